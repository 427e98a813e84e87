"""int8 vs fp32 image tower speed, onnxruntime on CPU, in one run (issue 12).

Exports ViT-B-32 (random weights: speed does not depend on what the weights mean) as fp32 and
as int8 (the same export command users run, gate included), then times both ONNX files in
onnxruntime directly, alternating rounds so both see the same machine load, at each batch
size on real photos preprocessed as the server does.

    .venv/bin/python benchmarks/int8_speed.py [--model ViT-B-32] [--batch-sizes 8 16] [--seconds 15] [--record]

Target (issue 12): int8 >= 1.5x fp32 img/s at batch 8 and 16. int8 gains need VNNI or AMX
(integer dot products); the machine's flags are printed and recorded. --record appends to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.5


def machine() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = sorted(set(re.findall(r"\b(avx512_vnni|avx_vnni|amx_\w+)\b", text)))
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "?"
    return {
        "cpu": model.group(1).strip() if model else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "int8_flags": ", ".join(flags) or "none (no VNNI, no AMX)",
        "load": load,
        "python": platform.python_version(),
    }


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per precision and batch size")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from headmaster.export import quantize
    from headmaster.export.encoder import ExportOptions, export_encoder

    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, int8 instructions: {info['int8_flags']}, "
        f"load average {info['load']} at start"
    )
    with tempfile.TemporaryDirectory(prefix="int8-speed-") as tmp:
        started = time.perf_counter()
        cards = {
            p: export_encoder(
                ExportOptions(model=args.model, pretrained=None, out=Path(tmp) / p, precision=p, towers=("image",))
            )
            for p in ("fp32", "int8")
        }
        print(f"exported fp32 and int8 in {time.perf_counter() - started:.0f} s")
        gate = cards["int8"].verification["image"]["gate"]
        sessions = {p: session(Path(tmp) / p / card.towers["image"].file) for p, card in cards.items()}
        photos = quantize.pixels(quantize.gate_images(quantize.calibration_images()), cards["fp32"].preprocessing)
        rows = []
        for batch in args.batch_sizes:
            x = np.ascontiguousarray(np.resize(photos, (batch, *photos.shape[1:])))
            images = dict.fromkeys(sessions, 0)
            spent = dict.fromkeys(sessions, 0.0)
            for s in sessions.values():
                s.run(None, {"PIXELS": x})  # warm-up
            while min(spent.values()) < args.seconds:  # alternate: both see the same load
                for p, s in sessions.items():
                    t = time.perf_counter()
                    s.run(None, {"PIXELS": x})
                    spent[p] += time.perf_counter() - t
                    images[p] += batch
            rate = {p: images[p] / spent[p] for p in sessions}
            rows.append((batch, rate["fp32"], rate["int8"], rate["int8"] / rate["fp32"]))
            print(
                f"batch {batch:3d}: fp32 {rate['fp32']:6.1f} img/s  int8 {rate['int8']:6.1f} img/s  "
                f"int8/fp32 {rate['int8'] / rate['fp32']:.2f}x (target {TARGET}x)"
            )
    end_load = machine()["load"]
    print(
        f"gate: cosine to fp32 mean {gate['mean_cosine']:.5f}, min {gate['min_cosine']:.5f} over "
        f"{gate['images']} held-out images; load average {end_load} at the end"
    )
    if args.record:
        day = datetime.date.today().isoformat()
        lines = [
            f"\n### {day}: {args.model} int8 vs fp32 image tower, onnxruntime direct, CPU "
            f"({info['cpu']}, {info['cores']} cores, int8 instructions: {info['int8_flags']}, "
            f"Python {info['python']})\n",
            f"Random weights; `benchmarks/int8_speed.py`, {args.seconds:.0f} s per precision and batch, "
            f"alternating; load average {info['load']} at start, {end_load} at the end (other work on "
            "the machine). Gate on held-out images: cosine to fp32 mean "
            f"{gate['mean_cosine']:.5f}, min {gate['min_cosine']:.5f}.\n",
            "| batch | fp32 (img/s) | int8 (img/s) | int8 / fp32 | target |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {b} | {f:.1f} | {i:.1f} | **{r:.2f}x** | {TARGET}x |" for b, f, i, r in rows]
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended to {ROOT / 'benchmarks' / 'RESULTS.md'}")


if __name__ == "__main__":
    sys.exit(main())
