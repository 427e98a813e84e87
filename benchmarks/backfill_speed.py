"""Backfill on Ray vs `classify --store`, on the same images, and 1 vs 2 embedding actors.

    .venv/bin/python benchmarks/backfill_speed.py [--images 2000] [--record]

ViT-B-32 (random weights: speed does not depend on them), the two zero-shot heads of
serve_throughput.py, N distinct JPEGs cut from the real photos (320x240). In one run:
- `classify --store` (store/classify.py through the served `classify` ensemble, batch 8, 4 in flight);
- backfill with one actor calling the same server's `embed` model;
- backfill with actors running the encoder here (--local), 1 then 2 actors.
Each into a new store. The local Ray cluster is started once beforehand (its start-up time is
printed separately, a one-time cost per command). --record appends to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve_throughput import MODEL, WORKDIR, prepare  # noqa: E402


def make_images(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    from tests.helpers import photo_bytes

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    photos = [Image.open(io.BytesIO(b)).convert("RGB") for b in photo_bytes().values()]
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        x, y = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        image = photo.crop((x, y, x + w // 2, y + h // 2)).resize((320, 240))
        image.putpixel((i % 320, (i // 320) % 240), (255, 0, 255))  # every image distinct, even the same crop
        image.save(folder / f"{i:05d}.jpg", quality=88)
    return sorted(folder.glob("*.jpg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    import ray

    from headmaster.client import HeadmasterClient
    from headmaster.pipelines.backfill import BackfillOptions, backfill
    from headmaster.repository.repo import Repository
    from headmaster.server.triton import ServerOptions, TritonServer, free_port
    from headmaster.store import open_store
    from headmaster.store.classify import classify_into_store

    _, repo = prepare("fp32", (8, 16), "cpu")
    files = make_images(WORKDIR / "backfill-images", args.images)
    stores = WORKDIR / "backfill-stores"
    shutil.rmtree(stores, ignore_errors=True)
    rows = []
    started = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - started
    options = ServerOptions(
        repository=repo,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        load_models=tuple(Repository(repo).model_names()),
        exit_timeout_s=10,
    )
    try:
        with TritonServer(options, log_path=WORKDIR / "tritonserver-backfill.log") as server:
            with HeadmasterClient(server.grpc_url, "grpc", batch_size=8, max_in_flight=4) as client:
                t = time.perf_counter()
                results, stats = classify_into_store(client, open_store(stores / "classify"), files)
                seconds = time.perf_counter() - t
            assert stats.embedded == len(files), stats
            rows.append(("`classify --store` (served `classify`)", "-", seconds))
            print(rows[-1], flush=True)
            for actors in (1,):  # on 2 cores the server does the work: more actors only queue more requests
                t = time.perf_counter()
                report = backfill(
                    str(files[0].parent),
                    open_store(stores / f"server-{actors}"),
                    BackfillOptions(repo=repo, server=server.grpc_url, actors=actors, embed_batch=16),
                )
                assert report.embedded == len(files), report
                rows.append(("backfill, actors call the server's `embed`", actors, time.perf_counter() - t))
                print(rows[-1], flush=True)
        for actors in (1, 2):
            t = time.perf_counter()
            report = backfill(
                str(files[0].parent),
                open_store(stores / f"local-{actors}"),
                BackfillOptions(repo=repo, actors=actors, embed_batch=16),
            )
            assert report.embedded == len(files), report
            rows.append(("backfill --local (encoder in each actor)", actors, time.perf_counter() - t))
            print(rows[-1], flush=True)
    finally:
        ray.shutdown()

    base = rows[0][2]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [
        f"### {dt.date.today().isoformat()}: backfill on Ray vs classify --store, {len(files)} JPEGs, {MODEL} "
        f"fp32, CPU ({machine}; the machine was shared with other jobs)",
        "",
        "| path | actors | seconds | images/s | vs classify --store |",
        "|---|---|---|---|---|",
    ]
    for name, actors, seconds in rows:
        lines.append(f"| {name} | {actors} | {seconds:.1f} | {len(files) / seconds:.1f} | {base / seconds:.2f}x |")
    one = {name: s for name, a, s in rows if a == 1}
    two = {name: s for name, a, s in rows if a == 2}
    lines += [
        "",
        "Scaling from 1 to 2 actors (same run): "
        + "; ".join(f"{name}: **{one[name] / two[name]:.2f}x**" for name in one if name in two),
        "",
        f"Two heads run on every embedding in every path. Ray's local cluster took {ray_start:.1f} s to start "
        "(once per command, not in the figures).",
    ]
    report = "\n".join(lines)
    print("\n" + report)
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + report + "\n")


if __name__ == "__main__":
    main()
