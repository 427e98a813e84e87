"""`headmaster eval --ood DIR`: how well a head version tells its own kind of image from others.

The holdout is the in-distribution side, every image under DIR the out-of-distribution side.
Both are scored by the version's own rule (``HeadVersion.ood_distances``: the distance to the
k-th nearest training embedding, as the server computes it). Reported: AUROC of that
distance (scikit-learn), FPR at 95% TPR (the share of DIR's images still taken as
in-distribution when 95% of the holdout is kept), what the version's own threshold does
(holdout kept, DIR rejected), and the accuracy of the labels accepted on the holdout without
and with the rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headmaster.errors import EvalError
from headmaster.images import IMAGE_SUFFIXES
from headmaster.repository.head_version import HeadVersion
from headmaster.rules.threshold import accepted_mask, ood_rule

TPR = 0.95


def ood_paths(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"--ood {folder}: no such folder", option="ood")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise EvalError(f"--ood {folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})", option="ood")
    return paths


def fpr_at_tpr(inside: np.ndarray, outside: np.ndarray, tpr: float = TPR) -> tuple[float, float]:
    """(FPR, the distance threshold) where ``tpr`` of the in-distribution distances are kept."""
    threshold = float(np.quantile(inside, tpr, method="higher"))
    return float((outside <= threshold).mean()), threshold


def ood_metrics(head: HeadVersion, inside: np.ndarray, outside: np.ndarray, truth: np.ndarray, source: str) -> dict:
    """inside / outside: embeddings [n, D]; truth: the holdout's 0/1 label matrix in the head's order."""
    from sklearn.metrics import roc_auc_score

    if not head.has_ood:
        raise EvalError(
            f"head {head.title} has no out-of-distribution reference set (trained with --ood off, or "
            "before heads carried one): retrain it to evaluate --ood",
            option="ood",
        )
    d_in, d_out = head.ood_distances(inside), head.ood_distances(outside)
    fpr, threshold_95 = fpr_at_tpr(d_in, d_out)
    flags_in, flags_out = ood_rule(d_in, head.card.ood), ood_rule(d_out, head.card.ood)
    info = {**head.info, "ood": {**head.card.ood, "policy": "abstain"}}  # what abstaining would do
    scores_in, scores_out = head.scores(inside), head.scores(outside)
    metrics = {
        "ood_source": source,
        "ood_images": int(len(outside)),
        "in_distribution_images": int(len(inside)),
        "auroc": float(roc_auc_score(np.r_[np.zeros(len(d_in)), np.ones(len(d_out))], np.r_[d_in, d_out])),
        "fpr_at_95_tpr": fpr,
        "threshold_at_95_tpr_here": threshold_95,
        "version_threshold": float(head.card.ood["threshold"]),
        "k": int(head.card.ood["k"]),
        "policy": head.card.ood["policy"],
        "references": int(head.card.ood["references"]),
        "holdout_kept": float(1 - flags_in.mean()),
        "ood_rejected": float(flags_out.mean()),
        "ood_labelled_without_rule": float(accepted_mask(scores_out, head.info).any(axis=1).mean()),
        "ood_labelled_with_rule": float(accepted_mask(scores_out, info, flags_out).any(axis=1).mean()),
    }
    if not head.card.multi_label:
        for name, flags in (("without_rule", None), ("with_rule", flags_in)):
            mask = accepted_mask(scores_in, info, flags)
            covered = mask.any(axis=1)
            correct = (mask & truth.astype(bool)).any(axis=1)
            metrics[f"holdout_{name}"] = {
                "coverage": float(covered.mean()),
                "accuracy_of_accepted": float(correct[covered].mean()) if covered.any() else 0.0,
            }
    return metrics
