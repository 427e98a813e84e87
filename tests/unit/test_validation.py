"""check_version_dir: a head version folder that would serve wrong answers is refused in one line."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest

from headmaster.errors import FingerprintMismatchError, ForeignVersionError, InvalidVersionError, RepositoryError
from headmaster.export.heads import HeadCard, HeadWeights, head_onnx, write_head
from headmaster.repository.validation import check_version_dir

FINGERPRINT = "sha256:" + "a" * 64
DIM = 16


def card(labels=("cat", "dog", "bird"), multi_label=False, **changes) -> HeadCard:
    base = HeadCard(
        name="animal",
        version=3,
        labels=tuple(labels),
        thresholds=tuple(0.1 for _ in labels),
        multi_label=multi_label,
        encoder_fingerprint=FINGERPRINT,
        embed_dim=DIM,
        kind="linear",
    )
    return replace(base, **changes)


def weights(labels: int, multi_label=False, seed=0) -> HeadWeights:
    rng = np.random.default_rng(seed)
    return HeadWeights(
        ((rng.normal(size=(labels, DIM)).astype(np.float32), rng.normal(size=labels).astype(np.float32)),), multi_label
    )


def write(folder, head_card: HeadCard, head_weights: HeadWeights | None = None, onnx_card: HeadCard | None = None):
    """model.onnx made from ``onnx_card`` (default: the card) and head.json from ``head_card``."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx_card = onnx_card or head_card
    head_weights = head_weights or weights(len(onnx_card.labels), onnx_card.multi_label)
    onnx.save(head_onnx(head_weights, onnx_card), str(folder / "model.onnx"))
    head_card.save(folder)
    return folder


def refused(folder, match, **kwargs) -> InvalidVersionError:
    with pytest.raises(InvalidVersionError, match=match) as info:
        check_version_dir(folder, FINGERPRINT, DIM, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"head version {folder}: ")
    return info.value


@pytest.mark.parametrize("multi_label", [False, True])
def test_a_sound_version_passes_and_returns_its_card(tmp_path, multi_label):
    c = card(multi_label=multi_label)
    write_head(tmp_path / "3", weights(3, multi_label), c)
    assert check_version_dir(tmp_path / "3", FINGERPRINT, DIM, name="animal", version=3) == c


def test_three_scores_for_four_labels_is_refused(tmp_path):
    folder = write(tmp_path / "3", card(("cat", "dog", "bird", "fish")), onnx_card=card())
    refused(
        folder, r"model.onnx gives 3 scores per embedding, but head.json has 4 labels \['cat', 'dog', 'bird', 'fish'\]"
    )


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda f: (f / "model.onnx").write_bytes(b"\x08garbage, not a protobuf"),
            "model.onnx does not load in onnxruntime",
        ),
        (lambda f: (f / "model.onnx").unlink(), "model.onnx is missing"),
        (lambda f: (f / "head.json").unlink(), "head.json is missing"),
        (
            lambda f: (f / "head.json").write_text("{not json"),
            "head.json is not a valid head card: .* is not valid JSON",
        ),
        (
            lambda f: (f / "head.json").write_text('{"schema": 1, "name": "animal"}'),
            "head.json is not a valid head card",
        ),
        (
            lambda f: (f / "head.json").write_text('{"schema": 1, "name": "animal", "labels": 3}'),
            "head.json is not a valid head card",
        ),
        (lambda f: shutil.rmtree(f), "no such folder"),
    ],
)
def test_damaged_files_are_refused_in_one_line(tmp_path, damage, match):
    folder = write(tmp_path / "3", card())
    damage(folder)
    refused(folder, match)


def test_another_encoder_is_refused_as_a_fingerprint_mismatch(tmp_path):
    folder = write(tmp_path / "3", card(encoder_fingerprint="sha256:" + "e" * 64))
    error = refused(
        folder, "head animal v3 was made with encoder eeeeeeeeeeee, but this repository serves encoder aaaaaaaaaaaa"
    )
    assert isinstance(error, ForeignVersionError) and isinstance(error, FingerprintMismatchError)
    assert isinstance(error, RepositoryError)


def test_another_embedding_size_is_refused(tmp_path):
    folder = write(tmp_path / "3", card())
    with pytest.raises(InvalidVersionError, match=r"head\.json reads 16-d embeddings; the encoder gives 32-d"):
        check_version_dir(folder, FINGERPRINT, 32)


def test_the_folder_must_be_the_version_its_card_says(tmp_path):
    folder = write(tmp_path / "3", card())
    refused(folder, "head.json names head 'animal', not 'pets'", name="pets")
    refused(folder, "head.json says version 3, not 4", version=4)


def test_softmax_and_sigmoid_must_match_multi_label(tmp_path):
    sigmoid = write(tmp_path / "a", card(multi_label=False), weights(3, multi_label=True), card(multi_label=True))
    refused(sigmoid, r"scores each label with a sigmoid \(multi-label\), but head.json says single-label")
    softmax = write(tmp_path / "b", card(multi_label=True), weights(3, multi_label=False), card(multi_label=False))
    refused(softmax, r"scores with a softmax \(single-label\), but head.json says multi-label")


def test_info_must_be_what_the_card_says(tmp_path):
    folder = write(tmp_path / "3", card(thresholds=(0.9, 0.9, 0.9)), onnx_card=card())
    refused(folder, "model.onnx answers with INFO that disagrees with head.json on thresholds")
    renamed = write(tmp_path / "4", card(labels=("cat", "dog", "owl")), onnx_card=card())
    refused(renamed, "INFO that disagrees with head.json on labels")


def test_scores_must_be_finite(tmp_path):
    nan = HeadWeights(((np.full((3, DIM), np.nan, np.float32), np.zeros(3, np.float32)),), False)
    refused(write(tmp_path / "3", card(), nan), "scores that are not finite")


def test_a_portable_version_needs_its_runner(tmp_path):
    folder = write(tmp_path / "3", card())
    refused(folder, "model.py is missing", needs_runner=True)
    (folder / "model.py").write_text("# runner\n")
    assert check_version_dir(folder, FINGERPRINT, DIM, needs_runner=True).name == "animal"


def test_a_model_with_other_tensors_is_refused(tmp_path):
    from onnx import TensorProto, helper

    folder = write(tmp_path / "3", card())
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", DIM])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", DIM])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    refused(folder, r"model.onnx takes \['X'\] and gives \['Y'\]; a head takes EMBEDDING and gives SCORES and INFO")


def test_card_json_round_trip_is_what_is_checked(tmp_path):
    """head.json as written by HeadCard.save (tuples as lists) passes; the check reads the file."""
    folder = write(tmp_path / "3", card())
    doc = json.loads((folder / "head.json").read_text())
    assert doc["labels"] == ["cat", "dog", "bird"]
    assert check_version_dir(folder, FINGERPRINT, DIM).labels == ("cat", "dog", "bird")
