"""`train-head`: labelled images -> a new, checked, atomic head version (hot-loaded if asked).

Steps: read the data (folders or manifest) -> embed what the cache lacks (server or local,
same encoder either way) -> check the data -> split without leakage -> fit -> choose
thresholds on validation -> measure -> publish version N+1 (its ONNX file is compared with
the fitted weights on the validation embeddings first) -> tell the server to load it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from headmaster.errors import DataError
from headmaster.export.heads import HeadCard, check_head_name
from headmaster.repository.repo import Repository
from headmaster.repository.topology import text_only
from headmaster.training.data import Dataset, by_content, content_hash, read_labelled
from headmaster.training.embeddings import embed_paths
from headmaster.training.feedback.snapshots import export_snapshot, is_snapshot, load_for_training
from headmaster.training.heads import checks
from headmaster.training.heads import ood as ood_detection
from headmaster.training.heads.metrics import evaluate
from headmaster.training.heads.options import TrainOptions, TrainResult, publish_fitted
from headmaster.training.heads.tasks import train_task_head
from headmaster.training.heads.thresholds import choose_thresholds
from headmaster.training.heads.trainer import fit

LOG = logging.getLogger(__name__)


def load_dataset(options: TrainOptions) -> Dataset | None:
    """The labelled images to embed; None when the data is a snapshot or the store (their
    embeddings are stored already)."""
    if sum(x is not None for x in (options.data, options.manifest, options.store)) != 1:
        raise DataError(
            "give one of: a data folder (one sub-folder per bucket) or snapshot, --manifest FILE, or --store PATH"
        )
    if options.store is not None or (options.data is not None and is_snapshot(options.data)):
        return None  # stored embeddings: see train_head
    return read_labelled(options.data, options.manifest, text=text_only(Repository(options.repo).card))


def _truth(rows_labels: list[tuple[str, ...]], labels: tuple[str, ...]) -> np.ndarray:
    return np.array([[label in row for label in labels] for row in rows_labels], dtype=np.int64)


def train_head(options: TrainOptions, progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """progress(done, total) is called while images are embedded."""
    check_head_name(options.name)
    if options.task != "labels":
        return train_task_head(options, progress)
    repo = Repository(options.repo)
    dataset, snapshot = load_dataset(options), None
    if dataset is None:
        # Stored embeddings: nothing to embed, no encoder needed.
        snapshot_path = options.data
        if options.store is not None:
            from headmaster.store import open_store

            out = options.snapshot_dir or (
                Path("snapshots") if "://" in options.store else Path(options.store) / "snapshots"
            )
            snapshot_path = export_snapshot(
                open_store(options.store, create=False), options.name, out, repo.fingerprint
            ).path
        snapshot, hashes, vectors = load_for_training(snapshot_path, repo.fingerprint)
        dataset, failures = snapshot.dataset(), {}
    else:
        hashes, vectors, failures = embed_paths(
            [e.path for e in dataset.examples],
            repo,
            None if options.local else options.server,
            options.cache_dir,
            progress,
        )

    # One row per distinct image content; contradictory copies are dropped, not guessed.
    report = checks.CheckReport(
        counts={}, class_weights={}, unreadable=sorted(failures.items()) + list(dataset.skipped)
    )
    by_sha = by_content(dataset.examples, hashes, failures)
    rows: list[tuple[str, tuple[str, ...], str]] = []  # (sha, labels, path)
    excluded = 0
    for sha, members in by_sha.items():
        if sha in options.exclude:
            excluded += 1
            continue
        label_sets = {dataset.examples[i].labels for i in members}
        member_paths = [str(dataset.examples[i].path) for i in members]
        if len(label_sets) > 1:
            report.conflicting.append(member_paths)
            continue
        if len(members) > 1:
            report.exact_duplicates.append(member_paths)
        rows.append((sha, dataset.examples[members[0]].labels, member_paths[0]))
    if report.conflicting:
        report.warnings.append(f"{len(report.conflicting)} images appear under different labels; left out")
    if report.exact_duplicates:
        report.warnings.append(
            f"{len(report.exact_duplicates)} images appear more than once with the same label; each is used once"
        )

    labels = dataset.labels
    x = np.stack([vectors[sha] for sha, _, _ in rows]) if rows else np.zeros((0, 1), np.float32)
    truth = _truth([row_labels for _, row_labels, _ in rows], labels)
    report.counts = {label: int(truth[:, j].sum()) for j, label in enumerate(labels)}
    weights, warnings = checks.check_counts(report.counts, len(rows), dataset.multi_label)
    report.class_weights = weights
    report.warnings += warnings
    checks.check_spread(x, truth, labels)

    pairs = checks.near_duplicate_pairs(x)
    report.near_duplicates = [
        (rows[i][2], rows[j][2], c) for i, j, c in pairs if dataset.multi_label or rows[i][1] == rows[j][1]
    ]
    if report.near_duplicates:
        report.warnings.append(
            f"{len(report.near_duplicates)} near-duplicate pairs (cosine >= "
            f"{checks.NEAR_DUPLICATE_COSINE}); each pair is kept in one split"
        )
    groups = checks.components(len(rows), pairs)
    if len(rows) and np.bincount(groups).max() > options.val_fraction * len(rows):
        # A chain of near duplicates spans too much of the data to keep in one split.
        report.warnings.append(
            "near duplicates chain together across much of the data; they are listed "
            "but not kept together, so validation may see near copies of training images"
        )
        groups = np.arange(len(rows))
    train, val = checks.split(
        [row_labels for _, row_labels, _ in rows],
        groups,
        labels,
        dataset.multi_label,
        options.val_fraction,
        options.config.seed,
    )

    y = truth if dataset.multi_label else truth.argmax(axis=1)
    class_weight_vector = np.array([weights[label] for label in labels])
    head, fit_info = fit(x[train], y[train], x[val], y[val], dataset.multi_label, class_weight_vector, options.config)
    val_scores = head.scores(x[val])
    thresholds, explanation = choose_thresholds(
        val_scores, truth[val], labels, options.thresholds, options.target_precision, options.positive
    )
    metrics = evaluate(val_scores, truth[val], labels, dataset.multi_label, thresholds)
    data_hash = content_hash([(sha, row_labels) for sha, row_labels, _ in rows])
    if options.ood not in ood_detection.MODES:
        raise DataError(f"ood must be one of {', '.join(ood_detection.MODES)}, not {options.ood!r}", option="ood")
    ood_fit = (
        None
        if options.ood == "off"
        else ood_detection.fit_ood(
            x[train], y[train], x[val], y[val], options.ood, options.ood_references, options.config.seed
        )
    )

    card = HeadCard(
        name=options.name,
        version=1,  # provisional: the repository numbers the version it publishes
        labels=labels,
        thresholds=thresholds,
        multi_label=dataset.multi_label,
        encoder_fingerprint=repo.fingerprint,
        embed_dim=head.embed_dim,
        kind=options.config.kind,
        details={
            "data": {
                "source": dataset.source,
                "sha256": data_hash,
                "images": len(rows),
                "snapshot": {
                    "path": str(snapshot.path),
                    "head": snapshot.head,
                    "number": snapshot.number,
                    "manifest_sha256": snapshot.manifest_sha256,
                }
                if snapshot
                else None,
                "train": int(len(train)),
                "validation": int(len(val)),
                "excluded": excluded,
                "checks": report.as_dict(),
            },
            "training": {**options.config.as_dict(), **fit_info, "val_fraction": options.val_fraction},
            "thresholds": {
                "mode": options.thresholds,
                "target_precision": options.target_precision,
                "positive": options.positive,
                "per_label": explanation,
            },
            "metrics": metrics,
            "ood": ood_fit.details if ood_fit else None,
        },
        ood=ood_fit.card if ood_fit else None,
    )
    change = publish_fitted(options, head, card, x[val], ood_fit, options.before_publish)
    return TrainResult(change.card, metrics, report, explanation, fit_info, change.server)
