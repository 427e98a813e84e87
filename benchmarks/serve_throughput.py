"""ViT-B-32 image tower: onnxruntime called directly vs. the served `classify` ensemble, fp32 and int8.

    .venv/bin/python benchmarks/serve_throughput.py [--precisions fp32 int8] [--batch-sizes 8 16]
                                                    [--seconds 20] [--record]

Everything runs in one process tree on this machine, in one run, per precision, the figures
measured in alternating windows (every figure sees the same machine load):
- raw: the exported image tower in onnxruntime (same session options as the server's
  runner) on already-preprocessed uint8 pixels, batch B, back to back;
- served: JPEG bytes -> `classify` (decode + resize, encoder, two zero-shot heads,
  thresholds) through the bundled Triton over gRPC, requests of B images, 2 in flight so
  the server's dynamic batcher always has the next batch queued;
- perf_analyzer (tritonclient 2.51) on `classify` with the same JPEGs, for a second opinion.
It prints served/raw per batch size, int8/fp32 for both, where the server spent its time per
image (Triton's own per-model statistics: preprocess vs encoder), and the preprocessing time
per image of phone-size JPEGs decoded at reduced scale vs exactly. --record appends the
tables to benchmarks/RESULTS.md.

Targets (issues 2 and 12): served >= 85% of raw; int8 >= 1.5x fp32 raw at batch 8 and 16.
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
HEADS = {
    "subject": (["cat=a photo of a cat", "dog=a photo of a dog", "person=a photo of a person"], ("a photo of {}.",)),
    "has_cat": (["cat=a photo containing a cat", "no cat=a photo with no cat"], ("{}",)),
}


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


def prepare(precision: str, preferred: tuple[int, ...], device: str) -> tuple[Path, Path]:
    from headmaster.errors import CardError
    from headmaster.export.card import EncoderCard
    from headmaster.export.encoder import ExportOptions, export_encoder
    from headmaster.repository.build import build_repository
    from headmaster.repository.repo import BuildOptions
    from headmaster.training.heads.zero_shot import create_zero_shot_head

    encoder_dir, repo = WORKDIR / f"encoder-{precision}", WORKDIR / f"model_repository-{precision}"
    try:
        EncoderCard.load(encoder_dir)
    except CardError:
        print(f"exporting {MODEL} {precision} (random weights: speed does not depend on them)...", flush=True)
        export_encoder(
            ExportOptions(model=MODEL, pretrained=None, out=encoder_dir, towers=("image", "text"), precision=precision)
        )
    if repo.exists():
        import shutil

        shutil.rmtree(repo)
    build_repository(
        encoder_dir,
        repo,
        # No caches: the served path repeats a handful of photos, which the caches would answer
        # without decoding or running the encoder.
        BuildOptions.for_device(
            device,
            preferred_batch_sizes=preferred,
            max_queue_delay_us=None if device == "cuda" else 2000,
            embedding_cache_mb=0,
            decoded_cache_mb=0,
        ),
    )
    for name, (labels, templates) in HEADS.items():
        create_zero_shot_head(repo, name, labels, templates)
    return encoder_dir, repo


class Raw:
    """The exported image tower in onnxruntime, called directly on preprocessed pixels."""

    def __init__(self, encoder_dir: Path, images: list[bytes], device: str = "cpu"):
        from headmaster.export.card import EncoderCard
        from headmaster.served.preprocess import preprocess_bytes
        from headmaster.served.runtime import load_runner

        card = EncoderCard.load(encoder_dir)
        self.pixels = np.stack([preprocess_bytes(images[i % len(images)], card.preprocessing) for i in range(64)])
        self.spec = card.towers["image"]
        self.runner = load_runner(
            str(encoder_dir / self.spec.file), device=device, optimization=self.spec.graph_optimization
        )

    def window(self, batch: int, seconds: float) -> tuple[int, float]:
        """Images done and seconds spent, running batches back to back for ``seconds``."""
        x = self.pixels[:batch]
        self.runner({self.spec.input_name: x}, [self.spec.output_name])  # warm
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.runner({self.spec.input_name: x}, [self.spec.output_name])
            done += batch
        return done, time.perf_counter() - start


class Served:
    """JPEG bytes -> `classify` over gRPC, requests of B images, 2 in flight."""

    def __init__(self, url: str, images: list[bytes]):
        from headmaster.client import HeadmasterClient

        self.url, self.images, self.client_type = url, images, HeadmasterClient

    def window(self, batch: int, seconds: float) -> tuple[int, float]:
        with self.client_type(self.url, batch_size=batch, max_in_flight=2) as client:
            chunk = [self.images[i % len(self.images)] for i in range(batch * 4)]
            client.classify(chunk)  # warm-up: the first batches pay for lazy initialisation
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                results = client.classify(chunk)
                assert all(r.ok for r in results)
                done += len(chunk)
            return done, time.perf_counter() - start


def model_times(url: str) -> dict[str, tuple[int, int, float, float]]:
    """Per model: (images, executions, mean compute ms per execution, per image) from Triton's statistics."""
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
            compute = sum(
                int(s["inference_stats"][k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output")
            )
            images = int(s.get("inference_count", 0))
            out[s["name"]] = (images, executions, compute / executions / 1e6, compute / max(images, 1) / 1e6)
    return out


def phone_photo_preprocessing(seconds: float) -> list[tuple[str, float, float]]:
    """ms per image, one thread: real photos upscaled to phone-camera sizes, reduced vs exact decode."""
    from PIL import Image

    from headmaster.served.preprocess import preprocess_bytes
    from tests.helpers import photo_bytes

    cfg = {"size": [224, 224], "resize_mode": "shortest", "interpolation": "bicubic"}
    rows = []
    for size in ((4032, 3024), (4000, 3000), (8064, 6048)):
        jpegs = []
        for data in list(photo_bytes().values())[:4]:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.LANCZOS).save(buffer, "JPEG", quality=90)
            jpegs.append(buffer.getvalue())
        times = {}
        for exact in (False, True):
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 6:
                preprocess_bytes(jpegs[done % len(jpegs)], {**cfg, "exact_decode": exact})
                done += 1
            times[exact] = (time.perf_counter() - start) / done * 1000
        rows.append((f"{size[0]}x{size[1]}", times[False], times[True]))
    return rows


def measure(images: list[bytes], args) -> tuple[list, dict]:
    """Every (precision, batch, raw | served) figure, measured in alternating windows of a few
    seconds, so that all of them see the same machine load (this machine is shared)."""
    import contextlib

    from headmaster.errors import ToolError
    from headmaster.repository.repo import Repository
    from headmaster.server import perf_analyzer
    from headmaster.server.triton import ServerOptions, TritonServer, free_port

    with contextlib.ExitStack() as stack:
        raw, served, servers = {}, {}, {}
        for precision in args.precisions:
            encoder_dir, repo = prepare(precision, tuple(sorted(set(args.batch_sizes))), args.device)
            raw[precision] = Raw(encoder_dir, images, args.device)
            options = ServerOptions(
                repository=repo,
                http_port=free_port(),
                grpc_port=free_port(),
                metrics_port=free_port(),
                load_models=tuple(Repository(repo).model_names()),
                exit_timeout_s=10,
            )
            servers[precision] = stack.enter_context(
                TritonServer(options, log_path=WORKDIR / f"tritonserver-{precision}.log")
            )
            served[precision] = Served(servers[precision].grpc_url, images)
        totals: dict[tuple, list[float]] = {}
        window = max(2.0, args.seconds / args.rounds)
        for _ in range(args.rounds):
            for b in args.batch_sizes:
                for precision in args.precisions:
                    for kind, side in (("raw", raw[precision]), ("served", served[precision])):
                        done, spent = side.window(b, window)
                        total = totals.setdefault((precision, b, kind), [0, 0.0])
                        total[0] += done
                        total[1] += spent
        rows = []
        for precision in args.precisions:
            for b in args.batch_sizes:
                pa = None
                if not args.no_perf_analyzer and not perf_analyzer.unavailable_reason():
                    data = perf_analyzer.write_image_input(images, WORKDIR / f"perf_input_b{b}.json")
                    try:
                        pa = perf_analyzer.run(
                            "classify",
                            servers[precision].http_url,
                            data,
                            batch_size=b,
                            concurrency=2,
                            api_key=servers[precision].api_key,
                            measurement_ms=int(window * 1000),
                        )
                    except ToolError as e:  # on a busy machine it may find no stable window: say so, go on
                        pa = f"no stable measurement ({str(e).splitlines()[-1][:60]})"
                rate = {
                    kind: totals[precision, b, kind][0] / totals[precision, b, kind][1] for kind in ("raw", "served")
                }
                rows.append((precision, b, rate["raw"], rate["served"], pa))
        breakdowns = {precision: model_times(server.grpc_url) for precision, server in servers.items()}
    return rows, breakdowns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "fp16", "int8"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per figure, all rounds together")
    parser.add_argument("--rounds", type=int, default=5, help="alternating windows per figure")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: the GPU repository (repo build --device cuda), e.g. --precisions fp16 "
        "--batch-sizes 64 256 (not run on this project's machines: no GPU was lent)",
    )
    args = parser.parse_args()

    from headmaster.server import perf_analyzer

    images = jpeg_inputs()
    load_start = os.getloadavg()[0]
    rows, breakdowns = measure(images, args)
    phone = phone_photo_preprocessing(args.seconds)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [
        f"### {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: {MODEL} {' vs '.join(args.precisions)} "
        f"ONNX, CPU ({machine}); load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end",
        "",
        "| precision | batch | onnxruntime direct (img/s) | served classify from JPEG (img/s) | served / direct | "
        "perf_analyzer classify (img/s, p50 ms) |",
        "|---|---|---|---|---|---|",
    ]
    for precision, b, r, s, pa in rows:
        pa_text = (
            pa
            if isinstance(pa, str)
            else f"{pa.throughput:.1f} ({pa.p50_ms:.0f} ms)"
            if pa
            else perf_analyzer.unavailable_reason() or "skipped"
        )
        lines.append(f"| {precision} | {b} | {r:.1f} | {s:.1f} | **{s / r:.0%}** | {pa_text} |")
    by = {(p, b): (r, s) for p, b, r, s, _ in rows}
    if "fp32" in args.precisions and "int8" in args.precisions:
        lines += ["", "| batch | int8 / fp32, direct | int8 / fp32, served |", "|---|---|---|"]
        lines += [
            f"| {b} | **{by['int8', b][0] / by['fp32', b][0]:.2f}x** | {by['int8', b][1] / by['fp32', b][1]:.2f}x |"
            for b in args.batch_sizes
        ]
    lines += [
        "",
        "Where the server spent its time (Triton statistics over the whole run; compute per image):",
        "",
        "| precision | model | images | executions | ms per execution | ms per image |",
        "|---|---|---|---|---|---|",
    ]
    for precision, breakdown in breakdowns.items():
        lines += [
            f"| {precision} | {name} | {n} | {e} | {ms:.1f} | {per:.2f} |"
            for name, (n, e, ms, per) in sorted(breakdown.items())
        ]
    lines += [
        "",
        "Preprocessing of phone-size JPEGs (real photos upscaled, quality 90), one thread, ms per image:",
        "",
        "| size | reduced DCT-scale decode (default) | exact (`--exact-decode`) | speed-up |",
        "|---|---|---|---|",
    ]
    lines += [f"| {size} | {fast:.1f} | {exact:.1f} | {exact / fast:.1f}x |" for size, fast, exact in phone]
    report = "\n".join(lines)
    print("\n" + report)
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + report + "\n")
        print(f"\nappended to {ROOT / 'benchmarks' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
