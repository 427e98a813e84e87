"""Rescore benchmark: a 10-class head over 1,000,000 stored 512-d embeddings, on CPU.

Builds a synthetic store (random unit vectors; the cost of rescoring does not depend on what
the vectors mean), writes a random linear head as a real head version (ONNX + head.json),
then runs `rescore` in a fresh child process and reads that process's peak memory from the
kernel (ru_maxrss), so building the store does not count.

    python benchmarks/rescore_store.py [--rows 1000000] [--dim 512] [--labels 10] [--dtype float16]

Targets (issue 4): under 30 s and under 2 GB peak memory. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FINGERPRINT = "sha256:" + "b" * 64  # a synthetic encoder


def build_store(path: Path, rows: int, dim: int, dtype: str, chunk: int = 100_000) -> float:
    from headmaster.store import ParquetStore

    store = ParquetStore(path, embedding_dtype=dtype)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        matrix = rng.standard_normal((n, dim), dtype=np.float32)
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(start, start + n)]
        store.add_embeddings(hashes, [f"synthetic://{i}" for i in range(start, start + n)], FINGERPRINT, matrix)
    return time.perf_counter() - started


def write_head(folder: Path, dim: int, labels: int) -> None:
    from headmaster.export.heads import HeadCard, HeadWeights
    from headmaster.export.heads import write_head as write

    rng = np.random.default_rng(1)
    weights = HeadWeights(
        ((rng.normal(size=(labels, dim)).astype(np.float32) * 4, np.zeros(labels, np.float32)),), multi_label=False
    )
    card = HeadCard(
        name="bench",
        version=1,
        labels=tuple(f"class_{i}" for i in range(labels)),
        thresholds=(0.3,) * labels,
        multi_label=False,
        encoder_fingerprint=FINGERPRINT,
        embed_dim=dim,
        kind="linear",
    )
    write(folder, weights, card)


CHILD = """
import json, sys, time
from pathlib import Path
from headmaster.store import ParquetStore
from headmaster.training.feedback.rescore import rescore
result = rescore(ParquetStore(Path(sys.argv[1]), create=False), Path(sys.argv[2]), batch_size=int(sys.argv[3]))
print(json.dumps({"rows": result.rows, "seconds": result.seconds, "labels": result.label_counts}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--batch-size", type=int, default=65536)
    parser.add_argument("--workdir", type=Path, default=Path("build/bench-rescore"))
    parser.add_argument("--record", action="store_true", help="Append the result to benchmarks/RESULTS.md.")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    store_path, head_dir = args.workdir / "store", args.workdir / "bench" / "1"
    build_s = build_store(store_path, args.rows, args.dim, args.dtype)
    size_mb = sum(p.stat().st_size for p in store_path.rglob("*.parquet")) / 2**20
    write_head(head_dir, args.dim, args.labels)
    print(
        f"store: {args.rows:,} x {args.dim} {args.dtype} embeddings, {size_mb:,.0f} MB on disk (built in {build_s:.1f} s)"
    )

    wall = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(store_path), str(head_dir), str(args.batch_size)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - wall
    if child.returncode:
        sys.exit(f"rescore failed:\n{child.stderr}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    assert result["rows"] == args.rows, result
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"machine: {machine}")
    print(
        f"rescore: {result['rows']:,} rows in {result['seconds']:.1f} s ({result['rows'] / result['seconds']:,.0f} rows/s); "
        f"child process {wall:.1f} s with imports"
    )
    print(f"peak memory (child RSS): {peak_mb:,.0f} MB")
    print(f"time / 30 s target: {result['seconds'] / 30:.2f}   memory / 2 GB target: {peak_mb / 2048:.2f}")
    print(f"accepted labels: {result['labels']}")
    if args.record:
        section = (
            f"\n### {datetime.date.today()}: rescore {args.rows:,} x {args.dim} {args.dtype} embeddings, "
            f"{args.labels}-class head, CPU ({machine})\n\n"
            "| store on disk | rescore time | rows/s | peak memory (RSS) | time / 30 s | memory / 2 GB |\n"
            "|---|---|---|---|---|---|\n"
            f"| {size_mb:,.0f} MB | {result['seconds']:.1f} s | {result['rows'] / result['seconds']:,.0f} | "
            f"{peak_mb:,.0f} MB | **{result['seconds'] / 30:.2f}** | **{peak_mb / 2048:.2f}** |\n"
        )
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
