"""`headmaster export encoder`: real open_clip exports, checked against PyTorch."""

from __future__ import annotations

import importlib.util
import json

import pytest

from headmaster.errors import CardError, ExportError, UnsupportedHereError
from headmaster.export import encoder as encoder_module
from headmaster.export.card import EncoderCard, fingerprint_of
from headmaster.export.encoder import ExportOptions, export_encoder
from headmaster.export.encoders import load
from tests.helpers import MODEL, SEED, TINY_MODEL, run_cli

# The card and the fingerprint on both session encoders: the tiny one in the fast tier, ViT-S-32's
# (whose export costs about 15 s of CPU, shared with the server tier) in `make test`.
ENCODERS = pytest.mark.parametrize(
    "fixture, model",
    [("tiny_encoder_dir", TINY_MODEL), pytest.param("encoder_dir", MODEL, marks=pytest.mark.slow)],
    ids=["tiny", "vit-s-32"],
)


@ENCODERS
@pytest.mark.disk  # the fixture is asked for by name: conftest's tiering cannot see it
def test_card_records_the_fingerprint_and_everything_it_is_made_of(request, fixture, model):
    encoder_dir = request.getfixturevalue(fixture)
    card = EncoderCard.load(encoder_dir)
    assert (card.model, card.pretrained, card.seed, card.precision, card.format) == (model, None, SEED, "fp32", "onnx")
    assert card.embed_dim == 384 and card.context_length == 77
    assert card.preprocessing == {
        "size": [224, 224],
        "resize_mode": "shortest",
        "interpolation": "bicubic",
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "fill_color": 0,
        "mode": "RGB",
        "exif_transpose": True,
    }
    assert card.fingerprint == fingerprint_of(model, card.weights_sha256, card.preprocessing, 384)
    assert card.towers["image"].input_dtype == "UINT8" and card.towers["image"].input_dims == (3, 224, 224)
    assert card.towers["text"].input_dtype == "INT64" and card.towers["text"].input_dims == (77,)
    for tower in ("image", "text"):
        assert (encoder_dir / card.towers[tower].file).is_file()
        assert card.verification[tower]["min_cosine"] >= 0.9999
        assert card.verification[tower]["inputs"] >= 6
    assert {"torch", "open_clip_torch", "onnx", "onnxruntime"} <= set(card.tools)


@ENCODERS
@pytest.mark.disk
def test_same_weights_same_fingerprint_other_weights_other_fingerprint(request, fixture, model):
    card = EncoderCard.load(request.getfixturevalue(fixture))
    assert load(model, None, seed=SEED).weights_sha256 == card.weights_sha256
    assert load(model, None, seed=SEED + 1).weights_sha256 != card.weights_sha256


def test_a_hand_edited_card_is_refused(tiny_encoder_dir, tmp_path):
    doc = json.loads((tiny_encoder_dir / "card.json").read_text())
    doc["preprocessing"]["interpolation"] = "bilinear"
    (tmp_path / "card.json").write_text(json.dumps(doc))
    with pytest.raises(CardError, match="does not match its own fields"):
        EncoderCard.load(tmp_path)


@pytest.mark.slow  # two full ViT-S-32 exports and their checks: 6-8 s of CPU each, 19-31 s on 2 busy cores (2026-12-07)
@pytest.mark.parametrize("fmt, precision, minimum", [("onnx", "fp16", 0.999), ("torchscript", "fp32", 0.9999)])
def test_other_formats_and_precisions_pass_their_check(tmp_path, encoder_dir, fmt, precision, minimum):
    card = export_encoder(
        ExportOptions(
            model=MODEL,
            pretrained=None,
            out=tmp_path / "enc",
            seed=SEED,
            format=fmt,
            precision=precision,
            towers=("image",),
        )
    )
    assert card.verification["image"]["min_cosine"] >= minimum
    assert card.verification["image"]["required"] == minimum
    assert (tmp_path / "enc" / card.towers["image"].file).is_file()
    # Same weights and preprocessing: heads made on the fp32 ONNX export stay valid.
    assert card.fingerprint == EncoderCard.load(encoder_dir).fingerprint


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_plan_says_clearly_that_tensorrt_is_missing(tmp_path):
    with pytest.raises(UnsupportedHereError, match="needs the `tensorrt` Python package and an NVIDIA GPU"):
        export_encoder(ExportOptions(model=MODEL, pretrained=None, out=tmp_path / "enc", format="plan"))
    assert not (tmp_path / "enc").exists()


@pytest.mark.slow  # a full export before its check fails: 40 s on 2 busy cores (2026-12-07)
def test_an_export_that_fails_its_check_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(encoder_module.MIN_COSINE, "fp32", 1.01)  # no export can reach this
    with pytest.raises(ExportError, match=r"does not match PyTorch: cosine .* < 1.01 .* nothing was written"):
        export_encoder(ExportOptions(model=MODEL, pretrained=None, out=tmp_path / "enc", towers=("image",)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "model, pretrained, message",
    [
        ("ViT-Q-99", None, "unknown open_clip model 'ViT-Q-99'"),
        (MODEL, "no_such_tag", "has no pretrained weights tagged 'no_such_tag'"),
    ],
)
def test_unknown_models_and_tags_are_refused(tmp_path, model, pretrained, message):
    with pytest.raises(ExportError, match=message):
        export_encoder(ExportOptions(model=model, pretrained=pretrained, out=tmp_path / "enc"))


def test_refuses_to_overwrite_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "thesis.tex").write_text("precious")
    with pytest.raises(ExportError, match="is not an encoder export"):
        export_encoder(ExportOptions(model=MODEL, pretrained=None, out=tmp_path / "enc", towers=("image",)))
    assert (tmp_path / "enc" / "thesis.tex").read_text() == "precious"


def test_cli_reports_errors_in_one_line_without_traceback(cli, tmp_path):
    # In this process: open_clip's registry is already imported (test_the_cli_names_the_flag_to_change
    # below runs the same command in a subprocess).
    result = cli("export", "encoder", "--model", "ViT-Q-99", "--out", tmp_path / "enc")
    assert result.returncode == 1
    assert "error: unknown open_clip model 'ViT-Q-99'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_cli_names_the_flag_to_change(tmp_path):
    """The library names the parameter at fault; the command line turns it into its flag."""
    result = run_cli("export", "encoder", "--format", "tflite", "--out", tmp_path / "enc")
    assert result.returncode == 1
    assert "error: format must be one of onnx, plan, torchscript, not 'tflite' (change --format)" in result.stderr
    assert "Traceback" not in result.stderr
