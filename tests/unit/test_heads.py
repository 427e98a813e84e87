"""Head ONNX models match their numpy reference; thresholds apply as documented."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from headmaster.errors import ExportError, InvalidNameError
from headmaster.export.heads import HeadCard, HeadWeights, check_head_name, head_onnx, write_head
from headmaster.rules.threshold import accept, head_results

FP = "sha256:" + "0" * 64
rng = np.random.default_rng(7)


def card(labels=("a", "b", "c"), thresholds=None, multi_label=False, version=3, dim=16, name="topic") -> HeadCard:
    return HeadCard(
        name=name,
        version=version,
        labels=tuple(labels),
        thresholds=tuple(thresholds or [0.0] * len(labels)),
        multi_label=multi_label,
        encoder_fingerprint=FP,
        embed_dim=dim,
        kind="linear",
    )


def linear(dim=16, labels=3, multi_label=False) -> HeadWeights:
    return HeadWeights(
        ((rng.normal(size=(labels, dim)).astype(np.float32), rng.normal(size=labels).astype(np.float32)),), multi_label
    )


def mlp(dim=16, hidden=8, labels=3, multi_label=False) -> HeadWeights:
    return HeadWeights(
        (
            (rng.normal(size=(hidden, dim)).astype(np.float32), rng.normal(size=hidden).astype(np.float32)),
            (rng.normal(size=(labels, hidden)).astype(np.float32), rng.normal(size=labels).astype(np.float32)),
        ),
        multi_label,
    )


@pytest.mark.parametrize(
    "weights",
    [linear(), mlp(), linear(multi_label=True), mlp(multi_label=True)],
    ids=["linear-softmax", "mlp-softmax", "linear-sigmoid", "mlp-sigmoid"],
)
def test_onnx_head_matches_numpy_reference(tmp_path, weights):
    head = card(multi_label=weights.multi_label)
    write_head(tmp_path, weights, head)  # checks itself; here we check independently too
    x = rng.normal(size=(5, 16)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    scores, info = session.run(None, {"EMBEDDING": x})
    np.testing.assert_allclose(scores, weights.scores(x), atol=1e-5)
    if not weights.multi_label:
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    assert info.shape == (5, 1)
    assert json.loads(info[0, 0]) == {
        "head": "topic",
        "version": 3,
        "labels": ["a", "b", "c"],
        "thresholds": [0.0, 0.0, 0.0],
        "multi_label": weights.multi_label,
    }
    assert HeadCard.load(tmp_path) == head


def test_head_weights_must_fit_the_card():
    with pytest.raises(ExportError, match=r"weights map 16 -> 3, but the card says 16 -> 2 labels"):
        head_onnx(linear(), card(labels=("a", "b")))


def test_layers_must_chain():
    with pytest.raises(ExportError, match="layer 1 takes 5 inputs, layer 0 gives 8"):
        HeadWeights(((np.zeros((8, 16)), np.zeros(8)), (np.zeros((3, 5)), np.zeros(3))), False)


@pytest.mark.parametrize(
    "name, message",
    [
        ("Cats", "is not allowed"),
        ("1cat", "is not allowed"),
        ("cat-dog", "is not allowed"),
        ("classify", "reserved"),
        ("threshold", "reserved"),
    ],
)
def test_head_names_are_checked(name, message):
    with pytest.raises(InvalidNameError, match=message):
        check_head_name(name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": ("a", "a")}, "labels must be distinct"),
        ({"labels": ("only",)}, "single-label head needs two labels"),
        ({"thresholds": (0.5,)}, "1 thresholds for 3 labels"),
        ({"thresholds": (0.5, 1.5, 0.0)}, r"thresholds must lie in \[0, 1\]"),
        ({"version": 0}, "versions start at 1"),
    ],
)
def test_head_cards_are_validated(kwargs, message):
    with pytest.raises(ExportError, match=message):
        card(**kwargs)


INFO = {"labels": ["cat", "no cat"], "thresholds": [0.7, 0.0], "multi_label": False, "version": 2}


def test_binary_head_falls_to_the_negative_label_below_the_threshold():
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], np.float32)
    assert accept(scores, INFO) == [["cat"], ["no cat"], ["no cat"]]


def test_single_label_accepts_at_most_the_best_label_that_passes():
    info = {"labels": ["a", "b", "c"], "thresholds": [0.5, 0.5, 0.5], "multi_label": False}
    scores = np.array([[0.2, 0.7, 0.1], [0.4, 0.3, 0.3], [0.5, 0.25, 0.25]], np.float32)
    assert accept(scores, info) == [["b"], [], ["a"]]  # a threshold is reached at equality


def test_multi_label_accepts_every_label_that_passes():
    info = {"labels": ["indoor", "people", "text"], "thresholds": [0.5, 0.3, 0.9], "multi_label": True}
    scores = np.array([[0.6, 0.31, 0.95], [0.1, 0.2, 0.3]], np.float32)
    assert accept(scores, info) == [["indoor", "people", "text"], []]


def test_head_results_carry_version_labels_and_all_scores():
    (result,) = head_results(np.array([[0.75, 0.25]], np.float32), INFO)
    assert result == {"version": 2, "labels": ["cat"], "scores": {"cat": 0.75, "no cat": 0.25}}


def test_scores_that_do_not_fit_the_labels_are_refused():
    with pytest.raises(ValueError, match=r"do not match 2 labels"):
        accept(np.zeros((1, 3), np.float32), INFO)
