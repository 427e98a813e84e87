"""`headmaster improve NAME`: from the store's corrections to a gated candidate, in one step.

1. Freeze the head's training set (every correction people made for it) as a dataset snapshot;
   the golden set's items are left out of it (a golden item that trains cannot judge).
2. Flag likely mislabels first: cleanlab's confident learning on out-of-fold probabilities
   (:func:`label_quality.out_of_fold_probabilities`); flagged items are written to a CSV that
   `headmaster correct --csv` reads, for people to check; ``drop_issues`` leaves them out of
   this training too (off by default: on real embeddings with a perfect annotator, cleanlab
   flagged 10-20% of margin-sampled labels, the hard items active learning needs; see
   benchmarks/active_loop.py).
3. Train the candidate (`train-head`'s pipeline on the snapshot) and, before anything is
   published, gate it against the live version on the frozen golden set (:mod:`.gate`), both
   run from their own ONNX files.
4. Accepted: published as a candidate (on disk, never live: the only path `train-head
   --candidate` takes), optionally put in shadow or to a canary share through the A/B
   operations. Refused: nothing is published; the live head is untouched.
5. When a test of an accepted candidate runs already, ``improve`` judges it instead: the
   candidate is promoted when it agrees with the live version on at least ``min_agreement``
   of ``min_items`` stored items both labelled, aborted when it does not.

Every decision, with the snapshot hash, the golden set's hash, the metrics and the reasons,
is appended to the head's ledger (:mod:`lifecycle.ledger`), which `headmaster history`
prints. Nothing changed since the last decision (same snapshot, golden set and live version):
the run records ``unchanged`` and trains nothing, so a schedule can run it every hour.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headmaster.errors import DataError, HeadmasterError, StoreError
from headmaster.lifecycle import ledger
from headmaster.lifecycle import operations as lifecycle
from headmaster.repository import ab
from headmaster.repository.head_version import HeadVersion
from headmaster.repository.repo import Repository
from headmaster.training.data import content_hash
from headmaster.training.feedback.gate import GateOptions, GateResult, gate
from headmaster.training.heads.trainer import TrainConfig

LOG = logging.getLogger(__name__)
THEN = ("none", "shadow", "canary")


class Refused(HeadmasterError):
    """The gate refused the candidate (raised inside train-head, before it publishes)."""

    def __init__(self, result: GateResult):
        super().__init__("; ".join(result.reasons))
        self.result = result


@dataclass(frozen=True)
class ImproveOptions:
    name: str
    repo: Path
    store: str
    golden: Path | None = None  # a dataset snapshot or a folder of labelled images; default: the one recorded
    replace_golden: bool = False  # allow a golden set other than the one recorded (it is frozen otherwise)
    snapshot_dir: Path | None = None  # default: STORE/snapshots
    config: TrainConfig = field(default_factory=TrainConfig)
    drop_issues: bool = False  # leave likely mislabels out of training (default: flag them for people only)
    gate: GateOptions = field(default_factory=GateOptions)
    keep: int = 5
    server: str | None = None
    cache_dir: Path | None = None  # embedding cache, for a golden folder of images
    then: str = "none"  # after acceptance: none | shadow | canary
    share: float = 0.1  # canary share
    force: bool = False  # train even when nothing changed since the last decision
    min_agreement: float = 0.9  # a running test's candidate is promoted at or above this agreement
    min_items: int = 100  # ... over at least this many items both versions labelled

    def __post_init__(self) -> None:
        if self.then not in THEN:
            raise DataError(f"--then must be one of {', '.join(THEN)}, not {self.then!r}", option="then")


@dataclass(frozen=True)
class Issue:
    sha256: str
    given: str
    suggested: str
    self_confidence: float  # out-of-fold probability of the given label
    uri: str


@dataclass
class ImproveResult:
    decision: str  # accepted | refused | unchanged | promoted | aborted | waiting
    entry: dict  # the ledger entry
    candidate: int | None = None  # the version published (accepted)
    gate: GateResult | None = None
    issues: list[Issue] = field(default_factory=list)
    issues_csv: Path | None = None


@dataclass(frozen=True)
class Golden:
    embeddings: np.ndarray
    labels: list[str]
    hashes: tuple[str, ...]
    sha256: str
    path: str


def load_golden(path: Path, repository: Repository, server: str | None, cache_dir: Path | None) -> Golden:
    """A dataset snapshot (its stored embeddings) or a folder of label folders (embedded here,
    through the embedding cache)."""
    from headmaster.training.evaluation.evaluate import Embedder, embed_dataset, snapshot_holdout
    from headmaster.training.feedback.snapshots import is_snapshot

    path = Path(path)
    if is_snapshot(path):
        holdout = snapshot_holdout(path, repository.fingerprint)
    elif path.is_dir():
        from headmaster.training.data import from_folders

        holdout = embed_dataset(from_folders(path), Embedder(repository, server, cache_dir))
    else:
        raise DataError(
            f"the golden set {path} is neither a dataset snapshot nor a folder of label folders", option="golden"
        )
    if holdout.multi_label or any(len(t) != 1 for t in holdout.truth_sets):
        raise DataError(f"the golden set {path} must give each item exactly one label", option="golden")
    if not len(holdout):
        raise DataError(f"the golden set {path} holds no readable item", option="golden")
    sha = content_hash([(h, t) for h, t in zip(holdout.hashes, holdout.truth_sets)])
    return Golden(holdout.embeddings, [t[0] for t in holdout.truth_sets], holdout.hashes, sha, str(path.resolve()))


def _recorded_golden(entries: list[dict]) -> dict | None:
    return next((e["golden"] for e in reversed(entries) if e.get("golden")), None)


def flag_label_issues(
    hashes: list[str], labels: list[str], x: np.ndarray, uris: dict[str, str], seed: int = 0
) -> tuple[list[Issue], str | None]:
    """Confident learning over out-of-fold probabilities; (issues most likely wrong first, or a
    note saying why none could be looked for)."""
    import cleanlab.filter

    from headmaster.training.evaluation.label_quality import CV_FOLDS, out_of_fold_probabilities

    classes = sorted(set(labels))
    y = np.array([classes.index(label) for label in labels])
    counts = np.bincount(y, minlength=len(classes))
    if len(classes) < 2 or counts.min() < 2:
        return (
            [],
            f"mislabels not looked for: every label needs 2 or more items (counts {dict(zip(classes, counts.tolist()))})",
        )
    probs = out_of_fold_probabilities(x, y, False, seed)
    ranked = cleanlab.filter.find_label_issues(labels=y, pred_probs=probs, return_indices_ranked_by="self_confidence")
    note = None if counts.min() >= CV_FOLDS else f"a label has {counts.min()} items: fewer folds than {CV_FOLDS}"
    return [
        Issue(hashes[i], labels[i], classes[int(probs[i].argmax())], float(probs[i, y[i]]), uris.get(hashes[i], ""))
        for i in ranked
    ], note


def write_issues(issues: list[Issue], head: str, path: Path) -> Path:
    """The CSV `headmaster correct --csv` reads: the label column holds cleanlab's suggestion, to
    be checked by a person before it is given back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item", "head", "label", "note", "uri"])
        for rank, issue in enumerate(issues, 1):
            writer.writerow(
                [
                    issue.sha256,
                    head,
                    issue.suggested,
                    f"cleanlab rank {rank}: labelled {issue.given}, out-of-fold probability of that label "
                    f"{issue.self_confidence:.3f}; suggested {issue.suggested}",
                    issue.uri,
                ]
            )
    return path


def _judge_test(options: ImproveOptions, test: ab.AbTest) -> ImproveResult:
    """A test of an earlier candidate runs: promote it, abort it, or wait for more items."""
    from headmaster.store import open_store
    from headmaster.store.ab import compare_versions

    try:
        result = compare_versions(open_store(options.store, create=False), options.name, test.live, test.version)
        items, agree = result.items, result.agree
    except StoreError:  # no item labelled by both versions yet
        items, agree = 0, 0
    agreement = agree / items if items else 0.0
    metrics = {
        "items": items,
        "agree": agree,
        "agreement": agreement,
        "min_agreement": options.min_agreement,
        "min_items": options.min_items,
    }
    common = {"live_version": test.live, "candidate_version": test.version, "test": test.mode, "metrics": metrics}
    if items < options.min_items:
        entry = ledger.append(
            options.repo,
            options.name,
            "waiting",
            reason=(
                f"the {test.mode} test of v{test.version} has {items} items both versions labelled; "
                f"{options.min_items} needed"
            ),
            **common,
        )
        return ImproveResult("waiting", entry)
    promote = agreement >= options.min_agreement
    lifecycle.finish_test(options.repo, options.name, promote, options.server, record=False)
    decision = "promoted" if promote else "aborted"
    entry = ledger.append(
        options.repo,
        options.name,
        decision,
        reason=(
            f"v{test.version} agreed with v{test.live} on {agreement:.1%} of {items} items "
            f"({'at or above' if promote else 'below'} {options.min_agreement:.0%})"
        ),
        **common,
    )
    return ImproveResult(decision, entry, test.version)


def improve(options: ImproveOptions) -> ImproveResult:
    from headmaster.store import open_store
    from headmaster.training.feedback.snapshots import export_snapshot
    from headmaster.training.heads.options import TrainOptions
    from headmaster.training.heads.train_head import train_head

    repository = Repository(options.repo)
    live = HeadVersion.load(repository, options.name)  # the live version: the head must exist
    if live.card.multi_label or live.card.task != "labels":
        raise DataError(
            f"head {options.name} is {'multi-label' if live.card.multi_label else live.card.task}: "
            "improve gates single-label heads only (not done for the others)"
        )
    running = ab.running(options.repo, options.name)
    if running is not None:
        return _judge_test(options, running)

    entries = ledger.read(options.repo, options.name)
    recorded = _recorded_golden(entries)
    if options.golden is None and recorded is None:
        raise DataError(
            f"head {options.name} has no golden set yet: give --golden (a dataset snapshot or a folder "
            "of label folders, never trained on); it is recorded and used from then on",
            option="golden",
        )
    golden = load_golden(options.golden or Path(recorded["path"]), repository, options.server, options.cache_dir)
    if recorded is not None and golden.sha256 != recorded["sha256"] and not options.replace_golden:
        raise DataError(
            f"the golden set is frozen: {recorded['path']} ({recorded['sha256'][:19]}...) judged earlier "
            f"candidates, {golden.path} holds other items or labels ({golden.sha256[:19]}...); give "
            "--replace-golden to judge by the new one from now on",
            option="golden",
        )
    golden_record = {"path": golden.path, "sha256": golden.sha256, "items": len(golden.labels)}

    store = open_store(options.store, create=False)
    out = options.snapshot_dir or (Path("snapshots") if "://" in options.store else Path(options.store) / "snapshots")
    snapshot = export_snapshot(store, options.name, out, repository.fingerprint, multi_label=False)
    snapshot_record = {
        "path": str(snapshot.path),
        "number": snapshot.number,
        "manifest_sha256": snapshot.manifest_sha256,
        "items": snapshot.items,
    }
    last = next((e for e in reversed(entries) if e.get("decision") in ("accepted", "refused")), None)
    if (
        not options.force
        and last is not None
        and last.get("snapshot", {}).get("manifest_sha256") == snapshot.manifest_sha256
        and last.get("golden", {}).get("sha256") == golden.sha256
        and last.get("live_version") == live.card.version
    ):
        entry = ledger.append(
            options.repo,
            options.name,
            "unchanged",
            live_version=live.card.version,
            snapshot=snapshot_record,
            golden=golden_record,
            reason=f"no new corrections since the {last['decision']} candidate of {last['at']}",
        )
        return ImproveResult("unchanged", entry)

    # The training rows: the snapshot less the golden items.
    golden_hashes = set(golden.hashes)
    vectors = snapshot.embeddings()
    rows = [
        (sha, ex.labels[0])
        for sha, ex in zip(snapshot.hashes(), snapshot.dataset().examples)
        if sha not in golden_hashes and len(ex.labels) == 1
    ]
    uris = {sha: next((u for u in by.values() if u), "") for sha, by in store.uris().items()}
    issues, issue_note = (
        flag_label_issues(
            [sha for sha, _ in rows],
            [label for _, label in rows],
            np.stack([vectors[sha] for sha, _ in rows]) if rows else np.zeros((0, 1)),
            uris,
            options.config.seed,
        )
        if rows
        else ([], "no training rows")
    )
    issues_csv = (
        write_issues(issues, options.name, out / options.name / f"issues-v{snapshot.number}.csv") if issues else None
    )
    exclude = golden_hashes | ({i.sha256 for i in issues} if options.drop_issues else set())
    common = {
        "live_version": live.card.version,
        "snapshot": snapshot_record,
        "golden": golden_record,
        "training": {
            "items": len(rows) - (len(issues) if options.drop_issues else 0),
            "golden_left_out": sum(sha in golden_hashes for sha in snapshot.hashes()),
            "label_issues": len(issues),
            "label_issues_left_out": options.drop_issues,
            "label_issues_csv": str(issues_csv) if issues_csv else None,
            "note": issue_note,
            "config": options.config.as_dict(),
        },
    }

    verdict: list[GateResult] = []

    def check(draft) -> None:
        from headmaster.export.heads import write_head

        card = draft.numbered(live.card.version + 1)  # the number is provisional: the publish assigns it
        with tempfile.TemporaryDirectory(prefix="headmaster-candidate-") as folder:
            # Written as it would be published (ONNX, card, reference set), then run from the file.
            write_head(Path(folder), draft.weights, card, draft.check_embeddings, draft.references, draft.ood_index)
            verdict.append(gate(live, HeadVersion(card, Path(folder)), golden.embeddings, golden.labels, options.gate))
        if not verdict[-1].accepted:
            raise Refused(verdict[-1])

    train = TrainOptions(
        name=options.name,
        repo=options.repo,
        data=snapshot.path,
        config=options.config,
        keep=options.keep,
        server=options.server,
        candidate=True,
        exclude=frozenset(exclude),
        before_publish=check,
    )
    try:
        trained = train_head(train)
    except Refused as refused:
        entry = ledger.append(
            options.repo,
            options.name,
            "refused",
            candidate_version=None,
            reason="; ".join(refused.result.reasons),
            notes=refused.result.notes,
            metrics=refused.result.metrics,
            **common,
        )
        return ImproveResult("refused", entry, None, refused.result, issues, issues_csv)
    except HeadmasterError as e:
        ledger.append(options.repo, options.name, "error", reason=str(e), **common)
        raise
    result = verdict[-1]
    version = trained.card.version
    entry = ledger.append(
        options.repo,
        options.name,
        "accepted",
        candidate_version=version,
        reason=f"no class, calibration or OOD rate worse on {len(golden.labels)} golden items",
        notes=result.notes,
        metrics=result.metrics,
        **common,
    )
    if options.then != "none":
        lifecycle.start_test(
            options.repo, options.name, version, options.share, options.then == "shadow", options.server
        )
    return ImproveResult("accepted", entry, version, result, issues, issues_csv)
