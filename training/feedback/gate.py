"""The evaluation gate: may a candidate head version replace the live one?

Both versions are run (their own ``model.onnx`` and out-of-distribution rule, as the server
runs them: :class:`HeadVersion`) over the same frozen golden set, and the candidate is refused
when, on that set:

- **a class got worse**: for each label, the candidate's recall minus the live version's, with a
  stratified paired bootstrap (the golden items of that label resampled ``bootstrap`` times,
  both versions judged on the same resample); the class is worse when the upper end of the
  ``confidence`` interval of that difference is below ``-max_class_drop``. A drop the golden set
  cannot tell from noise passes (and is reported with its interval); a small golden set thus
  guards only against large drops, which the interval makes visible.
- **overall accuracy got worse**, by the same rule on all golden items, or fell at all on the
  golden set (``max_accuracy_drop``, default 0, on the point estimate: a candidate no better
  than the live version on the golden set gains nothing by going live);
- **overall accuracy is not shown better** (``require_gain``, off by default): the whole
  interval of the paired difference must lie above 0. A tie or a gain the golden set cannot
  tell from noise is refused, so a version goes live only on evidence that it is better: the
  point-estimate rule above lets a candidate that is equal on the golden set and slightly worse
  elsewhere through, which is how a live head's accuracy on other items can fall while golden
  accuracy never does. The price is fewer promotions: small gains wait until enough
  corrections add up to one the golden set can show;
- **calibration got worse**: the expected calibration error of the top score (the bins of
  ``eval``) grew by more than ``ece_margin``;
- **more golden items look out of distribution**: the share the candidate flags "ood" exceeds
  the live version's (or, when higher, the 5% every version's threshold flags by design) by
  more than ``ood_margin``, even at the low end of its bootstrap interval (golden items are in
  distribution: every flag is a false alarm; the threshold behind it comes from a few
  validation images, so the share moves by several points between equally good versions).

Single-label heads only: the multi-label case needs per-label precision and recall intervals
(not done). The decision and every number it rests on are returned for the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from headmaster.errors import DataError
from headmaster.training.heads.ood import TPR as OOD_TPR


@dataclass(frozen=True)
class GateOptions:
    max_class_drop: float = 0.0  # a class is worse when its recall CI lies wholly below -this
    max_accuracy_drop: float | None = 0.0  # golden accuracy may fall by at most this, point estimate (None: off)
    require_gain: bool = False  # refuse unless the accuracy difference's interval lies wholly above 0
    ece_margin: float = 0.03  # calibration error may grow by at most this
    ood_margin: float = 0.05  # share of golden items flagged out of distribution may grow by at most this
    bootstrap: int = 2000  # resamples
    confidence: float = 0.95  # of the intervals
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise DataError(f"the gate's confidence must be in [0.5, 1), not {self.confidence}", option="confidence")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise DataError("the gate's allowed accuracy drop must be >= 0", option="max_accuracy_drop")
        if self.bootstrap < 100:
            raise DataError(
                f"the gate needs at least 100 bootstrap resamples, not {self.bootstrap}", option="bootstrap"
            )
        if min(self.max_class_drop, self.ece_margin, self.ood_margin) < 0:
            raise DataError("the gate's margins must be >= 0")


@dataclass
class GateResult:
    accepted: bool
    reasons: list[str]  # why refused (empty when accepted)
    metrics: dict  # JSON-ready: live, candidate, per-class differences with intervals
    notes: list[str] = field(default_factory=list)  # what the gate could not judge well


def _predictions(version, embeddings: np.ndarray, labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(index into ``labels`` of the top label, or -1 for a label the golden set lacks; top score)."""
    scores = version.scores(embeddings)
    top = scores.argmax(axis=1)
    index = {label: i for i, label in enumerate(labels)}
    mapped = np.array([index.get(version.card.labels[t], -1) for t in top])
    return mapped, scores.max(axis=1)


def ece(correct: np.ndarray, confidence: np.ndarray) -> float:
    """Expected calibration error of the top score, with `eval`'s bins."""
    from headmaster.training.evaluation.evaluate import calibration

    return calibration(correct, confidence, "top score").ece


def version_metrics(
    version, embeddings: np.ndarray, truth: np.ndarray, labels: tuple[str, ...]
) -> tuple[dict, np.ndarray]:
    """A version's golden-set metrics and its per-item correctness (what the bootstrap resamples)."""
    predicted, confidence = _predictions(version, embeddings, labels)
    correct = predicted == truth
    flags = version.out_of_distribution(embeddings)
    per_class = {label: float(correct[truth == j].mean()) for j, label in enumerate(labels) if (truth == j).any()}
    return {
        "version": version.card.version,
        "accuracy": float(correct.mean()),
        "ece": ece(correct, confidence),
        "ood_rate": None if flags is None else float(np.mean(flags)),
        "recall": per_class,
    }, correct


def _interval(live: np.ndarray, candidate: np.ndarray, options: GateOptions, rng: np.random.Generator):
    """Paired bootstrap of mean(candidate) - mean(live) over the same items: (difference, low, high)."""
    n = len(live)
    diff = candidate.astype(np.float64) - live.astype(np.float64)
    draws = rng.integers(0, n, size=(options.bootstrap, n))
    means = diff[draws].mean(axis=1)
    tail = (1 - options.confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(diff.mean()), float(low), float(high)


def gate(
    live, candidate, embeddings: np.ndarray, truth_labels: list[str], options: GateOptions = GateOptions()
) -> GateResult:
    """``live`` and ``candidate``: HeadVersion-like (``card``, ``scores``, ``out_of_distribution``);
    ``truth_labels``: each golden item's one label."""
    if live.card.multi_label or candidate.card.multi_label:
        raise DataError("the gate judges single-label heads only (multi-label: not done yet)")
    if len(truth_labels) != len(embeddings) or not len(embeddings):
        raise DataError(
            f"the golden set needs one label per embedding and at least one item "
            f"({len(truth_labels)} labels, {len(embeddings)} embeddings)"
        )
    labels = tuple(sorted(set(truth_labels)))
    truth = np.array([labels.index(label) for label in truth_labels])
    rng = np.random.default_rng(options.seed)
    live_metrics, live_correct = version_metrics(live, embeddings, truth, labels)
    cand_metrics, cand_correct = version_metrics(candidate, embeddings, truth, labels)
    reasons, notes, classes = [], [], {}
    for j, label in enumerate(labels):
        members = truth == j
        diff, low, high = _interval(live_correct[members], cand_correct[members], options, rng)
        classes[label] = {
            "items": int(members.sum()),
            "live": live_metrics["recall"][label],
            "candidate": cand_metrics["recall"][label],
            "difference": diff,
            "low": low,
            "high": high,
        }
        if high < -options.max_class_drop:
            reasons.append(
                f"class {label!r} is worse: recall {classes[label]['live']:.3f} -> "
                f"{classes[label]['candidate']:.3f} ({diff:+.3f}, {options.confidence:.0%} interval "
                f"[{low:+.3f}, {high:+.3f}] over {int(members.sum())} golden items)"
            )
        elif members.sum() < 10:
            notes.append(f"class {label!r} has {int(members.sum())} golden items: only large drops can show")
    missing = [label for label in labels if label not in candidate.card.labels]
    if missing:
        notes.append(f"the candidate has no label {', '.join(map(repr, missing))} of the golden set")
    overall = _interval(live_correct, cand_correct, options, rng)
    if overall[2] < 0:
        reasons.append(
            f"accuracy is worse: {live_metrics['accuracy']:.3f} -> {cand_metrics['accuracy']:.3f} "
            f"({options.confidence:.0%} interval [{overall[1]:+.3f}, {overall[2]:+.3f}])"
        )
    elif (
        options.max_accuracy_drop is not None
        and cand_metrics["accuracy"] < live_metrics["accuracy"] - options.max_accuracy_drop - 1e-12
    ):
        reasons.append(
            f"accuracy on the golden set fell: {live_metrics['accuracy']:.3f} -> "
            f"{cand_metrics['accuracy']:.3f} (allowed drop {options.max_accuracy_drop})"
        )
    elif options.require_gain and overall[1] <= 0:
        reasons.append(
            f"accuracy is not shown better: {live_metrics['accuracy']:.3f} -> {cand_metrics['accuracy']:.3f} "
            f"({options.confidence:.0%} interval [{overall[1]:+.3f}, {overall[2]:+.3f}] over {len(truth)} golden "
            "items; --require-gain)"
        )
    if cand_metrics["ece"] > live_metrics["ece"] + options.ece_margin:
        reasons.append(
            f"calibration is worse: ECE {live_metrics['ece']:.3f} -> {cand_metrics['ece']:.3f} "
            f"(margin {options.ece_margin})"
        )
    if live_metrics["ood_rate"] is not None and cand_metrics["ood_rate"] is not None:
        # A version's OOD threshold is set to flag 1 - TPR of its own validation images, so that
        # share of golden items is flagged by design, whatever the live version happens to flag.
        # That share is estimated from a few validation images, so it is judged like the rest:
        # refused when even the low end of the candidate's interval is beyond the allowance.
        baseline = max(live_metrics["ood_rate"], 1 - OOD_TPR)
        flags = candidate.out_of_distribution(embeddings).astype(np.float64)
        low = float(
            np.quantile(
                flags[rng.integers(0, len(flags), size=(options.bootstrap, len(flags)))].mean(axis=1),
                (1 - options.confidence) / 2,
            )
        )
        cand_metrics["ood_rate_low"] = low
        if low > baseline + options.ood_margin:
            reasons.append(
                f"more golden items look out of distribution: {live_metrics['ood_rate']:.1%} -> "
                f"{cand_metrics['ood_rate']:.1%} ({options.confidence:.0%} interval from {low:.1%}; "
                f"allowed up to {baseline + options.ood_margin:.1%})"
            )
    elif live_metrics["ood_rate"] is not None:
        notes.append("the candidate has no out-of-distribution reference set; the live version has one")
    metrics = {
        "golden_items": len(truth),
        "live": live_metrics,
        "candidate": cand_metrics,
        "classes": classes,
        "accuracy": {"difference": overall[0], "low": overall[1], "high": overall[2]},
        "options": {
            "max_class_drop": options.max_class_drop,
            "max_accuracy_drop": options.max_accuracy_drop,
            "require_gain": options.require_gain,
            "ece_margin": options.ece_margin,
            "ood_margin": options.ood_margin,
            "bootstrap": options.bootstrap,
            "confidence": options.confidence,
            "seed": options.seed,
        },
    }
    return GateResult(not reasons, reasons, metrics, notes)
