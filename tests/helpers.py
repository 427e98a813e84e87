"""Helpers that several test modules share (test modules never import from each other).

The PostgreSQL server: the DSN in HEADMASTER_TEST_POSTGRES (a ``postgresql://`` URL) when set,
else a throwaway server started from Debian's binaries (/usr/lib/postgresql/NN/bin) in a temp
folder, listening on a unix socket only, as the ``postgres`` user when the tests run as root
(the server refuses root). Each test gets a schema of its own. No binaries: the postgres cases
are skipped, or fail when CI is set. A module that needs it imports the fixtures
(``from tests.helpers import postgres_schema, postgres_url, pgvector_available``); pytest then
makes one fixture per module, so the server itself is started once per session and shared.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
import pytest

PG_ENV = "HEADMASTER_TEST_POSTGRES"
CLI = [sys.executable, "-m", "headmaster.cli"]


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """The `headmaster` command in a subprocess, as a user runs it."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def read_until_ready(serve: subprocess.Popen) -> list[str]:
    """The lines ``headmaster serve`` (started with ``stderr=PIPE, text=True``) prints up to "Triton is
    ready"; fails with all of them when it exits first."""
    seen = []
    for line in serve.stderr:
        seen.append(line)
        if "Triton is ready" in line or serve.poll() is not None:
            break
    assert any("Triton is ready" in line for line in seen), "".join(seen)
    return seen


# Under pytest-xdist (`pytest -n 2`) each worker process is named gw0, gw1, ... in PYTEST_XDIST_WORKER.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")

# Ports under xdist: each worker takes them from a range of its own, below Linux's ephemeral range
# (32768-60999), so two workers never pick the same port, and no outgoing connection (another worker's
# client, a gRPC channel) is given one as its source port in the seconds between the pick and the
# server's bind (Triton binds its ports only after loading its models). Alone, the kernel's choice
# (bind to 0) is enough, as it was before xdist.
_PORT_BASE, _PORT_SPAN = 20000, 500
_next_port: list[int] = []  # this worker's next candidate (a random start, so two runs side by side differ)


def free_port() -> int:
    """A loopback port no one listens on now: the kernel's pick, or under xdist the next free one in
    this worker's range (never the same one twice in a row of _PORT_SPAN picks)."""
    if WORKER is None or not WORKER.startswith("gw") or not WORKER[2:].isdigit():
        from headmaster.server import triton

        return triton.free_port()
    low = _PORT_BASE + int(WORKER[2:]) % ((32768 - _PORT_BASE) // _PORT_SPAN) * _PORT_SPAN
    if not _next_port:
        _next_port.append(low + int.from_bytes(os.urandom(2), "big") % _PORT_SPAN)
    for _ in range(_PORT_SPAN):
        port = _next_port[0]
        _next_port[0] = low + (port + 1 - low) % _PORT_SPAN
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken: by this worker's own servers, or anything else on the machine
                continue
        return port
    raise RuntimeError(f"no free loopback port in {low}-{low + _PORT_SPAN - 1} (xdist worker {WORKER})")


class Ports(NamedTuple):
    """Triton's three ports for one ``headmaster serve``."""

    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())

    def options(self) -> list[str]:
        return ["--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)]


def serve_command(repo: Path | str, ports: Ports, *extra: object) -> list[str]:
    """The argv of ``headmaster serve`` on ``repo`` (a folder or an s3:// URL) and ``ports``, then ``extra``."""
    return [*CLI, "serve", "--repo", str(repo), *ports.options(), *map(str, extra)]


def _pg_bin() -> Path | None:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the PostgreSQL store must be tested)")
    pytest.skip(reason)


class _Server:
    """One throwaway PostgreSQL server per test session, however many modules use it."""

    url: str | None = None
    users = 0
    stop = None


def _start_postgres() -> str:
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'headmaster[postgres]')")
    bin_dir = _pg_bin()
    if bin_dir is None or not (bin_dir / "initdb").is_file():
        _unavailable(f"no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (Debian: postgresql) and no {PG_ENV}")
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="headmaster-pg-")  # directly in /tmp: pytest's tmp is private to root
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            _unavailable("running as root and runuser is missing: the PostgreSQL server cannot run as root")
        try:
            shutil.chown(root, "postgres", "postgres")
        except LookupError:
            _unavailable("running as root and there is no `postgres` user: the PostgreSQL server cannot run as root")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), free_port()
    started = False

    def stop():
        if started:
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
                check=False,
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)

    try:
        subprocess.run(
            [
                *as_user,
                str(bin_dir / "initdb"),
                "-D",
                data,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        subprocess.run(
            [
                *as_user,
                str(bin_dir / "pg_ctl"),
                "-D",
                data,
                "-l",
                os.path.join(root, "server.log"),
                "-w",
                "-o",
                f"-p {port} -k {root} -c listen_addresses='' -c fsync=off -c full_page_writes=off",
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        started = True
    except subprocess.CalledProcessError as e:
        log = Path(root, "server.log")
        message = (
            f"could not start PostgreSQL: {e.stderr.decode(errors='replace')}{log.read_text() if log.is_file() else ''}"
        )
        stop()
        pytest.fail(message)
    _Server.stop = stop
    return f"postgresql://postgres@/postgres?{urlencode({'host': root, 'port': port})}"


@pytest.fixture(scope="session")
def postgres_url():
    """The base URL of a PostgreSQL server for the whole session."""
    if os.environ.get(PG_ENV):
        yield os.environ[PG_ENV]
        return
    if _Server.url is None:
        _Server.url = _start_postgres()
    _Server.users += 1
    try:
        yield _Server.url
    finally:
        _Server.users -= 1
        if _Server.users == 0 and _Server.stop is not None:
            _Server.stop()
            _Server.url = _Server.stop = None


@pytest.fixture(scope="session")
def pgvector_available(postgres_url) -> bool:
    """Whether the server has pgvector; if so it is created once in ``public``, which every
    test schema's search_path includes (an extension lives in exactly one schema)."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone() is None:
            return False
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector SCHEMA public")
        return True


def with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in [parts.query, urlencode({"options": f"-csearch_path={schema},public"})] if q)
    return urlunsplit(parts._replace(query=query))


@pytest.fixture
def postgres_schema(postgres_url, pgvector_available):
    """A DSN whose tables land in a fresh schema, dropped afterwards."""
    import psycopg

    schema = f"headmaster_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield with_schema(postgres_url, schema)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


# -- the session's encoder, repository and server, and data ------------------------------------------------
MODEL = "ViT-S-32"
SEED = 0
# A CLIP of open_clip's own architecture at toy size (tests/tiny_clip/open_clip_config.json: two
# layers per tower, widths 64 and 32), loaded through open_clip's local-dir: schema, so that a CLI
# subprocess finds it too: for tests whose subject is not the encoder (training, the repository,
# the loop). Exported in about 2 s of CPU in the suite where ViT-S-32 takes about 15, and embeds the digits
# several times faster. Its embeddings have ViT-S-32's 384 dimensions, so synthetic embeddings
# drawn for it (test_improve's clusters) keep the geometry their figures were measured in; tests
# that need the dimension read it from the card. Tests about the encoder keep MODEL.
TINY_MODEL = "local-dir:" + str(Path(__file__).parent / "tiny_clip")
# Logs and pictures a run keeps (servers' logs, the eval report's screenshot). Under xdist, a folder
# per worker (test-artifacts/gw0, ...): each worker's session server (and any module's, run on both) writes the same names.
ARTIFACTS = Path(os.environ.get("HEADMASTER_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
if WORKER:
    ARTIFACTS = ARTIFACTS / WORKER

# The native tier (opt-in): HEADMASTER_NATIVE_BACKENDS names a backend directory holding
# onnxruntime/ (Triton's onnxruntime backend) and python/, HEADMASTER_NATIVE_TRITON a
# tritonserver binary (default: the bundled one; either variable turns the tier on, the
# backends default to the binary's ../backends). Then the repositories the tests build are of
# the native flavour (encoders and heads on the onnxruntime_onnx platform) and every server
# the tests start runs that binary with those backends. HEADMASTER_NATIVE_DEVICE=gpu keeps the
# encoders on KIND_GPU (default cpu: KIND_CPU, for a Triton without GPU).
NATIVE_TRITON = os.environ.get("HEADMASTER_NATIVE_TRITON") or None
NATIVE_BACKENDS = os.environ.get("HEADMASTER_NATIVE_BACKENDS") or (
    str(Path(NATIVE_TRITON).resolve().parent.parent / "backends") if NATIVE_TRITON else None
)
NATIVE = NATIVE_BACKENDS is not None
FLAVOUR = "native" if NATIVE else "portable"
NATIVE_DEVICE = "auto" if os.environ.get("HEADMASTER_NATIVE_DEVICE", "cpu") == "gpu" else "cpu"
# What build_repo adds to the build options of every repository on this tier.
TIER_OPTIONS = {"flavour": "native", "device": NATIVE_DEVICE} if NATIVE else {}


def photo_bytes() -> dict[str, bytes]:
    """Real photos as their encoded bytes (PNG / JPEG files from installed packages)."""
    skimage_data = importlib.resources.files("skimage.data")
    sklearn_images = importlib.resources.files("sklearn.datasets") / "images"
    photos = {
        name: (skimage_data / name).read_bytes()
        for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png")
    }
    photos.update({name: (sklearn_images / name).read_bytes() for name in ("china.jpg", "flower.jpg")})
    return photos


ZERO_SHOT = {
    "animal": (["cat=a photo of a cat", "dog=a photo of a dog", "bird=a photo of a bird"], ("a photo of {}.",), {}),
    # A binary contest with a threshold on the positive label.
    "has_cat": (["cat=a photo containing a cat", "no cat=a photo with no cat"], ("{}",), {"cat": 0.52}),
}


def build_repo(encoder_dir: Path, repo: Path, heads=ZERO_SHOT, **options) -> Path:
    from headmaster.repository.build import build_repository
    from headmaster.repository.repo import BuildOptions
    from headmaster.training.heads.zero_shot import create_zero_shot_head

    if "flavour" not in options:  # the native tier builds native repositories
        options = {**TIER_OPTIONS, **options}
    # The suite's repositories serve the text tower (embed_text, tokenize) unless a test asks for a
    # lean one: `repo build`'s own default (lean) is tested through the CLI in test_lean_repository.
    options = {"serve_text": True, **options}
    build_repository(encoder_dir, repo, BuildOptions(**options))
    for name, (labels, templates, thresholds) in heads.items():
        create_zero_shot_head(repo, name, labels, templates, thresholds)
    return repo


def start_server(repo: Path, log_dir: Path):
    from headmaster.repository.repo import Repository
    from headmaster.server.triton import ServerOptions, TritonServer

    repository = Repository(repo)
    native = (
        {"binary": Path(NATIVE_TRITON) if NATIVE_TRITON else None, "backend_directory": Path(NATIVE_BACKENDS)}
        if NATIVE
        else {}
    )
    options = ServerOptions(
        repository=repo,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        load_models=tuple(repository.model_names()),
        exit_timeout_s=10,
        **native,
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    return TritonServer(options, log_path=log_dir / f"tritonserver-{repo.parent.name}.log").start()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def subset(digits_dir: Path, target: Path, per_label: dict[str, int], rename: dict[str, str] | None = None) -> Path:
    """A smaller folder dataset made of the first N images of some digits."""
    import shutil

    for digit, count in per_label.items():
        folder = target / (rename or {}).get(digit, digit)
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted((digits_dir / digit).glob("*.png"))[:count]:
            shutil.copy(path, folder / path.name)
    return target


def clone_repo(source: Path, target: Path) -> Path:
    """Copy a repository; model weights are hard-linked (never edited), the rest copied."""
    import shutil

    def copy(src, dst):
        if src.endswith((".onnx", ".pt")):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=copy)
    return target


def written_version(repo: Path, name: str, rng: np.random.Generator, labels: tuple[str, ...]):
    """A head version written directly: random weights, random thresholds."""
    from headmaster.export.heads import HeadCard, HeadWeights
    from headmaster.lifecycle.operations import HeadDraft, publish
    from headmaster.repository.repo import Repository

    repository = Repository(repo)
    weights = HeadWeights(
        (
            (
                rng.normal(scale=3.0, size=(len(labels), repository.card.embed_dim)).astype(np.float32),
                rng.normal(size=len(labels)).astype(np.float32),
            ),
        ),
        multi_label=False,
    )
    thresholds = tuple(float(t) for t in rng.uniform(0.0, 0.6, size=len(labels)))
    return publish(
        repo,
        HeadDraft(
            weights,
            HeadCard(
                name=name,
                version=1,
                labels=labels,
                thresholds=thresholds,
                multi_label=False,
                encoder_fingerprint=repository.fingerprint,
                embed_dim=repository.card.embed_dim,
                kind="linear",
                details={"written": True},
            ),
        ),
    ).card


class Clients:
    """``n`` threads classifying ``images`` over gRPC until stopped (at most ``limit_s``): every
    answer and every failure is kept, with when its request was sent and answered."""

    def __init__(self, url: str, images: list[bytes], n: int = 4, limit_s: float = 120, settle_s: float = 0.0):
        self.url, self.images, self.limit_s, self.settle_s = url, images, limit_s, settle_s
        self.results: list[tuple[float, float, object]] = []  # (sent, answered, Classification or error)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        from headmaster.client import HeadmasterClient

        started = time.monotonic()
        with HeadmasterClient(self.url, batch_size=2, max_in_flight=1, timeout_s=60) as client:
            while not self.stop.is_set() and time.monotonic() - started < self.limit_s:
                sent = time.monotonic()
                try:
                    out = client.classify(self.images)
                except Exception as e:  # a transport error is a failed request too
                    out = [e]
                self.results += [(sent, time.monotonic(), r) for r in out]

    @property
    def failures(self) -> list[str]:
        return [str(getattr(r, "error", r)) for _, _, r in self.results if isinstance(r, Exception) or not r.ok]

    @property
    def answers(self) -> list[tuple[float, float, object]]:
        return [(sent, answered, r) for sent, answered, r in self.results if not isinstance(r, Exception) and r.ok]

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(self.settle_s)  # answers to requests sent after the last change
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def assert_image_refused(server, module, data: bytes, status: str, message: str) -> None:
    """Send one image to `classify` with tritonclient ``module`` (grpc or http): it must be refused
    as that image's own fault (``status``), the message naming IMAGE[0] and matching ``message``."""
    import re

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = module.InferenceServerClient(server.grpc_url if module is grpcclient else server.http_url)
    try:
        tensor = module.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data]], dtype=object))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("classify", [tensor])
        assert caught.value.status() == status
        assert caught.value.message().startswith("in ensemble 'classify', IMAGE[0]: ")
        assert re.search(message, caught.value.message()), caught.value.message()
    finally:
        client.close()


class RedisServer:
    """A throwaway redis-server (Debian's) on a free loopback port, in a temp folder of its own,
    that a test can stop (SIGTERM or SIGKILL) and start again on the same port and data.
    ``extra`` adds server options (e.g. ``("--appendonly", "yes", "--appendfsync", "always")``);
    without them nothing persists. Missing binary: skipped, or failed when CI is set."""

    def __init__(self, *extra: str):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is missing (Debian: redis-server; `make setup` installs it) and CI is set")
            pytest.skip("redis-server is missing (Debian: redis-server)")
        pytest.importorskip("redis", reason="the Redis client is not installed (pip install 'headmaster[queue]')")
        self.root, self.port = tempfile.mkdtemp(prefix="headmaster-redis-"), free_port()
        self.extra = extra or ("--save", "", "--appendonly", "no")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start it and return once it answers (its data loaded)."""
        import redis

        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                self.root,
                "--protected-mode",
                "yes",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
                client.ping()  # answers LOADING (an error) until the data is in
                client.close()
                return
            except redis.RedisError:
                time.sleep(0.05)
        pytest.fail(f"redis-server did not answer on port {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: Redis shuts down as told (it writes its append-only file out); SIGKILL: a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url():
    """A throwaway redis-server (:class:`RedisServer`), no persistence; stopped at the end of the session."""
    server = RedisServer()
    try:
        yield server.url
    finally:
        server.close()


class MotoS3Server:
    """moto's S3 API server in a process of its own on a free loopback port, as a real S3 endpoint
    is: under three replicas and client threads, moto in the test's own process (ThreadedMotoServer)
    shared its GIL with the clients, answered late, and Triton's S3 client gave up ("curlCode: 28,
    Timeout was reached"). Each request it serves is one line of ``log`` (werkzeug's access log)."""

    def __init__(self, log: Path):
        import urllib.request

        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self._output = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):
                    return
            except OSError:
                assert time.monotonic() < deadline, f"moto's server did not answer:\n{log.read_text()}"
                time.sleep(0.2)

    def requests_since(self, offset: int) -> list[str]:
        """The access-log lines written after byte ``offset`` of the log (``log.stat().st_size`` before)."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._output.close()
