"""Active learning: the stored items a head is least sure about, that nobody has labelled yet.

Uncertainty is measured on the scores the store holds for one head version:

- ``margin`` (default): how far the head is from changing its answer. Single-label heads:
  top score minus second score (softmax probabilities). Multi-label heads: the smallest
  distance between a label's score and that label's threshold. Smallest first.
- ``entropy``: Shannon entropy of the softmax scores, or the summed binary entropies of the
  sigmoid scores (multi-label). Largest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headmaster.errors import StoreError
from headmaster.store.base import Store

METHODS = ("margin", "entropy")


@dataclass(frozen=True)
class Suggestion:
    sha256: str
    uri: str | None
    uncertainty: float  # margin (small = unsure) or entropy (large = unsure)
    labels: tuple[str, ...]  # what the head accepted
    scores: tuple[float, ...]


def uncertainty(scores: np.ndarray, method: str, multi_label: bool, thresholds: np.ndarray) -> np.ndarray:
    from scipy.stats import entropy

    if method == "margin":
        if multi_label:
            return np.abs(scores - thresholds).min(axis=1)
        top2 = np.sort(scores, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    if method == "entropy":
        if multi_label:
            p = np.clip(scores, 1e-7, 1 - 1e-7)
            return entropy(np.stack([p, 1 - p]), axis=0).sum(axis=1)
        return entropy(np.clip(scores, 1e-12, 1.0), axis=1)
    raise StoreError(f"unknown uncertainty method {method!r}: use one of {METHODS}")


def suggest(
    store: Store,
    head: str,
    n: int = 50,
    version: int | None = None,
    method: str = "margin",
    multi_label: bool = False,
    thresholds: tuple[float, ...] | None = None,
) -> tuple[int, list[Suggestion]]:
    """Returns (the version scored, the ``n`` most uncertain uncorrected items)."""
    if version is None:
        every = store.labels(head)
        if every.num_rows == 0:
            raise StoreError(
                f"the store {store.location} holds no labels of head {head!r}: classify with --store "
                "or `headmaster rescore` first"
            )
        version = max(every["version"].to_pylist())
    table = store.labels(head, version)  # the newest row per item, of that version
    if table.num_rows == 0:
        newest = sorted(set(store.labels(head)["version"].to_pylist()))
        raise StoreError(
            f"the store holds no labels of head {head!r} from version {version} (its newest are from "
            f"versions {newest}); `headmaster rescore {head} --version {version}` first"
        )
    corrected = set(store.corrections(head))
    keep = np.array([sha not in corrected for sha in table["sha256"].to_pylist()], bool)
    table = table.filter(keep)
    if table.num_rows == 0:
        return version, []
    scores = np.array(table["scores"].to_pylist(), np.float32)
    limits = np.asarray(thresholds if thresholds is not None else [0.5] * scores.shape[1], np.float32)
    values = uncertainty(scores, method, multi_label, limits)
    order = np.argsort(values if method == "margin" else -values, kind="stable")[:n]
    uris = store.uris()
    hashes, labels = table["sha256"].to_pylist(), table["labels"].to_pylist()
    return version, [
        Suggestion(
            hashes[i],
            next(iter(uris.get(hashes[i], {}).values()), None),
            float(values[i]),
            tuple(labels[i]),
            tuple(map(float, scores[i])),
        )
        for i in order
    ]
