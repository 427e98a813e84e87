"""One heads worker on the queue: labels/s for 10 heads over 512-d embeddings, and the latency
from enqueue to stored label at a steady rate.

    .venv/bin/python benchmarks/queue_speed.py [--items 20000] [--rate 200] [--seconds 20] [--record]

A redis-server (Debian's) on a free loopback port; a repository of ViT-B-32's fingerprint
(512-d) holding 10 linear heads of 10 labels each; one `headmaster worker heads` process (the
real command) writing into a Parquet store.
- Throughput: N embeddings queued first, then the worker started; labels/s = item-head label
  rows / (last label write - first label write), from the rows' own timestamps.
- Latency: the worker running, a producer enqueues embeddings at a steady rate; per item, the
  time from enqueue to the last of its 10 heads' label rows (stored), p50/p95/p99.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve_throughput import WORKDIR, prepare  # noqa: E402

HEADS, LABELS = 10, 10


def head_repo(encoder_dir: Path, target: Path) -> Path:
    """A repository of its own (the ViT-B-32 export of serve_throughput.py) holding only the 10 heads."""
    from headmaster.export.heads import HeadCard, HeadWeights
    from headmaster.lifecycle.operations import HeadDraft, publish
    from headmaster.repository.build import build_repository
    from headmaster.repository.repo import BuildOptions, Repository

    shutil.rmtree(target, ignore_errors=True)
    build_repository(encoder_dir, target, BuildOptions())
    repository = Repository(target)
    rng = np.random.default_rng(0)
    dim = repository.card.embed_dim
    for h in range(HEADS):
        labels = tuple(f"label{j}" for j in range(LABELS))
        weights = HeadWeights(
            ((rng.normal(size=(LABELS, dim)).astype(np.float32), rng.normal(size=LABELS).astype(np.float32)),),
            multi_label=False,
        )
        publish(
            target,
            HeadDraft(
                weights,
                HeadCard(
                    name=f"head{h}",
                    version=1,
                    labels=labels,
                    thresholds=(0.3,) * LABELS,
                    multi_label=False,
                    encoder_fingerprint=repository.fingerprint,
                    embed_dim=dim,
                    kind="linear",
                ),
            ),
        )
    return target


def label_rows(store: Path):
    import pyarrow as pa
    import pyarrow.dataset as ds

    tables = [
        ds.dataset(sorted(map(str, folder.glob("part-*.parquet"))), format="parquet").to_table(columns=["sha256", "at"])
        for folder in (store / "labels").iterdir()
    ]
    return pa.concat_tables(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=200.0, help="items/s for the latency run")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    from headmaster.pipelines.redis_streams import RedisStreams
    from headmaster.repository.repo import Repository
    from tests.helpers import CLI, free_port

    encoder_dir = WORKDIR / "encoder-fp32"
    if not (encoder_dir / "card.json").is_file():
        encoder_dir, _ = prepare("fp32", (8, 16), "cpu")
    repo = head_repo(encoder_dir, WORKDIR / "queue-repo")
    fingerprint, dim = Repository(repo).fingerprint, Repository(repo).card.embed_dim
    root, port = tempfile.mkdtemp(prefix="headmaster-bench-redis-"), free_port()
    redis = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", root, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    time.sleep(0.5)
    rng = np.random.default_rng(1)
    results = {}
    try:
        broker = RedisStreams(url)
        for phase in ("throughput", "latency"):
            store = WORKDIR / f"queue-store-{phase}"
            shutil.rmtree(store, ignore_errors=True)
            stream = f"bench-{phase}"
            worker_cmd = [
                *CLI,
                "worker",
                "heads",
                "--store",
                str(store),
                "--repo",
                str(repo),
                "--redis",
                url,
                "--stream",
                stream,
                "--batch",
                "256",
                "--exit-when-idle",
                "3" if phase == "throughput" else "15",
            ]
            enqueued = {}
            if phase == "throughput":
                pipe = broker.redis.pipeline(transaction=False)
                vectors = rng.normal(size=(args.items, dim)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                for i, v in enumerate(vectors):
                    pipe.xadd(stream, {"sha256": f"{i:064x}", "fingerprint": fingerprint, "embedding": v.tobytes()})
                    if i % 1000 == 999:
                        pipe.execute()
                pipe.execute()
                subprocess.run(worker_cmd, check=True)
                table = label_rows(store)
                at = table["at"].to_numpy().astype("datetime64[us]").astype(np.int64) / 1e6
                results["throughput"] = (table.num_rows, table.num_rows / (at.max() - at.min()))
            else:
                worker = subprocess.Popen(worker_cmd)
                time.sleep(8)  # the worker's start-up (imports, heads loaded) is not latency
                n = int(args.rate * args.seconds)
                start = time.time()
                for i in range(n):
                    due = start + i / args.rate
                    time.sleep(max(0.0, due - time.time()))
                    v = rng.normal(size=dim).astype(np.float32)
                    sha = f"{i + 10**9:064x}"
                    enqueued[sha] = time.time()
                    broker.publish(
                        stream,
                        {
                            "sha256": sha,
                            "fingerprint": fingerprint,
                            "embedding": (v / np.linalg.norm(v)).tobytes(),
                            "enqueued_at": repr(enqueued[sha]),
                        },
                    )
                worker.wait(timeout=300)
                table = label_rows(store)
                at = table["at"].to_numpy().astype("datetime64[us]").astype(np.int64) / 1e6
                last: dict[str, float] = {}
                for sha, t in zip(table["sha256"].to_pylist(), at):
                    last[sha] = max(last.get(sha, 0.0), t)
                lat = np.array([last[s] - enqueued[s] for s in enqueued]) * 1000
                results["latency"] = (n, np.percentile(lat, [50, 95, 99]), len(last) == n)
        broker.close()
    finally:
        redis.terminate()
        redis.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)

    rows, rate = results["throughput"]
    n, (p50, p95, p99), complete = results["latency"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    report = "\n".join(
        [
            f"### {dt.date.today().isoformat()}: one heads worker on Redis Streams, {HEADS} heads x {LABELS} labels over "
            f"{dim}-d embeddings, Parquet store, CPU ({machine}; the machine was shared with other jobs)",
            "",
            f"- Throughput: {rows:,} label rows ({args.items:,} embeddings x {HEADS} heads) at **{rate:,.0f} labels/s** "
            f"({rate / HEADS:,.0f} embeddings/s), batches of 256.",
            f"- Latency at a steady {args.rate:.0f} embeddings/s for {args.seconds:.0f} s ({n} items; every item labelled: "
            f"{complete}): enqueue -> all {HEADS} labels stored p50 **{p50:.0f} ms**, p95 {p95:.0f} ms, p99 {p99:.0f} ms.",
        ]
    )
    print("\n" + report)
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + report + "\n")


if __name__ == "__main__":
    main()
