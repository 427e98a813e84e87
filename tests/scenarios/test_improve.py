"""`headmaster improve`: corrections -> mislabels flagged -> a candidate gated on a frozen golden set.

A real copy of the session repository, a real Parquet store, real ONNX heads, real cleanlab.
The embeddings are four overlapping clusters in the encoder's space (seeded), so that what a
good or a poisoned round of corrections does to a linear head is known: good corrections give
a candidate the gate accepts; a round in which 30% of all labels are wrong (most of two classes
relabelled as their neighbours, the way a confused annotator errs) gives one it refuses, with
the class that got worse named, and the live head stays as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from headmaster.errors import DataError
from headmaster.lifecycle import ledger
from headmaster.lifecycle import operations as lifecycle
from headmaster.repository import ab
from headmaster.repository.head_version import HeadVersion
from headmaster.repository.repo import Repository
from headmaster.store import ParquetStore
from headmaster.training.feedback.corrections import make_corrections
from headmaster.training.feedback.gate import GateOptions, gate
from headmaster.training.feedback.improve import ImproveOptions, improve
from headmaster.training.feedback.rescore import rescore
from headmaster.training.feedback.snapshots import export_snapshot
from headmaster.training.heads.train_head import TrainOptions, train_head
from tests.helpers import CLI, clone_repo, run_cli

LABELS = ("ant", "bee", "cow", "dog")
HEAD = "critter"


class World:
    """Items drawn from four clusters; every item's true label is known."""

    def __init__(self, dim: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        # Classes close together around one direction (as an encoder puts one domain), items
        # near their class: a linear head is ~83% right from 10 labels a class, ~97% from 50.
        common = self.rng.normal(size=dim)
        offsets = self.rng.normal(size=(len(LABELS), dim))
        self.centres = common / np.linalg.norm(common) + 0.15 * offsets / np.linalg.norm(offsets, axis=1, keepdims=True)
        self.count = 0

    def draw(self, per_label: int) -> tuple[list[str], np.ndarray, list[str]]:
        hashes, rows, truth = [], [], []
        for j, label in enumerate(LABELS):
            for _ in range(per_label):
                hashes.append(hashlib.sha256(f"item {self.count}".encode()).hexdigest())
                self.count += 1
                rows.append(self.centres[j] + self.rng.normal(scale=0.04, size=self.centres.shape[1]))
                truth.append(label)
        x = np.array(rows, np.float32)
        return hashes, x / np.linalg.norm(x, axis=1, keepdims=True), truth


def add(store: ParquetStore, fingerprint: str, hashes, x, labels, by: str = "reviewer") -> None:
    store.add_embeddings(hashes, [None] * len(hashes), fingerprint, x)
    make_corrections(store, [{"item": h, "head": HEAD, "labels": (label,)} for h, label in zip(hashes, labels)], by)


@pytest.fixture
def loop(tiny_repo, tmp_path):
    """A repository with head critter v1 trained on 10 labels per class, its store, a golden snapshot.
    The tiny encoder's repository: the items are drawn in its space, never embedded."""
    repository = Repository(clone_repo(tiny_repo, tmp_path / "repo"))
    world = World(repository.card.embed_dim)
    store = ParquetStore(tmp_path / "store")
    add(store, repository.fingerprint, *world.draw(10))
    train_head(TrainOptions(name=HEAD, repo=repository.path, store=str(store.path)))
    golden_store = ParquetStore(tmp_path / "golden-store")
    add(golden_store, repository.fingerprint, *world.draw(60), by="golden")
    golden = export_snapshot(golden_store, HEAD, tmp_path / "golden", repository.fingerprint).path
    return repository, world, store, golden


def options(repository, store, **extra) -> ImproveOptions:
    return ImproveOptions(name=HEAD, repo=repository.path, store=str(store.path), **extra)


def test_good_corrections_are_accepted_poisoned_ones_refused_and_the_ledger_says_why(loop, tmp_path, cli):
    repository, world, store, golden = loop
    with pytest.raises(DataError, match="has no golden set yet: give --golden"):
        improve(options(repository, store))

    # Round 1: 40 more correct labels per class, 4 of them wrong at random (a careless click).
    hashes, x, truth = world.draw(40)
    given = list(truth)
    slips = [5, 47, 90, 151]
    for i in slips:
        given[i] = LABELS[(LABELS.index(truth[i]) + 2) % 4]
    add(store, repository.fingerprint, hashes, x, given)
    first = improve(options(repository, store, golden=golden, drop_issues=True))
    assert first.decision == "accepted", (first.entry["reason"], first.gate.metrics)
    assert first.candidate == 2 and Repository(repository.path).head(HEAD).live == 1  # published, not live
    # cleanlab found slips among few flags (measured: 2 of the 4 among 4 flags), and they did not train.
    flagged = {issue.sha256 for issue in first.issues}
    assert sum(hashes[i] in flagged for i in slips) >= 2 and len(flagged) <= 10, (
        len(flagged),
        [hashes[i] in flagged for i in slips],
    )
    assert first.entry["training"]["label_issues"] == len(first.issues) and first.issues_csv.is_file()
    card = HeadVersion.load(repository.path, HEAD, 2).card
    assert card.details["data"]["excluded"] == len(first.issues)  # the golden items are not in the store
    m = first.gate.metrics
    assert m["candidate"]["accuracy"] > m["live"]["accuracy"]
    assert all(c["high"] >= 0 for c in m["classes"].values())

    # Nothing new: nothing trained, recorded as such (the command, as a schedule runs it).
    unchanged = run_cli("improve", HEAD, "--store", store.path, "--repo", repository.path)
    assert unchanged.returncode == 0 and "unchanged" in unchanged.stderr, unchanged.stderr

    # The candidate goes live (through a shadow test, promoted by hand).
    lifecycle.start_test(repository.path, HEAD, 2, shadow=True)
    lifecycle.finish_test(repository.path, HEAD, promote=True)
    assert Repository(repository.path).head(HEAD).live == 2

    # Round 2: an annotator who takes every ant for a bee and some cows for dogs: 30% of all
    # labels given now are wrong, and cleanlab cannot see a mistake the majority makes.
    before = sorted(p.name for p in (repository.path / HEAD).iterdir())
    hashes, x, truth = world.draw(60)
    given = list(truth)
    wrong = 0
    for i, label in enumerate(truth):
        if label == "ant" or (label == "cow" and i % 5 == 0):
            given[i] = {"ant": "bee", "cow": "dog"}[label]
            wrong += 1
    assert wrong / len(given) == pytest.approx(0.30)
    add(store, repository.fingerprint, hashes, x, given)
    refused = improve(options(repository, store))  # the recorded golden set
    assert refused.decision == "refused" and refused.candidate is None
    assert "class 'ant' is worse" in refused.entry["reason"], refused.entry["reason"]
    state = Repository(repository.path).head(HEAD)
    assert state.live == 2 and sorted(p.name for p in (repository.path / HEAD).iterdir()) == before

    # Forced to train again on the same data: refused again, exit 3, the reason on the terminal.
    # (in this process: the subprocess above checked the command as a schedule runs it)
    again = cli("improve", HEAD, "--store", store.path, "--repo", repository.path, "--force")
    assert again.returncode == 3 and "refused" in again.stderr and "class 'ant' is worse" in again.stderr
    assert "likely mislabelled items" in again.stderr and "ant" in again.stdout  # the gate's table
    assert Repository(repository.path).head(HEAD).live == 2

    entries = ledger.read(repository.path, HEAD)
    assert [e["decision"] for e in entries] == ["accepted", "unchanged", "shadow", "promoted", "refused", "refused"]
    assert entries[0]["snapshot"]["manifest_sha256"] != entries[4]["snapshot"]["manifest_sha256"]
    assert entries[0]["golden"] == entries[4]["golden"] and entries[0]["golden"]["items"] == 240
    assert entries[4]["live_version"] == 2 and entries[4]["metrics"]["classes"]["ant"]["high"] < 0

    # The golden set is frozen: another one is refused unless replaced on purpose.
    other_store = ParquetStore(tmp_path / "other-golden-store")
    add(other_store, repository.fingerprint, *world.draw(5), by="golden")
    other = export_snapshot(other_store, HEAD, tmp_path / "other-golden", repository.fingerprint).path
    with pytest.raises(DataError, match="the golden set is frozen"):
        improve(options(repository, store, golden=other))

    # `headmaster history` shows it all.
    result = subprocess.run(
        [*CLI, "history", HEAD, "--repo", str(repository.path)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "250"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("│ 20")]
    assert [line.split("│")[2].strip() for line in lines] == [e["decision"] for e in entries]
    assert "class 'ant' is worse: recall" in lines[-1] and entries[0]["snapshot"]["manifest_sha256"][7:19] in lines[0]
    as_json = cli("history", HEAD, "--repo", repository.path, "--json", "--last", "2")
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == entries[-2:]
    assert entries[-1]["metrics"] == entries[-2]["metrics"]  # same data, same seed: the same candidate
    unknown = cli("history", "nothing", "--repo", repository.path)
    assert unknown.returncode == 1 and "nothing" in unknown.stderr and "Traceback" not in unknown.stderr


def test_an_accepted_candidate_goes_to_shadow_and_is_promoted_when_it_agrees(loop, cli, monkeypatch):
    from headmaster.cli import common

    repository, world, store, golden = loop
    add(store, repository.fingerprint, *world.draw(40))
    accepted = improve(options(repository, store, golden=golden, then="shadow"))
    assert accepted.decision == "accepted"
    test = ab.running(repository.path, HEAD)
    assert (test.mode, test.live, test.version) == ("shadow", 1, accepted.candidate)
    # Served traffic, as the store records it: both versions label the stored items.
    waiting = improve(options(repository, store, min_items=10_000))
    assert waiting.decision == "waiting"
    for version in (1, accepted.candidate):
        rescore(store, HeadVersion.load(repository.path, HEAD, version))
    promoted = improve(options(repository, store, min_items=50, min_agreement=0.5))
    assert promoted.decision == "promoted"
    assert (
        Repository(repository.path).head(HEAD).live == accepted.candidate and ab.running(repository.path, HEAD) is None
    )
    decisions = [e["decision"] for e in ledger.read(repository.path, HEAD)]
    assert decisions == ["accepted", "shadow", "waiting", "promoted"]
    # In this process, 250 columns wide (the test above runs `history` as a subprocess).
    for console in (common.console, common.out):
        monkeypatch.setattr(console, "_width", 250)
    shown = cli("history", HEAD, "--repo", repository.path)
    assert shown.returncode == 0, shown.stderr
    rows = [line.split("│") for line in shown.stdout.splitlines() if line.startswith("│ 20")]
    assert [r[2].strip() for r in rows] == decisions
    assert rows[3][7].strip().startswith("agree ") and "agreed with v1" in rows[3][9]


def test_the_gate_refuses_a_worse_class_and_worse_calibration_and_passes_a_copy(loop, tmp_path):
    """The gate alone, on two real versions: v1 against itself passes; a version whose weights
    for one class are zeroed loses that class and is refused for it."""
    from headmaster.export.heads import HeadWeights

    repository, world, store, golden = loop
    live = HeadVersion.load(repository.path, HEAD)
    _, x, truth = world.draw(30)
    same = gate(live, live, x, truth)
    assert same.accepted and same.metrics["accuracy"]["difference"] == 0
    # With --require-gain a copy gains nothing, so it is refused for that alone.
    copy = gate(live, live, x, truth, GateOptions(require_gain=True))
    assert copy.reasons == [copy.reasons[0]] and copy.reasons[0].startswith("accuracy is not shown better")

    weights = HeadWeights.from_onnx(live.model)
    ((w, b),) = weights.layers
    w, b = w.copy(), b.copy()
    w[LABELS.index("bee")] = 0
    b[LABELS.index("bee")] = -50.0
    broken = HeadWeights(((w, b),), False)
    folder = tmp_path / "broken"
    from headmaster.export.heads import write_head

    card = dataclasses.replace(live.card, ood=None)  # no reference set: the gate notes it cannot compare
    write_head(folder, broken, card)
    result = gate(live, HeadVersion(card, folder), x, truth)
    assert not result.accepted
    assert any(reason.startswith("class 'bee' is worse") for reason in result.reasons)
    assert result.metrics["classes"]["bee"]["candidate"] == 0
    assert result.notes == ["the candidate has no out-of-distribution reference set; the live version has one"]
    # The same weights with an OOD threshold of 0: every golden item flagged, refused for it alone.
    twitchy = dataclasses.replace(live.card, ood={**live.card.ood, "threshold": 0.0})
    write_head(tmp_path / "twitchy", weights, twitchy, references=np.load(live.folder / "ood.npy"))
    result = gate(live, HeadVersion(twitchy, tmp_path / "twitchy"), x, truth)
    assert [r.split(":")[0] for r in result.reasons] == ["more golden items look out of distribution"]
    assert result.metrics["candidate"]["ood_rate"] == 1.0
    with pytest.raises(DataError, match="confidence must be in"):
        GateOptions(confidence=1.5)
    json.dumps(result.metrics)  # the ledger takes it as it is
    assert Path(live.folder).is_dir()
