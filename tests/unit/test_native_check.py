"""native_check: configs against real ONNX / TorchScript files, as Triton's backends compare them.

The ONNX files are built here with onnx.helper (tiny encoders) or by export.heads (real
heads); the expected messages follow onnxruntime_backend r24.10's checks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from headmaster.errors import RepositoryError
from headmaster.export.card import CARD_FILE, EncoderCard, TowerFile
from headmaster.export.heads import HeadCard, HeadWeights, write_head
from headmaster.lifecycle import operations as lifecycle
from headmaster.repository.build import build_repository
from headmaster.repository.config import EncoderModel, HeadModel, Tensor, parse, render, to_proto
from headmaster.repository.consistency import check
from headmaster.repository.native_check import check_repository, onnx_problems, torchscript_problems
from headmaster.repository.repo import BuildOptions, Repository

D = 8  # embedding size of the tiny encoders
SIZE = 4  # image side of the tiny image encoder
CONTEXT = 5  # tokens of the tiny text encoder


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_image_encoder(path: Path, input_dtype=TensorProto.UINT8, input_name="PIXELS", batch="batch") -> Path:
    """PIXELS uint8 [batch, 3, SIZE, SIZE] -> EMBEDDING float [batch, D]."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3 * SIZE * SIZE, D)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", [input_name], ["x"], to=TensorProto.FLOAT),
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["EMBEDDING"]),
        ],
        "image",
        [helper.make_tensor_value_info(input_name, input_dtype, [batch, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("EMBEDDING", TensorProto.FLOAT, [batch, D])],
        [w],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def tiny_text_encoder(path: Path) -> Path:
    """TOKENS int64 [batch, CONTEXT] -> EMBEDDING float [batch, D]."""
    w = numpy_helper.from_array(np.ones((CONTEXT, D), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["TOKENS"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "w"], ["EMBEDDING"]),
        ],
        "text",
        [helper.make_tensor_value_info("TOKENS", TensorProto.INT64, ["batch", CONTEXT])],
        [helper.make_tensor_value_info("EMBEDDING", TensorProto.FLOAT, ["batch", D])],
        [w],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def image_config(**changes):
    spec = {
        "name": "image_encoder",
        "format": "onnx",
        "input": Tensor("PIXELS", "UINT8", (3, SIZE, SIZE)),
        "output": Tensor("EMBEDDING", "FP32", (D,)),
        **changes,
    }
    return parse(render(EncoderModel(**spec), "native"))


def head_card(version: int, labels: tuple[str, ...], fingerprint: str = "sha256:" + "a" * 64) -> HeadCard:
    return HeadCard(
        name="animals",
        version=version,
        labels=labels,
        thresholds=(0.0,) * len(labels),
        multi_label=False,
        encoder_fingerprint=fingerprint,
        embed_dim=D,
        kind="linear",
    )


def head_weights(labels: int, seed: int = 0) -> HeadWeights:
    rng = np.random.default_rng(seed)
    return HeadWeights(((rng.normal(size=(labels, D)).astype(np.float32), np.zeros(labels, np.float32)),), False)


def head_file(folder: Path, labels: tuple[str, ...]) -> Path:
    write_head(folder, head_weights(len(labels)), head_card(1, labels))
    return folder / "model.onnx"


# -- one config, one ONNX file ----------------------------------------------------------
def test_matching_encoder_config_passes(tmp_path):
    assert onnx_problems(image_config(), tiny_image_encoder(tmp_path / "model.onnx")) == []


def test_a_head_config_with_the_label_count_passes(tmp_path):
    path = head_file(tmp_path / "1", ("cat", "dog", "bird"))
    assert onnx_problems(to_proto(HeadModel("animals", D, 1, num_labels=3), "native"), path) == []


def test_a_head_config_without_the_label_count_is_what_the_backend_refused(tmp_path):
    path = head_file(tmp_path / "1", ("cat", "dog"))
    config = to_proto(HeadModel("animals", D, 1), "native")  # SCORES dims [-1]
    assert onnx_problems(config, path) == [
        "output 'SCORES': config shape [-1,-1] (batch dim + config dims) but the model has [-1,2]"
    ]


def test_a_wrong_dim(tmp_path):
    path = tiny_image_encoder(tmp_path / "model.onnx")
    assert onnx_problems(image_config(output=Tensor("EMBEDDING", "FP32", (D + 1,))), path) == [
        f"output 'EMBEDDING': config shape [-1,{D + 1}] (batch dim + config dims) but the model has [-1,{D}]"
    ]
    assert onnx_problems(image_config(input=Tensor("PIXELS", "UINT8", (3, SIZE, SIZE + 1))), path) == [
        f"input 'PIXELS': config shape [-1,3,{SIZE},{SIZE + 1}] (batch dim + config dims) but the model has "
        f"[-1,3,{SIZE},{SIZE}]"
    ]


def test_an_input_may_name_a_fixed_size_where_the_model_is_dynamic_an_output_may_not(tmp_path):
    head = head_file(tmp_path / "1", ("cat", "dog"))
    # The backend compares inputs only where the model's dim is fixed; outputs exactly.
    assert onnx_problems(to_proto(HeadModel("animals", D, 1, num_labels=2), "native"), head) == []
    config = to_proto(HeadModel("animals", D, 1, num_labels=2), "native")
    config.input[0].dims[:] = [-1]
    assert onnx_problems(config, head) == [
        f"input 'EMBEDDING': config shape [-1,-1] (batch dim + config dims) but the model has [-1,{D}]"
    ]


def test_a_wrong_dtype(tmp_path):
    path = tiny_image_encoder(tmp_path / "model.onnx")
    assert onnx_problems(image_config(input=Tensor("PIXELS", "FP32", (3, SIZE, SIZE))), path) == [
        "input 'PIXELS': config data type TYPE_FP32 but model.onnx has TYPE_UINT8"
    ]
    path = tiny_image_encoder(tmp_path / "fp16" / "model.onnx", input_dtype=TensorProto.FLOAT16)
    assert onnx_problems(image_config(), path) == [
        "input 'PIXELS': config data type TYPE_UINT8 but model.onnx has TYPE_FP16"
    ]


def test_a_wrong_name(tmp_path):
    path = tiny_image_encoder(tmp_path / "model.onnx", input_name="pixel_values")
    assert onnx_problems(image_config(), path) == ["input 'PIXELS' is not in model.onnx, whose inputs are pixel_values"]
    path = tiny_image_encoder(tmp_path / "ok" / "model.onnx")
    assert onnx_problems(image_config(output=Tensor("EMBEDDINGS", "FP32", (D,))), path) == [
        "output 'EMBEDDINGS' is not in model.onnx, whose outputs are EMBEDDING"
    ]


def test_batching_needs_a_dynamic_first_dim(tmp_path):
    path = tiny_image_encoder(tmp_path / "model.onnx", batch=1)
    assert onnx_problems(image_config(), path) == [
        f"input 'PIXELS': max_batch_size > 0 needs the model's first dim dynamic (-1), but the model has "
        f"[1,3,{SIZE},{SIZE}]",
        f"output 'EMBEDDING': max_batch_size > 0 needs the model's first dim dynamic (-1), but the model has [1,{D}]",
    ]


def test_input_count_is_compared(tmp_path):
    path = tiny_image_encoder(tmp_path / "model.onnx")
    config = image_config()
    config.input.add(name="EXTRA", data_type=config.input[0].data_type, dims=[1])
    assert onnx_problems(config, path) == [
        "config expects 2 inputs, model.onnx provides 1 (PIXELS)",
        "input 'EXTRA' is not in model.onnx, whose inputs are PIXELS",
    ]


def test_an_unreadable_file_is_one_problem(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    [problem] = onnx_problems(image_config(), tmp_path / "model.onnx")
    assert problem.startswith("model.onnx is not a readable ONNX file: ")


# -- TorchScript ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory) -> Path:
    import torch

    class Tower(torch.nn.Module):  # traced, as export/encoder.py does
        def forward(self, pixels):
            return pixels.float().flatten(1)[:, :D]

    path = tmp_path_factory.mktemp("ts") / "model.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated, and still what the backend loads
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(Tower(), (torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8),)).save(str(path))
    return path


def ts_config(**changes):
    spec = {
        "name": "image_encoder",
        "format": "torchscript",
        "input": Tensor("PIXELS__0", "UINT8", (3, SIZE, SIZE)),
        "output": Tensor("EMBEDDING__0", "FP32", (D,)),
        **changes,
    }
    return parse(render(EncoderModel(**spec), "native"))


def test_torchscript_named_index_passes(torchscript_file):
    assert ts_config().platform == "pytorch_libtorch"
    assert torchscript_problems(ts_config(), torchscript_file) == []
    # the forward argument's own name is the other convention the backend accepts
    assert torchscript_problems(ts_config(input=Tensor("pixels", "UINT8", (3, SIZE, SIZE))), torchscript_file) == []


def test_torchscript_output_index_beyond_what_forward_returns(torchscript_file):
    assert torchscript_problems(ts_config(output=Tensor("EMBEDDING__1", "FP32", (D,))), torchscript_file) == [
        "outputs EMBEDDING__1: NAME__N indices must be distinct and below the 1 tensor(s) forward returns"
    ]


def test_torchscript_argument_count(torchscript_file):
    config = ts_config()
    config.input.add(name="TOKENS__1", data_type=config.input[0].data_type, dims=[1])
    assert torchscript_problems(config, torchscript_file) == [
        "config expects 2 inputs, forward in model.pt takes 1 (pixels)",
        "inputs PIXELS__0, TOKENS__1: NAME__N indices must be distinct and below forward's 1 arguments (pixels)",
    ]


# -- a whole repository --------------------------------------------------------------------
@pytest.fixture
def tiny_encoder(tmp_path) -> Path:
    folder = tmp_path / "encoder"
    tiny_image_encoder(folder / "image.onnx")
    tiny_text_encoder(folder / "text.onnx")
    card = EncoderCard(
        model="ViT-S-32",
        pretrained=None,
        weights_sha256="0" * 64,
        preprocessing={
            "size": [SIZE, SIZE],
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "fill_color": 0,
            "mode": "RGB",
            "exif_transpose": True,
        },
        embed_dim=D,
        context_length=CONTEXT,
        logit_scale=1.0,
        precision="fp32",
        format="onnx",
        towers={
            "image": TowerFile("image.onnx", "onnx", "PIXELS", "UINT8", (3, SIZE, SIZE), "EMBEDDING"),
            "text": TowerFile("text.onnx", "onnx", "TOKENS", "INT64", (CONTEXT,), "EMBEDDING"),
        },
        verification={},
        tools={},
        created="2026-01-01T00:00:00+00:00",
    )
    (folder / CARD_FILE).write_text(card.to_json())
    return folder


def publish(repo: Path, labels: tuple[str, ...], seed: int = 0) -> HeadCard:
    fingerprint = Repository(repo).fingerprint
    return lifecycle.publish(
        repo, lifecycle.HeadDraft(head_weights(len(labels), seed), head_card(1, labels, fingerprint))
    ).card


def test_a_correct_native_repository_passes(tiny_encoder, tmp_path):
    repo = tmp_path / "repo"
    build_repository(tiny_encoder, repo, BuildOptions(flavour="native", device="cpu", serve_text=True))
    publish(repo, ("cat", "dog"))
    assert check_repository(repo) == []
    check(repo)


def test_a_head_whose_label_count_changes_per_version(tiny_encoder, tmp_path):
    repo = tmp_path / "repo"
    build_repository(tiny_encoder, repo, BuildOptions(flavour="native", device="cpu", serve_text=True))
    publish(repo, ("cat", "dog"))
    publish(repo, ("cat", "dog", "bird"), seed=1)
    config_path = repo / "animals" / "config.pbtxt"
    assert list(parse(config_path.read_text()).output[0].dims) == [3]  # re-rendered for v2
    assert check_repository(repo) == []
    # A config switched to v1 without re-rendering (what a hand edit, or the old renderer
    # with SCORES [-1], left): the one problem names the version and both shapes.
    config_path.write_text(config_path.read_text().replace("versions: 2", "versions: 1"))
    assert check_repository(repo) == [
        "animals v1: output 'SCORES': config shape [-1,3] (batch dim + config dims) but the model has [-1,2]"
    ]
    with pytest.raises(RepositoryError, match=r"animals v1: output 'SCORES': config shape \[-1,3\]"):
        check(repo)
    # Serving v1 the supported way re-renders the config for its two labels.
    Repository(repo).set_live("animals", 1)
    assert list(parse(config_path.read_text()).output[0].dims) == [2]
    assert check_repository(repo) == []
    lifecycle.rollback(repo, "animals", to=2)
    assert check_repository(repo) == []


def test_portable_configs_declare_the_same_shapes(tiny_encoder, tmp_path):
    repo = tmp_path / "repo"
    build_repository(tiny_encoder, repo, BuildOptions(flavour="portable", serve_text=True))
    publish(repo, ("cat", "dog", "bird"))
    assert list(parse((repo / "animals" / "config.pbtxt").read_text()).output[0].dims) == [3]
    assert check_repository(repo) == []


def test_a_broken_repository_lists_every_problem(tiny_encoder, tmp_path):
    repo = tmp_path / "repo"
    build_repository(tiny_encoder, repo, BuildOptions(flavour="native", device="cpu", serve_text=True))
    publish(repo, ("cat", "dog"))
    tiny_image_encoder(repo / "image_encoder" / "1" / "model.onnx.new", input_dtype=TensorProto.FLOAT)
    (repo / "image_encoder" / "1" / "model.onnx").unlink()
    (repo / "image_encoder" / "1" / "model.onnx.new").rename(repo / "image_encoder" / "1" / "model.onnx")
    (repo / "threshold" / "1" / "model.py").unlink()
    classify = repo / "classify" / "config.pbtxt"
    classify.write_text(classify.read_text().replace('key: "SCORES"', 'key: "SCORE"'))
    assert check_repository(repo) == [
        "image_encoder v1: input 'PIXELS': config data type TYPE_UINT8 but model.onnx has TYPE_FP32",
        "threshold v1: model.py is missing (python backend)",
        "classify: step animals: outputs SCORE are not in its config",
    ]
    assert json.loads((repo / "headmaster.json").read_text())["build"]["flavour"] == "native"
