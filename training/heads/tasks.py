"""`train-head --task hierarchy | regression | ordinal`: the same pipeline as flat heads
(embed through the cache -> one row per image content -> near duplicates kept on one side ->
fit -> measure on validation -> publish version N+1 atomically -> hot-load), with the target
and the loss of the task:

- hierarchy: every node of the taxonomy is a sigmoid label; an image is a positive of its
  node and of every ancestor (a parent's examples include its children's). Thresholds per
  node (best F1 on validation); the server answers one consistent path (threshold.py).
- regression: one value per image from a CSV (``path,quality``); mean squared error.
- ordinal: folders of ordered classes; CORAL targets (score_fit.py). A plain multiclass head is
  fitted on the same split as a baseline, and the card's metrics show both: accuracy, MAE in
  classes and how far the mistakes fall.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from headmaster.errors import DataError
from headmaster.export.heads import HeadCard
from headmaster.repository.repo import Repository
from headmaster.rules.threshold import ordinal_class
from headmaster.training.data import (
    Dataset,
    by_content,
    content_hash,
    from_folders,
    from_hierarchy,
    from_values,
    ordered,
)
from headmaster.training.embeddings import embed_paths
from headmaster.training.heads import checks
from headmaster.training.heads import ood as ood_detection
from headmaster.training.heads.options import TrainResult, publish_fitted
from headmaster.training.heads.score_fit import fit_ordinal, fit_regression
from headmaster.training.heads.task_metrics import hierarchy_metrics, ordinal_metrics, regression_metrics
from headmaster.training.heads.thresholds import choose_thresholds
from headmaster.training.heads.trainer import fit

TASKS = ("hierarchy", "regression", "ordinal")


def load_task_dataset(options) -> Dataset:
    """The labelled images of a hierarchy, regression or ordinal head (see TrainOptions)."""
    if options.store is not None:
        raise DataError(
            f"--task {options.task} trains from labelled files; --store trains flat label heads", option="store"
        )
    if options.task == "regression":
        if options.manifest is None or options.data is not None:
            raise DataError(
                "a regression head reads its values from a CSV: --manifest FILE with columns path and "
                "one value column (e.g. path,quality)",
                option="manifest",
            )
        return from_values(options.manifest)
    if options.data is None or options.manifest is not None:
        raise DataError(
            f"a {options.task} head reads a folder of label folders (give DATA, not --manifest)", option="data"
        )
    if options.task == "hierarchy":
        return from_hierarchy(options.data, options.taxonomy)
    if options.taxonomy is not None:
        raise DataError("--taxonomy goes with --task hierarchy", option="taxonomy")
    return ordered(from_folders(options.data), options.order)


def train_task_head(options, progress: Callable[[int, int], None] | None = None):
    """Train and publish a hierarchy / regression / ordinal head; returns a TrainResult."""
    if options.task not in TASKS:
        raise DataError(f"task must be labels or one of {', '.join(TASKS)}, not {options.task!r}", option="task")
    if options.order is not None and options.task != "ordinal":
        raise DataError("--order goes with --task ordinal", option="order")
    repo = Repository(options.repo)
    dataset = load_task_dataset(options)
    hashes, vectors, failures = embed_paths(
        [e.path for e in dataset.examples], repo, None if options.local else options.server, options.cache_dir, progress
    )
    report = checks.CheckReport(
        counts={}, class_weights={}, unreadable=sorted(failures.items()) + list(dataset.skipped)
    )
    by_sha = by_content(dataset.examples, hashes, failures)
    rows = []  # (sha, Example)
    for sha, members in by_sha.items():
        targets = {(dataset.examples[i].labels, dataset.examples[i].value) for i in members}
        if len(targets) > 1:  # the same image under two labels or values: left out, not guessed
            report.conflicting.append([str(dataset.examples[i].path) for i in members])
            continue
        if len(members) > 1:
            report.exact_duplicates.append([str(dataset.examples[i].path) for i in members])
        rows.append((sha, dataset.examples[members[0]]))
    if report.conflicting:
        report.warnings.append(f"{len(report.conflicting)} images appear with different targets; left out")
    if len(rows) < 10:
        raise DataError(f"only {len(rows)} readable, distinct images in {dataset.source}: too few to train on")
    x = np.stack([vectors[sha] for sha, _ in rows])
    groups = checks.components(len(rows), checks.near_duplicate_pairs(x))
    if np.bincount(groups).max() > options.val_fraction * len(rows):
        groups = np.arange(len(rows))
    labels = dataset.labels
    examples = [e for _, e in rows]
    if dataset.task == "ordinal":
        train, val = checks.split(
            [e.labels for e in examples], groups, labels, False, options.val_fraction, options.config.seed
        )
    else:  # regression and hierarchy: a group-aware random split (no single label to stratify by)
        train, val = checks.split([()] * len(rows), groups, labels, True, options.val_fraction, options.config.seed)
    config = options.config
    thresholds, explanation, parents, value_range, multi_label = (), [], None, None, False
    if dataset.task == "hierarchy":
        truth = np.array([[label in e.labels for label in labels] for e in examples], dtype=np.int64)
        report.counts = {label: int(truth[:, j].sum()) for j, label in enumerate(labels)}
        weights, warnings = checks.check_counts(report.counts, len(rows), True)
        report.class_weights, report.warnings = weights, report.warnings + warnings
        head, fit_info = fit(
            x[train], truth[train], x[val], truth[val], True, np.array([weights[label] for label in labels]), config
        )
        thresholds, explanation = choose_thresholds(
            head.scores(x[val]), truth[val], labels, options.thresholds, options.target_precision
        )
        parents, multi_label, y = dataset.parents, True, truth
    elif dataset.task == "regression":
        y = np.array([e.value for e in examples], dtype=np.float64)
        head, fit_info = fit_regression(x[train], y[train], x[val], y[val], config)
        thresholds, value_range = (0.0,), (float(y[train].min()), float(y[train].max()))
        explanation = [{"label": labels[0], "threshold": 0.0, "why": "a regression head answers a value"}]
    else:
        y = np.array([labels.index(e.labels[0]) for e in examples])
        report.counts = {label: int((y == j).sum()) for j, label in enumerate(labels)}
        head, fit_info = fit_ordinal(x[train], y[train], x[val], y[val], len(labels), config)
        thresholds = (0.0,) * len(labels)
        explanation = [
            {"label": label, "threshold": 0.0, "why": "ordinal: the median class is the answer"} for label in labels
        ]

    def card_for(version: int, **more) -> HeadCard:
        return HeadCard(
            name=options.name,
            version=version,
            labels=labels,
            thresholds=thresholds,
            multi_label=multi_label,
            encoder_fingerprint=repo.fingerprint,
            embed_dim=head.embed_dim,
            kind=config.kind,
            task=dataset.task,
            parents=parents,
            value_range=value_range,
            **more,
        )

    val_scores = head.scores(x[val])
    info = card_for(1).info()
    if dataset.task == "hierarchy":
        metrics = hierarchy_metrics(val_scores, [examples[i].labels for i in val], info)
    elif dataset.task == "regression":
        metrics = regression_metrics(np.clip(val_scores[:, 0], *value_range), y[val])
    else:
        metrics = ordinal_metrics(ordinal_class(val_scores), y[val], labels, val_scores @ np.arange(len(labels)))
        # The same split through a plain multiclass head: what the ordinal loss buys.
        # The same optimiser as the ordinal head (AdamW, early stopping), so the comparison shows
        # what the cumulative targets change, not what L-BFGS does.
        baseline, _ = fit(
            x[train], y[train], x[val], y[val], False, np.ones(len(labels)), dataclasses.replace(config, solver="adamw")
        )
        metrics["multiclass_baseline"] = ordinal_metrics(baseline.scores(x[val]).argmax(axis=1), y[val], labels)
    if options.ood not in ood_detection.MODES:
        raise DataError(f"ood must be one of {', '.join(ood_detection.MODES)}, not {options.ood!r}", option="ood")
    y_ood = y if dataset.task == "ordinal" else np.zeros((len(rows), 2))  # k by held-out class for ordinal only
    ood_fit = (
        None
        if options.ood == "off"
        else ood_detection.fit_ood(
            x[train], y_ood[train], x[val], y_ood[val], options.ood, options.ood_references, config.seed
        )
    )
    data_hash = content_hash([(sha, e.labels + ((repr(e.value),) if e.value is not None else ())) for sha, e in rows])

    card = card_for(
        1,  # provisional: the repository numbers the version it publishes
        ood=ood_fit.card if ood_fit else None,
        details={
            "data": {
                "source": dataset.source,
                "sha256": data_hash,
                "images": len(rows),
                "train": int(len(train)),
                "validation": int(len(val)),
                "checks": report.as_dict(),
            },
            "training": {
                **config.as_dict(),
                **fit_info,
                "val_fraction": options.val_fraction,
                "task": dataset.task,
            },
            "thresholds": {"mode": options.thresholds, "per_label": explanation},
            "metrics": metrics,
            "ood": ood_fit.details if ood_fit else None,
        },
    )

    change = publish_fitted(options, head, card, x[val], ood_fit)
    return TrainResult(change.card, metrics, report, explanation, fit_info, change.server)
