"""`headmaster backfill` on a real local Ray cluster (one per module; the killed run starts its
own): every image stored once with every live head's labels, resumable after kill -9, exactly
once, unreadable images listed, listings as sources, the server's `embed` model as encoder."""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from headmaster.repository.head_version import HeadVersion
from headmaster.repository.repo import Repository
from headmaster.store import open_store
from headmaster.training.embeddings import LocalEmbedder
from tests.helpers import CLI, clone_repo, free_port, run_cli

ray = pytest.importorskip("ray")

from headmaster.pipelines.backfill import BackfillOptions, backfill  # noqa: E402

N = 200


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the module's in-process backfills (they join it instead of starting one)."""
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def backfill_repo(repo, tmp_path_factory):
    return clone_repo(repo, tmp_path_factory.mktemp("backfill") / "model_repository")


@pytest.fixture(scope="module")
def catalogue(photos, tmp_path_factory) -> tuple:
    """N distinct JPEGs cut from real photos, one copy of one of them, and one broken file."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("catalogue") / "images"
    folder.mkdir()
    sources = [Image.open(io.BytesIO(data)).convert("RGB") for data in photos.values()]
    rng = np.random.default_rng(0)
    for i in range(N):
        photo = sources[i % len(sources)]
        w, h = photo.size
        x, y = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        photo.crop((x, y, x + w // 2, y + h // 2)).resize((160, 120)).save(folder / f"{i:04d}.jpg", quality=85)
    (folder / "sub").mkdir()
    (folder / "sub" / "copy-of-0007.jpg").write_bytes((folder / "0007.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"GIF89a truncated")
    hashes = {hashlib.sha256((folder / f"{i:04d}.jpg").read_bytes()).hexdigest() for i in range(N)}
    return folder, hashes


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of a session: what a killed command and its Ray cluster left."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def label_rows(store, head: str):
    import pyarrow.dataset as ds

    parts = sorted(str(p) for p in (store.path / "labels" / head).glob("part-*.parquet"))
    return ds.dataset(parts, format="parquet").to_table().to_pylist() if parts else []


def item_rows(store, fingerprint: str) -> list[str]:
    import pyarrow.dataset as ds

    parts = sorted(str(p) for p in store.path.glob("items/*/part-*.parquet"))
    return ds.dataset(parts, format="parquet").to_table(columns=["sha256"])["sha256"].to_pylist() if parts else []


def assert_exactly_once(store, repo, hashes: set[str]) -> None:
    """Each image stored once; each has exactly one label row per live head version, equal to
    the head run on its stored embedding."""
    repository = Repository(repo)
    items = item_rows(store, repository.fingerprint)
    assert len(items) == len(set(items)), "an item was stored twice"
    assert set(items) == hashes
    stored = store.embeddings(hashes, repository.fingerprint)
    order = sorted(hashes)
    matrix = np.stack([stored[h] for h in order])
    for head in repository.heads():
        version = HeadVersion.load(repository, head.name, head.live)
        rows = [r for r in label_rows(store, head.name) if r["version"] == head.live]
        shas = [r["sha256"] for r in rows]
        assert len(shas) == len(set(shas)), f"{head.name}: an item labelled twice"
        assert set(shas) == hashes
        expected = dict(zip(order, version.accepted(version.scores(matrix))))
        assert all(r["labels"] == expected[r["sha256"]] for r in rows)


@pytest.mark.slow  # a Ray cluster's start and 200 images through the encoder
def test_backfill_stores_every_image_once_with_every_head(ray_cluster, backfill_repo, catalogue, tmp_path):
    folder, hashes = catalogue
    store = open_store(tmp_path / "store")
    seen = []
    report = backfill(
        str(folder),
        store,
        BackfillOptions(repo=backfill_repo, actors=2, write_batch=64),
        progress=lambda r: seen.append(r.embedded),
    )
    assert (report.total, report.embedded, report.skipped) == (N + 2, N, 1)
    assert len(seen) >= 3 and seen == sorted(seen), "progress is reported per bounded write batch"
    [(uri, reason)] = report.failures
    assert uri.endswith("broken.jpg") and "not an image" in reason
    assert_exactly_once(store, backfill_repo, hashes)
    # The embeddings are the repository's encoder's (the same preprocess code as the server).
    repository = Repository(backfill_repo)
    files = sorted(folder.glob("*.jpg"))[:40]
    local = LocalEmbedder(repository)(files)
    stored = store.embeddings([hashlib.sha256(f.read_bytes()).hexdigest() for f in files], repository.fingerprint)
    for f, vector in zip(files, local):
        if f.name != "broken.jpg":
            assert float(stored[hashlib.sha256(f.read_bytes()).hexdigest()] @ vector) > 0.9999

    again = backfill(str(folder), store, BackfillOptions(repo=backfill_repo, actors=1))
    assert (again.embedded, again.skipped, again.relabelled, again.labelled) == (0, N + 1, 0, {})
    assert_exactly_once(store, backfill_repo, hashes)


@pytest.mark.slow  # Ray
def test_stored_items_missing_labels_are_completed_once(ray_cluster, backfill_repo, catalogue, tmp_path):
    """What a kill between the items write and the labels write leaves: items without labels."""
    folder, hashes = catalogue
    repository = Repository(backfill_repo)
    store = open_store(tmp_path / "store")
    files = sorted(folder.glob("00[0-2]?.jpg"))
    store.add_embeddings(
        [hashlib.sha256(f.read_bytes()).hexdigest() for f in files],
        [str(f) for f in files],
        repository.fingerprint,
        np.stack(LocalEmbedder(repository)(files)),
    )
    report = backfill(str(folder), store, BackfillOptions(repo=backfill_repo, actors=1))
    assert report.relabelled == len(files) * len(repository.heads())
    assert (report.embedded, report.skipped) == (N - len(files), len(files) + 1)
    assert_exactly_once(store, backfill_repo, hashes)


@pytest.mark.slow  # Ray
def test_listings_as_source(ray_cluster, backfill_repo, catalogue, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, _ = catalogue
    listing = folder.parent / "listing.csv"
    listing.write_text(
        "uri,note\nimages/0001.jpg,relative\n" + f"{folder / '0002.jpg'},absolute\nimages/gone.jpg,missing\n"
    )
    store = open_store(tmp_path / "store")
    report = backfill(str(listing), store, BackfillOptions(repo=backfill_repo))
    assert (report.total, report.embedded) == (3, 2)
    [(uri, reason)] = report.failures
    assert uri.endswith("gone.jpg") and "cannot read" in reason and "No such file" in reason
    pq.write_table(pa.table({"path": [str(folder / "0003.jpg")]}), folder.parent / "listing.parquet")
    report = backfill(str(folder.parent / "listing.parquet"), store, BackfillOptions(repo=backfill_repo))
    assert (report.total, report.embedded, report.failures) == (1, 1, [])


@pytest.mark.slow  # the command twice, each starting its own Ray cluster
def test_killed_backfill_resumes_exactly_once(backfill_repo, catalogue, tmp_path):
    """The real command, SIGKILLed (with its whole local Ray cluster) mid-run, then run again."""
    import shutil

    catalogue_folder, _ = catalogue
    folder = tmp_path / "images"  # 96 of the images and the broken file: Ray's start-up dominates anyway
    folder.mkdir()
    for path in [*sorted(catalogue_folder.glob("*.jpg"))[:96], catalogue_folder / "broken.jpg"]:
        shutil.copy(path, folder / path.name)
    hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("0*.jpg")}
    assert len(hashes) == 96
    store_path = tmp_path / "store"
    args = [
        "backfill",
        str(folder),
        "--store",
        str(store_path),
        "--repo",
        str(backfill_repo),
        "--write-batch",
        "16",
        "--batch-size",
        "8",
    ]
    first = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            if len(list(store_path.glob("items/*/part-*.parquet"))) >= 2:
                break
            time.sleep(0.05)
        assert first.poll() is None, first.stdout.read().decode()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    deadline = time.monotonic() + 15
    while session_processes(first.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not session_processes(first.pid), "Ray processes outlived the killed command"
    store = open_store(store_path)
    stored_before = len(item_rows(store, ""))
    assert 0 < stored_before < len(hashes), "the kill must come mid-run"
    result = run_cli(*args, timeout=600)
    assert result.returncode == 2, result.stderr  # 2: the broken image
    assert f"{len(hashes) - stored_before} embedded, {stored_before} already stored, 1 unreadable" in result.stdout
    assert "unreadable:" in result.stderr and "broken.jpg" in result.stderr
    assert re.search(r"backfill: \d+ of 97 \(\d+%\), [\d.]+ img/s, ETA \d+ s", result.stderr), result.stderr
    assert_exactly_once(open_store(store_path), backfill_repo, hashes)


def test_backfill_through_the_server(ray_cluster, repo, server, catalogue, tmp_path):
    """Actors call the server's `embed` model: the same embeddings as the local encoder."""
    folder, _ = catalogue
    listing = tmp_path / "some.csv"
    files = sorted(folder.glob("001?.jpg"))
    listing.write_text("uri\n" + "\n".join(map(str, files)) + "\n")
    store = open_store(tmp_path / "store")
    report = backfill(str(listing), store, BackfillOptions(repo=repo, server=server.grpc_url, actors=2))
    assert (report.embedded, report.failures) == (len(files), [])
    repository = Repository(repo)
    stored = store.embeddings([hashlib.sha256(f.read_bytes()).hexdigest() for f in files], repository.fingerprint)
    for f, vector in zip(files, LocalEmbedder(repository)(files)):
        assert float(stored[hashlib.sha256(f.read_bytes()).hexdigest()] @ vector) > 0.999


@pytest.mark.slow  # the command, starting its own Ray cluster
def test_backfill_from_an_s3_prefix(backfill_repo, catalogue, tmp_path):
    """The real command on `s3://bucket/prefix`, against moto's S3 API server on loopback."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (the test extra)")
    import boto3
    from moto.server import ThreadedMotoServer

    folder, _ = catalogue
    port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    try:
        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket="catalogue")
        files = [*sorted(folder.glob("002?.jpg")), folder / "broken.jpg"]
        for f in files:
            client.put_object(Bucket="catalogue", Key=f"2026/{f.name}", Body=f.read_bytes())
        client.put_object(Bucket="catalogue", Key="2026/notes.txt", Body=b"not listed: not an image name")
        client.put_object(Bucket="catalogue", Key="other/0001.jpg", Body=(folder / "0001.jpg").read_bytes())
        store_path = tmp_path / "store"
        result = subprocess.run(
            [*CLI, "backfill", "s3://catalogue/2026/", "--store", str(store_path), "--repo", str(backfill_repo)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    finally:
        s3.stop()
    assert result.returncode == 2, result.stderr
    assert "11 images: 10 embedded, 0 already stored, 1 unreadable" in result.stdout, result.stdout
    assert "s3://catalogue/2026/broken.jpg" in result.stderr
    store = open_store(store_path)
    uris = {next(iter(u.values())) for u in store.uris().values()}
    assert uris == {f"s3://catalogue/2026/{f.name}" for f in files if f.name != "broken.jpg"}
    assert_exactly_once(store, backfill_repo, {hashlib.sha256(f.read_bytes()).hexdigest() for f in files[:-1]})


def test_bad_source_is_one_line(tmp_path):
    result = run_cli("backfill", tmp_path / "nowhere", "--store", tmp_path / "store", "--repo", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
    result = run_cli("backfill", tmp_path, "--store", tmp_path / "store", "--repo", tmp_path, "--actors", "0")
    assert "--actors must be at least 1" in result.stderr and result.returncode == 1
