"""topology: which models a repository serves and how they connect, from a card, options and heads.

Pure functions: a small hand-made encoder card (embed_dim 8, an image and a text tower), no
files, no server."""

from __future__ import annotations

import dataclasses

import pytest
from tritonclient.grpc.model_config_pb2 import ModelInstanceGroup

from headmaster.errors import ConfigError
from headmaster.export.card import EncoderCard, TowerFile
from headmaster.repository import topology
from headmaster.repository.config import EnsembleModel, Step, Tensor, parse, render, to_proto
from headmaster.repository.repo import BuildOptions

KIND_CPU, KIND_GPU = ModelInstanceGroup.KIND_CPU, ModelInstanceGroup.KIND_GPU

D = 8
SIZE = 4
CONTEXT = 5
PREPROCESSING = {
    "size": [SIZE, SIZE],
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
    "mode": "RGB",
    "exif_transpose": True,
}
IMAGE = TowerFile("image.onnx", "onnx", "PIXELS", "UINT8", (3, SIZE, SIZE), "EMBEDDING")
TEXT = TowerFile("text.onnx", "onnx", "TOKENS", "INT64", (CONTEXT,), "EMBEDDING")
THREE = ["animals", "mood", "nsfw"]


def make_card(towers=None) -> EncoderCard:
    return EncoderCard(
        model="ViT-S-32",
        pretrained=None,
        weights_sha256="0" * 64,
        preprocessing=PREPROCESSING,
        embed_dim=D,
        context_length=CONTEXT,
        logit_scale=1.0,
        precision="fp32",
        format="onnx",
        towers={"image": IMAGE, "text": TEXT} if towers is None else towers,
        verification={},
        tools={},
        created="2026-01-01T00:00:00+00:00",
    )


@pytest.fixture
def card() -> EncoderCard:
    return make_card()


@pytest.fixture
def image_only() -> EncoderCard:
    return make_card({"image": IMAGE})


OPTIONS = BuildOptions(serve_text=True)  # every model an image+text card can serve


def by_name(models) -> dict:
    return {m.name: m for m in models}


def everything(card, options, heads, live_labels=3) -> dict:
    """Every model description of a repository with ``heads``, by name."""
    heads_models = [topology.head_model(card, options, h, 1, live_labels) for h in heads]
    return by_name(
        topology.static_models(card, options) + heads_models + topology.head_dependent_models(card, options, heads)
    )


# -- model_names: what loads, dependencies first ---------------------------------------------
STATIC = ["preprocess", "image_encoder", "tokenize", "text_encoder"]
DEPENDENT = ["threshold", "classify", "classify_embedding"]
EMBED = ["embed", "embed_text"]


@pytest.mark.parametrize("heads", [[], ["animals"], THREE], ids=["0 heads", "1 head", "3 heads"])
def test_model_names_order(card, heads):
    assert topology.model_names(card, OPTIONS, heads) == STATIC + heads + DEPENDENT + EMBED


def test_model_names_keep_the_order_heads_are_given_in(card):
    assert topology.model_names(card, OPTIONS, ["zebra", "apple"])[4:6] == ["zebra", "apple"]


def test_model_names_without_a_text_tower(image_only):
    assert topology.model_names(image_only, OPTIONS, ["animals"]) == [
        "preprocess",
        "image_encoder",
        "animals",
        "threshold",
        "classify",
        "classify_embedding",
        "embed",
    ]


def test_a_text_tower_is_left_unserved_by_default(card):
    lean = BuildOptions()  # `repo build` without --serve-text
    assert lean.serve_text is False
    assert topology.model_names(card, lean, ["animals"]) == [
        "preprocess",
        "image_encoder",
        "animals",
        "threshold",
        "classify",
        "classify_embedding",
        "embed",
    ]


@pytest.mark.parametrize("heads", [[], ["animals"], THREE], ids=["0 heads", "1 head", "3 heads"])
def test_every_step_model_loads_before_its_ensemble(card, heads):
    names = topology.model_names(card, OPTIONS, heads)
    assert len(names) == len(set(names))
    models = everything(card, OPTIONS, heads)
    assert set(names) == set(models)
    for model in models.values():
        if isinstance(model, EnsembleModel):
            for step in model.steps:
                assert names.index(step.model) < names.index(model.name), (step.model, model.name)


def test_static_and_head_dependent_models(card):
    assert [m.name for m in topology.static_models(card, OPTIONS)] == STATIC + EMBED
    dependent = topology.head_dependent_models(card, OPTIONS, THREE)
    assert tuple(m.name for m in dependent) == topology.HEAD_DEPENDENT == tuple(DEPENDENT)


# -- the threshold model ---------------------------------------------------------------------
@pytest.mark.parametrize("heads", [[], ["animals"], THREE], ids=["0 heads", "1 head", "3 heads"])
def test_threshold_inputs(card, heads):
    threshold = topology.head_dependent_models(card, OPTIONS, heads)[0]
    assert threshold.name == "threshold"
    assert threshold.heads == tuple(heads)
    assert threshold.encoder == card.fingerprint
    expected = [Tensor("EMBEDDING", "FP32", (D,), optional=False), Tensor("SHA256", "BYTES", (1,), optional=True)]
    for head in heads:
        expected += [
            Tensor(f"SCORES_{head}", "FP32", (-1,), optional=True),
            Tensor(f"INFO_{head}", "BYTES", (1,), optional=True),
        ]
    assert threshold.inputs == expected
    assert [t.name for t in threshold.outputs] == ["RESULT", "EMBEDDING_OUT"] + [f"SCORES_OUT_{h}" for h in heads]


def test_threshold_config_marks_head_inputs_optional(card):
    threshold = topology.head_dependent_models(card, OPTIONS, ["animals"])[0]
    config = parse(render(threshold, "portable"))
    assert {i.name: i.optional for i in config.input} == {
        "EMBEDDING": False,
        "SHA256": True,
        "SCORES_animals": True,
        "INFO_animals": True,
    }
    assert config.parameters["heads"].string_value == '["animals"]'
    assert config.parameters["encoder"].string_value == card.fingerprint


# -- the ensembles -----------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [[], ["animals"], THREE], ids=["0 heads", "1 head", "3 heads"])
def test_classify_steps(card, heads):
    classify = by_name(topology.head_dependent_models(card, OPTIONS, heads))["classify"]
    assert [s.model for s in classify.steps] == ["preprocess", "image_encoder", *heads, "threshold"]
    preprocess, encoder, *head_steps, threshold = classify.steps
    assert preprocess == Step("preprocess", {"IMAGE": "IMAGE"}, {"PIXELS": "PIXELS"})
    assert encoder == Step("image_encoder", {"PIXELS": "PIXELS"}, {"EMBEDDING": "IMAGE_EMBEDDING"})
    for head, step in zip(heads, head_steps):
        assert step.inputs == {"EMBEDDING": "IMAGE_EMBEDDING"}
        assert step.outputs == {"SCORES": f"HEAD_SCORES_{head}", "INFO": f"HEAD_INFO_{head}"}
    expected_inputs = {"EMBEDDING": "IMAGE_EMBEDDING"}
    expected_outputs = {"RESULT": "RESULT", "EMBEDDING_OUT": "EMBEDDING"}
    for head in heads:
        expected_inputs |= {f"SCORES_{head}": f"HEAD_SCORES_{head}", f"INFO_{head}": f"HEAD_INFO_{head}"}
        expected_outputs[f"SCORES_OUT_{head}"] = f"SCORES_{head}"
    assert threshold.inputs == expected_inputs
    assert threshold.outputs == expected_outputs
    assert [t.name for t in classify.inputs] == ["IMAGE"]
    assert [t.name for t in classify.outputs] == ["EMBEDDING", "RESULT", *(f"SCORES_{h}" for h in heads)]


@pytest.mark.parametrize("heads", [[], ["animals"], THREE], ids=["0 heads", "1 head", "3 heads"])
def test_classify_embedding_runs_the_heads_without_the_encoder(card, heads):
    ensemble = by_name(topology.head_dependent_models(card, OPTIONS, heads))["classify_embedding"]
    assert [s.model for s in ensemble.steps] == [*heads, "threshold"]
    # SHA256 (optional): the stored item's image hash, the key of an A/B test's arms.
    assert ensemble.inputs == (Tensor("EMBEDDING", "FP32", (D,)), Tensor("SHA256", "BYTES", (1,), optional=True))
    assert all(s.inputs["EMBEDDING"] == "EMBEDDING" for s in ensemble.steps)
    assert ensemble.steps[-1].inputs["SHA256"] == "SHA256"
    assert [t.name for t in ensemble.outputs] == ["RESULT", *(f"SCORES_{h}" for h in heads)]
    assert "EMBEDDING_OUT" not in ensemble.steps[-1].outputs


@pytest.mark.parametrize("heads", [[], ["animals"], THREE], ids=["0 heads", "1 head", "3 heads"])
def test_every_classify_output_is_made_by_threshold_and_read_by_no_step(card, heads):
    for ensemble in topology.head_dependent_models(card, OPTIONS, heads)[1:]:
        outputs = {t.name for t in ensemble.outputs}
        threshold = ensemble.steps[-1]
        assert threshold.model == "threshold"
        assert outputs == set(threshold.outputs.values()), ensemble.name
        for step in ensemble.steps[:-1]:
            assert not outputs & set(step.outputs.values()), (ensemble.name, step.model)
        read = {tensor for step in ensemble.steps for tensor in step.inputs.values()}
        assert not outputs & read, ensemble.name


def test_the_invariant_is_enforced_by_config(card):
    """The topology before the fix exposed EMBEDDING as an output while the heads read it."""
    steps = (
        Step("preprocess", {"IMAGE": "IMAGE"}, {"PIXELS": "PIXELS"}),
        Step("image_encoder", {"PIXELS": "PIXELS"}, {"EMBEDDING": "EMBEDDING"}),
        Step("animals", {"EMBEDDING": "EMBEDDING"}, {"SCORES": "S", "INFO": "I"}),
        Step("threshold", {"EMBEDDING": "EMBEDDING", "SCORES_animals": "S", "INFO_animals": "I"}, {"RESULT": "RESULT"}),
    )
    with pytest.raises(ConfigError, match=r"outputs \['EMBEDDING'\] are also read by a step"):
        EnsembleModel(
            "classify",
            (Tensor("IMAGE", "BYTES", (1,)),),
            (Tensor("EMBEDDING", "FP32", (D,)), Tensor("RESULT", "BYTES", (1,))),
            steps,
        )


@pytest.mark.parametrize("heads", [[], ["animals"], THREE], ids=["0 heads", "1 head", "3 heads"])
def test_step_maps_name_real_tensors_of_the_models_they_call(card, heads):
    """Each step's input_map keys are inputs of the model it calls, output_map keys its outputs."""
    models = everything(card, OPTIONS, heads)
    for ensemble in [m for m in models.values() if isinstance(m, EnsembleModel)]:
        for step in ensemble.steps:
            proto = to_proto(models[step.model], "portable")
            assert set(step.inputs) <= {t.name for t in proto.input}, (ensemble.name, step.model)
            assert set(step.outputs) <= {t.name for t in proto.output}, (ensemble.name, step.model)
            # required inputs of the model are all fed
            required = {t.name for t in proto.input if not t.optional}
            assert required <= set(step.inputs), (ensemble.name, step.model)


def test_embed_ensembles(card):
    embed, embed_text = topology.embed_ensembles(card, OPTIONS)
    assert [s.model for s in embed.steps] == ["preprocess", "image_encoder"]
    assert [s.model for s in embed_text.steps] == ["tokenize", "text_encoder"]
    assert embed.outputs == embed_text.outputs == (Tensor("EMBEDDING", "FP32", (D,)),)
    assert embed_text.steps[1].inputs == {"TOKENS": "TOKENS"}


def test_a_text_encoder_serves_its_text_tower_whatever_serve_text_says():
    text_card = dataclasses.replace(make_card({"text": TEXT}), preprocessing={}, fingerprint="")
    for options in (BuildOptions(), BuildOptions(serve_text=False), OPTIONS):
        names = topology.model_names(text_card, options, ["mood"])
        assert {"tokenize", "text_encoder", "embed_text", "classify"} <= set(names), names


@pytest.mark.parametrize(
    ("stored", "served"),
    [({}, True), ({"serve_text": True}, True), ({"serve_text": False}, False)],
    ids=["manifest from before serve_text", "built serving text", "built lean"],
)
def test_a_manifest_keeps_the_text_serving_it_was_built_with(card, stored, served):
    """Repositories built before the lean default wrote no serve_text and served text: reading
    their manifest after an upgrade must not drop embed_text from a running deployment."""
    manifest = {k: v for k, v in dataclasses.asdict(BuildOptions()).items() if k != "serve_text"} | stored
    options = BuildOptions.from_dict(manifest)
    assert options.serve_text is served
    assert ("embed_text" in topology.model_names(card, options, [])) is served


# -- no text tower -------------------------------------------------------------------------------
def test_a_card_without_a_text_tower_has_no_text_models(image_only):
    names = {m.name for m in topology.static_models(image_only, OPTIONS)}
    assert names == {"preprocess", "image_encoder", "embed"}
    assert [e.name for e in topology.embed_ensembles(image_only, OPTIONS)] == ["embed"]
    names = topology.model_names(image_only, OPTIONS, THREE)
    assert not {"tokenize", "text_encoder", "embed_text"} & set(names)


# -- models follow the card and the options ----------------------------------------------------
def test_encoder_model_follows_card_and_options(card):
    options = BuildOptions(
        max_batch_size=32, preferred_batch_sizes=(4, 8), max_queue_delay_us=500, encoder_instances=3, device="cpu"
    )
    image = topology.encoder_model(card, options, "image")
    assert image.input == Tensor("PIXELS", "UINT8", (3, SIZE, SIZE))
    assert image.output == Tensor("EMBEDDING", "FP32", (D,))
    assert (image.batching.max_batch_size, image.batching.preferred_batch_sizes, image.batching.max_queue_delay_us) == (
        32,
        (4, 8),
        500,
    )
    assert image.instances.count == 3
    assert image.fingerprint == card.fingerprint
    text = topology.encoder_model(card, options, "text")
    assert (text.name, text.input) == ("text_encoder", Tensor("TOKENS", "INT64", (CONTEXT,)))
    config = parse(render(image, "native"))
    assert config.platform == "onnxruntime_onnx"
    assert [(g.count, g.kind) for g in config.instance_group] == [(3, KIND_CPU)]  # device=cpu
    default = parse(render(topology.encoder_model(card, OPTIONS, "image"), "native"))
    assert [(g.count, g.kind) for g in default.instance_group] == [(1, KIND_GPU)]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]


def test_head_model_has_the_live_versions_label_count(card):
    head = topology.head_model(card, OPTIONS, "animals", live=4, labels=3)
    config = parse(render(head, "native"))
    assert list(config.version_policy.specific.versions) == [4]
    assert list(config.input[0].dims) == [D]
    assert {o.name: list(o.dims) for o in config.output} == {"SCORES": [3], "INFO": [1]}


def test_max_batch_size_reaches_every_model(card):
    options = BuildOptions(max_batch_size=16, preferred_batch_sizes=(8,))
    for model in everything(card, options, THREE).values():
        assert to_proto(model, "portable").max_batch_size == 16, model.name


# -- every description renders and parses back ---------------------------------------------------
@pytest.mark.parametrize("flavour", ["portable", "native"])
@pytest.mark.parametrize("with_text", [True, False], ids=["image+text", "image only"])
def test_every_description_renders_and_parses_back(flavour, with_text):
    card = make_card() if with_text else make_card({"image": IMAGE})
    models = everything(card, OPTIONS, THREE)
    assert set(models) == set(topology.model_names(card, OPTIONS, THREE))
    for name, model in models.items():
        text = render(model, flavour)
        config = parse(text)
        assert config == to_proto(model, flavour), name
        assert config.name == name
        if isinstance(model, EnsembleModel):
            assert config.platform == "ensemble"
            assert [s.model_name for s in config.ensemble_scheduling.step] == [s.model for s in model.steps]
        elif name in ("image_encoder", "text_encoder", *THREE) and flavour == "native":
            assert config.platform == "onnxruntime_onnx" and not config.backend, name
        else:
            assert config.backend == "python" and not config.platform, name


def test_a_plan_encoder_does_not_render_portable():
    plan = dataclasses.replace(IMAGE, format="plan", file="image.plan")
    card = make_card({"image": plan})
    image = topology.encoder_model(card, OPTIONS, "image")
    assert parse(render(image, "native")).platform == "tensorrt_plan"
    with pytest.raises(ConfigError, match="TensorRT plan needs Triton's tensorrt_plan backend"):
        render(image, "portable")


# -- a text encoder (st:FOLDER): no image tower, classify reads TEXT ----------------------------
def test_a_text_encoder_classifies_text_through_tokenize_and_its_text_tower():
    text_card = dataclasses.replace(make_card({"text": TEXT}), preprocessing={}, fingerprint="")
    models = everything(text_card, OPTIONS, THREE)
    assert not {"preprocess", "image_encoder", "embed"} & set(models)
    assert {"tokenize", "text_encoder", "embed_text", "classify", "classify_embedding"} <= set(models)
    classify = models["classify"]
    assert [t.name for t in classify.inputs] == ["TEXT"] and classify.inputs[0].dtype == "BYTES"
    assert [s.model for s in classify.steps] == ["tokenize", "text_encoder", *THREE, "threshold"]
    tokenize = to_proto(models["tokenize"], "portable")
    assert tokenize.parameters["refuse_empty"].string_value == "true"
    # the image encoders' tokenize (zero-shot prompts) keeps accepting empty prompts
    assert "refuse_empty" not in to_proto(everything(make_card(), OPTIONS, THREE)["tokenize"], "portable").parameters
    for model in models.values():
        parse(render(model, "portable"))
        parse(render(model, "native"))
    ab = topology.head_dependent_models(
        text_card, OPTIONS, THREE, ab={"mood": {"version": 2, "share": 0.5, "mode": "ab"}}
    )
    classify_ab = by_name(ab)["classify"]
    assert classify_ab.steps[-1].inputs["IMAGE"] == "TEXT"  # an A/B arm is picked by the text's sha256


def test_decode_texts_names_the_item_and_the_reason():
    from headmaster.served.tokenize import InvalidText, decode_texts

    assert decode_texts([b"caf\xc3\xa9", "plain"]) == ["caf\u00e9", "plain"]
    assert decode_texts([b""], allow_empty=True) == [""]
    for raw, message in (
        ([b"ok", b""], r"TEXT\[1\]: empty text"),
        ([b" \n"], r"TEXT\[0\]: empty text"),
        ([b"\xff"], r"TEXT\[0\]: not valid UTF-8 text \(byte 0"),
        ([b"x" * 11], r"TEXT\[0\]: 11 bytes is over the limit of 10 bytes"),
    ):
        with pytest.raises(InvalidText, match=message):
            decode_texts(raw, max_bytes=10)
