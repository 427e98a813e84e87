"""Checks before training, and the train/validation split they inform.

- buckets with few images (warning) and strong imbalance (warning; class weights offset it);
- exact duplicates (same bytes): kept once; the same bytes under different buckets are
  contradictory labels and are left out;
- near duplicates (cosine >= 0.98 between mean-centred embeddings): listed; kept in the
  same split, like exact duplicates, so validation never scores an image the head was
  trained on. Centring first removes the offset all embeddings of an encoder share (small in
  CLIP, dominant in random weights), which would otherwise make everything look alike;
- a collapsed encoder (error): when the mean embeddings of all labels lie within
  ``COLLAPSED_DISTANCE`` (cosine) of each other, the encoder sees one image whatever it is shown
  (a random-weight DINOv2 on digits: 3e-07; a random-weight CLIP ViT-S-32: 1e-02); no head and
  no out-of-distribution threshold can be learnt from that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from headmaster.errors import DataError

FEW_IMAGES = 20
IMBALANCE_RATIO = 4.0
NEAR_DUPLICATE_COSINE = 0.98
COLLAPSED_DISTANCE = 1e-4  # largest cosine distance between label means below which nothing separates


@dataclass
class CheckReport:
    counts: dict[str, int]
    class_weights: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why), skipped
    exact_duplicates: list[list[str]] = field(default_factory=list)  # paths with the same bytes
    conflicting: list[list[str]] = field(default_factory=list)  # same bytes, different labels: dropped
    near_duplicates: list[tuple[str, str, float]] = field(default_factory=list)  # (path, path, cosine)

    def as_dict(self) -> dict:
        return {
            "counts": self.counts,
            "class_weights": self.class_weights,
            "warnings": self.warnings,
            "unreadable": len(self.unreadable),
            "exact_duplicate_groups": len(self.exact_duplicates),
            "conflicting_groups": len(self.conflicting),
            "near_duplicate_pairs": len(self.near_duplicates),
        }


def class_weights(counts: dict[str, int], total: int, multi_label: bool) -> dict[str, float]:
    """Single-label: n / (k * count) (sklearn's 'balanced'); multi-label: negatives / positives."""
    if multi_label:
        return {label: (total - c) / c for label, c in counts.items()}
    return {label: total / (len(counts) * c) for label, c in counts.items()}


def near_duplicate_pairs(
    x: np.ndarray, threshold: float = NEAR_DUPLICATE_COSINE, chunk: int = 2048
) -> list[tuple[int, int, float]]:
    """Pairs i < j of rows whose centred cosine >= threshold, in chunks (memory O(chunk * n))."""
    x = x - x.mean(axis=0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    pairs = []
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk] @ x.T
        rows, cols = np.nonzero(block >= threshold)
        for r, c in zip(rows, cols):
            i = start + int(r)
            if i < c:
                pairs.append((i, int(c), float(block[r, c])))
    return pairs


def label_spread(x: np.ndarray, truth: np.ndarray) -> float:
    """The largest cosine distance between the mean (L2-normalised) embeddings of two labels;
    ``truth`` is the 0/1 matrix [n, L]. 2.0 when fewer than two labels have images."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centres = [x[truth[:, j].astype(bool)].mean(axis=0) for j in range(truth.shape[1]) if truth[:, j].any()]
    if len(centres) < 2:
        return 2.0
    c = np.stack(centres).astype(np.float64)
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return float(np.clip(1.0 - c @ c.T, 0.0, 2.0).max())


def check_spread(x: np.ndarray, truth: np.ndarray, labels: tuple[str, ...]) -> None:
    """Refuse a collapsed embedding set (see the module docstring) with what it means."""
    spread = label_spread(x, truth)
    if spread < COLLAPSED_DISTANCE:
        raise DataError(
            f"the embeddings of different labels are nearly identical (the means of "
            f"{', '.join(labels[:4])}{', ...' if len(labels) > 4 else ''} lie within cosine distance "
            f"{spread:.1e} of each other; {COLLAPSED_DISTANCE:.0e} or more is needed): the encoder or its "
            "preprocessing is wrong for these images (random weights, or a model for another kind of "
            "image); export an encoder with pretrained weights suited to them and build the repository "
            "with it"
        )


def components(n: int, pairs) -> np.ndarray:
    """Union-find over pairs: a group id per row (for split grouping)."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, *_ in pairs:
        parent[find(i)] = find(j)
    return np.array([find(i) for i in range(n)])


def check_counts(counts: dict[str, int], total: int, multi_label: bool) -> tuple[dict[str, float], list[str]]:
    warnings = []
    for label, count in counts.items():
        if count == 0:
            raise DataError(f"label {label!r} has no readable images left; a head cannot learn it")
        if count < 2:
            raise DataError(
                f"label {label!r} has {count} readable image; it needs at least 2 (one to train on, one to validate)"
            )
        if count < FEW_IMAGES:
            warnings.append(
                f"label {label!r} has only {count} images (fewer than {FEW_IMAGES}): "
                "its metrics will be noisy and the head may not generalise"
            )
    weights = class_weights(counts, total, multi_label)
    if not multi_label and max(counts.values()) >= IMBALANCE_RATIO * min(counts.values()):
        shown = ", ".join(f"{label} {counts[label]} (weight {w:.2f})" for label, w in weights.items())
        warnings.append(
            f"strong imbalance, largest/smallest = {max(counts.values()) / min(counts.values()):.1f}: "
            f"training weighs each label against its frequency: {shown}"
        )
    return weights, warnings


def split(
    labels: list[tuple[str, ...]],
    groups: np.ndarray,
    label_names: tuple[str, ...],
    multi_label: bool,
    val_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train and a validation split: stratified by label, never splitting a group."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    n = len(labels)
    if not 0.05 <= val_fraction <= 0.5:
        raise DataError(
            f"the validation fraction must be between 0.05 and 0.5, got {val_fraction}", option="val_fraction"
        )
    indices = np.arange(n)
    if multi_label:
        train, val = next(GroupShuffleSplit(1, test_size=val_fraction, random_state=seed).split(indices, groups=groups))
    else:
        y = np.array([label_names.index(l[0]) for l in labels])
        folds = max(2, round(1 / val_fraction))
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        train, val = next(splitter.split(indices, y, groups))
        for side, rows in (("validation", val), ("training", train)):
            missing = {label_names[i] for i in set(y.tolist()) - set(y[rows].tolist())}
            if missing:
                raise DataError(
                    f"no {side} image left for {sorted(missing)} (too few images, or all of them "
                    "near duplicates of each other, which stay on one side); add images of it",
                    option="val_fraction",
                )
    return np.sort(train), np.sort(val)
