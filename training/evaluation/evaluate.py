"""`eval`: run a head version on hand-labelled images kept aside, and measure it.

The holdout has the training layout (one sub-folder per label, or a manifest for
multi-label heads) and is embedded exactly like training data (same cache, same local or
server embedder). Scores come from the version's own ``model.onnx`` run with onnxruntime on
CPU, and the accepted labels from ``threshold.accept``, the function the server's threshold
step runs, so the figures describe what the server would answer.

Every metric comes from scikit-learn. The one formula written here is the expected
calibration error, a weighted sum over the bins of ``sklearn.calibration.calibration_curve``:

    ECE = sum over non-empty bins b of (n_b / N) * |accuracy_b - confidence_b|

where, for bin b, n_b is its number of predictions, accuracy_b the share of them that are
right (calibration_curve's ``prob_true``) and confidence_b their mean score (``prob_pred``).
Bins are the same 10 equal-width bins of [0, 1] that calibration_curve uses. Single-label
heads are calibrated on their top label (its score vs whether it is right); multi-label
heads on every (image, label) score vs whether the label is there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from headmaster.errors import EvalError
from headmaster.export.heads import HeadCard
from headmaster.repository.head_version import HeadVersion
from headmaster.repository.repo import Repository
from headmaster.repository.topology import text_only
from headmaster.rules.threshold import accept
from headmaster.training.data import Dataset, read_labelled
from headmaster.training.embeddings import EmbeddingCache, default_cache_dir, embed_files, embedder_for

LOG = logging.getLogger(__name__)

CALIBRATION_BINS = 10
TOP_K = (2, 3, 5)  # top-k accuracies reported for heads with more than k labels
SWEEP = tuple(round(t, 2) for t in np.arange(0.05, 1.0, 0.05))  # threshold sweep grid


@dataclass(frozen=True)
class EvalOptions:
    name: str
    repo: Path
    data: Path | None = None  # holdout folder: one sub-folder per label
    manifest: Path | None = None  # or a CSV / JSONL manifest (multi-label heads)
    snapshot: Path | None = None  # or a dataset snapshot (`headmaster dataset export`): stored embeddings
    version: int | None = None  # default: the live version
    compare: tuple[int, int] | None = None  # two versions of NAME, side by side
    against: str | None = None  # another head with the same label names, side by side
    server: str | None = None  # HTTP host:port: embed through the server (same encoder)
    cache_dir: Path | None = None  # default: ~/.cache/headmaster/embeddings
    train_data: Path | None = None  # the head's training set, for leakage and label-issue checks
    ood: Path | None = None  # a folder of out-of-distribution images: AUROC, FPR at 95% TPR (evaluation/ood.py)


# -- the holdout -----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Holdout:
    """The readable holdout images, one row each, with their embeddings."""

    paths: tuple[str, ...]
    hashes: tuple[str, ...]  # sha256 of each file's bytes (the embedding cache key)
    labels: tuple[str, ...]  # the labels the holdout uses (sorted)
    truth_sets: tuple[tuple[str, ...], ...]  # each image's labels
    embeddings: np.ndarray  # [n, D]
    multi_label: bool  # came from a manifest
    source: str
    skipped: tuple[tuple[str, str], ...] = ()  # (path, why): unreadable or not an image, left out

    def __len__(self) -> int:
        return len(self.paths)

    def truth(self, labels: tuple[str, ...]) -> np.ndarray:
        """0/1 matrix [n, len(labels)] in the given (head's) label order."""
        return np.array([[label in row for label in labels] for row in self.truth_sets], dtype=np.int64)


class Embedder:
    """One embedder and cache for a whole evaluation (holdout and training images alike)."""

    def __init__(self, repository: Repository, server: str | None, cache_dir: Path | None):
        self.repository, self.server = repository, server
        self.cache = EmbeddingCache(cache_dir or default_cache_dir(), repository.fingerprint)

    @cached_property
    def embedder(self):
        # Made on first use: a snapshot holdout needs no encoder unless training images join.
        return embedder_for(self.repository, self.server)

    def __call__(self, paths: list[Path], progress: Callable[[int], None] | None = None):
        """Like embed_files: hashes, embeddings by sha256, failures by path."""
        return embed_files(paths, self.embedder, self.cache, progress)


def snapshot_holdout(path: Path, fingerprint: str) -> Holdout:
    """A dataset snapshot as the holdout: its labels and stored embeddings, nothing to embed."""
    from headmaster.training.feedback.snapshots import load_for_training

    snapshot, hashes, vectors = load_for_training(path, fingerprint)
    dataset = snapshot.dataset()
    return Holdout(
        tuple(str(e.path) for e in dataset.examples),
        tuple(hashes),
        dataset.labels,
        tuple(e.labels for e in dataset.examples),
        np.stack([vectors[h] for h in hashes]),
        dataset.multi_label,
        dataset.source,
    )


def embed_dataset(dataset: Dataset, embed: Embedder, progress: Callable[[int], None] | None = None) -> Holdout:
    """Embed a dataset; unreadable files are listed in ``skipped``, never fatal."""
    paths = [e.path for e in dataset.examples]
    hashes, vectors, failures = embed(paths, progress)
    keep = [i for i, (p, h) in enumerate(zip(paths, hashes)) if h is not None and str(p) not in failures]
    skipped = tuple(dataset.skipped) + tuple(sorted(failures.items()))
    for path, why in skipped:
        LOG.info("skipped %s: %s", path, why)  # listed by the caller and in the report
    dim = next(iter(vectors.values())).shape[0] if vectors else 1
    x = np.stack([vectors[hashes[i]] for i in keep]) if keep else np.zeros((0, dim), np.float32)
    return Holdout(
        tuple(str(paths[i]) for i in keep),
        tuple(hashes[i] for i in keep),
        dataset.labels,
        tuple(dataset.examples[i].labels for i in keep),
        x,
        dataset.multi_label,
        dataset.source,
        skipped,
    )


# -- the head ----------------------------------------------------------------------------------
def check_labels(head: HeadVersion, holdout: Holdout) -> tuple[str, ...]:
    """The head's labels absent from the holdout (allowed, reported). Holdout labels the
    head lacks, or a holdout with several labels per image for a single-label head, are errors."""
    extra = [label for label in holdout.labels if label not in head.card.labels]
    if extra:
        raise EvalError(
            f"the holdout {holdout.source} has labels that head {head.title} does not have: "
            f"{', '.join(map(repr, extra))}. Head labels: {', '.join(map(repr, head.card.labels))}. "
            "Rename or remove those folders (or manifest labels)"
        )
    if not head.card.multi_label:
        bad = [p for p, row in zip(holdout.paths, holdout.truth_sets) if len(row) != 1]
        if bad:
            raise EvalError(
                f"head {head.title} is single-label, but {len(bad)} holdout images have "
                f"{'no' if not holdout.truth_sets[holdout.paths.index(bad[0])] else 'several'} labels "
                f"(first: {bad[0]}); give each image exactly one label"
            )
    return tuple(label for label in head.card.labels if label not in holdout.labels)


# -- metrics -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Curve:
    """A precision-recall curve of one label (binary and multi-label heads)."""

    label: str
    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray
    average_precision: float
    threshold: float  # the head's own threshold for this label
    sweep: tuple[dict, ...]  # {threshold, precision, recall, f1, accepted} on the SWEEP grid


@dataclass(frozen=True)
class Calibration:
    prob_true: np.ndarray  # per non-empty bin: share right
    prob_pred: np.ndarray  # per non-empty bin: mean score
    counts: np.ndarray  # per non-empty bin: predictions in it
    ece: float
    what: str  # what was calibrated, in words


@dataclass(frozen=True, eq=False)
class Evaluation:
    head: HeadVersion
    labels: tuple[str, ...]  # the head's label order (columns of scores and truth)
    scores: np.ndarray  # [n, L]
    truth: np.ndarray  # [n, L] 0/1
    accepted: tuple[tuple[str, ...], ...]  # threshold.accept: what the server would answer
    missing_labels: tuple[str, ...]  # head labels with no holdout image
    metrics: dict  # JSON-ready
    confusion: np.ndarray  # single-label: [L, L] (rows actual, columns top label); multi-label: [L, 2, 2]
    curves: tuple[Curve, ...] = ()
    calibration: Calibration | None = None

    @property
    def multi_label(self) -> bool:
        return self.head.card.multi_label

    @property
    def top(self) -> np.ndarray:
        """Index of the top-scoring label per image."""
        return self.scores.argmax(axis=1)

    def predicted_sets(self) -> list[tuple[str, ...]]:
        """Single-label: the top label; multi-label: the accepted labels."""
        if self.multi_label:
            return [tuple(row) for row in self.accepted]
        return [(self.labels[i],) for i in self.top]


def calibration(correct: np.ndarray, confidence: np.ndarray, what: str, n_bins: int = CALIBRATION_BINS) -> Calibration:
    """calibration_curve's bins, their sizes (its own binning rule), and the ECE over them."""
    from sklearn.calibration import calibration_curve

    correct = np.asarray(correct, dtype=int)
    confidence = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    if len(np.unique(correct)) < 2:
        # calibration_curve needs both outcomes to pick its positive label; with only one
        # outcome, tell it which one counts as "right".
        prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=n_bins, pos_label=1)
    else:
        prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=n_bins)
    # The bin sizes, by calibration_curve's rule (uniform edges, searchsorted on the inner ones).
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=n_bins)
    counts = counts[counts > 0]
    ece = float(np.sum(counts / counts.sum() * np.abs(prob_true - prob_pred))) if counts.size else 0.0
    return Calibration(prob_true, prob_pred, counts, ece, what)


def _curve(label: str, truth: np.ndarray, scores: np.ndarray, threshold: float) -> Curve:
    from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, precision_score, recall_score

    precision, recall, thresholds = precision_recall_curve(truth, scores)
    sweep = []
    threshold = float(threshold)
    for t in sorted([t for t in SWEEP if abs(t - threshold) > 1e-6] + [threshold]):
        predicted = (scores >= t).astype(int)
        sweep.append(
            {
                "threshold": float(t),
                "precision": float(precision_score(truth, predicted, zero_division=0)),
                "recall": float(recall_score(truth, predicted, zero_division=0)),
                "f1": float(f1_score(truth, predicted, zero_division=0)),
                "accepted": float(predicted.mean()) if len(predicted) else 0.0,
                "current": t == threshold,
            }
        )
    ap = float(average_precision_score(truth, scores)) if truth.any() else 0.0
    return Curve(label, precision, recall, thresholds, ap, float(threshold), tuple(sweep))


def positive_label(card: HeadCard) -> int:
    """A binary head's positive label: the one trained with --positive, else the one with a
    threshold, else the first."""
    positive = (card.details.get("thresholds") or {}).get("positive")
    if positive in card.labels:
        return card.labels.index(positive)
    return int(np.argmax(card.thresholds)) if any(card.thresholds) else 0


def evaluate(head: HeadVersion, holdout: Holdout, scores: np.ndarray | None = None) -> Evaluation:
    """Every metric of one head version on the holdout (scores default to the version's own)."""
    from sklearn.metrics import (
        accuracy_score,
        classification_report,
        confusion_matrix,
        f1_score,
        multilabel_confusion_matrix,
        top_k_accuracy_score,
    )

    missing = check_labels(head, holdout)
    if not len(holdout):
        raise EvalError(f"no readable image left in the holdout {holdout.source}")
    card = head.card
    labels = card.labels
    scores = head.scores(holdout.embeddings) if scores is None else scores
    truth = holdout.truth(labels)
    accepted = tuple(tuple(row) for row in accept(scores.astype(np.float32), card.info()))
    present = [j for j, label in enumerate(labels) if label not in missing]
    metrics: dict = {
        "head": card.name,
        "version": card.version,
        "kind": card.kind,
        "multi_label": card.multi_label,
        "labels": list(labels),
        "thresholds": list(card.thresholds),
        "n": int(len(truth)),
        "holdout": holdout.source,
        "missing_labels": list(missing),
        "skipped": [{"path": p, "why": why} for p, why in holdout.skipped],
    }
    curves: list[Curve] = []
    if card.multi_label:
        predicted = np.array([[label in row for label in labels] for row in accepted], dtype=int)
        report = classification_report(
            truth, predicted, labels=range(len(labels)), target_names=list(labels), output_dict=True, zero_division=0
        )
        confusion = multilabel_confusion_matrix(truth, predicted, labels=range(len(labels)))
        metrics.update(
            {
                "subset_accuracy": float(accuracy_score(truth, predicted)),
                "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
                "macro_f1": float(f1_score(truth[:, present], predicted[:, present], average="macro", zero_division=0)),
                "per_label": {name: report[name] for name in labels},
                "confusion_per_label": {
                    name: {"tn": int(c[0, 0]), "fp": int(c[0, 1]), "fn": int(c[1, 0]), "tp": int(c[1, 1])}
                    for name, c in zip(labels, confusion)
                },
            }
        )
        curves = [_curve(labels[j], truth[:, j], scores[:, j], card.thresholds[j]) for j in present]
        cal = calibration(truth.ravel(), scores.ravel(), "every (image, label) score vs whether the label is there")
    else:
        y_true, y_top = truth.argmax(axis=1), scores.argmax(axis=1)
        report = classification_report(
            y_true, y_top, labels=range(len(labels)), target_names=list(labels), output_dict=True, zero_division=0
        )
        confusion = confusion_matrix(y_true, y_top, labels=range(len(labels)))
        covered = np.array([bool(row) for row in accepted])
        correct = np.array([bool(row) and row[0] == labels[t] for row, t in zip(accepted, y_true)])
        metrics.update(
            {
                "accuracy": float(accuracy_score(y_true, y_top)),
                # Over the labels the holdout has: a label without images has no recall to average.
                "macro_f1": float(f1_score(y_true, y_top, labels=present, average="macro", zero_division=0)),
                "per_label": {name: report[name] for name in labels},
                "confusion_matrix": confusion.tolist(),
                "thresholded": {
                    "coverage": float(covered.mean()),
                    "accuracy_of_accepted": float(correct[covered].mean()) if covered.any() else 0.0,
                },
            }
        )
        if len(labels) > 2:
            metrics["top_k_accuracy"] = {
                str(k): float(top_k_accuracy_score(y_true, scores, k=k, labels=range(len(labels))))
                for k in TOP_K
                if k < len(labels)
            }
        else:
            j = positive_label(card)
            curves = [_curve(labels[j], truth[:, j], scores[:, j], card.thresholds[j])]
        cal = calibration(y_top == y_true, scores.max(axis=1), "the top label's score vs whether it is right")
    if curves:
        metrics["precision_recall"] = {
            c.label: {"average_precision": c.average_precision, "threshold": c.threshold, "sweep": list(c.sweep)}
            for c in curves
        }
    metrics["calibration"] = {
        "ece": cal.ece,
        "bins": CALIBRATION_BINS,
        "what": cal.what,
        "prob_true": cal.prob_true.tolist(),
        "prob_pred": cal.prob_pred.tolist(),
        "counts": cal.counts.tolist(),
    }
    return Evaluation(head, labels, scores, truth, accepted, missing, metrics, confusion, tuple(curves), cal)


# -- comparison ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    index: int  # holdout row
    path: str
    truth: tuple[str, ...]
    before: tuple[str, ...]  # a's prediction (top label, or accepted set for multi-label)
    after: tuple[str, ...]  # b's prediction
    score_before: float  # a's score of its prediction (top score; mean accepted score for multi-label)
    score_after: float


@dataclass(frozen=True, eq=False)
class Comparison:
    a: Evaluation
    b: Evaluation
    rows: tuple[tuple[str, float, float], ...]  # (metric, a, b)
    changed: tuple[Change, ...]  # images whose prediction differs


def _headline(e: Evaluation) -> dict[str, float]:
    m = e.metrics
    if e.multi_label:
        rows = {"subset accuracy": m["subset_accuracy"], "micro-F1": m["micro_f1"], "macro-F1": m["macro_f1"]}
    else:
        rows = {
            "accuracy": m["accuracy"],
            "macro-F1": m["macro_f1"],
            "coverage (thresholds)": m["thresholded"]["coverage"],
            "accuracy of accepted": m["thresholded"]["accuracy_of_accepted"],
        }
        rows.update({f"top-{k} accuracy": v for k, v in m.get("top_k_accuracy", {}).items()})
    rows["ECE"] = m["calibration"]["ece"]
    for label, values in m["per_label"].items():
        rows[f"F1 {label}"] = values["f1-score"]
    return rows


def aligned(b: HeadVersion, labels: tuple[str, ...], scores: np.ndarray) -> np.ndarray:
    """b's scores with columns reordered to ``labels`` (the other head's order)."""
    return scores[:, [b.card.labels.index(label) for label in labels]]


def compare(a: Evaluation, b: Evaluation, holdout: Holdout) -> Comparison:
    """Side-by-side metrics and the images whose prediction changed from a to b."""
    if set(a.labels) != set(b.labels) or a.multi_label != b.multi_label:
        only_a, only_b = sorted(set(a.labels) - set(b.labels)), sorted(set(b.labels) - set(a.labels))
        raise EvalError(
            f"{a.head.title} and {b.head.title} cannot be compared: "
            + (
                f"labels only in {a.head.title}: {only_a}; only in {b.head.title}: {only_b}"
                if only_a or only_b
                else "one is multi-label and the other is not"
            )
        )
    ha, hb = _headline(a), _headline(b)
    rows = tuple((name, ha[name], hb[name]) for name in ha if name in hb)
    changed = []
    b_scores = aligned(b.head, a.labels, b.scores)
    before, after = a.predicted_sets(), b.predicted_sets()
    for i, (x, y) in enumerate(zip(before, after)):
        if set(x) != set(y):
            changed.append(
                Change(
                    i,
                    holdout.paths[i],
                    holdout.truth_sets[i],
                    x,
                    y,
                    _score_of(a.scores[i], a.labels, x),
                    _score_of(b_scores[i], a.labels, y),
                )
            )
    return Comparison(a, b, rows, tuple(changed))


def _score_of(scores: np.ndarray, labels: tuple[str, ...], chosen: tuple[str, ...]) -> float:
    return float(np.mean([scores[labels.index(c)] for c in chosen])) if chosen else 0.0


# -- one run ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EvalRun:
    options: EvalOptions
    repository: Repository
    holdout: Holdout
    evaluation: Evaluation  # the head (or --compare's first version) on the holdout
    comparison: Comparison | None = None
    embed: Embedder | None = field(default=None, repr=False)  # reused for training images


def run_eval(options: EvalOptions, progress: Callable[[int, int], None] | None = None) -> EvalRun:
    """Load, embed, score and measure; progress(done, total) while embedding."""
    if options.compare and options.against:
        raise EvalError("compare two versions or compare against another head, not both", option="against")
    if options.compare and options.version is not None:
        raise EvalError("comparing two versions names both of them; leave out the single version", option="version")
    repository = Repository(options.repo)
    first = HeadVersion.load(repository, options.name, options.compare[0] if options.compare else options.version)
    second = None
    if options.compare:
        second = HeadVersion.load(repository, options.name, options.compare[1])
    elif options.against:
        second = HeadVersion.load(repository, options.against)
    if options.ood is not None and not first.has_ood:
        raise EvalError(
            f"head {first.title} has no out-of-distribution reference set (trained with --ood off, or "
            "before heads carried one): retrain it to evaluate --ood",
            option="ood",
        )
    if options.manifest is not None and not first.card.multi_label:
        LOG.info("a manifest holdout for a single-label head: each image needs exactly one label")
    embed = Embedder(repository, options.server, options.cache_dir)
    if options.snapshot is not None:
        if options.data is not None or options.manifest is not None:
            raise EvalError("give one holdout: a labelled folder, a manifest or a dataset snapshot", option="snapshot")
        holdout = snapshot_holdout(options.snapshot, repository.fingerprint)
    else:
        dataset = read_labelled(options.data, options.manifest, text=text_only(repository.card))
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], len(dataset.examples))

        holdout = embed_dataset(dataset, embed, advance)
    evaluation = evaluate(first, holdout)
    if options.ood is not None:
        from headmaster.training.evaluation.ood import ood_metrics, ood_paths

        paths = ood_paths(options.ood)
        hashes, vectors, failures = embed(paths)
        outside = [vectors[h] for p, h in zip(paths, hashes) if h is not None and str(p) not in failures]
        if not outside:
            raise EvalError(f"--ood {options.ood}: none of its {len(paths)} images could be read", option="ood")
        evaluation.metrics["ood"] = ood_metrics(
            first, holdout.embeddings, np.stack(outside), holdout.truth(first.card.labels), str(options.ood)
        )
    comparison = compare(evaluation, evaluate(second, holdout), holdout) if second else None
    return EvalRun(options, repository, holdout, evaluation, comparison, embed)
