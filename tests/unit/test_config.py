"""Typed model descriptions -> config.pbtxt through Triton's model_config protobuf."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import json_format

from headmaster.errors import ConfigError
from headmaster.repository.config import (
    Batching,
    EncoderModel,
    EnsembleModel,
    HeadModel,
    Instances,
    PreprocessModel,
    Step,
    Tensor,
    ThresholdModel,
    TokenizeModel,
    parse,
    render,
    to_proto,
)

PREPROCESSING = {
    "size": [224, 224],
    "resize_mode": "shortest",
    "interpolation": "bicubic",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}
IMAGE = EncoderModel(
    "image_encoder", "onnx", Tensor("PIXELS", "UINT8", (3, 224, 224)), Tensor("EMBEDDING", "FP32", (512,))
)
ENSEMBLE = EnsembleModel(
    "classify",
    (Tensor("IMAGE", "BYTES", (1,)),),
    (Tensor("EMBEDDING", "FP32", (512,)),),
    (
        Step("preprocess", {"IMAGE": "IMAGE"}, {"PIXELS": "PIXELS"}),
        Step("image_encoder", {"PIXELS": "PIXELS"}, {"EMBEDDING": "EMBEDDING"}),
    ),
)
ALL_KINDS = [
    PreprocessModel(PREPROCESSING),
    IMAGE,
    EncoderModel(
        "image_encoder",
        "torchscript",
        Tensor("PIXELS__0", "UINT8", (3, 224, 224)),
        Tensor("EMBEDDING__0", "FP32", (512,)),
    ),
    TokenizeModel("ViT-B-32", 77),
    HeadModel("animal", 512, 3),
    ThresholdModel(("animal", "has_cat"), 512),
    ENSEMBLE,
]


@pytest.mark.parametrize("flavour", ["portable", "native"])
@pytest.mark.parametrize("model", ALL_KINDS, ids=lambda m: f"{type(m).__name__}-{getattr(m, 'format', '')}")
def test_every_kind_renders_and_parses_back(model, flavour):
    text = render(model, flavour)
    parsed = parse(text)
    assert parsed == to_proto(model, flavour)
    assert parsed.name == model.name


def test_native_flavour_uses_the_container_platforms():
    assert parse(render(IMAGE, "native")).platform == "onnxruntime_onnx"
    assert parse(render(HeadModel("animal", 512, 2), "native")).platform == "onnxruntime_onnx"
    plan = EncoderModel("image_encoder", "plan", IMAGE.input, IMAGE.output)
    assert parse(render(plan, "native")).platform == "tensorrt_plan"
    ts = EncoderModel("image_encoder", "torchscript", IMAGE.input, IMAGE.output)
    assert parse(render(ts, "native")).platform == "pytorch_libtorch"
    assert (
        parse(render(IMAGE, "native")).instance_group[0].kind
        == parse("instance_group {kind: KIND_GPU}").instance_group[0].kind
    )


def test_portable_flavour_runs_the_same_artifact_through_the_python_backend():
    config = parse(render(IMAGE, "portable"))
    assert config.backend == "python" and not config.platform
    assert config.parameters["artifact"].string_value == "model.onnx"


def test_encoder_batching_is_rendered():
    model = EncoderModel("image_encoder", "onnx", IMAGE.input, IMAGE.output, Batching(32, (8, 16), 1500))
    config = parse(render(model, "native"))
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1500


def test_head_serves_only_its_live_version():
    config = parse(render(HeadModel("animal", 512, 7), "portable"))
    assert list(config.version_policy.specific.versions) == [7]


def test_threshold_head_inputs_are_optional():
    config = parse(render(ThresholdModel(("animal",), 512), "portable"))
    optional = {t.name: t.optional for t in config.input}
    assert optional == {"EMBEDDING": False, "SHA256": True, "SCORES_animal": True, "INFO_animal": True}


def test_plan_cannot_be_portable():
    plan = EncoderModel("image_encoder", "plan", IMAGE.input, IMAGE.output)
    with pytest.raises(ConfigError, match="TensorRT plan needs Triton's tensorrt_plan backend"):
        render(plan, "portable")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Tensor("X", "FLOAT", (1,)), "dtype must be one of"),
        (lambda: Tensor("X", "FP32", ()), "dims must be positive or -1"),
        (lambda: Tensor("X", "FP32", (0,)), "dims must be positive or -1"),
        (lambda: Batching(8, (16,)), r"preferred_batch_sizes \[16\] are not within 1..max_batch_size=8"),
        (lambda: Batching(0), "max_batch_size must be >= 1"),
        (lambda: Instances(0), "instance count must be >= 1"),
        (lambda: HeadModel("animal", 512, 0), "live_version must be >= 1"),
        (lambda: EncoderModel("image_encoder", "savedmodel", IMAGE.input, IMAGE.output), "format must be one of"),
        (
            lambda: EnsembleModel(
                "e", (Tensor("A", "FP32", (1,)),), (Tensor("C", "FP32", (1,)),), (Step("m", {"x": "B"}, {"y": "C"}),)
            ),
            r"reads \['B'\], which no earlier step produces",
        ),
        (
            lambda: EnsembleModel(
                "e", (Tensor("A", "FP32", (1,)),), (Tensor("Z", "FP32", (1,)),), (Step("m", {"x": "A"}, {"y": "C"}),)
            ),
            r"outputs \['Z'\] are produced by no step",
        ),
        (lambda: render(IMAGE, "docker"), "flavour must be one of portable, native"),
    ],
)
def test_invalid_descriptions_are_refused_with_the_field_named(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_the_protobuf_rejects_what_the_dataclasses_cannot_see():
    class Misspelt:
        name = "typo"

        def config(self, flavour):
            return {"name": "typo", "max_batch_sze": 8}

    with pytest.raises(ConfigError, match="not a valid Triton ModelConfig"):
        render(Misspelt(), "portable")


def test_parse_reports_broken_text():
    with pytest.raises(ConfigError, match=r"not a valid config\.pbtxt"):
        parse("name: 'x'\nmax_batch_size: eight\n")


def test_rendered_json_form_round_trips():
    message = to_proto(ENSEMBLE, "portable")
    again = json_format.ParseDict(json_format.MessageToDict(message), type(message)())
    assert again == message


def test_an_ensemble_output_that_feeds_a_step_is_refused_when_rendered():
    with pytest.raises(ConfigError, match="also read by a step"):
        EnsembleModel(
            "bad",
            (Tensor("IMAGE", "BYTES", (1,)),),
            (Tensor("EMBEDDING", "FP32", (4,)),),
            (
                Step("enc", {"IMAGE": "IMAGE"}, {"E": "EMBEDDING"}),
                Step("head", {"EMBEDDING": "EMBEDDING"}, {"S": "SCORES"}),
            ),
        )


def test_errors_name_the_parameter_and_the_cli_its_flag():
    from headmaster.cli.common import flag
    from headmaster.errors import HeadmasterError, TrainingError
    from headmaster.training.heads.thresholds import choose_thresholds

    with pytest.raises(TrainingError) as caught:
        choose_thresholds(np.zeros((2, 2)), np.eye(2), ("a", "b"), "bogus")
    assert caught.value.option == "thresholds" and isinstance(caught.value, HeadmasterError)
    assert flag("thresholds") == "--thresholds" and flag("target_precision") == "--target-precision"
    assert flag("kind") == "--model"  # TrainConfig.kind is train-head's --model
