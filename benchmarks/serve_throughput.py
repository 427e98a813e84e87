"""ViT-B-32 image tower: onnxruntime called directly vs. the served `classify` ensemble.

    .venv/bin/python benchmarks/serve_throughput.py [--batch-sizes 8 16] [--seconds 20] [--record]

Both sides run in one process tree on this machine, in one run:
- raw: the exported image tower in onnxruntime (same session options as the server's
  runner) on already-preprocessed uint8 pixels, batch B, back to back;
- served: JPEG bytes -> `classify` (decode + resize, encoder, two zero-shot heads,
  thresholds) through the bundled Triton over gRPC, requests of B images, 2 in flight so
  the server's dynamic batcher always has the next batch queued;
- perf_analyzer (tritonclient 2.51) on `classify` with the same JPEGs, for a second opinion.
It prints served/raw per batch size and where the server spent its time (Triton's own
per-model statistics). --record appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for the tests photo helper

MODEL = "ViT-B-32"
WORKDIR = ROOT / "build" / "benchmark"
HEADS = {"subject": (["cat=a photo of a cat", "dog=a photo of a dog", "person=a photo of a person"], ("a photo of {}.",)),
         "has_cat": (["cat=a photo containing a cat", "no cat=a photo with no cat"], ("{}",))}


def jpeg_inputs() -> list[bytes]:
    """The real photos from scikit-image / scikit-learn, as JPEG (300x451 to 640x427)."""
    from PIL import Image

    from tests.helpers import photo_bytes

    out = []
    for data in photo_bytes().values():
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def prepare(preferred: tuple[int, ...]) -> tuple[Path, Path]:
    from headmaster.errors import CardError
    from headmaster.export.card import EncoderCard
    from headmaster.export.encoder import ExportOptions, export_encoder
    from headmaster.model_repository.build import build_repository
    from headmaster.model_repository.repository import BuildOptions
    from headmaster.training.heads.zero_shot import create_zero_shot_head

    encoder_dir, repo = WORKDIR / "encoder", WORKDIR / "model_repository"
    try:
        EncoderCard.load(encoder_dir)
    except CardError:
        print(f"exporting {MODEL} (random weights: speed does not depend on them)...", flush=True)
        export_encoder(ExportOptions(model=MODEL, pretrained=None, out=encoder_dir, towers=("image", "text")))
    if repo.exists():
        import shutil

        shutil.rmtree(repo)
    build_repository(encoder_dir, repo, BuildOptions(preferred_batch_sizes=preferred, max_queue_delay_us=2000))
    for name, (labels, templates) in HEADS.items():
        create_zero_shot_head(repo, name, labels, templates)
    return encoder_dir, repo


def raw_throughput(encoder_dir: Path, images: list[bytes], batch: int, seconds: float) -> float:
    from headmaster.export.card import EncoderCard
    from headmaster.model_repository.backends.preprocess import preprocess_bytes
    from headmaster.model_repository.backends.runtime import load_runner

    card = EncoderCard.load(encoder_dir)
    pixels = np.stack([preprocess_bytes(images[i % len(images)], card.preprocessing) for i in range(batch)])
    spec = card.towers["image"]
    runner = load_runner(str(encoder_dir / spec.file), device="cpu", optimization=spec.graph_optimization)
    run = lambda: runner({spec.input_name: pixels}, [spec.output_name])  # noqa: E731
    run()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        done += batch
    return done / (time.perf_counter() - start)


def served_throughput(url: str, images: list[bytes], batch: int, seconds: float) -> float:
    from headmaster.client import HeadmasterClient

    with HeadmasterClient(url, batch_size=batch, max_in_flight=2) as client:
        chunk = [images[i % len(images)] for i in range(batch * 4)]
        client.classify(chunk)  # warm-up: first batches pay for lazy initialisation
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            results = client.classify(chunk)
            assert all(r.ok for r in results)
            done += len(chunk)
        return done / (time.perf_counter() - start)


def model_times(url: str) -> dict[str, tuple[int, int, float]]:
    """Per model: (requests, executions, mean compute ms per execution) from Triton's statistics."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(as_json=True)["model_stats"]
    finally:
        client.close()
    out = {}
    for s in stats:
        executions = int(s.get("execution_count", 0))
        if executions:
            compute = sum(int(s["inference_stats"][k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output"))
            out[s["name"]] = (int(s.get("inference_count", 0)), executions, compute / executions / 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per figure")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--no-perf-analyzer", action="store_true")
    args = parser.parse_args()

    from headmaster.model_repository import perf_analyzer
    from headmaster.model_repository.repository import Repository
    from headmaster.model_repository.server import ServerOptions, TritonServer, free_port

    images = jpeg_inputs()
    encoder_dir, repo = prepare(tuple(sorted(set(args.batch_sizes))))
    rows = []
    raw = {b: raw_throughput(encoder_dir, images, b, args.seconds) for b in args.batch_sizes}
    options = ServerOptions(repository=repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                            load_models=tuple(Repository(repo).model_names()), exit_timeout_s=10)
    with TritonServer(options, log_path=WORKDIR / "tritonserver.log") as server:
        for b in args.batch_sizes:
            served = served_throughput(server.grpc_url, images, b, args.seconds)
            pa = None
            if not args.no_perf_analyzer and not perf_analyzer.unavailable_reason():
                data = perf_analyzer.write_image_input(images, WORKDIR / f"perf_input_b{b}.json")
                pa = perf_analyzer.run("classify", server.http_url, data, batch_size=b, concurrency=2, api_key=server.api_key,
                                       measurement_ms=int(args.seconds * 1000 / 3))
            rows.append((b, raw[b], served, pa))
        breakdown = model_times(server.grpc_url)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [f"### {dt.date.today().isoformat()}: {MODEL} fp32 ONNX, CPU ({machine})", "",
             "| batch | onnxruntime direct (img/s) | served classify from JPEG (img/s) | served / direct | perf_analyzer classify (img/s, p50 ms) |",
             "|---|---|---|---|---|"]
    for b, r, s, pa in rows:
        pa_text = f"{pa.throughput:.1f} ({pa.p50_ms:.0f} ms)" if pa else perf_analyzer.unavailable_reason() or "skipped"
        lines.append(f"| {b} | {r:.1f} | {s:.1f} | **{s / r:.0%}** | {pa_text} |")
    lines += ["", "Where the server spent its time (Triton statistics over the whole run):", "",
              "| model | requests | executions | mean compute per execution (ms) |", "|---|---|---|---|"]
    lines += [f"| {name} | {n} | {e} | {ms:.1f} |" for name, (n, e, ms) in sorted(breakdown.items())]
    report = "\n".join(lines)
    print("\n" + report)
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + report + "\n")
        print(f"\nappended to {ROOT / 'benchmarks' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
