"""`headmaster serve` as an operator runs it: a closed control plane, the server record, heads
that go live with no flag, version folders dropped in by hand, a dead stub healed, and a clean
drain on SIGTERM under load.

One `headmaster serve` process (the real command, in a subprocess) on a copy of the session
repository serves this module; the tests that end it come last. Clients talk to loopback only,
and every load loop is bounded in time and count.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from headmaster.client import AsyncHeadmasterClient, ClientError, HeadmasterClient
from headmaster.server.record import KEY_HEADER, read_record, record_path, running_server
from headmaster.server.triton import SHM_PREFIX
from tests.helpers import (
    ARTIFACTS,
    CLI,
    Clients,
    Ports,
    clone_repo,
    free_port,
    run_cli,
    serve_command,
    subset,
    written_version,
)

# `headmaster serve` runs the bundled Triton, which has only the python backend.
pytestmark = [
    pytest.mark.portable_only("`headmaster serve` runs the bundled Triton (python backend only)"),
    pytest.mark.server,
]  # every test runs `headmaster serve` or a Triton


class Serve:
    """A `headmaster serve` subprocess and what it printed."""

    def __init__(self, repo: Path, log: Path, *options: str):
        self.repo, self.log = repo, log
        ports = Ports.free()
        self.http_url, self.grpc_url = f"127.0.0.1:{ports.http}", f"127.0.0.1:{ports.grpc}"
        self.output = open(log, "w")
        self.process = subprocess.Popen(
            serve_command(repo, ports, *options),
            stdout=self.output,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 240
        while running_server(repo) is None:
            assert self.process.poll() is None, self.printed()
            assert time.monotonic() < deadline, f"serve did not become ready:\n{self.printed()}"
            time.sleep(0.5)
        self.record = read_record(repo)

    def printed(self) -> str:
        return self.log.read_text()

    def said(self) -> str:
        """What it printed, as one line: rich wraps the warnings of its log handler."""
        return " ".join(self.printed().split())

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout)
        self.output.close()
        return self.process.returncode


def http(url: str, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> int:
    request = urllib.request.Request(f"http://{url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def stubs_of(pid: int) -> dict[str, tuple[int, str]]:
    """instance name -> (pid, shm region) of the python stubs under tritonserver ``pid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if args[0].endswith(b"triton_python_backend_stub"):
            found[args[8].decode()] = (int(entry.name), args[2].decode())
    return found


@pytest.fixture(scope="module")
def served(repo, tmp_path_factory):
    copy = clone_repo(repo, tmp_path_factory.mktemp("served") / "model_repository")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    serve = Serve(copy, ARTIFACTS / "serve-operations.log")
    yield serve
    serve.stop()


def version_answered(url: str, image: bytes, head: str) -> int | None:
    """The version of ``head`` that answered, or None when the server did not answer."""
    try:
        with HeadmasterClient(url) as client:
            (result,) = client.classify([image])
    except ClientError:
        return None
    return result.heads[head].version if result.ok and head in result.heads else None


# -- the control plane -----------------------------------------------------------------------
RESTRICTED_HTTP = [
    ("POST", "/v2/repository/index", b"{}"),
    ("POST", "/v2/repository/models/classify/unload", b"{}"),
    ("POST", "/v2/repository/models/classify/load", b"{}"),
    # The load API can carry files: this is how code would be uploaded and run.
    (
        "POST",
        "/v2/repository/models/evil/load",
        json.dumps(
            {"parameters": {"config": json.dumps({"backend": "python"}), "file:1/model.py": "aW1wb3J0IG9zCg=="}}
        ).encode(),
    ),
    ("GET", "/v2/logging", None),
    ("POST", "/v2/logging", b'{"log_verbose_level": 1}'),
    # Tracing every request at TENSORS level would copy every caller's inputs into the trace.
    ("GET", "/v2/trace/setting", None),
    ("POST", "/v2/trace/setting", b'{"trace_level": ["TENSORS"], "trace_rate": "1"}'),
    ("POST", "/v2/models/classify/trace/setting", b'{"trace_level": ["TIMESTAMPS"]}'),
    # Registering shared memory makes the server map any /dev/shm name (a python stub's region) it is given.
    ("POST", "/v2/systemsharedmemory/region/evil/register", b'{"key": "/evil", "offset": 0, "byte_size": 64}'),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/unregister", b"{}"),
    (
        "POST",
        "/v2/cudasharedmemory/region/evil/register",
        b'{"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64}',
    ),
    ("GET", "/v2/cudasharedmemory/status", None),
]


@pytest.mark.parametrize("method, path, body", RESTRICTED_HTTP, ids=[f"{m} {p}" for m, p, _ in RESTRICTED_HTTP])
def test_the_control_api_refuses_callers_without_the_key_over_http(served, method, path, body):
    assert http(served.http_url, path, method, body) == 403
    assert http(served.http_url, "/v2/models/classify/ready") == 200  # nothing was unloaded
    assert not (served.repo / "evil").exists()


def test_the_control_api_refuses_callers_without_the_key_over_grpc(served):
    client = grpcclient.InferenceServerClient(served.grpc_url)
    calls = {
        "index": lambda **kw: client.get_model_repository_index(**kw),
        "unload": lambda **kw: client.unload_model("classify", **kw),
        "load with files": lambda **kw: client.load_model(
            "evil", config=json.dumps({"backend": "python"}), files={"file:1/model.py": b"import os\n"}, **kw
        ),
        "log settings": lambda **kw: client.update_log_settings({"log_verbose_level": 1}, **kw),
        "trace settings": lambda **kw: client.update_trace_settings(settings={"trace_rate": "1"}, **kw),
        "shared memory": lambda **kw: client.register_system_shared_memory("evil", "/evil", 64, **kw),
        "shared memory status": lambda **kw: client.get_system_shared_memory_status(**kw),
    }
    try:
        for what, call in calls.items():
            with pytest.raises(InferenceServerException) as refused:
                call()
            # Triton 2.51 answers a restricted gRPC call with UNAVAILABLE (HTTP gets 403).
            assert "This protocol is restricted" in refused.value.message(), (what, refused.value)
        # The key opens it (gRPC metadata names it with Triton's prefix): read-only calls prove it.
        key = {f"triton-grpc-protocol-{KEY_HEADER}": served.record.api_key}
        assert client.get_model_repository_index(headers=key)
        assert client.get_log_settings(headers=key)
        assert client.is_model_ready("classify")
    finally:
        client.close()


def test_inference_health_metadata_statistics_and_model_configs_stay_open(served, jpeg_photos):
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/classify",
        "/v2/models/classify/stats",
        "/v2/models/classify/config",
    ):
        assert http(served.http_url, path) == 200, path
    # Reading a config changes nothing: perf_analyzer and Model Analyzer read it first, over gRPC too,
    # where they cannot send a key.
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        assert client.get_model_config("classify").config.name == "classify"
    finally:
        client.close()
    with HeadmasterClient(served.grpc_url) as client:
        assert client.classify([next(iter(jpeg_photos.values()))])[0].ok
        assert (
            client.encoder_fingerprint()
            == json.loads((served.repo / "headmaster.json").read_text())["encoder"]["fingerprint"]
        )


def test_the_record_is_for_its_owner_only_and_a_stale_one_is_ignored(served, tmp_path):
    path = record_path(served.repo)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    record = read_record(served.repo)
    assert record.http_url == served.http_url and record.pid != os.getpid() and len(record.api_key) >= 40
    # A copy of the repository carries the record along: it names another repository, so it is not used.
    copy = clone_repo(served.repo, tmp_path / "copy")
    assert read_record(copy) is not None and running_server(copy) is None
    # A record whose server is gone (a dead pid) is stale: ignored and removed.
    stale = json.loads(path.read_text())
    dead = subprocess.Popen(["true"])
    dead.wait()
    (copy / ".headmaster" / "server.json").write_text(json.dumps({**stale, "pid": dead.pid, "repository": str(copy)}))
    assert running_server(copy) is None
    assert not (copy / ".headmaster" / "server.json").exists()


# -- heads go live with no flag ------------------------------------------------------------------
def test_a_head_trained_with_no_flag_goes_live_while_serve_runs(served, jpeg_photos, digits_dir, tmp_path):
    image = jpeg_photos["chelsea.jpg"]
    data = subset(digits_dir, tmp_path / "digits", {"0": 20, "1": 20}, rename={"0": "cat", "1": "no cat"})
    with Clients(served.grpc_url, list(jpeg_photos.values())[:2]) as clients:
        done = subprocess.run(
            [*CLI, "train-head", str(data), "--name", "has_cat", "--repo", str(served.repo), "--epochs", "30"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        finished = time.monotonic()
        assert done.returncode == 0, done.stderr
        assert "live on the server at" in done.stderr + done.stdout
        new = max(int(p.name) for p in (served.repo / "has_cat").iterdir() if p.name.isdigit())
        while version_answered(served.grpc_url, image, "has_cat") != new:
            assert time.monotonic() - finished < 10, "the new version was not answering within 10 s"
            time.sleep(0.2)
    assert clients.failures == []
    assert {r.heads["has_cat"].version for _, _, r in clients.results} >= {new}


def test_a_rollback_with_no_flag_stays_rolled_back(served, jpeg_photos):
    """The version rolled back from is still on disk and newer than the live one: the watcher
    of dropped-in folders must not take it for one and make it live again."""
    image = jpeg_photos["chelsea.jpg"]
    newest = version_answered(served.grpc_url, image, "has_cat")
    done = subprocess.run(
        [
            *CLI,
            "rollback",
            "has_cat",
            "--repo",
            str(served.repo),
            "--server",
            served.http_url.replace("127.0.0.1", "localhost"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert version_answered(served.grpc_url, image, "has_cat") < newest
    time.sleep(6)  # three scans of the repository
    assert version_answered(served.grpc_url, image, "has_cat") < newest
    assert "adopted" not in served.printed()


def test_a_candidate_trained_while_serve_runs_stays_a_candidate(served, jpeg_photos, digits_dir, tmp_path):
    """`train-head --candidate` writes a version above the live one that nothing serves until a
    canary names it: the watcher of dropped-in folders must not take it for one."""
    image = jpeg_photos["chelsea.jpg"]
    live_before = version_answered(served.grpc_url, image, "has_cat")
    adopted_before = served.printed().count("adopted")
    data = subset(digits_dir, tmp_path / "digits", {"0": 20, "1": 20}, rename={"0": "cat", "1": "no cat"})
    done = subprocess.run(
        [
            *CLI,
            "train-head",
            str(data),
            "--name",
            "has_cat",
            "--repo",
            str(served.repo),
            "--epochs",
            "5",
            "--candidate",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    candidate = max(int(p.name) for p in (served.repo / "has_cat").iterdir() if p.name.isdigit())
    assert candidate > live_before
    time.sleep(8)  # four scans of the repository, each past the folder's settling time
    assert version_answered(served.grpc_url, image, "has_cat") == live_before
    assert served.printed().count("adopted") == adopted_before, served.printed()[-2000:]


def test_a_version_copied_in_by_hand_is_validated_then_served(served, jpeg_photos, tmp_path):
    image = jpeg_photos["coffee.jpg"]
    elsewhere = clone_repo(served.repo, tmp_path / "elsewhere")
    before = version_answered(served.grpc_url, image, "animal")
    made = written_version(elsewhere, "animal", np.random.default_rng(7), ("cat", "dog", "bird", "fish"))
    target = served.repo / "animal" / str(made.version)
    assert made.version > before and not target.exists()
    with Clients(served.grpc_url, [image]) as clients:
        shutil.copytree(elsewhere / "animal" / str(made.version), target)  # cp -r
        copied = time.monotonic()
        while version_answered(served.grpc_url, image, "animal") != made.version:
            assert time.monotonic() - copied < 10, f"not adopted within 10 s:\n{served.printed()[-2000:]}"
            time.sleep(0.2)
        deadline = time.monotonic() + 30  # the head answers first; threshold and ensembles reload after it
        while "adopted" not in served.printed():
            assert time.monotonic() < deadline, served.printed()[-2000:]
            time.sleep(0.2)
    assert clients.failures == []

    # A broken copy (3 scores for 4 labels) is refused, and the server keeps serving what it had.
    broken = written_version(elsewhere, "animal", np.random.default_rng(8), ("cat", "dog", "bird"))
    card = json.loads((elsewhere / "animal" / str(broken.version) / "head.json").read_text())
    card.update(labels=["cat", "dog", "bird", "fish"], thresholds=[0.0] * 4, version=made.version + 1)
    (elsewhere / "animal" / str(broken.version) / "head.json").write_text(json.dumps(card))
    shutil.copytree(elsewhere / "animal" / str(broken.version), served.repo / "animal" / str(made.version + 1))
    deadline = time.monotonic() + 15
    while "refused the version copied into" not in served.printed():
        assert time.monotonic() < deadline, served.printed()[-2000:]
        time.sleep(0.5)
    assert version_answered(served.grpc_url, image, "animal") == made.version
    shutil.rmtree(served.repo / "animal" / str(made.version + 1))


def test_a_version_triton_refuses_to_load_leaves_the_disk_naming_what_is_served(served, jpeg_photos, tmp_path):
    """Validation passes (a sound head) but Triton cannot load it (its runner is broken): the
    repository goes back to the version the server still serves, and says so; the watcher tries
    that folder once."""
    from headmaster.repository.consistency import problems
    from headmaster.repository.repo import Repository

    image = jpeg_photos["astronaut.jpg"]
    serving = version_answered(served.grpc_url, image, "has_cat")
    elsewhere = clone_repo(served.repo, tmp_path / "elsewhere")
    made = written_version(elsewhere, "has_cat", np.random.default_rng(9), ("cat", "no cat"))
    source = elsewhere / "has_cat" / str(made.version)
    (source / "model.py").write_text("raise RuntimeError('this runner cannot start')\n")
    target = served.repo / "has_cat" / str(made.version)
    assert not target.exists()
    shutil.copytree(source, target)  # cp -r
    deadline = time.monotonic() + 60
    while f"refused the version copied into {target}" not in served.said():
        assert time.monotonic() < deadline, served.printed()[-2000:]
        time.sleep(0.5)
    assert f"serves v{serving} again" in served.said()
    assert Repository(served.repo).head("has_cat").live == serving
    assert version_answered(served.grpc_url, image, "has_cat") == serving
    time.sleep(5)  # more scans: the refused folder, unchanged, is not tried again
    assert served.said().count(f"refused the version copied into {target}") == 1
    shutil.rmtree(target)
    assert problems(served.repo) == []


# -- faults ---------------------------------------------------------------------------------------
def test_a_killed_stub_is_healed_within_10_s(served, jpeg_photos):
    image = jpeg_photos["rocket.jpg"]
    pid, region = stubs_of(served.record.pid)["preprocess_0_0"]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    unready_seen = False
    while True:
        unready_seen |= http(served.http_url, "/v2/models/classify/ready") != 200
        if version_answered(served.grpc_url, image, "animal") is not None:
            break
        assert time.monotonic() - killed < 10, f"not answering 10 s after the kill:\n{served.printed()[-2000:]}"
        time.sleep(0.1)
    assert "preprocess_0_0" in stubs_of(served.record.pid)
    assert stubs_of(served.record.pid)["preprocess_0_0"][0] != pid
    assert "reloading preprocess" in served.printed()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/dev/shm/{region}"):
        assert time.monotonic() < deadline, "the dead stub's shared memory was left behind"
        time.sleep(0.2)
    assert unready_seen, "classify kept saying it was ready while its preprocess stub was dead"


def regions_of(pid: int) -> set[str]:
    return {region for _, region in stubs_of(pid).values()}


def test_sigterm_under_load_answers_in_flight_refuses_new_and_leaves_nothing(served, jpeg_photos):
    """Last test of the module: it ends the module's server."""
    pid = served.record.pid
    regions = regions_of(pid)
    image = np.array([[jpeg_photos["chelsea.jpg"]], [jpeg_photos["coffee.jpg"]]], dtype=object)
    outcomes: list[tuple[float, float, str]] = []
    stop = threading.Event()
    signalled = [None]

    def client():
        c = grpcclient.InferenceServerClient(served.grpc_url)
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < 60:
            tensor = grpcclient.InferInput("IMAGE", [2, 1], "BYTES")
            tensor.set_data_from_numpy(image)
            sent = time.monotonic()
            try:
                c.infer("classify", [tensor], client_timeout=40)
                outcomes.append((sent, time.monotonic(), "ok"))
            except InferenceServerException as e:
                outcomes.append((sent, time.monotonic(), str(e.status())))
                time.sleep(0.02)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(4)
    signalled[0] = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    code = served.process.wait(30)
    exited = time.monotonic() - signalled[0]
    stop.set()
    for t in threads:
        t.join(60)
    before = [o for o in outcomes if o[0] < signalled[0]]
    after = [o for o in outcomes if o[0] >= signalled[0]]
    assert code == 0, served.printed()[-2000:]
    assert exited < 15
    # Every request sent before the signal was answered; none hung.
    assert before and all(kind == "ok" for _, _, kind in before), Counter(k for _, _, k in before)
    assert all(answered - sent < 5 for sent, answered, _ in after), "a request sent during the drain hung"
    assert os.path.exists(f"/proc/{pid}") is False
    assert not any(os.path.exists(f"/dev/shm/{r}") for r in regions)
    assert not record_path(served.repo).exists()
    assert "stopped (tritonserver exit code 0)" in served.printed()


def test_serve_exits_non_zero_when_tritonserver_dies(repo, tmp_path):
    copy = clone_repo(repo, tmp_path / "repo")
    serve = Serve(copy, tmp_path / "serve.log", "--restarts", "0")
    regions = regions_of(serve.record.pid)
    os.kill(serve.record.pid, signal.SIGKILL)
    code = serve.process.wait(60)
    assert code == 1
    assert "Triton exited unexpectedly (killed by SIGKILL)" in serve.printed()
    assert "CUDA driver version" not in serve.printed()  # what Triton says on every machine with no GPU
    assert not any(os.path.exists(f"/dev/shm/{r}") for r in regions)
    assert not [p for p in Path("/dev/shm").glob(f"{SHM_PREFIX}*") if p.name in regions]


def test_serve_restarts_a_crashed_tritonserver_with_the_same_ports_and_key(repo, tmp_path, jpeg_photos):
    """The bundled Triton 2.51 segfaults when a gRPC client vanishes while its request is in
    flight (upstream triton-inference-server/server#7368, fixed in 24.12; reproduced here with
    a killed client). serve restarts it: same ports, same key, the heads as the repository names
    them now (a head removed while serving is not asked for: Triton would refuse to start)."""
    copy = clone_repo(repo, tmp_path / "repo")
    serve = Serve(copy, tmp_path / "serve.log", "--restarts", "2")
    image = jpeg_photos["chelsea.jpg"]
    try:
        first = serve.record
        removed = run_cli("heads", "remove", "has_cat", "--repo", copy)
        assert removed.returncode == 0, removed.stderr
        regions = regions_of(first.pid)
        os.kill(first.pid, signal.SIGKILL)  # what a crash looks like from outside
        deadline = time.monotonic() + 240
        while (
            running_server(copy) is None
            or read_record(copy).pid == first.pid
            or version_answered(serve.grpc_url, image, "animal") is None
        ):
            assert serve.process.poll() is None, serve.printed()
            assert time.monotonic() < deadline, serve.printed()
            time.sleep(1)
        second = read_record(copy)
        assert (second.http_url, second.grpc_url, second.api_key) == (first.http_url, first.grpc_url, first.api_key)
        with HeadmasterClient(serve.grpc_url) as client:
            assert set(client.classify([image])[0].heads) == {"animal"}
        assert "restarting Triton (1 of at most 2 in 10 minutes)" in serve.printed()
        assert not any(os.path.exists(f"/dev/shm/{r}") for r in regions)
        # The real trigger: gRPC clients killed mid-request. Whether or not this Triton crashes on
        # them, serve answers again afterwards.
        script = textwrap.dedent(f"""
            from headmaster.client import HeadmasterClient
            with HeadmasterClient({serve.grpc_url!r}, batch_size=2, max_in_flight=4) as client:
                print("ready", flush=True)
                while True:
                    client.classify([{image!r}] * 8)
        """)
        client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "ready"
        time.sleep(2)
        client.kill()
        client.wait()
        deadline = time.monotonic() + 240
        while version_answered(serve.grpc_url, image, "animal") is None:
            assert serve.process.poll() is None, serve.printed()
            assert time.monotonic() < deadline, serve.printed()
            time.sleep(1)
    finally:
        assert serve.stop() == 0, serve.printed()
    # The same disconnect can, instead of a crash, leave models Triton never releases: it then
    # exits 1 at its exit timeout with every request answered, and serve says so and exits 0.
    if "Exit timeout expired" in (copy / ".headmaster" / "triton.log").read_text(errors="replace"):
        assert "nothing in flight was lost" in serve.said()


def test_a_request_cut_by_the_exit_timeout_is_still_a_failed_stop(repo, tmp_path, jpeg_photos):
    """The other side of reading Triton's exit log: requests still running when its exit timeout
    expires are lost, and stop reports a failure (tritonserver's exit code 1, or its crash)."""
    from headmaster.repository.repo import Repository
    from headmaster.server.triton import ServerOptions, TritonServer

    copy = clone_repo(repo, tmp_path / "repo")
    options = ServerOptions(
        repository=copy,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        load_models=tuple(Repository(copy).model_names()),
        exit_timeout_s=2,
    )
    server = TritonServer(options, log_path=tmp_path / "triton.log").start()
    outcome, left_running = [], []

    # 2,048 different images: the encoder's cache answers a repeated one without the encoder, and
    # the same photo 2,048 times finished within the 3 s.
    rng = np.random.default_rng(0)
    images = []
    for _ in range(2048):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())

    async def classify():
        async with AsyncHeadmasterClient(server.grpc_url, batch_size=64, max_in_flight=4) as c:
            try:  # far more work than the 3 s it gets: about 45 s on 2 cores
                outcome.append(await c.classify(images))
            except ClientError as e:
                outcome.append(e)
                left_running.extend(
                    t
                    for t in asyncio.all_tasks()
                    if t is not asyncio.current_task() and "AsyncHeadmasterClient" in t.get_coro().__qualname__
                )

    thread = threading.Thread(target=asyncio.run, args=(classify(),), daemon=True)
    thread.start()
    time.sleep(3)
    code = server.stop(drain=False)
    thread.join(60)
    assert code not in (0, None)  # 1, or a crash: this Triton can segfault answering a closed stream
    assert "in-flight inferences" in (tmp_path / "triton.log").read_text()
    assert outcome and isinstance(outcome[0], ClientError), outcome[:1]
    # The call's other requests ended with it: none is left to fail later, unheard.
    assert not left_running
