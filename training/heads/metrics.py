"""Validation metrics of a head, from scikit-learn (no hand-written metric code)."""

from __future__ import annotations

import numpy as np

from headmaster.rules.threshold import accept


def evaluate(
    scores: np.ndarray, truth: np.ndarray, labels: tuple[str, ...], multi_label: bool, thresholds: tuple[float, ...]
) -> dict:
    """truth: 0/1 matrix [n, L]. Single-label heads are scored on their top label (accuracy,
    macro-F1, per-class report, confusion matrix) and on what the thresholds accept
    (coverage, accuracy of the accepted); multi-label heads on thresholded predictions."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    info = {"labels": list(labels), "thresholds": list(thresholds), "multi_label": multi_label}
    accepted = accept(scores.astype(np.float32), info)
    names = list(labels)
    if multi_label:
        predicted = np.array([[label in row for label in labels] for row in accepted], dtype=int)
        report = classification_report(truth, predicted, target_names=names, output_dict=True, zero_division=0)
        return {
            "multi_label": True,
            "subset_accuracy": float(accuracy_score(truth, predicted)),
            "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
            "per_label": {n: report[n] for n in names},
            "n": int(len(truth)),
        }
    y_true = truth.argmax(axis=1)
    y_top = scores.argmax(axis=1)
    report = classification_report(
        y_true, y_top, labels=range(len(names)), target_names=names, output_dict=True, zero_division=0
    )
    covered = np.array([bool(row) for row in accepted])
    correct = np.array([bool(row) and row[0] == names[t] for row, t in zip(accepted, y_true)])
    return {
        "multi_label": False,
        "accuracy": float(accuracy_score(y_true, y_top)),
        "macro_f1": float(f1_score(y_true, y_top, average="macro", zero_division=0)),
        "per_label": {n: report[n] for n in names},
        "confusion_matrix": confusion_matrix(y_true, y_top, labels=range(len(names))).tolist(),
        "thresholded": {
            "coverage": float(covered.mean()),
            "accuracy_of_accepted": float(correct[covered].mean()) if covered.any() else 0.0,
        },
        "n": int(len(truth)),
    }
