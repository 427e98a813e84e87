"""training.heads.checks (weights, count checks, near duplicates, grouped split) and
training.heads.thresholds (per-label thresholds), on constructed inputs with expected values
computed here."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve
from sklearn.utils.class_weight import compute_class_weight

from headmaster.errors import DataError, TrainingError
from headmaster.training.heads.checks import (
    FEW_IMAGES,
    check_counts,
    class_weights,
    components,
    near_duplicate_pairs,
    split,
)
from headmaster.training.heads.thresholds import choose_thresholds


# -- class_weights --------------------------------------------------------------------------------
def test_single_label_weights_are_sklearns_balanced():
    counts = {"cat": 30, "dog": 10, "bird": 5}
    y = np.array(["cat"] * 30 + ["dog"] * 10 + ["bird"] * 5)
    classes = np.array(sorted(counts))
    expected = dict(zip(classes.tolist(), compute_class_weight("balanced", classes=classes, y=y)))
    got = class_weights(counts, 45, multi_label=False)
    assert got.keys() == counts.keys()
    for label in counts:
        assert got[label] == pytest.approx(expected[label])
    assert got["bird"] == pytest.approx(45 / (3 * 5))


def test_multi_label_weights_are_negatives_over_positives():
    assert class_weights({"sea": 10, "boat": 40, "sky": 25}, 50, multi_label=True) == {
        "sea": 4.0,
        "boat": 0.25,
        "sky": 1.0,
    }


# -- check_counts ----------------------------------------------------------------------------------
def test_balanced_and_large_enough_has_no_warning():
    weights, warnings = check_counts({"cat": 30, "dog": 25}, 55, False)
    assert warnings == []
    assert weights == class_weights({"cat": 30, "dog": 25}, 55, False)


def test_few_images_warn_per_label():
    _, warnings = check_counts({"cat": FEW_IMAGES - 1, "dog": FEW_IMAGES, "bird": 2}, 60, True)
    assert len(warnings) == 2  # multi-label: no imbalance warning
    assert warnings[0].startswith(f"label 'cat' has only {FEW_IMAGES - 1} images (fewer than {FEW_IMAGES})")
    assert warnings[1].startswith("label 'bird' has only 2 images")
    assert not any("'dog'" in w for w in warnings)


def test_imbalance_warns_from_the_ratio_on_single_label_only():
    _, warnings = check_counts({"cat": 100, "dog": 25}, 125, False)  # exactly 4:1
    assert len(warnings) == 1
    assert warnings[0].startswith("strong imbalance, largest/smallest = 4.0")
    assert "cat 100 (weight 0.62), dog 25 (weight 2.50)" in warnings[0]
    _, warnings = check_counts({"cat": 99, "dog": 25}, 124, False)  # just under
    assert warnings == []
    _, warnings = check_counts({"sea": 100, "boat": 25}, 125, True)  # multi-label: weights, no warning
    assert warnings == []


@pytest.mark.parametrize(
    "count, message",
    [
        (0, "label 'dog' has no readable images left; a head cannot learn it"),
        (1, "label 'dog' has 1 readable image; it needs at least 2 (one to train on, one to validate)"),
    ],
)
def test_too_few_images_are_errors(count, message):
    with pytest.raises(DataError) as e:
        check_counts({"cat": 30, "dog": count}, 30 + count, False)
    assert str(e.value) == message


# -- near duplicates ---------------------------------------------------------------------------------
def centred_cosines(x: np.ndarray) -> np.ndarray:
    c = x - x.mean(axis=0)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    return c @ c.T


def test_near_duplicates_on_constructed_vectors():
    rng = np.random.default_rng(0)
    d = 16
    offset = 5 * np.ones(d)  # shared by every row: raw cosines are all high
    base = rng.normal(size=(6, d))
    x = np.vstack([base, base[1] + 0.01 * rng.normal(size=d), base[4] * 1.0]) + offset
    # rows 6 ~ 1 and 7 == 4; everything else is unrelated once centred
    raw = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert (raw @ raw.T).min() > 0.6  # without centring, everything would look alike
    pairs = near_duplicate_pairs(x.astype(np.float32))
    assert [(i, j) for i, j, _ in pairs] == [(1, 6), (4, 7)]
    cos = centred_cosines(x)
    for i, j, value in pairs:
        assert value == pytest.approx(cos[i, j], abs=1e-5)
        assert value >= 0.98


def test_near_duplicates_match_a_brute_force_reference_across_chunks():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 8))
    x[20:30] = x[:10] + 0.05 * rng.normal(size=(10, 8))
    cos = centred_cosines(x)
    for threshold in (0.98, 0.9, 0.5):
        expected = [(i, j) for i in range(40) for j in range(i + 1, 40) if cos[i, j] >= threshold]
        for chunk in (3, 7, 2048):  # chunk boundaries must not change the answer
            got = near_duplicate_pairs(x, threshold=threshold, chunk=chunk)
            assert [(i, j) for i, j, _ in got] == expected, (threshold, chunk)


# -- components ---------------------------------------------------------------------------------------
def test_components_union_find():
    groups = components(7, [(0, 3, 0.99), (3, 5, 0.99), (1, 2, 0.98)])
    assert groups[0] == groups[3] == groups[5]
    assert groups[1] == groups[2]
    assert len({groups[0], groups[1], groups[4], groups[6]}) == 4
    np.testing.assert_array_equal(components(3, []), [0, 1, 2])
    # a chain given out of order joins into one group; plain (i, j) pairs work too
    chain = components(5, [(3, 4), (0, 1), (2, 3), (1, 2)])
    assert len(set(chain.tolist())) == 1


# -- split -----------------------------------------------------------------------------------------------
def single_label(counts: dict[str, int]) -> list[tuple[str, ...]]:
    return [(label,) for label, n in counts.items() for _ in range(n)]


def test_split_is_a_stratified_partition():
    labels = single_label({"cat": 40, "dog": 20, "bird": 20})
    names = ("bird", "cat", "dog")
    train, val = split(labels, np.arange(80), names, False, 0.25, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(80))
    assert not set(train) & set(val)
    assert list(train) == sorted(train) and list(val) == sorted(val)
    val_counts = {name: sum(labels[i] == (name,) for i in val) for name in names}
    # stratified: each label's share of validation is close to a quarter of its images
    assert val_counts == pytest.approx({"bird": 5, "cat": 10, "dog": 5}, abs=2)
    # the same seed gives the same split
    again = split(labels, np.arange(80), names, False, 0.25, seed=0)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(val, again[1])


@pytest.mark.parametrize("multi_label", [False, True])
def test_split_never_splits_a_group(multi_label):
    rng = np.random.default_rng(2)
    labels = (
        single_label({"cat": 30, "dog": 30})
        if not multi_label
        else [tuple(sorted({"a", "b"} & set(rng.choice(["a", "b", "c"], 2)))) for _ in range(60)]
    )
    groups = np.arange(60) // 3  # 20 groups of three
    for seed in range(5):
        train, val = split(labels, groups, ("cat", "dog") if not multi_label else ("a", "b"), multi_label, 0.2, seed)
        assert not set(groups[train]) & set(groups[val])
        assert len(train) + len(val) == 60 and len(val) > 0


@pytest.mark.parametrize("fraction", [0.04, 0.51, 0.0, 1.0])
def test_split_validates_the_fraction(fraction):
    with pytest.raises(DataError, match=r"between 0\.05 and 0\.5") as e:
        split(single_label({"a": 10, "b": 10}), np.arange(20), ("a", "b"), False, fraction, 0)
    assert e.value.option == "val_fraction"


@pytest.mark.filterwarnings("ignore:The least populated class")
def test_a_label_with_no_validation_image_is_refused():
    # two 'dog' images against ten 'cat' ones: some seeds leave both dogs in training
    labels = single_label({"cat": 10, "dog": 2})
    refused = kept = 0
    for seed in range(10):
        try:
            _, val = split(labels, np.arange(12), ("cat", "dog"), False, 0.25, seed)
        except DataError as e:
            assert str(e) == (
                "no validation image left for ['dog'] (too few images, or all of them near "
                "duplicates of each other, which stay on one side); add images of it"
            )
            assert e.option == "val_fraction"
            refused += 1
        else:
            assert {labels[i] for i in val} == {("cat",), ("dog",)}
            kept += 1
    assert refused and kept
    with pytest.raises(DataError, match=r"no validation image left for \['dog'\]"):
        split(labels, np.arange(12), ("cat", "dog"), False, 0.25, seed=0)


def test_every_label_keeps_a_training_image_or_is_refused():
    labels = single_label({"cat": 20, "dog": 4})
    groups = np.array(list(range(20)) + [99] * 4)  # the four dogs are near duplicates of each other
    assert np.bincount(groups).max() <= 0.25 * len(labels)  # train_head keeps such a group together
    for seed in range(5):
        try:
            train, _ = split(labels, groups, ("cat", "dog"), False, 0.25, seed)
        except DataError:
            continue
        assert {labels[i] for i in train} == {("cat",), ("dog",)}, f"seed {seed}: no 'dog' image to train on"


# -- choose_thresholds ------------------------------------------------------------------------------------
def reference_best_f1(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    precision, recall, cuts = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    k = int(np.argmax(f1))
    return float(np.float32(cuts[k])), float(f1[k])


def test_best_f1_is_the_argmax_of_the_precision_recall_curve():
    rng = np.random.default_rng(3)
    n, labels = 200, ("cat", "dog", "bird")
    truth = (rng.random((n, 3)) < [0.5, 0.2, 0.05]).astype(int)
    truth[0, 2] = 1  # at least one bird
    scores = np.clip(truth * 0.3 + rng.random((n, 3)) * 0.7, 0, 1).astype(np.float32)
    thresholds, rows = choose_thresholds(scores, truth, labels, "best-f1")
    for j, label in enumerate(labels):
        threshold, f1 = reference_best_f1(truth[:, j], scores[:, j])
        assert thresholds[j] == threshold
        assert rows[j]["label"] == label and rows[j]["why"] == "best F1"
        assert rows[j]["f1"] == pytest.approx(f1)
        # the explanation's precision and recall are those of scoring >= threshold
        predicted = scores[:, j] >= thresholds[j]
        tp = int((predicted & (truth[:, j] == 1)).sum())
        assert rows[j]["precision"] == pytest.approx(tp / predicted.sum())
        assert rows[j]["recall"] == pytest.approx(tp / truth[:, j].sum())


def test_best_f1_on_a_hand_worked_example():
    scores = np.array([[0.1], [0.4], [0.35], [0.8], [0.7], [0.2]], np.float32)
    truth = np.array([[0], [1], [0], [1], [1], [0]])
    # >= 0.4 catches the three positives and nothing else: F1 = 1
    thresholds, rows = choose_thresholds(scores, truth, ("cat",), "best-f1")
    assert thresholds == (pytest.approx(0.4),)
    assert (rows[0]["precision"], rows[0]["recall"], rows[0]["f1"]) == (1.0, 1.0, 1.0)


def test_precision_mode_picks_the_lowest_threshold_reaching_the_target():
    # sorted by score: negatives at 0.1, 0.3, 0.55; positives at 0.2, 0.5, 0.6, 0.7, 0.9
    s = np.array([0.1, 0.2, 0.3, 0.5, 0.55, 0.6, 0.7, 0.9], np.float32)
    y = np.array([0, 1, 0, 1, 0, 1, 1, 1])

    def precision_at(t):
        return y[s >= t].mean()

    for target in (0.6, 0.75, 0.8, 1.0):
        expected = min(float(t) for t in s if precision_at(t) >= target)
        thresholds, rows = choose_thresholds(s[:, None], y[:, None], ("dog",), "precision", target_precision=target)
        assert thresholds[0] == pytest.approx(expected), target
        assert rows[0]["precision"] == pytest.approx(precision_at(expected))
        assert rows[0]["why"] == f"lowest threshold with precision >= {target:g}"
    # by hand: >= 0.5 keeps 0.5, 0.55, 0.6, 0.7, 0.9: four positives of five, precision 0.8
    assert choose_thresholds(s[:, None], y[:, None], ("dog",), "precision", target_precision=0.8)[0] == (
        pytest.approx(0.5),
    )
    # and 0.9 takes the lowest threshold with only positives above it: 0.6
    assert choose_thresholds(s[:, None], y[:, None], ("dog",), "precision", target_precision=0.9)[0] == (
        pytest.approx(0.6),
    )


def test_an_unreachable_precision_falls_back_to_best_f1():
    s = np.array([0.9, 0.8, 0.7, 0.1], np.float32)
    y = np.array([0, 1, 1, 0])  # the top score is a negative: precision never reaches 1
    thresholds, rows = choose_thresholds(s[:, None], y[:, None], ("dog",), "precision", target_precision=1.0)
    best, _ = reference_best_f1(y, s)
    assert thresholds == (best,)
    assert rows[0]["why"] == "target precision 1 unreachable (best 0.667); best F1 instead"


def test_positive_label_alone_gets_a_threshold():
    rng = np.random.default_rng(4)
    y = rng.random(50) < 0.4
    scores = np.stack([1 - rng.random(50), rng.random(50) * 0.5 + y * 0.5], axis=1).astype(np.float32)
    truth = np.stack([~y, y], axis=1).astype(int)
    thresholds, rows = choose_thresholds(scores, truth, ("other", "spam"), "best-f1", positive="spam")
    assert thresholds[0] == 0.0
    assert rows[0] == {"label": "other", "threshold": 0.0, "why": "fallback when 'spam' is below its threshold"}
    assert thresholds[1] == reference_best_f1(y, scores[:, 1])[0]


def test_none_mode_and_one_sided_validation():
    scores = np.array([[0.2, 0.9], [0.8, 0.1]], np.float32)
    thresholds, rows = choose_thresholds(scores, np.array([[0, 1], [1, 0]]), ("a", "b"), "none")
    assert thresholds == (0.0, 0.0)
    assert {r["why"] for r in rows} == {"none asked: the top label wins"}
    thresholds, rows = choose_thresholds(scores, np.array([[1, 0], [1, 0]]), ("a", "b"), "best-f1")
    assert thresholds == (0.5, 0.5)  # 'a' has no negatives, 'b' no positives
    assert rows[1]["why"] == "validation has no negatives or no positives: 0.5"


@pytest.mark.parametrize(
    "kwargs, option, message",
    [
        ({"mode": "f1"}, "thresholds", "thresholds must be one of best-f1, precision, none, not 'f1'"),
        (
            {"mode": "best-f1", "positive": "cow"},
            "positive",
            "the positive label 'cow' is not a label of this head: a, b",
        ),
        ({"mode": "precision", "target_precision": 0.0}, "target_precision", "the target precision must be in (0, 1]"),
        ({"mode": "precision", "target_precision": 1.5}, "target_precision", "the target precision must be in (0, 1]"),
    ],
)
def test_errors_name_the_parameter(kwargs, option, message):
    with pytest.raises(TrainingError) as e:
        choose_thresholds(np.zeros((2, 2), np.float32), np.eye(2, dtype=int), ("a", "b"), **kwargs)
    assert e.value.option == option
    assert str(e.value).startswith(message)
