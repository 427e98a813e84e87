"""Soak of `headmaster serve`: mixed load, head swaps and killed python stubs for N minutes.

    .venv/bin/python benchmarks/soak.py --minutes 30 --record
    .venv/bin/python benchmarks/soak.py --minutes 3 --kill-every 60      # a quick trial

A benchmark, not a test: it passes or fails nothing, it measures and reports.

1. Setup, in a temporary folder (in a child process, so this one stays small): the ViT-S-32
   encoder with random weights (seed 0), a portable repository, and two zero-shot heads
   (`animal`, `has_cat`), as tests/conftest.py builds them.
2. The real `headmaster serve --repo R --http-port .. --grpc-port .. --metrics-port ..` in a
   subprocess; the server record (R/.headmaster/server.json) gives tritonserver's pid and key.
3. For N minutes: `--clients` threads (half gRPC, half HTTP, tritonclient directly, one
   request in flight each) send `classify` requests of 1-4 real photos (scikit-image /
   scikit-learn, as JPEG and PNG); a share `--bad-share` of requests carries one odd input
   (corrupt bytes, an empty payload, a text file, a truncated PNG, a 1x3000 PNG: all refused
   with 400 / INVALID_ARGUMENT; and a 16-bit PNG, which the preprocess accepts since it
   renders every Pillow mode to 8 bits). Every `--swap-every` s a head gets a new live
   version (alternately `headmaster zero-shot NAME --replace-trained` in a subprocess with
   other labels, and `lifecycle.publish` of random weights), and the time until the new
   version answers is measured. Every `--kill-every` s one python-backend stub of that
   tritonserver gets SIGKILL (rotating preprocess, image_encoder, animal, threshold,
   has_cat); `serve` is supposed to notice and reload the model; the time until `classify`
   answers again is measured by a probe.
4. Figures: requests, failures by kind (inside the window of a kill, from the kill until 2 s
   after it healed, apart from the rest), p50/p99 latency of good requests, throughput, RSS
   of tritonserver + its stubs (VmRSS and RssAnon) at start, after the first minute and at
   the end, heal times, and after SIGTERM to `serve`: exit code, seconds to exit, leftover
   processes, /dev/shm regions and its /tmp/headmaster-triton-* folder.
5. A table on stdout; --record appends a section to benchmarks/RESULTS.md.

Only loopback is used; every loop is bounded in time and count. The logs (serve's output,
R/.headmaster/triton.log, a JSON of every figure) are kept in WORK/logs (the path is printed);
the encoder and repository are removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = "ViT-S-32"
SEED = 0
HEADS = {  # as tests/conftest.py ZERO_SHOT
    "animal": (["cat=a photo of a cat", "dog=a photo of a dog", "bird=a photo of a bird"], ("a photo of {}.",), {}),
    "has_cat": (["cat=a photo containing a cat", "no cat=a photo with no cat"], ("{}",), {"cat": 0.52}),
}
KILL_ROTATION = ("preprocess", "image_encoder", "animal", "threshold", "has_cat")
ANIMAL_LABELS = [
    "cat=a photo of a cat",
    "dog=a photo of a dog",
    "bird=a photo of a bird",
    "fish=a photo of a fish",
    "horse=a photo of a horse",
    "car=a photo of a car",
]
HAS_CAT_LABELS = ["cat=a photo containing a cat", "no cat=a photo with no cat", "maybe=a blurry photo of an animal"]
STUB_NAME = "triton_python_backend_stub"
SHM_PREFIX = "triton_python_backend_shm_region_"
RETRY_PAUSE_S = 0.1  # a client thread pauses this long after a failure that is not a 400
KILL_GRACE_S = 2.0  # a kill's window lasts until this long after the model answered again
HEAL_LIMIT_S = 120.0  # a kill not healed by then is reported as not healed
# The `headmaster` console script of this interpreter's environment (the same entry point otherwise).
HEADMASTER = (
    [str(Path(sys.executable).parent / "headmaster")]
    if (Path(sys.executable).parent / "headmaster").exists()
    else [sys.executable, "-c", "from headmaster.cli import main; main()"]
)


# -- inputs -----------------------------------------------------------------------------------
def good_images() -> list[tuple[str, bytes]]:
    """Real photos from installed packages, as their PNG/JPEG files and re-encoded as JPEG."""
    import importlib.resources

    from PIL import Image

    skimage_data = importlib.resources.files("skimage.data")
    sklearn_images = importlib.resources.files("sklearn.datasets") / "images"
    files = {
        name: (skimage_data / name).read_bytes()
        for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png")
    }
    files.update({name: (sklearn_images / name).read_bytes() for name in ("china.jpg", "flower.jpg")})
    out = list(files.items())
    for name, data in files.items():
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "JPEG", quality=90)
        out.append((name.rsplit(".", 1)[0] + "-q90.jpg", buffer.getvalue()))
    return out


def odd_inputs(png: bytes) -> dict[str, tuple[bytes, bool]]:
    """kind -> (bytes, refused?): what a careless or hostile client sends."""
    from PIL import Image

    rng = np.random.default_rng(1)
    wide = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(3000, 1), dtype=np.uint8)).save(wide, "PNG")  # 1 wide, 3000 high
    deep = io.BytesIO()
    ramp = (np.linspace(0, 65535, 256 * 256).reshape(256, 256)).astype(np.uint16)
    Image.fromarray(ramp).save(deep, "PNG")  # mode I;16
    return {
        "corrupt bytes": (b"\xff\xd8\xff\xe0" + rng.integers(0, 256, size=4000, dtype=np.uint8).tobytes(), True),
        "empty payload": (b"", True),
        "text file": (b"This is a text file, not an image.\n" * 40, True),
        "truncated PNG": (png[: len(png) // 2], True),
        "1x3000 PNG": (wide.getvalue(), True),
        "16-bit PNG": (deep.getvalue(), False),  # accepted: rendered to 8 bits (commit c0bcf3b)
    }


# -- setup (child process) ----------------------------------------------------------------------
def setup(work: Path) -> None:
    from headmaster.export.encoder import ExportOptions, export_encoder
    from headmaster.repository.build import build_repository
    from headmaster.repository.repo import BuildOptions, Repository
    from headmaster.training.heads.zero_shot import create_zero_shot_head

    encoder, repo = work / "encoder" / "vit-s-32", work / "model_repository"
    export_encoder(ExportOptions(model=MODEL, pretrained=None, out=encoder, seed=SEED))
    build_repository(encoder, repo, BuildOptions(max_queue_delay_us=20000, preferred_batch_sizes=(4, 8)))
    for name, (labels, templates, thresholds) in HEADS.items():
        create_zero_shot_head(repo, name, labels, templates, thresholds)
    print("models:", ", ".join(Repository(repo).model_names()), flush=True)


# -- /proc ----------------------------------------------------------------------------------------
def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children(pid: int) -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _ppid(int(e.name)) == pid]


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    version: str
    instance: str
    region: str


def stubs_of(server_pid: int) -> list[Stub]:
    """The python-backend stubs under tritonserver: `<stub> <model.py> <shm region> ... <instance> ...`."""
    found = []
    for pid in children(server_pid):
        args = _cmdline(pid)
        if len(args) > 8 and args[0].endswith(STUB_NAME):
            model_file = Path(args[1])
            found.append(Stub(pid, model_file.parent.parent.name, model_file.parent.name, args[8], args[2]))
    return found


def regions_mapped_by(pid: int) -> set[str]:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {line.rsplit("/", 1)[-1] for line in maps.splitlines() if f"/dev/shm/{SHM_PREFIX}" in line}


def tree_memory(server_pid: int) -> tuple[int, int, int, int]:
    """(VmRSS kB, RssAnon kB, live processes, zombie children) of tritonserver and all its children."""
    kids = children(server_pid)
    pids = [server_pid, *(p for p in kids if _alive(p))]
    return (
        sum(_status_kb(p, "VmRSS") for p in pids),
        sum(_status_kb(p, "RssAnon") for p in pids),
        len(pids),
        len(kids) - (len(pids) - 1),
    )


def cpu_ticks(pid: int, with_children: bool) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # after the ")": state=0 ... utime=11 stime=12 cutime=13 cstime=14
    return sum(int(fields[i]) for i in ((11, 12, 13, 14) if with_children else (11, 12)))


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies summed over all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def my_ticks(serve) -> int:
    """CPU ticks of this process (and its reaped children), serve, tritonserver (and its reaped
    children) and all its children: live stubs and killed ones not reaped yet (a zombie keeps its ticks)."""
    return (
        cpu_ticks(os.getpid(), True)
        + cpu_ticks(serve.process.pid, False)
        + cpu_ticks(serve.record.pid, True)
        + sum(cpu_ticks(pid, False) for pid in children(serve.record.pid))
    )


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# -- requests ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    sent: float
    done: float
    protocol: str
    kind: str  # "good" or the odd input's kind
    images: int
    category: str  # ok | refused | model_unavailable | server_error | timeout | connection | bad_answer | client_error
    message: str = ""


def categorize(error: Exception) -> tuple[str, str]:
    from tritonclient.utils import InferenceServerException

    text = str(error)
    if isinstance(error, InferenceServerException):
        status = str(error.status() or "")
        message = error.message() or text
        low = message.lower()
        if "unknown model" in low or "is not ready" in low or "not found" in low or "unavailable model" in low:
            return "model_unavailable", f"[{status}] {message}"
        if "deadline" in status.lower() or "deadline exceeded" in low or "timed out" in low or "timeout" in low:
            return "timeout", f"[{status}] {message}"
        if status in ("400", "StatusCode.INVALID_ARGUMENT"):
            return "refused", f"[{status}] {message}"
        if "UNAVAILABLE" in status and ("connect" in low or "socket" in low or "closed" in low or "reset" in low):
            return "connection", f"[{status}] {message}"
        return "server_error", f"[{status}] {message}"
    name = type(error).__name__
    if "timeout" in name.lower() or isinstance(error, (socket.timeout, TimeoutError)):
        return "timeout", f"{name}: {text}"
    if isinstance(error, (ConnectionError, OSError)):
        return "connection", f"{name}: {text}"
    return "client_error", f"{name}: {text}"


class Requester:
    """One connection over one protocol: `classify` on a list of encoded images."""

    def __init__(self, protocol: str, url: str, timeout_s: float):
        self.protocol, self.timeout_s = protocol, timeout_s
        if protocol == "grpc":
            import tritonclient.grpc as module

            self.client = module.InferenceServerClient(url)
        else:
            import tritonclient.http as module

            self.client = module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        self.module = module

    def classify(self, items: list[bytes]) -> dict:
        m = self.module
        tensor = m.InferInput("IMAGE", [len(items), 1], "BYTES")
        array = np.array([[i] for i in items], dtype=object)
        outputs = ["EMBEDDING", "RESULT"]
        if self.protocol == "grpc":
            tensor.set_data_from_numpy(array)
            result = self.client.infer(
                "classify",
                [tensor],
                outputs=[m.InferRequestedOutput(n) for n in outputs],
                client_timeout=self.timeout_s,
            )
        else:
            tensor.set_data_from_numpy(array, binary_data=True)
            result = self.client.infer(
                "classify", [tensor], outputs=[m.InferRequestedOutput(n, binary_data=True) for n in outputs]
            )
        return {n: result.as_numpy(n) for n in outputs}

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


def check_answer(out: dict, n: int) -> dict[str, int] | str:
    """Head versions answered, or what is wrong with the answer."""
    embedding, result = out.get("EMBEDDING"), out.get("RESULT")
    if embedding is None or result is None or embedding.shape[0] != n or result.shape[0] != n:
        return f"shapes {None if embedding is None else embedding.shape} / {None if result is None else result.shape}"
    if not np.all(np.isfinite(embedding)) or not np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-3):
        return "embedding not finite or not unit length"
    versions = {}
    for row in result:
        doc = json.loads(row[0])
        heads = doc.get("heads", {})
        if set(heads) != set(HEADS):
            return f"heads {sorted(heads)}"
        versions = {name: int(h["version"]) for name, h in heads.items()}
    return versions


class Load:
    """`clients` threads, each one request in flight, until stopped or the deadline."""

    def __init__(
        self,
        record,
        clients: int,
        goods: list[bytes],
        odds: dict[str, tuple[bytes, bool]],
        bad_share: float,
        timeout_s: float,
        deadline: float,
    ):
        self.record, self.goods, self.odds = record, goods, odds
        self.bad_share, self.timeout_s, self.deadline = bad_share, timeout_s, deadline
        self.outcomes: list[Outcome] = []
        self.latest_versions: dict[str, int] = {}
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(
                target=self._run, args=(i, "grpc" if i % 2 == 0 else "http"), daemon=True, name=f"load-{i}"
            )
            for i in range(clients)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout_s: float) -> list[str]:
        self.stop.set()
        end = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.1, end - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]

    def _run(self, index: int, protocol: str) -> None:
        rng = random.Random(1000 + index)
        url = self.record.grpc_url if protocol == "grpc" else self.record.http_url
        requester = Requester(protocol, url, self.timeout_s)
        count = 0
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline and count < 1_000_000:
                count += 1
                if rng.random() < self.bad_share:
                    kind = rng.choice(sorted(self.odds))
                    items = [self.odds[kind][0]] + ([rng.choice(self.goods)] if rng.random() < 0.5 else [])
                    rng.shuffle(items)
                else:
                    kind = "good"
                    items = [rng.choice(self.goods) for _ in range(rng.randint(1, 4))]
                sent = time.monotonic()
                try:
                    out = requester.classify(items)
                    answer = check_answer(out, len(items))
                    if isinstance(answer, str):
                        category, message = "bad_answer", answer
                    else:
                        category, message = "ok", ""
                        self.latest_versions.update(answer)
                except Exception as e:  # noqa: BLE001 - every failure is a figure here
                    category, message = categorize(e)
                    if category in ("connection", "client_error"):  # start over with a fresh connection
                        requester.close()
                        time.sleep(0.2)
                        requester = Requester(protocol, url, self.timeout_s)
                    elif category != "refused":
                        time.sleep(RETRY_PAUSE_S)  # as a client would before trying again
                self.outcomes.append(
                    Outcome(sent, time.monotonic(), protocol, kind, len(items), category, message[:300])
                )
        finally:
            requester.close()


# -- serve ------------------------------------------------------------------------------------------
class Serve:
    def __init__(self, repo: Path, log: Path):
        from headmaster.server.record import running_server
        from headmaster.server.triton import free_port

        self.repo, self.log = repo, log
        self.ports = [free_port() for _ in range(3)]
        self.command = [
            "headmaster",
            "serve",
            "--repo",
            str(repo),
            "--http-port",
            str(self.ports[0]),
            "--grpc-port",
            str(self.ports[1]),
            "--metrics-port",
            str(self.ports[2]),
        ]
        self.output = open(log, "w")
        started = time.monotonic()
        self.process = subprocess.Popen(
            [*HEADMASTER, *self.command[1:]], stdout=self.output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = started + 300
        self.record = None
        while self.record is None:
            if self.process.poll() is not None:
                raise SystemExit(f"headmaster serve exited with {self.process.returncode}:\n{self.printed()[-3000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise SystemExit(f"headmaster serve not ready within 300 s:\n{self.printed()[-3000:]}")
            time.sleep(0.5)
            self.record = running_server(repo)
        self.ready_s = time.monotonic() - started
        args = _cmdline(self.record.pid)
        backend = next((a.split("=", 1)[1] for a in args if a.startswith("--backend-directory=")), None)
        self.workdir = Path(backend).parent if backend else None  # /tmp/headmaster-triton-*

    def printed(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class Watcher(threading.Thread):
    """Every few seconds: memory of the server's process tree, and every stub pid and shared-memory
    region seen (for the leftover check at the end)."""

    def __init__(self, server_pid: int, t0: float, every_s: float = 5.0):
        super().__init__(daemon=True, name="watcher")
        self.server_pid, self.t0, self.every_s = server_pid, t0, every_s
        self.samples: list[tuple[float, int, int, int, int]] = []  # (t, VmRSS kB, RssAnon kB, processes, zombies)
        self.stub_pids: set[int] = set()
        self.regions: set[str] = set()
        self.stop = threading.Event()

    def look(self) -> None:
        stubs = stubs_of(self.server_pid)
        self.stub_pids |= {s.pid for s in stubs}
        self.regions |= {s.region for s in stubs} | regions_mapped_by(self.server_pid)
        rss, anon, n, zombies = tree_memory(self.server_pid)
        if rss:
            self.samples.append((time.monotonic() - self.t0, rss, anon, n, zombies))

    def run(self) -> None:
        for _ in range(100_000):
            if self.stop.wait(self.every_s):
                return
            self.look()


class Probe:
    """One good image through `classify` over gRPC, with a short timeout."""

    def __init__(self, url: str, image: bytes):
        self.url, self.image = url, image
        self.requester = Requester("grpc", url, 5.0)

    def answer(self) -> dict[str, int] | None:
        try:
            out = self.requester.classify([self.image])
        except Exception:
            self.requester.close()
            self.requester = Requester("grpc", self.url, 5.0)
            return None
        versions = check_answer(out, 1)
        return versions if isinstance(versions, dict) else None


def kill_stub(serve: Serve, model: str, probe: Probe, t0: float) -> dict:
    """SIGKILL one stub of ``model``; measure until `classify` answers again with a fresh stub."""
    stubs = [s for s in stubs_of(serve.record.pid) if s.model == model]
    if not stubs:
        return {"model": model, "at_s": time.monotonic() - t0, "error": "no stub of that model found"}
    stub = stubs[0]
    printed_before = len(serve.printed())
    os.kill(stub.pid, signal.SIGKILL)
    killed = time.monotonic()
    event = {
        "model": model,
        "instance": stub.instance,
        "pid": stub.pid,
        "region": stub.region,
        "at_s": killed - t0,
        "killed": killed,
    }
    noticed = reloaded = healed = new_stub = None
    for _ in range(int(HEAL_LIMIT_S / 0.2) + 10):
        now = time.monotonic()
        if now - killed > HEAL_LIMIT_S:
            break
        tail = serve.printed()[printed_before:]
        if noticed is None and f"stub of model {model} died" in tail:
            noticed = now
        if reloaded is None and f"model {model} reloaded" in tail:
            reloaded = now
        if new_stub is None and any(
            s.instance == stub.instance and s.pid != stub.pid for s in stubs_of(serve.record.pid)
        ):
            new_stub = now
        if healed is None and new_stub is not None and probe.answer() is not None:
            healed = time.monotonic()
        if healed is not None and reloaded is not None:
            break
        time.sleep(0.2)
    event.update(
        noticed_s=noticed and noticed - killed,
        reloaded_s=reloaded and reloaded - killed,
        new_stub_s=new_stub and new_stub - killed,
        healed_s=healed and healed - killed,
        healed=healed,
    )
    for _ in range(25):  # the dead stub's region should go with the reload
        if not os.path.exists(f"/dev/shm/{stub.region}"):
            break
        time.sleep(0.2)
    event["region_left"] = os.path.exists(f"/dev/shm/{stub.region}")
    return event


def swap_head(serve: Serve, index: int, probe: Probe, t0: float, rng: random.Random) -> dict:
    """Publish a new version of a head (CLI zero-shot or lifecycle.publish of random weights) and
    measure until `classify` answers with it."""
    from headmaster.repository.repo import Repository

    head = ("animal", "has_cat")[index % 2]
    via = ("zero-shot CLI", "lifecycle.publish")[(index // 2) % 2]
    pool = ANIMAL_LABELS if head == "animal" else HAS_CAT_LABELS
    labels = rng.sample(pool, rng.randint(2, len(pool) if head == "has_cat" else 5))
    started = time.monotonic()
    event = {"head": head, "via": via, "labels": len(labels), "at_s": started - t0, "started": started}
    try:
        if via == "zero-shot CLI":
            args = [*HEADMASTER, "zero-shot", head, "--repo", str(serve.repo), "--replace-trained"]
            for label in labels:
                args += ["--label", label]
            done = subprocess.run(args, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                event["error"] = f"exit {done.returncode}: {(done.stderr or done.stdout)[-500:]}"
            version = Repository(serve.repo).head(head).live
        else:
            from headmaster.export.heads import HeadCard, HeadWeights
            from headmaster.lifecycle import operations as lifecycle

            repository = Repository(serve.repo)
            names = tuple(label.split("=", 1)[0] for label in labels)
            dim = repository.card.embed_dim
            weights = HeadWeights(
                (
                    (
                        np.random.default_rng(index).normal(scale=3.0, size=(len(names), dim)).astype(np.float32),
                        np.random.default_rng(index + 1).normal(size=len(names)).astype(np.float32),
                    ),
                ),
                multi_label=False,
            )
            thresholds = tuple(float(t) for t in np.random.default_rng(index + 2).uniform(0.0, 0.6, size=len(names)))
            change = lifecycle.publish(
                serve.repo,
                lifecycle.HeadDraft(
                    weights,
                    HeadCard(
                        name=head,
                        version=1,
                        labels=names,
                        thresholds=thresholds,
                        multi_label=False,
                        encoder_fingerprint=repository.fingerprint,
                        embed_dim=dim,
                        kind="linear",
                        details={"written": True, "soak": True},
                    ),
                ),
            )
            version = change.version
            if change.server is None:
                event["error"] = "lifecycle.publish found no server to update"
    except Exception as e:  # noqa: BLE001
        event["error"] = f"{type(e).__name__}: {e}"[:500]
        version = None
    event["command_s"] = time.monotonic() - started
    event["version"] = version
    live_at = None
    for _ in range(300):
        if version is None or time.monotonic() - started > 60:
            break
        answer = probe.answer()
        if answer is not None and answer.get(head) == version:
            live_at = time.monotonic()
            break
        time.sleep(0.2)
    event["live_s"] = live_at and live_at - started
    event["live_after_command_s"] = live_at and live_at - started - event["command_s"]
    event["live_at"] = live_at
    return event


def stop_serve(serve: Serve, watcher: Watcher) -> dict:
    """SIGTERM to `headmaster serve`; exit code, time, and what it left behind."""
    server_pid = serve.record.pid
    watcher.look()
    regions = set(watcher.regions)
    stub_pids = set(watcher.stub_pids)
    signalled = time.monotonic()
    serve.process.send_signal(signal.SIGTERM)
    try:
        code = serve.process.wait(120)
        exit_s = time.monotonic() - signalled
    except subprocess.TimeoutExpired:
        serve.process.kill()
        code = serve.process.wait(30)
        exit_s = None
    serve.output.close()
    time.sleep(1.0)
    leftovers = []
    if _alive(server_pid) and any("tritonserver" in a for a in _cmdline(server_pid)[:1]):
        leftovers.append(f"tritonserver {server_pid}")
    leftovers += [
        f"stub {p} ({' '.join(_cmdline(p)[8:9])})"
        for p in sorted(stub_pids)
        if _alive(p) and _cmdline(p)[:1] and _cmdline(p)[0].endswith(STUB_NAME)
    ]
    repo_text = str(serve.repo.resolve())
    for entry in Path("/proc").iterdir():
        if (
            entry.name.isdigit()
            and int(entry.name) not in (os.getpid(), server_pid, *stub_pids)
            and any(repo_text in a for a in _cmdline(int(entry.name)))
            and _alive(int(entry.name))
        ):
            leftovers.append(f"pid {entry.name}: {' '.join(_cmdline(int(entry.name)))[:120]}")
    return {
        "exit_code": code,
        "exit_s": exit_s,
        "killed_after_120s": exit_s is None,
        "leftover_processes": leftovers,
        "regions_seen": len(regions),
        "leftover_regions": sorted(r for r in regions if os.path.exists(f"/dev/shm/{r}")),
        "workdir": str(serve.workdir),
        "workdir_left": bool(serve.workdir and serve.workdir.exists()),
        "record_left": (serve.repo / ".headmaster" / "server.json").exists(),
    }


# -- figures ------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def analyse(outcomes: list[Outcome], kills: list[dict], swaps: list[dict], odds: dict, load_s: float) -> dict:
    windows = [
        (k["killed"], (k["healed"] or k["killed"] + HEAL_LIMIT_S) + KILL_GRACE_S) for k in kills if "killed" in k
    ]
    swap_windows = [(s["started"], (s["live_at"] or s["started"] + 60) + KILL_GRACE_S) for s in swaps]

    def in_kill(o: Outcome) -> bool:
        return any(o.done >= a and o.sent <= b for a, b in windows)

    def in_swap(o: Outcome) -> bool:
        return any(o.done >= a and o.sent <= b for a, b in swap_windows)

    good = [o for o in outcomes if o.kind == "good"]
    bad = [o for o in outcomes if o.kind != "good"]
    ok_good = [o for o in good if o.category == "ok"]
    latencies = [1000 * (o.done - o.sent) for o in ok_good]
    failures = defaultdict(Counter)  # where -> category -> count
    messages = defaultdict(Counter)  # (where, category) -> message -> count
    for o in outcomes:
        expected = "ok" if o.kind == "good" or not odds[o.kind][1] else "refused"
        if o.category == expected:
            continue
        where = "kill window" if in_kill(o) else "elsewhere"
        category = o.category if not (o.kind != "good" and o.category == "ok") else "accepted (expected 400)"
        if o.kind == "good" and o.category == "refused":
            category = "refused a good request"
        failures[where][category] += 1
        key = re.sub(r"\b[0-9a-f]{8}-[0-9a-f-]{27}\b", "<uuid>", re.sub(r"\d+", "N", o.message))[:200]
        messages[(where, category)][key] += 1
    unexpected_elsewhere = [
        o
        for o in outcomes
        if (o.category != ("ok" if o.kind == "good" or not odds[o.kind][1] else "refused")) and not in_kill(o)
    ]
    by_kind = {}
    for kind, (_, refused) in odds.items():
        sent = [o for o in bad if o.kind == kind]
        by_kind[kind] = {
            "expected": "400" if refused else "accepted",
            "sent": len(sent),
            "as_expected": sum(o.category == ("refused" if refused else "ok") for o in sent),
            "in_kill_windows_other": sum(
                1 for o in sent if o.category != ("refused" if refused else "ok") and in_kill(o)
            ),
            "outside_kill_windows_other": dict(
                Counter(o.category for o in sent if o.category != ("refused" if refused else "ok") and not in_kill(o))
            ),
        }
    return {
        "requests": len(outcomes),
        "good_requests": len(good),
        "bad_requests": len(bad),
        "good_ok": len(ok_good),
        "good_images_ok": sum(o.images for o in ok_good),
        "throughput_img_s": sum(o.images for o in ok_good) / load_s,
        "requests_s": len(outcomes) / load_s,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=None),
        "p50_ms_by_protocol": {
            p: percentile([1000 * (o.done - o.sent) for o in ok_good if o.protocol == p], 50) for p in ("grpc", "http")
        },
        "failures": {w: dict(c) for w, c in failures.items()},
        "failure_messages": {f"{w} / {c}": dict(m.most_common(5)) for (w, c), m in messages.items()},
        "unexpected_elsewhere_during_swaps": sum(in_swap(o) for o in unexpected_elsewhere),
        "by_kind": by_kind,
    }


def fmt(value, spec=".1f", none="-") -> str:
    return none if value is None else format(value, spec)


def report(
    args,
    machine: dict,
    setup_s: float,
    serve: Serve,
    figures: dict,
    memory: dict,
    kills: list[dict],
    swaps: list[dict],
    shutdown: dict,
    logs: dict,
    load_s: float,
) -> str:
    f = figures
    command = (
        f".venv/bin/python benchmarks/soak.py --minutes {args.minutes:g}"
        + (f" --kill-every {args.kill_every:g}" if args.kill_every != 300 else "")
        + (f" --swap-every {args.swap_every:g}" if args.swap_every != 60 else "")
        + (f" --clients {args.clients}" if args.clients != 6 else "")
        + (f" --bad-share {args.bad_share:g}" if args.bad_share != 0.1 else "")
        + (" --record" if args.record else "")
    )
    lines = [
        f"### {machine['date']}: soak of `headmaster serve`, {load_s / 60:.1f} min, {MODEL} (random weights), "
        f"portable flavour, CPU",
        "",
        f"- command: `{command}`",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['os']}, Python {machine['python']}; "
        f"{machine['others']}",
        f"- setup (export + repository + 2 heads) {setup_s:.0f} s; `{' '.join(serve.command[:2])} ...` ready in "
        f"{serve.ready_s:.1f} s; {args.clients} client threads (half gRPC, half HTTP, one request in flight "
        f"each), {args.bad_share:.0%} of requests with an odd input, a head swap every {args.swap_every:g} s, "
        f"a stub SIGKILL every {args.kill_every:g} s",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests | {f['requests']:,} ({f['good_requests']:,} good, {f['bad_requests']:,} with an odd input) |",
        f"| good requests answered | {f['good_ok']:,} of {f['good_requests']:,} |",
        f"| throughput | {f['throughput_img_s']:.1f} img/s, {f['requests_s']:.1f} requests/s |",
        f"| latency of good requests (1-4 images) | p50 {fmt(f['p50_ms'], '.0f')} ms, p99 {fmt(f['p99_ms'], '.0f')} ms, "
        f"max {fmt(f['max_ms'], '.0f')} ms (p50 gRPC {fmt(f['p50_ms_by_protocol']['grpc'], '.0f')}, "
        f"HTTP {fmt(f['p50_ms_by_protocol']['http'], '.0f')}) |",
        f"| unexpected failures outside kill windows | **{sum(f['failures'].get('elsewhere', {}).values())}** "
        f"({f['unexpected_elsewhere_during_swaps']} of them during a head swap) |",
        f"| failures inside kill windows (kill until {KILL_GRACE_S:g} s after healed) | "
        f"{sum(f['failures'].get('kill window', {}).values())} |",
        f"| RSS tritonserver + stubs (VmRSS) | start {memory['start'][0] / 1024:.0f} MB, after 1 min "
        f"{memory['warm'][0] / 1024:.0f} MB, end {memory['end'][0] / 1024:.0f} MB: "
        f"**{(memory['end'][0] - memory['warm'][0]) / 1024:+.0f} MB** since 1 min "
        f"({(memory['end'][0] - memory['start'][0]) / 1024:+.0f} MB since start) |",
        f"| anonymous memory (RssAnon) | start {memory['start'][1] / 1024:.0f} MB, after 1 min "
        f"{memory['warm'][1] / 1024:.0f} MB, end {memory['end'][1] / 1024:.0f} MB "
        f"({(memory['end'][1] - memory['warm'][1]) / 1024:+.0f} MB since 1 min); slope over the second half "
        f"{fmt(memory['slope_mb_per_10min'], '+.1f')} MB / 10 min |",
        f"| RSS every {5 if load_s >= 600 else 1} min (min: VmRSS / RssAnon MB) | "
        f"{', '.join(f'{m}: {r} / {a}' for m, r, a in memory['every_5_min'])} |",
        f"| processes (tritonserver + stubs) | {memory['start'][2]} at start, {memory['end'][2]} at end; "
        f"unreaped (zombie) stubs at the end: {memory['end'][3]} |",
        f"| head swaps | {len(swaps)} ({sum(s['via'] == 'zero-shot CLI' for s in swaps)} by `headmaster "
        f"zero-shot`, the others by `lifecycle.publish`); the new version answers in median "
        f"{fmt(percentile([s['live_s'] for s in swaps if s['live_s']], 50))} s, max "
        f"{fmt(max([s['live_s'] for s in swaps if s['live_s']], default=None))} s from the start of the command "
        f"(max {fmt(max([s['live_after_command_s'] for s in swaps if s['live_s']], default=None), '.2f')} s "
        f"after it returned); not live within 60 s: "
        f"{sum(1 for s in swaps if not s['live_s'])}; errors: {sum(1 for s in swaps if 'error' in s)} |",
        f"| stub kills healed (classify answers again) | {sum(1 for k in kills if k.get('healed_s'))} of {len(kills)}; "
        f"max {fmt(max([k['healed_s'] for k in kills if k.get('healed_s')], default=None))} s |",
        f"| SIGTERM to `headmaster serve` | exit code {shutdown['exit_code']} after "
        f"{fmt(shutdown['exit_s'])} s{' (killed after 120 s)' if shutdown['killed_after_120s'] else ''} |",
        f"| left behind | processes: {len(shutdown['leftover_processes'])}, /dev/shm regions: "
        f"{len(shutdown['leftover_regions'])} of {shutdown['regions_seen']} seen, its /tmp/headmaster-triton-* "
        f"folder: {'left' if shutdown['workdir_left'] else 'removed'}, server record: "
        f"{'left' if shutdown['record_left'] else 'removed'} |",
        "",
        "Failures by kind (a request counts in a kill window when it was answered after the kill and sent "
        "before the model answered again + 2 s):",
        "",
        "| kind | outside kill windows | inside kill windows |",
        "|---|---|---|",
    ]
    kinds = sorted(set(f["failures"].get("elsewhere", {})) | set(f["failures"].get("kill window", {})))
    for kind in kinds:
        lines.append(
            f"| {kind} | {f['failures'].get('elsewhere', {}).get(kind, 0)} | "
            f"{f['failures'].get('kill window', {}).get(kind, 0)} |"
        )
    if not kinds:
        lines.append("| (none) | 0 | 0 |")
    lines += [
        "",
        "Odd inputs (alone or with one good image in the request):",
        "",
        "| input | expected | sent | answered as expected | otherwise, outside kill windows | otherwise, inside |",
        "|---|---|---|---|---|---|",
    ]
    for kind, k in f["by_kind"].items():
        other = ", ".join(f"{c} {n}" for c, n in k["outside_kill_windows_other"].items()) or "0"
        lines.append(
            f"| {kind} | {k['expected']} | {k['sent']} | {k['as_expected']} | {other} | {k['in_kill_windows_other']} |"
        )
    lines += [
        "",
        "Stub kills (SIGKILL; `serve` should reload the model within 10 s):",
        "",
        "| at | model (instance) | serve noticed | reload done | classify answers again | failed requests in window | "
        "dead stub's /dev/shm region |",
        "|---|---|---|---|---|---|---|",
    ]
    # (a client thread pauses RETRY_PAUSE_S after each failure, so the counts scale with the window's length)
    for k in kills:
        if "error" in k:
            lines.append(f"| {k['at_s'] / 60:.1f} min | {k['model']} | {k['error']} | | | | |")
            continue
        lines.append(
            f"| {k['at_s'] / 60:.1f} min | {k['model']} ({k['instance']}) | {fmt(k['noticed_s'])} s | "
            f"{fmt(k['reloaded_s'])} s | **{fmt(k['healed_s'], none='not healed')} s** | "
            f"{k.get('window_failures', 0)} | {'left' if k['region_left'] else 'removed'} |"
        )
    if f["failure_messages"]:
        lines += ["", "Most frequent failure messages (digits as N):", ""]
        for where_kind, messages in sorted(f["failure_messages"].items()):
            for message, n in list(messages.items())[:3]:
                lines.append(f"- {where_kind}, {n}x: `{message.replace('`', chr(39))}`")
    lines += [
        "",
        f"Server log: {logs['triton_errors']} error lines (E...) in triton.log; `serve` printed "
        f"{logs['died']} 'stub ... died', {logs['reloaded']} 'reloaded', {logs['not_reloaded']} 'could not be "
        f"reloaded', {len(logs['warnings'])} warning(s)"
        + "".join(f"; WARNING: {w}" for w in logs["warnings"])
        + f". A client thread pauses {RETRY_PAUSE_S:g} s after a failure that is not a 400.",
    ]
    if shutdown["leftover_processes"] or shutdown["leftover_regions"]:
        lines += ["", "Left behind: " + "; ".join(shutdown["leftover_processes"] + shutdown["leftover_regions"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--bad-share", type=float, default=0.1, help="share of requests with an odd input")
    parser.add_argument("--swap-every", type=float, default=60.0, help="seconds between head swaps")
    parser.add_argument("--kill-every", type=float, default=300.0, help="seconds between stub kills")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, seconds")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the encoder and repository")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--setup-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup_only:
        setup(args.setup_only)
        return
    if not 0 < args.minutes <= 24 * 60 or not 1 <= args.clients <= 64:
        parser.error("--minutes must be in (0, 1440] and --clients in [1, 64]")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="headmaster-soak-"))
    logs_dir = work / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    machine = {
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
        "loadavg_start": os.getloadavg(),
    }

    started = time.monotonic()
    print("setup: exporting ViT-S-32 (random weights), building the repository, adding 2 heads...", flush=True)
    done = subprocess.run(
        [sys.executable, __file__, "--setup-only", str(work)],
        capture_output=True,
        text=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise SystemExit(f"setup failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    setup_s = time.monotonic() - started
    print(f"setup done in {setup_s:.0f} s; {done.stdout.strip()}", flush=True)
    repo = work / "model_repository"

    goods_named = good_images()
    goods = [data for _, data in goods_named]
    odds = odd_inputs(dict(goods_named)["astronaut.png"])

    serve = Serve(repo, logs_dir / "serve.out")
    record = serve.record
    print(
        f"serve ready in {serve.ready_s:.1f} s: tritonserver pid {record.pid}, HTTP {record.http_url}, "
        f"gRPC {record.grpc_url}; stubs: {', '.join(sorted(s.instance for s in stubs_of(record.pid)))}",
        flush=True,
    )

    probe = Probe(record.grpc_url, goods[0])
    for kind, (data, refused) in odds.items():  # what each odd input gets, once, before the load
        try:
            Requester("grpc", record.grpc_url, 30).classify([data])
            print(f"  {kind}: accepted (expected {'400' if refused else 'accepted'})", flush=True)
        except Exception as e:  # noqa: BLE001
            category, message = categorize(e)
            print(f"  {kind}: {category}: {message[:150]} (expected {'400' if refused else 'accepted'})", flush=True)
    if probe.answer() is None:
        raise SystemExit("classify does not answer a good image; see " + str(logs_dir))

    t0 = time.monotonic()
    load_s = args.minutes * 60
    watcher = Watcher(record.pid, t0)
    watcher.look()
    memory = {"start": watcher.samples[-1][1:]}
    busy0, total0 = machine_busy_ticks()
    mine0 = my_ticks(serve)
    load = Load(record, args.clients, goods, odds, args.bad_share, args.timeout, t0 + load_s)
    load.start()
    watcher.start()

    events = [(k * args.swap_every, "swap") for k in range(1, 100_000) if k * args.swap_every < load_s - 15]
    offset = min(args.kill_every / 2, 30.0)
    events += [
        (k * args.kill_every - offset, "kill") for k in range(1, 100_000) if k * args.kill_every - offset < load_s - 20
    ]
    events.sort()
    kills, swaps = [], []
    rng = random.Random(SEED)
    last_print = 0.0
    for at, what in events:
        while time.monotonic() - t0 < at:
            time.sleep(min(0.5, max(0.0, at - (time.monotonic() - t0))))
            if time.monotonic() - last_print > 60:
                last_print = time.monotonic()
                n = len(load.outcomes)
                bad = sum(1 for o in load.outcomes if o.category not in ("ok", "refused"))
                mem = watcher.samples[-1][1] / 1024 if watcher.samples else 0
                print(
                    f"  {(time.monotonic() - t0) / 60:5.1f} min: {n} requests, {bad} not ok/400, RSS {mem:.0f} MB",
                    flush=True,
                )
        if serve.process.poll() is not None:
            print(f"headmaster serve exited early with {serve.process.returncode}", flush=True)
            break
        if what == "swap":
            event = swap_head(serve, len(swaps), probe, t0, rng)
            swaps.append(event)
            print(
                f"  swap {len(swaps)} at {event['at_s'] / 60:.1f} min: {event['head']} v{event['version']} via "
                f"{event['via']} ({event['labels']} labels): command {event['command_s']:.1f} s, live after "
                f"{fmt(event['live_s'])} s{'; ' + event['error'] if 'error' in event else ''}",
                flush=True,
            )
        else:
            model = KILL_ROTATION[len(kills) % len(KILL_ROTATION)]
            event = kill_stub(serve, model, probe, t0)
            kills.append(event)
            print(
                f"  kill {len(kills)} at {event['at_s'] / 60:.1f} min: {model} "
                f"{event.get('instance', '')} pid {event.get('pid')}: noticed {fmt(event.get('noticed_s'))} s, "
                f"reloaded {fmt(event.get('reloaded_s'))} s, answers again {fmt(event.get('healed_s'))} s"
                f"{'; ' + event['error'] if 'error' in event else ''}",
                flush=True,
            )
        if time.monotonic() - t0 >= 60 and "warm" not in memory and watcher.samples:
            memory["warm"] = next((s[1:] for s in watcher.samples if s[0] >= 60), watcher.samples[-1][1:])
    for _ in range(int(load_s) + 10):  # the rest of the run
        if time.monotonic() - t0 >= load_s or serve.process.poll() is not None:
            break
        time.sleep(min(1.0, max(0.0, load_s - (time.monotonic() - t0))))
    stuck = load.join(args.timeout + 15)
    measured_s = time.monotonic() - t0
    watcher.stop.set()
    watcher.join(10)
    watcher.look()
    memory["end"] = watcher.samples[-1][1:]
    memory.setdefault("warm", next((s[1:] for s in watcher.samples if s[0] >= 60), memory["start"]))
    half = [(t, anon) for t, _, anon, _, _ in watcher.samples if t >= measured_s / 2]
    memory["every_5_min"] = [
        (round(t / 60), rss // 1024, anon // 1024)
        for t, rss, anon, _, _ in [
            next((x for x in watcher.samples if x[0] >= m * 60), watcher.samples[-1])
            for m in range(0, int(measured_s // 60) + 1, 5 if measured_s >= 600 else 1)
        ]
    ]
    memory["slope_mb_per_10min"] = (
        float(np.polyfit([t for t, _ in half], [a / 1024 for _, a in half], 1)[0]) * 600
        if len(half) >= 3 and measured_s >= 600
        else None
    )
    busy1, total1 = machine_busy_ticks()
    # CPU used by everything else on the machine during the load (rough: the machine's busy ticks less
    # those of this process, serve, tritonserver and its stubs).
    machine["other_cpu_share"] = max(0.0, ((busy1 - busy0) - (my_ticks(serve) - mine0)) / max(1, total1 - total0))
    machine["loadavg_end"] = os.getloadavg()
    machine["others"] = (
        f"other work was running on it: other processes used about "
        f"{machine['other_cpu_share']:.0%} of its CPU time during the run (load average "
        f"{machine['loadavg_start'][0]:.1f} before, {machine['loadavg_end'][0]:.1f} at the end)"
        if machine["other_cpu_share"] > 0.05
        else f"quiet otherwise (other processes used {machine['other_cpu_share']:.0%} of its CPU time)"
    )
    shutdown = stop_serve(serve, watcher)

    printed = serve.printed()
    triton_log = repo / ".headmaster" / "triton.log"
    if triton_log.exists():
        shutil.copy2(triton_log, logs_dir / "triton.log")
    triton_text = (logs_dir / "triton.log").read_text(errors="replace") if (logs_dir / "triton.log").exists() else ""
    logs = {
        "triton_errors": sum(1 for line in triton_text.splitlines() if line[:1] == "E"),
        "died": printed.count("died; reloading"),
        "reloaded": len(re.findall(r"model \w+ reloaded", printed)),
        "not_reloaded": printed.count("could not be reloaded"),
        "warnings": [" ".join(w.split()) for w in re.findall(r"WARNING\s+(.*?)(?=\n\S|\Z)", printed, re.S)],
    }
    outcomes = list(load.outcomes)
    figures = analyse(outcomes, kills, swaps, odds, measured_s)
    for k in kills:
        if "killed" in k:
            end = (k["healed"] or k["killed"] + HEAL_LIMIT_S) + KILL_GRACE_S
            k["window_failures"] = sum(
                1
                for o in outcomes
                if o.done >= k["killed"]
                and o.sent <= end
                and o.category != ("ok" if o.kind == "good" or not odds[o.kind][1] else "refused")
            )
    text = report(args, machine, setup_s, serve, figures, memory, kills, swaps, shutdown, logs, measured_s)
    if stuck:
        text += f"\n\nClient threads still waiting at the end: {', '.join(stuck)}"
    (logs_dir / "figures.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "figures": figures,
                "memory": memory,
                "memory_samples": watcher.samples,
                "kills": kills,
                "swaps": swaps,
                "shutdown": shutdown,
                "logs": logs,
                "setup_s": setup_s,
                "ready_s": serve.ready_s,
            },
            indent=2,
            default=str,
        )
    )
    with open(logs_dir / "outcomes.jsonl", "w") as f:
        for o in outcomes:
            f.write(json.dumps(o.__dict__) + "\n")
    print("\n" + text + "\n", flush=True)
    if not args.keep:
        shutil.rmtree(work / "encoder", ignore_errors=True)
        shutil.rmtree(repo, ignore_errors=True)
    print(f"logs kept in {logs_dir} (serve.out, triton.log, figures.json, outcomes.jsonl)", flush=True)
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + text + "\n")
        print(f"appended to {ROOT / 'benchmarks' / 'RESULTS.md'}", flush=True)


if __name__ == "__main__":
    main()
