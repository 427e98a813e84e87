"""Data quality of a holdout: likely label errors, near duplicates, and leakage from training.

- **Likely label errors** (cleanlab's confident learning): a logistic regression on the
  embeddings gives each image out-of-fold probabilities (``cross_val_predict``, so no image
  is scored by a model that saw its label); ``cleanlab.filter.find_label_issues`` flags the
  images whose given label disagrees with what the rest of the data implies, ranked by self
  confidence (the out-of-fold probability of the given label, lowest first). The regression
  is independent of the head under test, so the head's own mistakes do not vouch for
  themselves. With the training images added (``--train-data``), it learns from more.
- **Near duplicates** inside the holdout: ``checks.near_duplicate_pairs`` (the rule
  train-head uses): near copies weigh one picture twice in the metrics.
- **Leakage**: holdout images that are in the head's training set, byte for byte (sha256)
  or as near duplicates. The head has seen them, so its metrics on them are optimistic.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headmaster.export.heads import HeadCard
from headmaster.repository.topology import text_only
from headmaster.training.data import content_hash, read_labelled
from headmaster.training.evaluation.evaluate import Embedder, Holdout, embed_dataset
from headmaster.training.heads.checks import near_duplicate_pairs

LOG = logging.getLogger(__name__)

CV_FOLDS = 5
REGULARISATION = 0.1  # LogisticRegression C for the out-of-fold probabilities
CORRECTIONS_COLUMNS = ("item", "head", "label", "note")  # what `headmaster correct --csv` reads


@dataclass(frozen=True)
class LabelIssue:
    rank: int  # 1 = most likely wrong
    path: str
    sha256: str
    given: tuple[str, ...]  # the label(s) the image has
    suggested: tuple[str, ...]  # what the out-of-fold model says
    self_confidence: float  # out-of-fold probability of the given label (multi-label: cleanlab's score)
    suggested_probability: float
    in_holdout: bool  # False: a training image (--train-data)

    @property
    def action(self) -> str:
        where = "holdout" if self.in_holdout else "training set"
        return (
            f"look at it: if it is {' + '.join(self.suggested) or 'none of the labels'}, fix the label in the "
            f"{where} (corrections.csv lists it for `headmaster correct`); if the given label is right, keep it"
        )


@dataclass(frozen=True)
class NearDuplicate:
    path_a: str
    path_b: str
    cosine: float
    labels_a: tuple[str, ...]
    labels_b: tuple[str, ...]

    @property
    def action(self) -> str:
        if self.labels_a != self.labels_b:
            return "the same picture under different labels: decide which label is right and drop the other copy"
        return "keep one of the two: a near copy counts the same picture twice in the metrics"


@dataclass(frozen=True)
class Leak:
    holdout_path: str
    train_path: str
    kind: str  # exact (same sha256) | near (checks.NEAR_DUPLICATE_COSINE or more)
    cosine: float

    @property
    def action(self) -> str:
        return (
            "remove it from the holdout (or from the training set and retrain): the head was trained on "
            + ("this very file" if self.kind == "exact" else "a near copy of it")
            + ", so its score here is optimistic"
        )


@dataclass(frozen=True)
class QualityReport:
    label_issues: tuple[LabelIssue, ...]
    near_duplicates: tuple[NearDuplicate, ...]
    leaks: tuple[Leak, ...]
    leakage_checked: bool
    train_source: str | None  # the training set folder / manifest that was checked
    notes: tuple[str, ...] = field(default_factory=tuple)  # what was not checked, and why

    def as_dict(self) -> dict:
        return {
            "label_issues": [
                {
                    "rank": i.rank,
                    "path": i.path,
                    "sha256": i.sha256,
                    "given": list(i.given),
                    "suggested": list(i.suggested),
                    "self_confidence": i.self_confidence,
                    "in_holdout": i.in_holdout,
                }
                for i in self.label_issues
            ],
            "near_duplicates": [{"a": d.path_a, "b": d.path_b, "cosine": d.cosine} for d in self.near_duplicates],
            "leakage_checked": self.leakage_checked,
            "train_source": self.train_source,
            "leaks": [
                {"holdout": x.holdout_path, "train": x.train_path, "kind": x.kind, "cosine": x.cosine}
                for x in self.leaks
            ],
            "notes": list(self.notes),
        }


# -- label issues -----------------------------------------------------------------------------
def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, multi_label: bool, seed: int = 0) -> np.ndarray:
    """Probabilities for each row from a model that never saw that row (cross_val_predict).

    y: class indices [n] (single-label) or a 0/1 matrix [n, K] (multi-label)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Strong regularisation (C=0.1 on standardised embeddings): with a few hundred images in
    # hundreds of dimensions, a looser fit memorises the wrong labels of a mislabelled group
    # and then vouches for them; measured on the digits test, C=0.1 ranks more of them first.
    model = make_pipeline(StandardScaler(), LogisticRegression(C=REGULARISATION, max_iter=2000))
    if multi_label:
        cv = KFold(min(CV_FOLDS, len(x)), shuffle=True, random_state=seed)
        return cross_val_predict(OneVsRestClassifier(model), x, y, cv=cv, method="predict_proba")
    folds = min(CV_FOLDS, int(np.bincount(y).min()))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, x, y, cv=cv, method="predict_proba")


def find_label_issues(sets: list[Holdout], notes: list[str]) -> list[LabelIssue]:
    """cleanlab over the pooled images of ``sets`` (the holdout first, then training images)."""
    import cleanlab.filter

    rows = [(s, i) for s in sets for i in range(len(s))]
    x = np.concatenate([s.embeddings for s in sets]) if rows else np.zeros((0, 1))
    given = [s.truth_sets[i] for s, i in rows]
    multi_label = any(s.multi_label for s in sets)
    classes = sorted({label for row in given for label in row})
    if multi_label:
        y = np.array([[c in row for c in classes] for row in given], dtype=int)
        usable = np.arange(len(rows))
        if len(rows) < 2 * CV_FOLDS or len(classes) < 2:
            notes.append(
                f"label errors not checked: {len(rows)} images and {len(classes)} labels are too few "
                f"for {CV_FOLDS}-fold cross-validation"
            )
            return []
    else:
        counts = {c: sum(row == (c,) for row in given) for c in classes}
        rare = sorted(c for c, n in counts.items() if n < 2)
        if rare:
            notes.append(
                f"label errors not checked for {', '.join(map(repr, rare))}: fewer than 2 images "
                "(cross-validation needs two)"
            )
        kept = [c for c in classes if c not in rare]
        usable = np.array([k for k, row in enumerate(given) if row[0] in kept], dtype=int)
        if len(kept) < 2:
            notes.append("label errors not checked: fewer than two labels with 2 or more images")
            return []
        classes = kept
        y = np.array([classes.index(given[k][0]) for k in usable])
    probabilities = out_of_fold_probabilities(x[usable], y, multi_label)
    labels_arg = [list(np.flatnonzero(row)) for row in y] if multi_label else y
    ranked = cleanlab.filter.find_label_issues(
        labels_arg, probabilities, multi_label=multi_label, n_jobs=1, return_indices_ranked_by="self_confidence"
    )
    issues = []
    for rank, k in enumerate(ranked, 1):
        s, i = rows[usable[k]]
        p = probabilities[k]
        if multi_label:
            suggested = tuple(classes[j] for j in np.flatnonzero(p >= 0.5))
            given_p = float(np.mean([p[j] if y[k, j] else 1 - p[j] for j in range(len(classes))]))
            suggested_p = float(np.mean([p[j] if p[j] >= 0.5 else 1 - p[j] for j in range(len(classes))]))
        else:
            suggested = (classes[int(p.argmax())],)
            given_p, suggested_p = float(p[y[k]]), float(p.max())
        issues.append(
            LabelIssue(rank, s.paths[i], s.hashes[i], s.truth_sets[i], suggested, given_p, suggested_p, s is sets[0])
        )
    return issues


# -- duplicates and leakage -------------------------------------------------------------------------
def holdout_near_duplicates(holdout: Holdout) -> list[NearDuplicate]:
    return [
        NearDuplicate(holdout.paths[i], holdout.paths[j], c, holdout.truth_sets[i], holdout.truth_sets[j])
        for i, j, c in near_duplicate_pairs(holdout.embeddings)
    ]


def find_leaks(holdout: Holdout, train: Holdout) -> list[Leak]:
    """Holdout images whose bytes, or a near copy, are in the training set."""
    leaks: list[Leak] = []
    train_by_sha = dict(zip(train.hashes, train.paths))
    exact = set()
    for path, sha in zip(holdout.paths, holdout.hashes):
        if sha in train_by_sha:
            leaks.append(Leak(path, train_by_sha[sha], "exact", 1.0))
            exact.add(path)
    n = len(holdout)
    if n and len(train):
        # One pass over both sets (centred together); only pairs across the boundary count.
        for i, j, c in near_duplicate_pairs(np.concatenate([holdout.embeddings, train.embeddings])):
            if i < n <= j and holdout.paths[i] not in exact and holdout.hashes[i] != train.hashes[j - n]:
                leaks.append(Leak(holdout.paths[i], train.paths[j - n], "near", c))
    return leaks


def training_source(card: HeadCard, train_data: Path | None) -> tuple[Path | None, str]:
    """The training set to check against, or None and why not."""
    if train_data is not None:
        return Path(train_data), f"--train-data {train_data}"
    source = (card.details.get("data") or {}).get("source")
    if not source:
        return None, (
            f"leakage not checked: {card.name} v{card.version} records no training data "
            f"({card.kind} head); give --train-data DIR to check against a folder"
        )
    if not Path(source).exists():
        return None, (
            f"leakage not checked: {card.name} v{card.version} was trained on {source}, which does not "
            "exist here; give --train-data DIR"
        )
    return Path(source), f"{source} (recorded in {card.name} v{card.version})"


def check_quality(holdout: Holdout, card: HeadCard, embed: Embedder, train_data: Path | None = None) -> QualityReport:
    """Label issues, near duplicates and leakage for one holdout and the head's training set."""
    notes: list[str] = []
    source, described = training_source(card, train_data)
    train = None
    if source is None:
        notes.append(described)
    else:
        text = text_only(embed.repository.card)  # a text encoder's training set: .txt folders or text,label
        dataset = read_labelled(source if source.is_dir() else None, None if source.is_dir() else source, text=text)
        train = embed_dataset(dataset, embed)
        recorded = (card.details.get("data") or {}).get("sha256")
        if recorded and recorded != _training_hash(train):
            notes.append(
                f"{source} has changed since {card.name} v{card.version} was trained on it (its content "
                "hash differs); leakage is checked against what is there now"
            )
    sets = [holdout]
    if train is not None and train_data is not None:
        # Pooled only when its labels are the head's: a suggestion must be a label the head has.
        foreign = sorted(set(train.labels) - set(card.labels))
        if foreign:
            notes.append(
                f"training images not used for the label-error check: {source} has labels head "
                f"{card.name} lacks ({', '.join(map(repr, foreign))})"
            )
        elif train.multi_label != holdout.multi_label:
            notes.append(
                "training images not used for the label-error check: one set is a manifest "
                "(several labels per image), the other folders"
            )
        else:
            sets.append(train)
    issues = find_label_issues(sets, notes)
    leaks = find_leaks(holdout, train) if train is not None else []
    return QualityReport(
        tuple(issues),
        tuple(holdout_near_duplicates(holdout)),
        tuple(leaks),
        train is not None,
        described if train is not None else None,
        tuple(notes),
    )


def _training_hash(train: Holdout) -> str:
    """train-head's data hash: one row per distinct image, contradictory copies left out."""
    by_sha: dict[str, set] = {}
    for sha, labels in zip(train.hashes, train.truth_sets):
        by_sha.setdefault(sha, set()).add(labels)
    return content_hash([(sha, next(iter(sets))) for sha, sets in by_sha.items() if len(sets) == 1])


def corrections(report: QualityReport, head: str) -> list[dict[str, str]]:
    """Rows of corrections.csv: item (sha256), head, label (suggested; ';' between several), note."""
    rows = []
    for issue in report.label_issues:
        rows.append(
            {
                "item": issue.sha256,
                "head": head,
                "label": ";".join(issue.suggested),
                "note": (
                    f"cleanlab rank {issue.rank}: labelled {' + '.join(issue.given) or '(none)'} in the "
                    f"{'holdout' if issue.in_holdout else 'training set'} ({issue.path}); out-of-fold "
                    f"probability of that label {issue.self_confidence:.3f}, of the suggestion "
                    f"{issue.suggested_probability:.3f}"
                ),
            }
        )
    return rows


def write_corrections(rows: list[dict[str, str]], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CORRECTIONS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path
