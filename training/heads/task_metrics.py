"""Metrics of hierarchy, regression and ordinal heads (scikit-learn and scipy; no hand-written
statistics). Predictions come from ``threshold.head_results``, the server's own rule, so what
is measured is what the server answers."""

from __future__ import annotations

import numpy as np

from headmaster.rules.threshold import accept, depths


def hierarchy_metrics(scores: np.ndarray, truth_paths: list[tuple[str, ...]], info: dict) -> dict:
    """Per level of the taxonomy: over the images whose true path reaches that level, the share
    answered at that level (coverage), the accuracy of those answers, the accuracy counting a
    missing answer as wrong, and macro-F1 over that level's labels."""
    from sklearn.metrics import f1_score

    predicted = [tuple(path) for path in accept(np.asarray(scores, np.float32), info)]
    level = depths(info["labels"], info["parents"])
    per_level = []
    for d in range(int(level.max()) + 1):
        rows = [i for i, path in enumerate(truth_paths) if len(path) > d]
        if not rows:
            continue
        true = [truth_paths[i][d] for i in rows]
        said = [predicted[i][d] if len(predicted[i]) > d else "" for i in rows]
        answered = np.array([s != "" for s in said])
        right = np.array([s == t for s, t in zip(said, true)])
        names = sorted({label for label, depth in zip(info["labels"], level) if depth == d})
        per_level.append(
            {
                "level": d,
                "n": len(rows),
                "labels": names,
                "coverage": float(answered.mean()),
                "accuracy": float(right.mean()),
                "accuracy_of_answered": float(right[answered].mean()) if answered.any() else 0.0,
                "macro_f1": float(f1_score(true, said, labels=names, average="macro", zero_division=0)),
            }
        )
    consistent = all(
        all(info["parents"].get(p[i]) == p[i - 1] for i in range(1, len(p))) and (not p or p[0] not in info["parents"])
        for p in predicted
    )
    exact = float(np.mean([p == t for p, t in zip(predicted, truth_paths)]))
    return {
        "task": "hierarchy",
        "n": len(truth_paths),
        "per_level": per_level,
        "exact_path": exact,
        "paths_consistent": consistent,
        "answered_depth": np.bincount([len(p) for p in predicted], minlength=int(level.max()) + 2).tolist(),
    }


def regression_metrics(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """MAE, RMSE, R² (scikit-learn) and Spearman's rank correlation (scipy)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    predicted, truth = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    rho = spearmanr(predicted, truth).statistic if np.ptp(predicted) > 0 and np.ptp(truth) > 0 else 0.0
    return {
        "task": "regression",
        "n": int(len(truth)),
        "mae": float(mean_absolute_error(truth, predicted)),
        "rmse": float(np.sqrt(mean_squared_error(truth, predicted))),
        "r2": float(r2_score(truth, predicted)),
        "spearman": float(rho),
    }


def ordinal_metrics(
    predicted: np.ndarray, truth: np.ndarray, labels: tuple[str, ...], expected: np.ndarray | None = None
) -> dict:
    """Class indices (0 = the lowest class). Accuracy, MAE / RMSE in classes, Spearman, the
    confusion matrix and how far the mistakes fall (``by_distance[d]``: images |pred - true| = d)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import accuracy_score, confusion_matrix, mean_absolute_error, mean_squared_error

    predicted, truth = np.asarray(predicted, np.int64), np.asarray(truth, np.int64)
    k = len(labels)
    distance = np.abs(predicted - truth)
    out = {
        "task": "ordinal",
        "n": int(len(truth)),
        "labels": list(labels),
        "accuracy": float(accuracy_score(truth, predicted)),
        "mae_classes": float(mean_absolute_error(truth, predicted)),
        "rmse_classes": float(np.sqrt(mean_squared_error(truth, predicted))),
        "spearman": float(spearmanr(predicted, truth).statistic) if np.ptp(predicted) and np.ptp(truth) else 0.0,
        "by_distance": np.bincount(distance, minlength=k).tolist(),
        "far_mistakes": float((distance >= 2).mean()),  # off by two classes or more
        # How far the wrong answers fall: what an ordinal loss is for (1.0: every mistake a neighbour).
        "mistake_mean_distance": float(distance[distance > 0].mean()) if (distance > 0).any() else 0.0,
        "neighbour_share_of_mistakes": float((distance == 1).sum() / max(1, (distance > 0).sum())),
        "confusion_matrix": confusion_matrix(truth, predicted, labels=range(k)).tolist(),
    }
    if expected is not None:
        out["mae_expected"] = float(mean_absolute_error(truth, expected))
    return out


def summary_lines(metrics: dict) -> list[str]:
    """The metrics of a hierarchy / regression / ordinal head as a few lines of text (the CLI's)."""
    task = metrics["task"]
    if task == "regression":
        return [
            f"MAE {metrics['mae']:.3f}  RMSE {metrics['rmse']:.3f}  Spearman {metrics['spearman']:.3f}  "
            f"R² {metrics['r2']:.3f}  ({metrics['n']} images)"
        ]
    if task == "hierarchy":
        lines = [
            f"level {m['level']} ({', '.join(m['labels'])}): accuracy {m['accuracy']:.3f}, "
            f"{m['coverage']:.1%} answered at this level, {m['accuracy_of_answered']:.3f} of those right, "
            f"macro-F1 {m['macro_f1']:.3f}, {m['n']} images"
            for m in metrics["per_level"]
        ]
        return [
            *lines,
            f"exact path {metrics['exact_path']:.3f}; paths answered by depth "
            f"{metrics['answered_depth']}; every path consistent: {metrics['paths_consistent']}",
        ]

    def line(name: str, m: dict) -> str:
        return (
            f"{name}: accuracy {m['accuracy']:.3f}  MAE {m['mae_classes']:.3f} classes  "
            f"mistakes fall {m['mistake_mean_distance']:.2f} classes away on average, "
            f"{m['neighbour_share_of_mistakes']:.1%} of them neighbours; off by 0, 1, 2, ...: {m['by_distance']}"
        )

    lines = [line("ordinal", metrics)]
    if "multiclass_baseline" in metrics:
        lines.append(line("plain multiclass on the same split", metrics["multiclass_baseline"]))
    if "multiclass_baseline_at_training" in metrics:
        lines.append(
            line(
                "plain multiclass on this version's validation split (at training)",
                metrics["multiclass_baseline_at_training"],
            )
        )
    return lines
