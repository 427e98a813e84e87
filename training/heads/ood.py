"""Out of distribution: what a trained head version carries to say "not like my training data".

The score is the cosine distance from an image's embedding to its k-th nearest training
embedding (deep nearest neighbours, Sun et al. 2022), searched by faiss
(``threshold.KnnIndex``): exactly up to ``threshold.EXACT_MAX`` references, through an
inverted-file index beyond (``threshold.ivf_search``, recorded in the card; the index itself is
built here once and published beside the references as ``threshold.OOD_INDEX_FILE``, its sha256
in the card, so that the server and the CPU tools read and search the very same index). The threshold keeps ``TPR`` (95%) of the validation images: an
image farther from the training set than 95% of held-out in-distribution images is "ood".

k is chosen on validation without any out-of-distribution data: each label in turn is
treated as unseen (its training rows leave the reference set, its validation rows become the
"ood" side) and the k with the best mean AUROC over those held-out labels wins. Multi-label
heads and heads whose labels cannot be held out keep ``DEFAULT_K``.

The reference set is the training split, L2-normalised, stored as float16, subsampled to
``max_references`` rows (seeded) so that a head stays small; the benchmark
(benchmarks/ood_knn.py) measures what the cap and the inverted-file search cost and their recall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from headmaster.errors import TrainingError
from headmaster.rules.threshold import OOD_POLICIES, KnnIndex, index_sha256, ivf_search, knn_distance, references_sha256

TPR = 0.95  # in-distribution validation images kept below the threshold
K_CANDIDATES = (1, 3, 5, 10, 20, 50)
DEFAULT_K = 10
MAX_REFERENCES = 100_000
MODES = ("off", *OOD_POLICIES)


@dataclass(frozen=True)
class OodFit:
    references: np.ndarray  # float16 [R, D], unit rows: ood.npy
    card: dict  # HeadCard.ood
    details: dict  # how k and the threshold were chosen (head.json details["ood"])
    index: bytes | None = None  # the serialized faiss IVF index (ood.faiss); None: an exact search


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def choose_k(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> tuple[int, dict]:
    """k by held-out-label AUROC on validation (single-label heads); see the module docstring."""
    if y_train.ndim != 1:  # multi-label: no label can be held out alone
        return DEFAULT_K, {"k_rule": f"default {DEFAULT_K} (multi-label head)"}
    labels = [c for c in np.unique(y_train) if (y_val == c).any() and (y_val != c).any() and (y_train != c).sum() >= 2]
    if not labels:
        return DEFAULT_K, {"k_rule": f"default {DEFAULT_K} (no label can be held out)"}
    per_k = {}
    for k in K_CANDIDATES:
        scores = []
        for c in labels:
            index = KnnIndex(x_train[y_train != c])
            if len(index) < k:
                break
            d = knn_distance(index, x_val, k)
            scores.append(_auroc(d[y_val != c], d[y_val == c]))
        if len(scores) == len(labels):
            per_k[k] = float(np.mean(scores))
    if not per_k:
        return 1, {"k_rule": "1 (too few training rows for more)"}
    best = max(per_k, key=lambda k: (round(per_k[k], 6), -k))
    return best, {"k_rule": "best mean AUROC with each label held out as unseen", "auroc_by_k": per_k}


def fit_ood(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    policy: str,
    max_references: int = MAX_REFERENCES,
    seed: int = 0,
) -> OodFit:
    """The reference set, k and threshold of a new head version (``policy``: abstain | flag)."""
    if policy not in OOD_POLICIES:
        raise TrainingError(f"ood must be one of {', '.join(MODES)}, not {policy!r}", option="ood")
    if max_references < 1:
        raise TrainingError(f"ood references must be >= 1, not {max_references}", option="ood_references")
    if len(x_train) < 1 or len(x_val) < 1:
        raise TrainingError("out-of-distribution detection needs training and validation images", option="ood")
    x_train, x_val = _normalised(x_train), _normalised(x_val)
    k, how = choose_k(x_train, np.asarray(y_train), x_val, np.asarray(y_val))
    keep = np.arange(len(x_train))
    if len(keep) > max_references:
        keep = np.sort(np.random.default_rng(seed).choice(len(keep), max_references, replace=False))
    references = x_train[keep].astype(np.float16)
    k = min(k, len(references))
    search = ivf_search(len(references))
    index = KnnIndex(references.astype(np.float32), search)
    distances = knn_distance(index, x_val, k)
    # What the server will read instead of rebuilding (without faiss here, it builds as before).
    stored = index.serialized() if search and index.index is not None else None
    # Rounded up, so that the image at the quantile stays inside after the card's rounding.
    threshold = math.ceil(float(np.quantile(distances, TPR, method="higher")) * 1e6) / 1e6
    card = {
        "k": int(k),
        "threshold": threshold,
        "policy": policy,
        "references": int(len(references)),
        "sha256": references_sha256(references),
        **({"search": search, "index_sha256": index_sha256(stored)} if stored is not None else {}),
    }
    details = {
        **how,
        "tpr": TPR,
        "training_rows": int(len(x_train)),
        "subsampled": bool(len(keep) < len(x_train)),
        "validation_kept": float((distances <= card["threshold"]).mean()),
    }
    return OodFit(references, card, details, stored)
