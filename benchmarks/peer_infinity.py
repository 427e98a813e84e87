"""Headmaster against infinity-emb 0.0.78 (issue 27): the same ViT-B/32 geometry with random
weights, the same JPEGs, the same concurrency, each server alone, alternating rounds.

    .venv/bin/python benchmarks/peer_infinity.py [--precisions fp32 int8] [--rounds 2]
                                                 [--seconds 20] [--record]

- The peer: infinity-emb 0.0.78 (its torch engine on CPU) in a virtual environment of its own
  that this script makes under build/peer-infinity/ (torch 2.13.0, infinity-emb[server,torch,
  vision,optimum], aiohttp; torchvision removed: a CUDA torchvision breaks transformers' import),
  serving a random-init transformers ``CLIPModel(CLIPConfig())`` (ViT-B/32: 12 layers, width 768,
  patch 32, 224 px, projection 512) saved offline with its image processor and a CLIP tokenizer
  made from open_clip's bundled BPE vocabulary. ``--dtype int8`` is its int8.
- Headmaster: open_clip ViT-B-32 with random weights exported to ONNX (fp32, or int8), a
  repository with two zero-shot heads (benchmarks/serve_throughput.py's) built with
  ``--no-serve-text`` (the text tower stays on disk, unloaded: classify and embed need none),
  served by the real ``headmaster serve``; ``classify`` and ``embed`` over gRPC.
- Per server and round: started alone; the first 10 single-image requests after it says ready
  (new images); 4 client threads x batch 8 for --seconds (images/s, p50/p99 per request,
  failures; RSS and PSS of the server's whole process tree sampled under load, the highest
  sum kept, with each process at that moment); then 20 single new images (steady state) and
  one image sent 20 times (repeated). Stopped before the other starts.

Targets (issue 27; reported, never asserted): classify >= 2x the peer's images/s at the same
precision at <= its PSS and RSS; first-10 p99 within 1.5x of steady p99; a repeated image
>= 10x faster than a new one.
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime as dt
import importlib.util
import io
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.helpers (the photos)
PEER_DIR = ROOT / "build" / "peer-infinity"
PEER_VENV = PEER_DIR / "venv"
PEER_MODEL = PEER_DIR / "clip-vit-b32-random"
INFINITY = "0.0.78"
CLIENTS, BATCH = 4, 8

# Run by the peer's own interpreter: the random-init CLIP folder infinity loads (no hub here).
MAKE_PEER_MODEL = r"""
import gzip, html, json, sys
from pathlib import Path
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

out, bpe = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
CLIPModel(CLIPConfig()).save_pretrained(out)  # the default config is ViT-B/32's geometry
CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224}).save_pretrained(out)
# open_clip's SimpleTokenizer vocabulary, written as the vocab.json + merges.txt CLIPTokenizer reads.
merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
merges = [tuple(m.split()) for m in merges]
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
cs, n = bs[:], 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
vocab = [chr(c) for c in cs]
vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
(out / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
(out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
CLIPTokenizer(out / "vocab.json", out / "merges.txt").save_pretrained(out)
print("made", out)
"""


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup_peer() -> Path:
    """The peer's virtual environment and model folder (made once); returns its interpreter's bin/."""
    python = PEER_VENV / "bin" / "python"
    if not (PEER_VENV / "bin" / "infinity_emb").exists():
        print(f"making {PEER_VENV} with infinity-emb {INFINITY} (a few minutes)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run(
            [*pip, f"infinity-emb[server,torch,vision,optimum]=={INFINITY}", "torch==2.13.0", "aiohttp"], check=True
        )
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=False)
    if not (PEER_MODEL / "config.json").exists():
        import open_clip

        bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        subprocess.run([str(python), "-c", MAKE_PEER_MODEL, str(PEER_MODEL), str(bpe)], check=True)
    return PEER_VENV / "bin"


def free_port() -> int:
    from headmaster.server.triton import free_port as free

    return free()


# -- images ------------------------------------------------------------------------------------
def image_pool(n: int) -> list[bytes]:
    """``n`` distinct JPEGs (different bytes and pixels) from the real photos: crops and qualities vary."""
    from PIL import Image

    from tests.helpers import photo_bytes

    photos = [Image.open(io.BytesIO(d)).convert("RGB") for d in photo_bytes().values()]
    rng, out = np.random.default_rng(0), []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        dx, dy = int(rng.integers(0, w // 8)), int(rng.integers(0, h // 8))
        buffer = io.BytesIO()
        photo.crop((dx, dy, w - int(rng.integers(0, w // 8)), h - int(rng.integers(0, h // 8)))).save(
            buffer, "JPEG", quality=int(rng.integers(80, 95))
        )
        out.append(buffer.getvalue())
    return out


# -- memory of a process tree ------------------------------------------------------------------
def tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def memory(pid: int) -> dict[int, tuple[str, int, int]]:
    """pid -> (name, RSS bytes, PSS bytes) of every process in the tree under ``pid``."""
    out = {}
    for p in tree(pid):
        try:
            fields = {
                line.split(":")[0]: int(line.split()[1]) * 1024
                for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:]
            }
            name = Path(f"/proc/{p}/comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue
        out[p] = (name, fields.get("Rss", 0), fields.get("Pss", 0))
    return out


class MemorySampler(threading.Thread):
    """The process tree's memory every 0.5 s; keeps the sample with the highest PSS sum."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop_event, self.peak = pid, threading.Event(), {}

    def run(self) -> None:
        while not self.stop_event.is_set():
            sample = memory(self.pid)
            if sum(p for _, _, p in sample.values()) > sum(p for _, _, p in self.peak.values()):
                self.peak = sample
            self.stop_event.wait(0.5)

    def stop(self) -> dict:
        self.stop_event.set()
        self.join()
        return self.peak


# -- the two servers -----------------------------------------------------------------------------
class HeadmasterServer:
    """``headmaster serve`` on a repository; ``call(images, model)`` over gRPC."""

    name = "headmaster"

    def __init__(self, repo: Path, model: str):
        self.repo, self.model = repo, model
        ports = [free_port() for _ in range(3)]
        self.grpc = f"127.0.0.1:{ports[1]}"
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "headmaster.cli",
                "serve",
                "--repo",
                str(repo),
                "--http-port",
                str(ports[0]),
                "--grpc-port",
                str(ports[1]),
                "--metrics-port",
                str(ports[2]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in self.process.stderr:  # serve says ready only once every model is warm
            if "Triton is ready" in line:
                break
        else:
            raise RuntimeError(f"headmaster serve exited with {self.process.wait()}")
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()
        self.ready_s = time.monotonic() - self.started
        self._local = threading.local()

    def call(self, images: list[bytes], model: str | None = None) -> bool:
        from headmaster.client import HeadmasterClient

        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = HeadmasterClient(self.grpc, batch_size=BATCH, max_in_flight=1)
        results = client.embed(images) if (model or self.model) == "embed" else client.classify(images)
        return all(r.ok for r in results)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


class InfinityServer:
    """``infinity_emb v2`` (torch engine, CPU) on the random CLIP folder; images as data URIs over HTTP."""

    name = "infinity-emb"

    def __init__(self, bin_dir: Path, dtype: str):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.monotonic()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "INFINITY_ANONYMOUS_USAGE_STATS": "0",
            "DO_NOT_TRACK": "1",
        }
        self.log = open(PEER_DIR / f"infinity-{dtype}.log", "w")
        self.process = subprocess.Popen(
            [
                str(bin_dir / "infinity_emb"),
                "v2",
                "--model-id",
                str(PEER_MODEL),
                "--served-model-name",
                "clip",
                "--engine",
                "torch",
                "--device",
                "cpu",
                "--dtype",
                dtype,
                "--batch-size",
                str(BATCH * CLIENTS),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"infinity exited with {self.process.returncode}: see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("infinity did not become ready in 600 s")
            time.sleep(0.25)
        self.ready_s = time.monotonic() - self.started

    def call(self, images: list[bytes], model: str | None = None) -> bool:
        body = json.dumps(
            {
                "model": "clip",
                "modality": "image",
                "input": ["data:image/jpeg;base64," + base64.b64encode(i).decode() for i in images],
            }
        )
        request = urllib.request.Request(
            f"{self.url}/embeddings", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        return len(answer["data"]) == len(images)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


# -- measuring ---------------------------------------------------------------------------------
def timed(server, images: list[bytes], model: str | None = None) -> tuple[float, bool]:
    start = time.perf_counter()
    try:
        ok = server.call(images, model)
    except Exception:  # noqa: BLE001 - a failure is a figure
        ok = False
    return time.perf_counter() - start, ok


def load(server, pool: list[bytes], seconds: float, model: str | None = None) -> dict:
    """CLIENTS threads sending batches of BATCH images back to back for ``seconds``."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    timed(server, pool[:BATCH], model)  # each side's client connection made before the clock starts
    stop_at = time.monotonic() + seconds

    sent: collections.Counter = collections.Counter()  # pool index -> times sent

    def client(k: int) -> None:
        # Client k takes the k-th batch of every CLIENTS batches of the pool: no two clients ever
        # send the same image, so a repeat can only come from the pool running out (counted below).
        # (Until 2026-12-08 client k started at k * 97 and stepped by BATCH * CLIENTS, so the
        # clients' slices overlapped and most images were sent by several clients a few batches
        # apart: Headmaster's caches answered those repeats, which flattered its images/s.)
        i = k * BATCH
        while time.monotonic() < stop_at:
            indices = [(i + j) % len(pool) for j in range(BATCH)]
            i += BATCH * CLIENTS
            spent, ok = timed(server, [pool[x] for x in indices], model)
            with lock:
                sent.update(indices)
                latencies.append(spent) if ok else None
                failures[0] += 0 if ok else 1

    pid = server.process.pid
    sampler = MemorySampler(pid)
    sampler.start()
    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spent = time.monotonic() - start
    peak = sampler.stop()
    ms = np.array(latencies) * 1000
    return {
        "img_s": len(latencies) * BATCH / spent,
        "repeats": sum(n - 1 for n in sent.values()),  # images sent more than once in the window
        "p50": float(np.percentile(ms, 50)) if len(ms) else 0.0,
        "p99": float(np.percentile(ms, 99)) if len(ms) else 0.0,
        "failures": failures[0],
        "rss": sum(r for _, r, _ in peak.values()),
        "pss": sum(p for _, _, p in peak.values()),
        "processes": sorted(peak.values(), key=lambda x: -x[2]),
    }


def singles(server, images: list[bytes], model: str | None = None) -> list[float]:
    return [timed(server, [image], model)[0] * 1000 for image in images]


def round_of(server, pool: list[bytes], fresh: list[bytes], seconds: float, models: list[str | None]) -> dict:
    """``pool``: images never sent twice while the server runs (its cache must not flatter it):
    each model's window gets its own share."""
    out = {"ready_s": server.ready_s, "first10": singles(server, fresh[:10], models[0])}
    share = len(pool) // len(models)
    for k, model in enumerate(models):
        out[model or "embed"] = load(server, pool[k * share : (k + 1) * share], seconds, model)
    out["steady"] = singles(server, fresh[10:30], models[0])
    repeated = fresh[30]
    timed(server, [repeated], models[0])  # seen once
    out["repeated"] = singles(server, [repeated] * 20, models[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (each server started anew)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load window per server, model and round")
    parser.add_argument("--pool", type=int, default=3000, help="distinct JPEGs made for the load windows")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from headmaster.repository.build import build_repository
    from headmaster.repository.repo import BuildOptions

    bin_dir = setup_peer()
    serve_throughput = _load("serve_throughput")
    pool = image_pool(args.pool)  # distinct images: nothing repeats within a window
    fresh_all = image_pool(args.pool + 31 * (args.rounds + 1))[args.pool :]
    results: dict[tuple[str, str], list[dict]] = {}
    load_start = os.getloadavg()[0]
    for precision in args.precisions:
        encoder_dir, repo = serve_throughput.prepare(precision, (8, 16, 32), "cpu")
        # classify and embed need no text tower: it stays on disk (the zero-shot heads were made
        # from it) but is not loaded (repo build's default; --serve-text loads it).
        build_repository(encoder_dir, repo, BuildOptions(preferred_batch_sizes=(8, 16, 32), serve_text=False))
        for r in range(args.rounds):
            fresh = fresh_all[31 * r : 31 * (r + 1)]  # for the single-image figures
            order = (
                [("infinity", None), ("headmaster", None)] if r % 2 == 0 else [("headmaster", None), ("infinity", None)]
            )
            for side, _ in order:
                print(f"{precision} round {r + 1}: {side}...", flush=True)
                server = (
                    InfinityServer(bin_dir, "float32" if precision == "fp32" else "int8")
                    if side == "infinity"
                    else HeadmasterServer(repo, "classify")
                )
                try:
                    models = [None] if side == "infinity" else ["classify", "embed"]
                    results.setdefault((precision, side), []).append(
                        round_of(server, pool, fresh, args.seconds, models)
                    )
                finally:
                    server.stop()
    report = render(results, args, load_start)
    print("\n" + report)
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + report + "\n")
        print(f"\nappended to {ROOT / 'benchmarks' / 'RESULTS.md'}")


def render(results: dict, args, load_start: float) -> str:
    gb = 1e9
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [
        f"### {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: Headmaster vs infinity-emb {INFINITY}, "
        f"ViT-B/32 random weights, CPU ({machine}); {CLIENTS} clients x batch {BATCH}, {args.rounds} alternating "
        f"rounds of {args.seconds:.0f} s per server and model; load average {load_start:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at the end (`benchmarks/peer_infinity.py`)",
        "",
        "| precision | server | img/s | p50 ms | p99 ms | failures | PSS GB | RSS GB | processes | ready after s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (precision, side), rounds in results.items():
        for model in ["embed"] if side == "infinity" else ["classify", "embed"]:
            w = [r[model] for r in rounds]
            lines.append(
                f"| {precision} | {side} `{model}` | {np.mean([x['img_s'] for x in w]):.1f} | "
                f"{np.mean([x['p50'] for x in w]):.0f} | {max(x['p99'] for x in w):.0f} | "
                f"{sum(x['failures'] for x in w)} | {max(x['pss'] for x in w) / gb:.2f} | "
                f"{max(x['rss'] for x in w) / gb:.2f} | {len(w[-1]['processes'])} | "
                f"{np.mean([r['ready_s'] for r in rounds]):.0f} |"
            )
    repeats = sum(
        r[m]["repeats"] for rounds in results.values() for r in rounds for m in ("classify", "embed") if m in r
    )
    if repeats:
        lines += ["", f"(the pool ran out: {repeats} images were sent twice within a window; use a larger --pool)"]
    lines += [
        "",
        "| precision | server | first 10 after ready: p99 ms | steady single: p99 ms | ratio | "
        "new image p50 ms | repeated image p50 ms | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (precision, side), rounds in results.items():
        first = np.percentile(np.concatenate([r["first10"] for r in rounds]), 99)
        steady = np.percentile(np.concatenate([r["steady"] for r in rounds]), 99)
        new = np.percentile(np.concatenate([r["steady"] for r in rounds]), 50)
        again = np.percentile(np.concatenate([r["repeated"] for r in rounds]), 50)
        lines.append(
            f"| {precision} | {side} | {first:.0f} | {steady:.0f} | {first / steady:.2f}x | {new:.1f} | "
            f"{again:.1f} | {new / again:.1f}x |"
        )
    lines += [
        "",
        "| precision | classify / infinity img/s | infinity PSS / Headmaster PSS | RSS ratio |",
        "|---|---|---|---|",
    ]
    for precision in args.precisions:
        if (precision, "infinity") in results and (precision, "headmaster") in results:
            h = [r["classify"] for r in results[precision, "headmaster"]]
            i = [r["embed"] for r in results[precision, "infinity"]]
            lines.append(
                f"| {precision} | **{np.mean([x['img_s'] for x in h]) / np.mean([x['img_s'] for x in i]):.2f}x** | "
                f"{max(x['pss'] for x in i) / max(x['pss'] for x in h):.2f}x | "
                f"{max(x['rss'] for x in i) / max(x['rss'] for x in h):.2f}x |"
            )
    lines += ["", "Memory per process at the highest-PSS sample of the last round (name: PSS / RSS MB):", ""]
    for (precision, side), rounds in results.items():
        procs = rounds[-1]["classify" if side == "headmaster" else "embed"]["processes"]
        lines.append(f"- {precision} {side}: " + ", ".join(f"{n} {p / 1e6:.0f}/{r / 1e6:.0f}" for n, r, p in procs))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
