"""Per-label thresholds chosen on the validation split, with the reason for each.

- ``best-f1``: the score threshold where the label's one-vs-rest F1 is highest;
- ``precision``: the lowest threshold (so the highest recall) whose precision reaches the
  target; if no threshold reaches it, best F1, and the report says the target was missed;
- ``none``: 0 everywhere: single-label heads answer their top label, always.
With ``positive`` (binary heads), only that label gets a threshold; the other one is the
fallback an image gets when the positive label's score is below it.
"""

from __future__ import annotations

import numpy as np

from headmaster.errors import TrainingError

MODES = ("best-f1", "precision", "none")


def choose_thresholds(
    scores: np.ndarray,
    truth: np.ndarray,
    labels: tuple[str, ...],
    mode: str,
    target_precision: float = 0.9,
    positive: str | None = None,
) -> tuple[tuple[float, ...], list[dict]]:
    """truth: 0/1 matrix [n, L]. Returns thresholds and one explanation row per label."""
    from sklearn.metrics import precision_recall_curve

    if mode not in MODES:
        raise TrainingError(f"thresholds must be one of {', '.join(MODES)}, not {mode!r}", option="thresholds")
    if positive is not None and positive not in labels:
        raise TrainingError(
            f"the positive label {positive!r} is not a label of this head: {', '.join(labels)}", option="positive"
        )
    if not 0 < target_precision <= 1:
        raise TrainingError(
            f"the target precision must be in (0, 1], got {target_precision}", option="target_precision"
        )
    thresholds, rows = [], []
    for j, label in enumerate(labels):
        if mode == "none" or (positive is not None and label != positive):
            why = (
                "none asked: the top label wins"
                if mode == "none"
                else f"fallback when {positive!r} is below its threshold"
            )
            thresholds.append(0.0)
            rows.append({"label": label, "threshold": 0.0, "why": why})
            continue
        y = truth[:, j].astype(bool)
        if not y.any() or y.all():
            thresholds.append(0.5)
            rows.append({"label": label, "threshold": 0.5, "why": "validation has no negatives or no positives: 0.5"})
            continue
        precision, recall, cuts = precision_recall_curve(y, scores[:, j])
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
        k = int(np.argmax(f1))
        why = "best F1"
        if mode == "precision":
            reaching = np.flatnonzero(precision >= target_precision)
            if len(reaching):
                k = int(reaching[0])  # cuts ascend: the first is the lowest threshold, most recall
                why = f"lowest threshold with precision >= {target_precision:g}"
            else:
                why = f"target precision {target_precision:g} unreachable (best {precision.max():.3f}); best F1 instead"
        threshold = float(np.float32(cuts[k]))
        thresholds.append(threshold)
        rows.append(
            {
                "label": label,
                "threshold": threshold,
                "why": why,
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
            }
        )
    return tuple(thresholds), rows
