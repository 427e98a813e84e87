"""The embed -> queue -> heads split on a real redis-server (Debian's, started on loopback by
the tests), real stores and real worker processes: kill -9 mid-batch, redelivery, poison
entries, backpressure, hot-loaded head versions, `worker status`."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest

from headmaster.errors import QueueError
from headmaster.repository.head_version import HeadVersion
from headmaster.repository.repo import Repository
from headmaster.store import open_store
from tests import helpers
from tests.helpers import CLI, clone_repo, free_port, run_cli, written_version

redis_url = helpers.redis_url  # the session's redis-server (a fixture shared through helpers)

pytest.importorskip("redis")

from headmaster.pipelines.redis_streams import RedisStreams  # noqa: E402
from headmaster.pipelines.workers import (  # noqa: E402
    EmbedWorker,
    HeadsWorker,
    LiveHeads,
    WorkerOptions,
    dead_letters,
)


@pytest.fixture(scope="module")
def worker_repo(tiny_repo, tmp_path_factory):
    """A copy of the session's tiny-encoder repository, so head versions written here stay here
    (the workers are the subject, not the encoder)."""
    return clone_repo(tiny_repo, tmp_path_factory.mktemp("workers") / "model_repository")


@pytest.fixture(scope="module")
def vit_worker_repo(repo, tmp_path_factory):
    """A copy of the session's ViT-S-32 repository: where a test needs the embed worker as slow as
    a real encoder (the tiny one embeds 150 images before a second Redis outage can come mid-stream)."""
    return clone_repo(repo, tmp_path_factory.mktemp("workers-vit") / "model_repository")


@pytest.fixture
def broker(redis_url):
    broker = RedisStreams(redis_url)
    yield broker
    broker.close()


@pytest.fixture
def names():
    """Streams of their own per test, so tests never see each other's entries."""
    tag = uuid.uuid4().hex[:8]
    return f"images-{tag}", f"embeddings-{tag}"


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def publish_embeddings(broker, stream: str, fingerprint: str, vectors: np.ndarray, prefix: str = "") -> list[str]:
    hashes = []
    for i, vector in enumerate(vectors):
        sha = (prefix + f"{i:08x}").rjust(64, "a")
        hashes.append(sha)
        broker.publish(
            stream,
            {
                "sha256": sha,
                "fingerprint": fingerprint,
                "embedding": vector.astype("<f4").tobytes(),
                "uri": f"item-{i}",
                "enqueued_at": repr(time.time()),
            },
        )
    return hashes


def label_rows(store, head: str):
    """Every label row ever written for ``head`` (not the newest per item): duplicates show here."""
    import pyarrow.dataset as ds

    parts = sorted(str(p) for p in (store.path / "labels" / head).glob("part-*.parquet"))
    return ds.dataset(parts, format="parquet").to_table() if parts else None


def assert_labelled_once(store, repo, hashes: list[str], vectors: np.ndarray) -> None:
    """Every item has exactly one label row per live head version, equal to the head run on CPU."""
    repository = Repository(repo)
    for head in repository.heads():
        version = HeadVersion.load(repository, head.name, head.live)
        table = label_rows(store, head.name)
        table = table.filter(__import__("pyarrow.compute").compute.equal(table["version"], head.live))
        rows = table.to_pylist()
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["sha256"]] = counts.get(row["sha256"], 0) + 1
        assert set(counts) == set(hashes), f"{head.name}: {len(set(hashes) - set(counts))} items never labelled"
        assert max(counts.values()) == 1, f"{head.name}: some item labelled {max(counts.values())} times"
        scores = version.scores(vectors)
        expected = dict(zip(hashes, version.accepted(scores)))
        by_sha = {row["sha256"]: row for row in rows}
        for i, sha in enumerate(hashes):
            assert by_sha[sha]["labels"] == expected[sha]
            np.testing.assert_allclose(by_sha[sha]["scores"], scores[i], atol=1e-5)


def test_heads_worker_labels_every_item_with_every_live_head(broker, names, worker_repo, tmp_path):
    _, embeddings = names
    store = open_store(tmp_path / "store")
    vectors = unit_vectors(300)
    hashes = publish_embeddings(broker, embeddings, Repository(worker_repo).fingerprint, vectors)
    worker = HeadsWorker(
        broker, store, LiveHeads(worker_repo), WorkerOptions(group="heads", batch=64, block_ms=100), embeddings
    )
    worker.run(idle_exit_s=1.0)
    assert worker.processed == 300 and worker.dead == 0
    assert_labelled_once(store, worker_repo, hashes, vectors)
    [status] = broker.status([embeddings])
    assert (status.lag, status.pending) == (0, 0)
    assert status.length == 0, "acknowledged entries are trimmed from the stream"
    assert len(worker.latencies) == 300


class CrashAfterStore(HeadsWorker):
    """Dies the way SIGKILL between the store write and the XACK leaves things: labels stored,
    entries still pending."""

    def step(self) -> int:
        o = self.options
        messages = self.broker.read(self.stream, o.group, o.consumer, o.batch, o.block_ms)
        self.handle(messages)
        return len(messages)


def test_redelivered_entries_are_not_labelled_twice(broker, names, worker_repo, tmp_path):
    _, embeddings = names
    store = open_store(tmp_path / "store")
    vectors = unit_vectors(100, seed=1)
    hashes = publish_embeddings(broker, embeddings, Repository(worker_repo).fingerprint, vectors)
    broker.ensure_group(embeddings, "heads")
    crashed = CrashAfterStore(
        broker,
        store,
        LiveHeads(worker_repo),
        WorkerOptions(group="heads", consumer="dead", batch=60, block_ms=100),
        embeddings,
    )
    assert crashed.step() == 60
    [status] = broker.status([embeddings])
    assert status.consumers == {"dead": 60}
    survivor = HeadsWorker(
        broker,
        store,
        LiveHeads(worker_repo),
        WorkerOptions(group="heads", consumer="survivor", batch=64, block_ms=100, claim_idle_ms=300),
        embeddings,
    )
    time.sleep(0.4)
    survivor.run(idle_exit_s=1.0)
    assert_labelled_once(store, worker_repo, hashes, vectors)
    [status] = broker.status([embeddings])
    assert status.pending == 0


def frozen(pid: int) -> None:
    """SIGSTOP a process and return once it has stopped (state T in /proc)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.001)


@pytest.mark.slow  # real worker processes, one killed: 5 s of CPU, 26 s on 2 busy cores (2026-12-07)
def test_heads_worker_killed_mid_batch_loses_nothing(broker, names, worker_repo, redis_url, tmp_path):
    """Real worker processes: one is SIGKILLed while it holds pending entries; another claims them."""
    _, embeddings = names
    store_path = tmp_path / "store"
    open_store(store_path)
    vectors = unit_vectors(3000, seed=2)
    hashes = publish_embeddings(broker, embeddings, Repository(worker_repo).fingerprint, vectors)
    common = [
        "worker",
        "heads",
        "--store",
        store_path,
        "--repo",
        worker_repo,
        "--redis",
        redis_url,
        "--stream",
        embeddings,
        "--claim-idle-ms",
        "2000",
    ]
    victim = subprocess.Popen(
        [*CLI, *map(str, common), "--consumer", "victim", "--batch", "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            table = label_rows(open_store(store_path), "animal")
            if table is not None and table.num_rows >= 300:
                break
            time.sleep(0.05)
        # Kill while it holds a batch (read, not yet acknowledged). It acknowledges every few
        # milliseconds, so look at its pending entries while it is frozen: a look then a kill
        # can straddle an acknowledgement on a busy machine.
        while time.monotonic() < deadline:
            frozen(victim.pid)
            if broker.status([embeddings])[0].consumers.get("victim"):
                break
            victim.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        if victim.poll() is None:
            victim.kill()
    [status] = broker.status([embeddings])
    assert status.consumers.get("victim", 0) > 0, "the kill must leave entries pending (mid-batch)"
    assert status.lag > 0, "the kill must come before the stream was read to its end"
    result = run_cli("worker", "status", "--redis", redis_url, "--stream", embeddings)
    assert result.returncode == 0, result.stderr
    assert "victim" in result.stdout and str(status.pending) in result.stdout
    done = run_cli(*common, "--consumer", "survivor", "--exit-when-idle", "3", timeout=300)
    assert done.returncode == 0, done.stderr
    assert_labelled_once(open_store(store_path), worker_repo, hashes, vectors)
    [status] = broker.status([embeddings])
    assert (status.lag, status.pending) == (0, 0)


def test_poison_entries_go_to_the_dead_letter_stream_and_the_rest_flow_on(broker, names, worker_repo, tmp_path):
    _, embeddings = names
    fingerprint = Repository(worker_repo).fingerprint
    store = open_store(tmp_path / "store")
    vectors = unit_vectors(50, seed=3)
    hashes = publish_embeddings(broker, embeddings, fingerprint, vectors[:25], prefix="a")
    poison = {
        "short": {"sha256": "b" * 64, "fingerprint": fingerprint, "embedding": b"\0" * 100},
        "nan": {
            "sha256": "c" * 64,
            "fingerprint": fingerprint,
            "embedding": np.full(384, np.nan, np.float32).tobytes(),
        },
        "foreign": {
            "sha256": "d" * 64,
            "fingerprint": "sha256:" + "0" * 64,
            "embedding": vectors[0].astype("<f4").tobytes(),
        },
    }
    for fields in poison.values():
        broker.publish(embeddings, fields)
    hashes += publish_embeddings(broker, embeddings, fingerprint, vectors[25:], prefix="e")
    worker = HeadsWorker(
        broker,
        store,
        LiveHeads(worker_repo),
        WorkerOptions(group="heads", batch=16, block_ms=50, claim_idle_ms=200, max_tries=3),
        embeddings,
    )
    worker.run(idle_exit_s=2.0)
    assert worker.dead == 3
    dead = broker.redis.xrange(dead_letters(embeddings))
    reasons = {fields[b"sha256"].decode(): fields[b"reason"].decode() for _, fields in dead}
    assert {fields[b"deliveries"] for _, fields in dead} == {b"3"}
    assert "expected 384 float32" in reasons["b" * 64]
    assert "NaN" in reasons["c" * 64]
    assert "unknown encoder fingerprint sha256:0000" in reasons["d" * 64]
    assert_labelled_once(store, worker_repo, hashes, vectors)
    [status] = broker.status([embeddings])
    assert status.pending == 0


def test_backpressure_stops_producers_at_the_bound(broker, names, worker_repo, tmp_path):
    _, embeddings = names
    fingerprint = Repository(worker_repo).fingerprint
    broker.ensure_group(embeddings, "heads")
    vector = unit_vectors(1)[0].astype("<f4").tobytes()
    for i in range(20):
        broker.publish(
            embeddings, {"sha256": f"{i:064x}", "fingerprint": fingerprint, "embedding": vector}, max_backlog=20
        )
    started = time.monotonic()
    with pytest.raises(QueueError, match="stayed at its bound of 20 unfinished entries"):
        broker.publish(
            embeddings,
            {"sha256": "f" * 64, "fingerprint": fingerprint, "embedding": vector},
            max_backlog=20,
            timeout_s=1.0,
        )
    assert time.monotonic() - started >= 1.0
    assert broker.redis.xlen(embeddings) == 20
    # With a consumer draining it, a producer of 400 entries gets through, the backlog never past the bound.
    store = open_store(tmp_path / "store")
    worker = HeadsWorker(
        broker, store, LiveHeads(worker_repo), WorkerOptions(group="heads", batch=8, block_ms=50), embeddings
    )
    stop = threading.Event()
    consumer = threading.Thread(target=worker.run, kwargs={"stop": stop.is_set})
    consumer.start()
    seen = []
    try:
        for i in range(400):
            broker.publish(
                embeddings,
                {"sha256": f"{i + 1000:064x}", "fingerprint": fingerprint, "embedding": vector},
                max_backlog=20,
                timeout_s=60,
            )
            seen.append(broker.backlog(embeddings))
    finally:
        stop.set()
        consumer.join(timeout=30)
    assert max(seen) <= 20
    assert worker.processed >= 400 - 20


def test_a_new_head_version_is_picked_up_without_a_restart(broker, names, worker_repo, tmp_path):
    _, embeddings = names
    fingerprint = Repository(worker_repo).fingerprint
    store = open_store(tmp_path / "store")
    heads = LiveHeads(worker_repo, recheck_s=0.2)
    worker = HeadsWorker(broker, store, heads, WorkerOptions(group="heads", batch=16, block_ms=50), embeddings)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop.is_set})
    thread.start()
    try:
        first = publish_embeddings(broker, embeddings, fingerprint, unit_vectors(20, seed=4), prefix="1")
        deadline = time.monotonic() + 30
        while worker.processed < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        card = written_version(worker_repo, "animal", np.random.default_rng(7), ("cat", "dog", "bird", "fish"))
        time.sleep(0.5)
        second = publish_embeddings(broker, embeddings, fingerprint, unit_vectors(20, seed=5), prefix="2")
        while worker.processed < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    versions = {row["sha256"]: row["version"] for row in label_rows(store, "animal").to_pylist()}
    assert {versions[s] for s in first} == {card.version - 1}
    assert {versions[s] for s in second} == {card.version}
    labels = {row["sha256"]: row for row in label_rows(store, "animal").to_pylist()}
    assert all(len(labels[s]["scores"]) == 4 for s in second)


@pytest.mark.slow  # real worker processes end to end: 5.4 s of CPU, 37 s on 2 busy cores (2026-12-07)
def test_embed_then_heads_end_to_end_with_real_workers(broker, names, worker_repo, redis_url, tmp_path, jpeg_photos):
    """submit -> `worker embed` (local encoder) -> `worker heads`: items and labels as the
    repository's own encoder and heads give them; an unreadable image dead-lettered with why."""
    images, embeddings = names
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in jpeg_photos.items():
        (folder / name).write_bytes(data)
    (folder / "copy.jpg").write_bytes(jpeg_photos["chelsea.jpg"])  # same bytes: one item
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    store_path = tmp_path / "store"
    open_store(store_path)
    result = run_cli("worker", "submit", folder, "--redis", redis_url, "--stream", images)
    assert result.returncode == 0, result.stderr
    embed = run_cli(
        "worker",
        "embed",
        "--store",
        store_path,
        "--repo",
        worker_repo,
        "--redis",
        redis_url,
        "--stream",
        images,
        "--output",
        embeddings,
        "--max-tries",
        "2",
        "--claim-idle-ms",
        "300",
        "--exit-when-idle",
        "2",
    )
    assert embed.returncode == 0, embed.stderr
    heads = run_cli(
        "worker",
        "heads",
        "--store",
        store_path,
        "--repo",
        worker_repo,
        "--redis",
        redis_url,
        "--stream",
        embeddings,
        "--exit-when-idle",
        "2",
    )
    assert heads.returncode == 0, heads.stderr
    assert "enqueue -> stored label" in heads.stderr
    from headmaster.training.embeddings import LocalEmbedder

    store = open_store(store_path)
    repository = Repository(worker_repo)
    local = LocalEmbedder(repository)
    files = sorted(p for p in folder.iterdir() if p.name != "broken.jpg")
    import hashlib

    by_sha = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in files}
    stored = store.embeddings(by_sha, repository.fingerprint)
    assert set(stored) == set(by_sha) and len(by_sha) == len(jpeg_photos)
    expected = dict(zip(by_sha, local(list(by_sha.values()))))
    for sha, vector in stored.items():
        assert float(vector @ expected[sha]) > 0.9999
    assert_labelled_once(store, worker_repo, list(stored), np.stack([stored[s] for s in stored]))
    dead = broker.redis.xrange(dead_letters(images))
    assert len(dead) == 1 and dead[0][1][b"uri"].decode().endswith("broken.jpg")
    assert "not an image" in dead[0][1][b"reason"].decode()


def test_embed_worker_through_the_server(broker, names, repo, server, tmp_path, jpeg_photos):
    """The embed worker on Triton's `embed` model: the same embeddings as the local encoder."""
    from headmaster.pipelines.embedders import LocalBytesEmbedder, ServerBytesEmbedder

    images, embeddings = names
    store = open_store(tmp_path / "store")
    for data in jpeg_photos.values():
        broker.publish(images, {"data": data})
    embedder = ServerBytesEmbedder(Repository(repo), server.grpc_url)
    try:
        EmbedWorker(broker, store, embedder, WorkerOptions(group="embed", block_ms=100), images, embeddings).run(
            idle_exit_s=1.0
        )
    finally:
        embedder.close()
    local = LocalBytesEmbedder(Repository(repo))
    import hashlib

    hashes = [hashlib.sha256(d).hexdigest() for d in jpeg_photos.values()]
    stored = store.embeddings(hashes, Repository(repo).fingerprint)
    for sha, vector in zip(hashes, local(list(jpeg_photos.values()))):
        assert float(stored[sha] @ vector) > 0.999
    assert broker.redis.xlen(embeddings) == len(jpeg_photos)


def test_redis_errors_are_one_line_and_hide_the_password():
    free = free_port()
    with pytest.raises(QueueError, match="cannot reach Redis") as caught:
        RedisStreams(f"redis://:s3cret-pass@127.0.0.1:{free}/0", connect_timeout_s=1)
    assert "s3cret-pass" not in str(caught.value) and "***" in str(caught.value)
    result = run_cli("worker", "status", "--redis", f"redis://:s3cret-pass@127.0.0.1:{free}/0")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach Redis") and "s3cret-pass" not in result.stderr
    assert "Traceback" not in result.stderr


def random_pngs(folder, n: int, seed: int) -> list[str]:
    """``n`` distinct small PNG files; returns their sha256 (the items they make)."""
    import hashlib
    import io

    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    hashes = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
        (folder / f"{i:04d}.png").write_bytes(buffer.getvalue())
        hashes.append(hashlib.sha256(buffer.getvalue()).hexdigest())
    return hashes


@pytest.mark.slow  # workers through a Redis restart and crash: 14 s of CPU, 47 s on 2 busy cores (2026-12-07)
def test_workers_ride_out_a_redis_restart_and_a_redis_crash(vit_worker_repo, tmp_path):
    """Both real workers keep running through a Redis restart (SIGTERM) and a crash (SIGKILL),
    each mid-stream, on the persistence the README asks for (appendonly yes, appendfsync always):
    they log the loss and the reconnection, and every image is stored and labelled exactly once.
    --claim-idle-ms is far above the test's length, so what a lost reply left pending comes back
    through the reconnection, not through a claim."""
    redis_server = helpers.RedisServer("--save", "", "--appendonly", "yes", "--appendfsync", "always")
    n = 150
    hashes = random_pngs(tmp_path / "photos", n, seed=11)
    store_path = tmp_path / "store"
    open_store(store_path)
    url = redis_server.url
    common = ["--store", store_path, "--repo", vit_worker_repo, "--redis", url, "--claim-idle-ms", "600000"]
    logs = {name: tmp_path / f"{name}.log" for name in ("embed", "heads")}
    workers = {}
    try:
        submitted = run_cli("worker", "submit", tmp_path / "photos", "--redis", url)
        assert submitted.returncode == 0, submitted.stderr
        for name, batch in (("embed", "8"), ("heads", "16")):
            with open(logs[name], "w") as log:
                workers[name] = subprocess.Popen(
                    [*CLI, "worker", name, *map(str, common), "--batch", batch], stdout=log, stderr=subprocess.STDOUT
                )

        def labelled() -> int:
            table = label_rows(open_store(store_path), "animal")
            return 0 if table is None else table.num_rows

        deadline = time.monotonic() + 240
        for sig, at in ((signal.SIGTERM, n // 3), (signal.SIGKILL, 2 * n // 3)):
            while labelled() < at:
                assert time.monotonic() < deadline, f"only {labelled()} of {n} labelled"
                assert all(w.poll() is None for w in workers.values()), {k: p.read_text() for k, p in logs.items()}
                time.sleep(0.02)
            assert labelled() < n, "the restart must come mid-stream"
            redis_server.stop(sig)
            time.sleep(2)  # the outage: both workers meet refused connections
            redis_server.start()
        while labelled() < n and time.monotonic() < deadline:
            assert all(w.poll() is None for w in workers.values()), {k: p.read_text() for k, p in logs.items()}
            time.sleep(0.1)
        time.sleep(1)  # anything labelled twice would have been written by now
        assert all(w.poll() is None for w in workers.values()), "a worker exited"
        for worker in workers.values():
            worker.send_signal(signal.SIGTERM)
        for name, worker in workers.items():
            assert worker.wait(timeout=60) == 0, logs[name].read_text()
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    try:
        for name, log in logs.items():
            text = " ".join(log.read_text().split())  # rich wraps long log lines
            assert text.count(f"lost Redis at {url}") >= 2, f"{name}: {text}"
            assert text.count(f"reconnected to Redis at {url}") >= 2, f"{name}: {text}"
        store = open_store(store_path)
        repository = Repository(vit_worker_repo)
        stored = [sha for table in store._item_tables(["sha256"]) for sha in table.column("sha256").to_pylist()]
        assert sorted(stored) == sorted(hashes), "every image stored exactly once"
        vectors = store.embeddings(hashes, repository.fingerprint)
        assert_labelled_once(store, vit_worker_repo, hashes, np.stack([vectors[s] for s in hashes]))
        broker = RedisStreams(url)
        try:
            for status in broker.status():
                if not status.stream.endswith(":dead"):
                    assert (status.lag, status.pending) == (0, 0), status
            assert not broker.redis.exists(dead_letters("headmaster:images"), dead_letters("headmaster:embeddings"))
        finally:
            broker.close()
    finally:
        redis_server.close()


class CuttingProxy:
    """A TCP proxy in front of Redis that can cut a connection just after Redis answered,
    before the answer reaches the client: the reply dies on the way, as in a crash or a
    network cut at the worst moment."""

    def __init__(self, port: int):
        import socket

        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_next_reply = threading.Event()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source, sink, replies: bool):
        import socket

        try:
            while data := source.recv(65536):
                if replies and self.cut_next_reply.is_set():
                    self.cut_next_reply.clear()
                    self.cuts += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self):
        self.listener.close()


def test_a_batch_whose_reply_is_cut_off_is_read_again_after_reconnecting(redis_url, caplog):
    """Redis hands entries over (they are pending for the consumer) and the connection dies
    before the reply arrives: redis-py's retry reads the next entries, and the broker reads the
    lost ones back from the consumer's pending list once it has reconnected, instead of leaving
    them to a claim ``claim_idle_ms`` later."""
    from urllib.parse import urlsplit

    proxy = CuttingProxy(urlsplit(redis_url).port)
    broker = RedisStreams(f"redis://127.0.0.1:{proxy.port}/0")
    stream = f"cut-{uuid.uuid4().hex[:8]}"
    try:
        ids = [broker.publish(stream, {"n": str(i)}) for i in range(8)]
        broker.ensure_group(stream, "g")
        first = broker.read(stream, "g", "c", 3, 10)
        broker.ack(stream, "g", [m.id for m in first])
        proxy.cut_next_reply.set()
        retried = broker.read(stream, "g", "c", 3, 10)
        assert proxy.cuts == 1 and broker.reconnects == 1
        assert [m.id for m in retried] == ids[6:], "the retry got the entries after the lost ones"
        broker.ack(stream, "g", [m.id for m in retried])
        again = broker.read(stream, "g", "c", 10, 10)
        assert [(m.id, m.deliveries) for m in again] == [(i, 2) for i in ids[3:6]]
        assert broker.read(stream, "g", "c", 10, 10) == []
        assert "lost Redis at redis://127.0.0.1" in caplog.text and "reconnected to Redis at" in caplog.text
    finally:
        broker.close()
        proxy.close()


def test_a_connection_redis_closed_while_idle_is_reported_too(caplog):
    """Redis restarted between two commands: redis-py's pool reconnects before the next one
    without a failure, and the log still says so."""
    redis_server = helpers.RedisServer()
    broker = RedisStreams(redis_server.url)
    try:
        broker.publish("s", {"n": "1"})
        redis_server.stop()
        redis_server.start()
        assert broker.backlog("s") == 0  # no persistence: the restart emptied it
        assert broker.reconnects == 1
        assert caplog.messages == [
            f"lost Redis at {redis_server.url} while idle (the server closed the connection)",
            f"reconnected to Redis at {redis_server.url}",
        ]
    finally:
        broker.close()
        redis_server.close()


def test_a_worker_goes_on_after_redis_comes_back_empty_and_stops_while_it_is_away(worker_repo, tmp_path, caplog):
    """Redis without persistence restarts with nothing: the worker makes its group again and
    labels what comes next; told to stop while Redis is away, it stops waiting and says why."""
    redis_server = helpers.RedisServer()
    broker = RedisStreams(redis_server.url, patience_s=None)
    fingerprint = Repository(worker_repo).fingerprint
    store = open_store(tmp_path / "store")
    worker = HeadsWorker(
        broker, store, LiveHeads(worker_repo), WorkerOptions(group="heads", batch=16, block_ms=50), "embeddings"
    )
    stop = threading.Event()
    errors = []

    def run():
        try:
            worker.run(stop=stop.is_set)
        except QueueError as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        first = publish_embeddings(broker, "embeddings", fingerprint, unit_vectors(20, seed=8), prefix="1")
        deadline = time.monotonic() + 60
        while worker.processed < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        redis_server.stop()
        redis_server.start()
        second = publish_embeddings(broker, "embeddings", fingerprint, unit_vectors(20, seed=9), prefix="2")
        while worker.processed < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.processed == 40
        assert "group heads of embeddings is gone from Redis" in caplog.text
        rows = label_rows(store, "animal").column("sha256").to_pylist()
        assert sorted(rows) == sorted(first + second)
        redis_server.stop(signal.SIGKILL)
        time.sleep(0.5)
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "a stopped worker waits for Redis no longer"
        [error] = errors
        assert "stopped while reconnecting (entries this worker held stay pending for its group)" in str(error)
    finally:
        stop.set()
        thread.join(timeout=30)
        broker.close()
        redis_server.close()
