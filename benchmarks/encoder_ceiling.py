"""The fp32 image encoder alone (issue 27's ceiling): how many images/s can each runtime get out of
ViT-B/32 (random weights) on this CPU, batch 8, with nothing around it (no decode, no server)?

    .venv/bin/python benchmarks/encoder_ceiling.py [--batch 8] [--seconds 10] [--rounds 2] [--record]

Variants, each in a process of its own, the order reversed every round (the machine is shared):

- ``torch-infinity``: what infinity-emb 0.0.78's torch engine runs, in its own virtual environment
  (benchmarks/peer_infinity.py makes it): the random-init transformers CLIP folder loaded by its
  own vision class (``TIMM``: transformers' default attention, no BetterTransformer, no
  torch.compile) and its own ``encode_core`` (``get_image_features`` under ``torch.no_grad``).
  Skipped when that environment is missing.
- ``torch-open_clip``: open_clip's ViT-B-32 visual tower (what Headmaster exports) in eager torch
  with ``torch.inference_mode``, in this environment (its torch).
- ``ort-export``: Headmaster's exported ``image.onnx`` (fp32, uint8 pixels in, normalised
  embedding out) through the served runner (``served/runtime.py``: ORT_ENABLE_ALL, intra-op
  threads 0 = one per physical core, sequential, CPU arena on, spinning on).
- ``ort-fused``: the same file after onnxruntime's transformer optimizer (``optimize_model``,
  model_type clip: Attention, LayerNormalization, Gelu where they match), same runner. The table
  also says whether the graph onnxruntime then runs differs from the plain file's.
- ``ort-export-threadsN-spin`` / ``-nospin``: the runner's options with intra-op threads = N
  (cores) instead of 0, the intra-op threads spinning between operators or sleeping (the runner's
  choice since 2026-12-07: sleeping).
- ``torch-infinity-threads1``, ``torch-open_clip-threads1``, ``ort-export-threads1``: one thread
  each. On a shared machine, multi-threaded figures mostly measure how each runtime's thread
  pool copes with other processes taking its cores (OpenMP's and onnxruntime's threads wait
  for each other at every operator); one thread compares the kernels themselves.

The ratio that matters: the best onnxruntime figure over ``torch-infinity``'s is the most
Headmaster's ``classify`` could lead infinity by at the same precision, decode and serving
costing nothing; issue 27 asks for 2x.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = ROOT / "build" / "ceiling"
PEER_PYTHON = ROOT / "build" / "peer-infinity" / "venv" / "bin" / "python"
PEER_MODEL = ROOT / "build" / "peer-infinity" / "clip-vit-b32-random"

# Run by the peer's interpreter: infinity's torch vision engine on CPU, its own class
# (infinity_emb/transformer/vision/torch_vision.py ``TIMM``: AutoModel.from_pretrained with
# transformers' default attention, no BetterTransformer, no torch.compile by default) and its own
# ``encode_core`` (get_image_features under torch.no_grad), fed pixel_values of the served size.
PEER_SCRIPT = r"""
import json, sys, time
import torch
from infinity_emb.args import EngineArgs
from infinity_emb.transformer.vision.torch_vision import TIMM
batch, seconds, threads = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
engine = TIMM(engine_args=EngineArgs(model_name_or_path=sys.argv[1], engine="torch", device="cpu", dtype="float32"))
features = ({"pixel_values": torch.randn(batch, 3, 224, 224)}, [True] * batch)
for _ in range(3):
    engine.encode_core(features)
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    engine.encode_core(features)
    n += batch
model = engine.model
print(json.dumps({"img_s": n / (time.perf_counter() - start), "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "attn": getattr(model.config, "_attn_implementation", "?"),
                  "compiled": engine.engine_args.compile}))
"""


def export_encoder() -> Path:
    """The fp32 ViT-B-32 export (random weights), made once."""
    from headmaster.errors import CardError
    from headmaster.export.card import EncoderCard
    from headmaster.export.encoder import ExportOptions
    from headmaster.export.encoder import export_encoder as export

    folder = WORKDIR / "encoder-fp32"
    try:
        EncoderCard.load(folder)
    except CardError:
        print("exporting ViT-B-32 fp32 (random weights)...", flush=True)
        export(ExportOptions(model="ViT-B-32", pretrained=None, out=folder, towers=("image",), precision="fp32"))
    return folder


def fused(plain: Path) -> Path:
    """The export's image graph after onnxruntime's transformer optimizer (made once)."""
    from onnxruntime.transformers.optimizer import optimize_model

    out = WORKDIR / "image.fused.onnx"
    if not out.exists():
        # opt_level 0: only the optimizer's own fusions; the session applies ORT_ENABLE_ALL after.
        model = optimize_model(str(plain), model_type="clip", num_heads=12, hidden_size=768, opt_level=0)
        print(f"transformer optimizer fused: {model.get_fused_operator_statistics()}", flush=True)
        model.save_model_to_file(str(out))
    return out


def session_graph(path: Path) -> dict[str, int]:
    """Operator counts of the graph onnxruntime actually runs (after its ORT_ENABLE_ALL passes)."""
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    out = WORKDIR / f"{path.stem}.session.onnx"
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{out.stem}.bin")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(out), load_external_data=False).graph
    return dict(collections.Counter(n.op_type for n in graph.node))


def run_ort(path: str, batch: int, seconds: float, threads: int | None, spinning: bool) -> dict:
    """``threads`` None: the served runner itself (served/runtime.py, intra-op threads 0 = ORT
    picks one per physical core); otherwise its options with that many threads and spinning as given."""
    import onnxruntime as ort

    from headmaster.served.runtime import load_runner, session_options

    if threads is None:
        session = load_runner(path, device="cpu", optimization="all").session
    else:
        options = session_options(ort, threads, "all", spinning=spinning)  # the runner's, varied
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 3, 224, 224), dtype=np.uint8)
    for _ in range(3):
        session.run(["EMBEDDING"], {"PIXELS": pixels})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(["EMBEDDING"], {"PIXELS": pixels})
        n += batch
    return {"img_s": n / (time.perf_counter() - start)}


def run_open_clip(batch: int, seconds: float, threads: int) -> dict:
    import open_clip
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    pixels = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(3):
            model(pixels)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(pixels)
            n += batch
    return {"img_s": n / (time.perf_counter() - start), "threads": torch.get_num_threads(), "torch": torch.__version__}


def _threads(variant: str) -> int | None:
    """``...-threadsN...`` -> N; None when the variant names no thread count (the runtime's default)."""
    return int(variant.split("threads", 1)[1].split("-")[0]) if "threads" in variant else None


def one(variant: str, args) -> dict:
    """One variant in a fresh process (its own threads, allocator and caches)."""
    if variant.startswith("torch-infinity"):
        threads = _threads(variant) or 0
        command = [
            str(PEER_PYTHON),
            "-c",
            PEER_SCRIPT,
            str(PEER_MODEL),
            str(args.batch),
            str(args.seconds),
            str(threads),
        ]
    else:
        command = [
            sys.executable,
            __file__,
            "--one",
            variant,
            "--batch",
            str(args.batch),
            "--seconds",
            str(args.seconds),
        ]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed window per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--only", nargs="+", help="these variants only (names as in the table)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant here, print JSON
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    if args.one:
        plain = export_encoder() / "image.onnx"
        threads = _threads(args.one)
        if args.one.startswith("torch-open_clip"):
            result = run_open_clip(args.batch, args.seconds, threads or 0)
        else:
            # ort-export | ort-fused [-threadsN] [-nospin]
            path = fused(plain) if args.one.startswith("ort-fused") else plain
            result = run_ort(str(path), args.batch, args.seconds, threads, spinning="nospin" not in args.one)
        print(json.dumps(result))
        return

    plain = export_encoder() / "image.onnx"
    graphs = {"ort-export": session_graph(plain), "ort-fused": session_graph(fused(plain))}
    same = graphs["ort-export"] == graphs["ort-fused"]
    print(f"graphs onnxruntime runs: {'identical' if same else 'different'} operator counts: {graphs}", flush=True)
    variants = [
        "torch-open_clip",
        "ort-export",
        "ort-fused",
        f"ort-export-threads{cores}-spin",
        f"ort-export-threads{cores}-nospin",
        "torch-open_clip-threads1",
        "ort-export-threads1",
    ]
    if args.only:
        variants = [v for v in variants if v in args.only]
    if PEER_PYTHON.exists() and (PEER_MODEL / "config.json").exists():
        variants[:0] = [v for v in ("torch-infinity", "torch-infinity-threads1") if not args.only or v in args.only]
    else:
        print(f"no {PEER_PYTHON} (run benchmarks/peer_infinity.py once): torch-infinity skipped", flush=True)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    load_start = os.getloadavg()[0]
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            results[variant].append(one(variant, args))
            print(f"round {r + 1} {variant}: {results[variant][-1]}", flush=True)
    report = render(results, args, load_start, graphs)
    print("\n" + report)
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + report + "\n")


def render(results: dict[str, list[dict]], args, load_start: float, graphs: dict) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"

    def base(variant: str) -> float | None:
        # each figure against torch-infinity at the same thread count
        peer = "torch-infinity-threads1" if variant.endswith("threads1") else "torch-infinity"
        return np.mean([x["img_s"] for x in results[peer]]) if peer in results else None

    lines = [
        f"### {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: the fp32 ViT-B/32 encoder alone, batch "
        f"{args.batch}, CPU ({machine}); {args.rounds} alternating rounds of {args.seconds:.0f} s per variant; "
        f"load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end "
        "(`benchmarks/encoder_ceiling.py`)",
        "",
        "| variant | img/s (mean) | per round | vs torch-infinity (same threads) |",
        "|---|---|---|---|",
    ]
    for variant, rounds in results.items():
        mean = np.mean([x["img_s"] for x in rounds])
        ratio = f"{mean / base(variant):.2f}x" if base(variant) else "-"
        per_round = " / ".join(f"{x['img_s']:.1f}" for x in rounds)
        lines.append(f"| {variant} | {mean:.1f} | {per_round} | {ratio} |")
    same = graphs["ort-export"] == graphs["ort-fused"]
    lines += [
        "",
        f"Graph onnxruntime runs (ORT_ENABLE_ALL): export {sum(graphs['ort-export'].values())} nodes, after the "
        f"transformer optimizer {sum(graphs['ort-fused'].values())} nodes, operator counts "
        f"{'identical' if same else 'different'}; fused operators in it: "
        + ", ".join(
            f"{op} {graphs['ort-fused'].get(op, 0)}"
            for op in ("Attention", "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization", "BiasGelu")
        )
        + ".",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
