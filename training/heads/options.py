"""What `train-head` is asked (TrainOptions) and what it returns (TrainResult): shared by the
flat-label pipeline (train_head.py) and the hierarchy / regression / ordinal one (tasks.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from headmaster.export.heads import HeadCard, HeadWeights
from headmaster.training.heads import checks
from headmaster.training.heads import ood as ood_detection
from headmaster.training.heads.trainer import TrainConfig


@dataclass(frozen=True)
class TrainOptions:
    name: str
    repo: Path
    data: Path | None = None  # folder of bucket folders (single-label), or a dataset snapshot
    store: str | None = None  # train from the store's corrections (frozen as a snapshot first)
    snapshot_dir: Path | None = None  # where --store snapshots go (default: STORE/snapshots)
    manifest: Path | None = None  # CSV / JSONL of path -> labels (multi-label)
    server: str | None = None  # HTTP host:port: embed through it and hot-load the new version (default:
    # embed here, and hot-load into the server recorded in the repository, if one runs)
    local: bool = False  # embed here even when a server is given
    config: TrainConfig = field(default_factory=TrainConfig)
    val_fraction: float = 0.2
    thresholds: str = "best-f1"  # best-f1 | precision | none
    target_precision: float = 0.9
    positive: str | None = None  # binary heads: the label that gets the threshold
    cache_dir: Path | None = None  # default: ~/.cache/headmaster/embeddings
    keep: int = 5  # versions kept on disk (loadable for rollback)
    ood: str = "flag"  # out of distribution: abstain (no label) | flag (label + "ood": true) | off (no reference set)
    ood_references: int = ood_detection.MAX_REFERENCES  # training embeddings kept for the kNN (subsampled beyond)
    task: str = "labels"  # labels (flat) | hierarchy | regression | ordinal: see training/heads/tasks.py
    taxonomy: Path | None = None  # hierarchy: a parent,child CSV (default: the data's folder nesting)
    candidate: bool = False  # publish without going live: for `heads canary` (an A/B or shadow test)
    order: tuple[str, ...] | None = None  # ordinal: the class folders, lowest first (default: numeric)
    exclude: frozenset[str] = frozenset()  # sha256 of items left out (a golden set, likely mislabels): labels only
    # Called with the candidate (a lifecycle.HeadDraft) before anything is published;
    # raising stops the publish (`headmaster improve`'s gate). Flat-label heads only.
    before_publish: Callable | None = None


@dataclass
class TrainResult:
    card: HeadCard
    metrics: dict
    checks: checks.CheckReport
    thresholds: list[dict]
    fit: dict
    server: str | None = None  # the server that now serves the new version (None: none was running)


def publish_fitted(
    options: TrainOptions,
    head: HeadWeights,
    card: HeadCard,
    check_embeddings,
    ood_fit,
    before_publish: Callable | None = None,
):
    """Publish a fitted head (any task) with its out-of-distribution set, as ``options`` say: a
    candidate or live, on the repository's server if one serves it. ``before_publish(draft)``
    sees the draft first (a test's hook). Returns the lifecycle Change."""
    from headmaster.lifecycle import operations as lifecycle

    draft = lifecycle.HeadDraft(
        head,
        card,
        check_embeddings=check_embeddings,
        references=ood_fit.references if ood_fit else None,
        ood_index=ood_fit.index if ood_fit else None,
    )
    if before_publish is not None:
        before_publish(draft)
    return lifecycle.publish(
        options.repo, draft, keep=options.keep, server=options.server, go_live=not options.candidate
    )
