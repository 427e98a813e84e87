"""Out-of-distribution kNN benchmark: what the rule costs per image, per head, at 100k references.

Runs the exact code the threshold step runs (``threshold.KnnIndex`` + ``knn_distance``: faiss's
flat inner-product index, and its numpy fallback) on references of 100,000 and of 20,000 rows,
at the batch sizes the server forms, next to the ViT-B-32 image tower in onnxruntime on the same
machine (random weights, the cost does not depend on them).

The inverted-file search (``threshold.ivf_search``: what a head with more than ``EXACT_MAX``
references gets) at 100,000 and 200,000 clustered references: its cost per image (one thread,
batch 8) as a share of the encoder's, the time to build it (train-head builds it once and stores
it as ood.faiss; the server reads that file), recall@k of its neighbours against the exact faiss search, and FPR at 95% TPR with
its distances against the exact ones.

What the cap costs in detection: synthetic but structured embeddings (a mixture of 2,000
clusters on the 512-d sphere; in-distribution = 1,600 of the clusters, out-of-distribution =
the other 400), FPR at 95% TPR with all 100,000 references vs subsamples of 20,000 and 5,000.

    python benchmarks/ood_knn.py [--dim 512] [--references 100000] [--no-exact] [--record]

The first request that needs a new IVF head version, as the threshold step serves it
(``TritonPythonModel._index`` + ``knn_distance``, one thread, batch 8), with the index built on
first use (a version published before ood.faiss was stored) and read from ood.faiss (now):

    python benchmarks/ood_knn.py --first-request 30000 [--record]

Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def per_image_ms(index, queries: np.ndarray, k: int, batch: int, seconds: float = 3.0) -> float:
    from headmaster.rules.threshold import knn_distance

    knn_distance(index, queries[:batch], k)  # warm up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        start = (done // batch * batch) % (len(queries) - batch)
        knn_distance(index, queries[start : start + batch], k)
        done += batch
    return (time.perf_counter() - started) / done * 1000


def encoder_ms(batch: int) -> float:
    from headmaster.export.encoder import ExportOptions, export_encoder
    from headmaster.served.runtime import load_runner

    with tempfile.TemporaryDirectory() as tmp:
        card = export_encoder(ExportOptions(model="ViT-B-32", pretrained=None, out=Path(tmp) / "e", towers=("image",)))
        spec = card.towers["image"]
        run = load_runner(str(Path(tmp) / "e" / spec.file), device="cpu", optimization="all")
        pixels = np.random.default_rng(0).integers(0, 256, (batch, 3, 224, 224), dtype=np.uint8)
        run({spec.input_name: pixels}, [spec.output_name])
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < 5.0:
            run({spec.input_name: pixels}, [spec.output_name])
            done += batch
        return (time.perf_counter() - started) / done * 1000


def clustered(rng, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    pick = rng.integers(0, len(centres), n)
    return unit(centres[pick] + spread * rng.normal(size=(n, centres.shape[1])).astype(np.float32))


def cap_cost(dim: int, references: int, k: int = 10) -> list[tuple[int, float]]:
    """FPR at 95% TPR against the reference-set size (seeded subsamples of one set)."""
    from headmaster.rules.threshold import KnnIndex, knn_distance

    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(2000, dim)).astype(np.float32))
    seen, unseen = centres[:1600], centres[1600:]
    spread = 1.2 / np.sqrt(dim)  # neighbours within a cluster at cosine ~0.4
    train = clustered(rng, seen, references, spread)
    inside, outside = clustered(rng, seen, 5000, spread), clustered(rng, unseen, 5000, spread)
    rows = []
    for size in (references, 20_000, 5_000):
        keep = np.sort(rng.choice(references, size, replace=False)) if size < references else np.arange(references)
        index = KnnIndex(train[keep])
        d_in, d_out = knn_distance(index, inside, k), knn_distance(index, outside, k)
        rows.append((size, float((d_out <= np.quantile(d_in, 0.95, method="higher")).mean())))
    return rows


def ivf_rows(dim: int, sizes: tuple[int, ...], k: int = 10) -> list[dict]:
    """The inverted-file search against the exact one on clustered references (as cap_cost)."""
    import faiss

    from headmaster.rules.threshold import KnnIndex, ivf_search, knn_distance

    faiss.omp_set_num_threads(1)  # as the threshold step runs it
    rows = []
    for size in sizes:
        rng = np.random.default_rng(0)
        centres = unit(rng.normal(size=(2000, dim)).astype(np.float32))
        spread = 1.2 / np.sqrt(dim)
        references = clustered(rng, centres[:1600], size, spread).astype(np.float16).astype(np.float32)
        inside, outside = clustered(rng, centres[:1600], 2000, spread), clustered(rng, centres[1600:], 2000, spread)
        exact = KnnIndex(references)
        search = ivf_search(size)
        started = time.perf_counter()
        ivf = KnnIndex(references, search)
        build = time.perf_counter() - started
        want, got = exact.index.search(inside, k)[1], ivf.index.search(inside, k)[1]
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(want, got)]))

        def fpr(index, inside=inside, outside=outside) -> float:
            d_in, d_out = knn_distance(index, inside, k), knn_distance(index, outside, k)
            return float((d_out <= np.quantile(d_in, 0.95, method="higher")).mean())

        rows.append(
            {
                "references": size,
                "search": search,
                "build_s": build,
                "recall": recall,
                "ivf_ms": per_image_ms(ivf, inside, k, 8),
                "exact_ms": per_image_ms(exact, inside, k, 8),
                "fpr_ivf": fpr(ivf),
                "fpr_exact": fpr(exact),
            }
        )
    return rows


def first_request(dim: int, size: int, k: int) -> dict:
    """Seconds of the first request (batch 8) that needs a version of ``size`` clustered
    references: the index built on first use vs read from the stored ood.faiss."""
    import faiss

    from headmaster.rules import threshold
    from headmaster.served import threshold as served_threshold

    faiss.omp_set_num_threads(1)  # as the threshold step runs it
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(2000, dim)).astype(np.float32))
    references = clustered(rng, centres[:1600], size, 1.2 / np.sqrt(dim)).astype(np.float16)
    queries = clustered(rng, centres, 8, 1.2 / np.sqrt(dim))
    search = threshold.ivf_search(size)
    if search is None:
        raise SystemExit(
            f"--first-request {size}: at most EXACT_MAX ({threshold.EXACT_MAX}) references are "
            "searched exactly, with nothing to build; ask for more"
        )
    started = time.perf_counter()
    stored = threshold.KnnIndex(references.astype(np.float32), search).serialized()  # what train-head does
    publish_s = time.perf_counter() - started
    ood = {
        "k": k,
        "threshold": 1.0,
        "policy": "flag",
        "references": size,
        "sha256": threshold.references_sha256(references),
        "search": search,
    }
    out = {"references": size, "search": search, "publish_s": publish_s, "index_mb": len(stored) / 2**20}
    with tempfile.TemporaryDirectory() as tmp:
        version = Path(tmp) / "head" / "1"
        version.mkdir(parents=True)
        np.save(version / threshold.OOD_FILE, references, allow_pickle=False)
        (version / threshold.OOD_INDEX_FILE).write_bytes(stored)
        distances = []
        for name, entry in (("built_s", ood), ("stored_s", {**ood, "index_sha256": threshold.index_sha256(stored)})):
            model = served_threshold.TritonPythonModel.__new__(served_threshold.TritonPythonModel)
            model.repository, model._indexes = tmp, {}
            started = time.perf_counter()
            distances.append(threshold.knn_distance(model._index("head", {"version": 1, "ood": entry}), queries, k))
            out[name] = time.perf_counter() - started
    out["same"] = bool(np.array_equal(*distances))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--references", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--no-exact", action="store_true", help="only the inverted-file rows (and the encoder)")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument(
        "--first-request",
        type=int,
        metavar="REFERENCES",
        help="only the first request of an IVF version of this many references, built vs stored",
    )
    args = parser.parse_args()
    if args.first_request is not None:
        import faiss

        r = first_request(args.dim, args.first_request, args.k)
        text = (
            "\n".join(
                [
                    f"### {datetime.date.today()}: first request of a new IVF head version, {r['references']:,} clustered "
                    f"{args.dim}-d references, k={args.k}, batch 8 ({platform.machine()}, {os.cpu_count()} cores, "
                    f"Python {platform.python_version()}, faiss {faiss.__version__}; machine shared with other work, "
                    f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; "
                    f"`benchmarks/ood_knn.py --first-request {r['references']} --dim {args.dim}`)",
                    "",
                    "| index | first request (s) |",
                    "|---|---|",
                    f"| built on first use (k-means over {r['search']['lists']} lists + add; versions published before "
                    f"ood.faiss) | {r['built_s']:.2f} |",
                    f"| read from ood.faiss ({r['index_mb']:.1f} MiB, sha256 checked) | {r['stored_s']:.2f} |",
                    "",
                    f"Building and serializing the index at publish time (train-head) took {r['publish_s']:.2f} s in the same "
                    f"run; the two indexes gave {'identical' if r['same'] else 'DIFFERENT'} distances.",
                ]
            )
            + "\n"
        )
        print(text)
        if args.record:
            with open(Path(__file__).parent / "RESULTS.md", "a") as f:
                f.write("\n" + text)
        return

    import faiss

    from headmaster.rules.threshold import KnnIndex

    rng = np.random.default_rng(0)
    queries = unit(rng.normal(size=(2048, args.dim)).astype(np.float32))
    rows = []
    for size in () if args.no_exact else (args.references, 20_000):
        references = unit(rng.normal(size=(size, args.dim)).astype(np.float32))
        for threads in (1, os.cpu_count() or 1):
            faiss.omp_set_num_threads(threads)
            index = KnnIndex(references)
            for batch in (1, 8, 32):
                rows.append((size, f"faiss, {threads} thread(s)", batch, per_image_ms(index, queries, args.k, batch)))
        index = KnnIndex(references)
        index.index = None
        rows.append((size, "numpy fallback", 32, per_image_ms(index, queries, args.k, 32)))
    ivf = ivf_rows(args.dim, (args.references, 2 * args.references), args.k)
    encoder = {batch: encoder_ms(batch) for batch in (8,)}
    cap = [] if args.no_exact else cap_cost(args.dim, args.references, args.k)

    lines = [
        f"### {datetime.date.today()}: out-of-distribution kNN, {args.dim}-d, k={args.k} "
        f"({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"faiss {faiss.__version__}; machine shared with other work, load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end)",
        "",
        "| references | search | batch | ms per image per head |",
        "|---|---|---|---|",
    ]
    lines += [f"| {size:,} | {how} | {batch} | {ms:.3f} |" for size, how, batch, ms in rows]
    lines += [
        "",
        f"ViT-B-32 image tower, onnxruntime fp32, batch 8, same run: {encoder[8]:.1f} ms per image.",
        "",
        "FPR at 95% TPR against the reference-set size (synthetic clustered embeddings, see the script):",
        "",
        "| references | FPR at 95% TPR |",
        "|---|---|",
    ]
    lines += [f"| {size:,} | {fpr:.4f} |" for size, fpr in cap]
    lines += [
        "",
        "Inverted-file search (what heads above EXACT_MAX references get), clustered references, one "
        "thread, batch 8, against the exact faiss search on the same references:",
        "",
        "| references | lists / probed | build (s) | recall@k | IVF ms per image | exact ms per image | "
        "IVF / encoder | exact / encoder | FPR at 95% TPR, IVF / exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['references']:,} | {r['search']['lists']} / {r['search']['probe']} | {r['build_s']:.1f} | "
        f"{r['recall']:.4f} | {r['ivf_ms']:.3f} | {r['exact_ms']:.3f} | {r['ivf_ms'] / encoder[8]:.1%} | "
        f"{r['exact_ms'] / encoder[8]:.1%} | {r['fpr_ivf']:.4f} / {r['fpr_exact']:.4f} |"
        for r in ivf
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
