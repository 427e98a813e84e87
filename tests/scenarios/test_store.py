"""The store: classify -> store -> rescore on CPU, corrections -> snapshots -> heads, encoder swaps.

Real server (a dedicated one on a copy of the session repository, since heads change here),
real ONNX heads, real images; the store is a real Parquet folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from headmaster.client import HeadmasterClient
from headmaster.errors import DataError, FingerprintMismatchError, StoreError
from headmaster.export.heads import HeadCard, HeadWeights
from headmaster.repository.head_version import HeadVersion
from headmaster.repository.repo import Repository
from headmaster.server import live
from headmaster.store import ParquetStore, open_store
from headmaster.store.base import label_table
from headmaster.store.classify import classify_into_store
from headmaster.training.embeddings import EmbeddingCache, LocalEmbedder, embed_files
from headmaster.training.feedback.corrections import make_corrections, read_csv
from headmaster.training.feedback.reembed import reembed
from headmaster.training.feedback.rescore import rescore
from headmaster.training.feedback.snapshots import Snapshot, export_snapshot
from headmaster.training.feedback.suggest import suggest
from headmaster.training.heads.train_head import TrainOptions, train_head
from headmaster.training.heads.trainer import TrainConfig
from tests.helpers import ARTIFACTS, CLI, clone_repo, run_cli, start_server, subset, written_version

FOREIGN = "sha256:" + "f" * 64  # an encoder this repository never had


@pytest.fixture(scope="module")
def store_server(repo, tmp_path_factory):
    copy = clone_repo(repo, tmp_path_factory.mktemp("store") / "repo")
    server = start_server(copy, ARTIFACTS / "store")
    yield server, copy
    server.stop()


@pytest.fixture
def photo_files(photos, tmp_path) -> list[Path]:
    """The 7 session photos and one broken file, in one folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in photos.items():
        (folder / name).write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return sorted(folder.iterdir())


def encoder_executions(url: str) -> int:
    import tritonclient.http as http

    stats = http.InferenceServerClient(url).get_inference_statistics("image_encoder")
    return sum(int(m["inference_stats"]["success"]["count"]) for m in stats["model_stats"])


def test_classify_store_then_rescore_gives_the_server_labels(store_server, photo_files, tmp_path):
    server, repo = store_server
    store = ParquetStore(tmp_path / "store")
    with HeadmasterClient(server.grpc_url, batch_size=4) as client:
        first, stats = classify_into_store(client, store, photo_files)
        assert (stats.embedded, stats.reused, stats.failed) == (7, 0, 1)
        assert [Path(r.source).name for r in first if not r.ok] == ["broken.jpg"]
        encoder_calls = encoder_executions(server.http_url)
        again, stats = classify_into_store(client, store, photo_files)
        # Stored images skip the encoder entirely, and get the same answers.
        assert (stats.embedded, stats.reused, stats.failed) == (0, 7, 1)
        assert encoder_executions(server.http_url) == encoder_calls
        for a, b in zip(first, again):
            assert a.ok == b.ok
            if not a.ok:
                continue
            assert a.sha256 == b.sha256
            assert {n: h.labels for n, h in a.heads.items()} == {n: h.labels for n, h in b.heads.items()}
            for name in a.heads:
                np.testing.assert_allclose(
                    list(a.heads[name].scores.values()), list(b.heads[name].scores.values()), atol=1e-5
                )

        # A new version goes live; the server classifies with it; rescoring the store with the
        # same version on CPU must give the same labels.
        card = written_version(repo, "animal", np.random.default_rng(7), ("cat", "dog", "bird"))
        live.head_published(server, "animal")
        # The old version is still unloading (Triton calls the whole server "not ready" then),
        # yet classify is ready: the client must say so, or `headmaster classify` refuses to run.
        assert client.is_ready()
        served = {r.sha256: r.heads["animal"] for r in client.classify(photo_files) if r.ok}
    assert {h.version for h in served.values()} == {card.version}
    result = rescore(store, HeadVersion.load(repo, "animal", card.version))
    assert result.rows == 7 and result.refused == {}
    stored = store.labels("animal", version=card.version)
    assert stored.num_rows == 7
    for sha, scores, labels, source in zip(*(stored[c].to_pylist() for c in ("sha256", "scores", "labels", "source"))):
        assert source == "rescore"
        assert tuple(labels) == served[sha].labels
        np.testing.assert_allclose(scores, list(served[sha].scores.values()), atol=1e-5)
    # The earlier version's labels are still there, per version.
    assert store.labels("animal", version=card.version - 1).num_rows == 7


def test_chunks_of_only_new_images_into_a_store_that_holds_items(store_server, photo_files, tmp_path, monkeypatch):
    """Issue 9: a chunk none of whose images is stored, in a store that holds others, crashed
    (`cannot reshape array of size 0`); small chunks make every chunk after the first one such.
    Each file is read once: hashed and sent from the same bytes."""
    import builtins
    import io
    from collections import Counter

    server, _ = store_server
    store = ParquetStore(tmp_path / "store")
    good = [p for p in photo_files if p.name != "broken.jpg"]
    names = {str(p) for p in photo_files}
    reads: Counter = Counter()
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        if str(file) in names:
            reads[str(file)] += 1
        return real_open(file, *args, **kwargs)

    with HeadmasterClient(server.grpc_url, batch_size=4) as client:
        _, stats = classify_into_store(client, store, good[:2], chunk=2)
        assert (stats.embedded, stats.reused, stats.failed) == (2, 0, 0)
        before = encoder_executions(server.http_url)
        monkeypatch.setattr(io, "open", counting_open)
        monkeypatch.setattr(builtins, "open", counting_open)
        results, stats = classify_into_store(client, store, photo_files, chunk=2)
        monkeypatch.undo()
        assert (stats.embedded, stats.reused, stats.failed) == (5, 2, 1)
        assert encoder_executions(server.http_url) > before
    assert reads == Counter({str(p): 1 for p in photo_files})
    assert [Path(r.source).name for r in results] == [p.name for p in photo_files]
    assert [r.source for r in results if not r.ok] == [str(photo_files[0].parent / "broken.jpg")]
    (fingerprint,) = store.fingerprints()
    assert store.fingerprints() == {fingerprint: 7}
    assert sorted(store.labels("animal")["sha256"].to_pylist()) == sorted(r.sha256 for r in results if r.ok)


def test_float16_store_halves_the_embeddings_and_keeps_them_close(store_server, photo_files, tmp_path):
    server, _ = store_server
    full, half = ParquetStore(tmp_path / "f32"), ParquetStore(tmp_path / "f16", embedding_dtype="float16")
    with HeadmasterClient(server.grpc_url, batch_size=4) as client:
        classify_into_store(client, full, photo_files)
        classify_into_store(client, half, photo_files)
        fingerprint = client.encoder_fingerprint()
    a, b = full.embeddings(full.uris(), fingerprint), half.embeddings(half.uris(), fingerprint)
    assert set(a) == set(b) and len(a) == 7
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 2e-3
    size = lambda s: sum(p.stat().st_size for p in (s.path / "items").rglob("*.parquet"))  # noqa: E731
    assert size(half) < 0.7 * size(full)


def test_classify_cli_with_store_then_rescore_suggest_correct(store_server, photo_files, tmp_path):
    server, repo = store_server
    store = tmp_path / "store"
    good = [p for p in photo_files if p.name != "broken.jpg"]
    result = run_cli("classify", *good, "--url", server.grpc_url, "--store", store)
    assert result.returncode == 0, result.stderr
    assert "7 embedded, 0 from stored embeddings" in result.stderr
    result = run_cli("classify", good[0].parent, "--url", server.grpc_url, "--store", store)
    assert result.returncode == 2  # broken.jpg fails; the rest come from the store
    assert "7 classified, 1 failed" in result.stderr and "0 embedded, 7 from stored" in result.stderr

    result = run_cli("rescore", "has_cat", "--store", store, "--repo", repo)
    assert result.returncode == 0, result.stderr
    assert "7 items rescored" in result.stderr
    suggestions = tmp_path / "suggest.csv"
    result = run_cli("suggest", "has_cat", "--n", 3, "--store", store, "--repo", repo, "--output", suggestions)
    assert result.returncode == 0, result.stderr
    rows = read_csv(suggestions, None)
    assert len(rows) == 3
    # Fill in the label column, as a person would, and feed the file back.
    text = suggestions.read_text().splitlines()
    suggestions.write_text("\n".join([text[0]] + [line.replace(",has_cat,,", ",has_cat,cat,") for line in text[1:]]))
    result = run_cli("correct", "--csv", suggestions, "--store", store, "--repo", repo, "--by", "tester")
    assert result.returncode == 0, result.stderr
    assert "3 corrections stored" in result.stderr
    corrections = ParquetStore(store).corrections("has_cat")
    assert {c.by for c in corrections.values()} == {"tester"} and len(corrections) == 3
    # The corrected ones are not suggested again.
    result = run_cli("suggest", "has_cat", "--n", 10, "--store", store, "--repo", repo, "--output", suggestions)
    assert {r["item"] for r in read_csv(suggestions, None)}.isdisjoint(corrections)
    # A label the head does not have is refused, with the labels it has.
    result = run_cli("correct", good[0], "--head", "has_cat", "--label", "dog", "--store", store, "--repo", repo)
    assert result.returncode == 1 and "head has_cat has no label 'dog'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def digit_store(tiny_repo, digits_dir, embedding_cache, tmp_path_factory):
    """Digits 3 / 5 / 8 (40 each) embedded locally into a store, labelled by people (the folder names).
    The tiny encoder: these tests are about the store, snapshots and rescoring, not the encoder."""
    root = tmp_path_factory.mktemp("digit-store")
    data = subset(
        digits_dir, root / "images", {"3": 40, "5": 40, "8": 40}, rename={"3": "three", "5": "five", "8": "eight"}
    )
    paths = sorted(data.rglob("*.png"))
    repository = Repository(tiny_repo)
    hashes, vectors, failures = embed_files(
        paths, LocalEmbedder(repository), EmbeddingCache(embedding_cache, repository.fingerprint)
    )
    assert not failures
    return repository, paths, hashes, vectors


def new_store(tmp_path: Path, digit_store) -> ParquetStore:
    repository, paths, hashes, vectors = digit_store
    store = ParquetStore(tmp_path / "store")
    store.add_embeddings(
        hashes, [str(p) for p in paths], repository.fingerprint, np.stack([vectors[h] for h in hashes])
    )
    make_corrections(
        store, [{"item": h, "head": "digit", "labels": (p.parent.name,)} for h, p in zip(hashes, paths)], by="folders"
    )
    return store


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_corrections_change_the_next_snapshot_and_head_only(tiny_repo, digit_store, tmp_path):
    repository, paths, hashes, _ = digit_store
    train_repo = clone_repo(tiny_repo, tmp_path / "repo")
    store = new_store(tmp_path, digit_store)
    first = export_snapshot(store, "digit", tmp_path / "snapshots", repository.fingerprint)
    assert (first.number, first.items, first.counts) == (1, 120, {"eight": 40, "five": 40, "three": 40})
    assert export_snapshot(store, "digit", tmp_path / "snapshots", repository.fingerprint).reused
    before = folder_digest(first.path)

    options = {"name": "digit", "repo": train_repo, "config": TrainConfig(seed=0, epochs=60)}
    v1 = train_head(TrainOptions(data=first.path, **options)).card
    assert v1.details["data"]["sha256"] == first.manifest_sha256
    assert v1.details["data"]["snapshot"]["number"] == 1

    # People relabel 6 "five"s as "three"; a source image is deleted.
    fives = [h for h, p in zip(hashes, paths) if p.parent.name == "five"][:6]
    make_corrections(store, [{"item": h, "head": "digit", "labels": ("three",)} for h in fives], by="reviewer")
    paths[0].unlink()
    second = export_snapshot(store, "digit", tmp_path / "snapshots", repository.fingerprint)
    assert second.number == 2 and second.manifest_sha256 != first.manifest_sha256
    assert second.counts == {"eight": 40, "five": 34, "three": 46}
    assert folder_digest(first.path) == before  # the old snapshot did not move
    assert second.missing_images == 1  # gone before v2 was made; its embedding still trains

    v2 = train_head(TrainOptions(data=second.path, **options)).card
    assert v2.details["data"]["sha256"] == second.manifest_sha256
    # Training from the first snapshot again gives the first head again, bit for bit.
    v3 = train_head(TrainOptions(data=first.path, **options)).card
    w1, w3 = (HeadWeights.from_onnx(train_repo / "digit" / str(v) / "model.onnx") for v in (v1.version, v3.version))
    for (a, b), (c, d) in zip(w1.layers, w3.layers):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    w2 = HeadWeights.from_onnx(train_repo / "digit" / str(v2.version) / "model.onnx")
    assert not np.array_equal(w1.layers[0][0], w2.layers[0][0])

    # Straight from the store: a snapshot is frozen on the way (the same as v2: nothing changed).
    v4 = train_head(TrainOptions(store=str(store.path), **options)).card
    assert v4.details["data"]["sha256"] == second.manifest_sha256
    assert Snapshot.load(Path(v4.details["data"]["snapshot"]["path"])).manifest_sha256 == second.manifest_sha256


def test_dataset_export_without_a_repository_takes_the_encoder_and_kind_from_the_store(
    digit_store, tmp_path, cli, monkeypatch
):
    """On a machine without ./model_repository (a labeller's), `dataset export` needs no --repo:
    the one encoder that embedded the labelled items, the kind from the labels. Two encoders:
    one line asking for --repo."""
    repository, paths, hashes, _ = digit_store
    store = new_store(tmp_path, digit_store)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [*CLI, "dataset", "export", "digit", "--out", str(tmp_path / "snapshots"), "--store", str(store.path)]
    done = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    snapshot = Snapshot.load(Path(done.stdout.strip()))
    assert (snapshot.fingerprint, snapshot.multi_label, snapshot.items) == (repository.fingerprint, False, 120)

    store.add_embeddings(hashes[:5], [None] * 5, FOREIGN, np.random.default_rng(0).normal(size=(5, 384)))
    monkeypatch.chdir(elsewhere)  # the refusal in this process (the `cli` fixture): the same command
    done = cli(*command[len(CLI) :])
    assert done.returncode == 1
    assert done.stderr == (
        f"error: the items labelled for 'digit' are embedded by 2 encoders "
        f"({repository.fingerprint} (120 items), {FOREIGN} (5 items)): name the repository whose "
        "encoder the snapshot is for (change --repo)\n"
    )


def test_foreign_encoder_rows_are_refused_by_rescore_and_train(tiny_repo, digit_store, tmp_path):
    repository, paths, hashes, vectors = digit_store
    store = new_store(tmp_path, digit_store)
    # Five more items, embedded by another encoder only, and labelled.
    rng = np.random.default_rng(0)
    foreign = [hashlib.sha256(f"foreign {i}".encode()).hexdigest() for i in range(5)]
    store.add_embeddings(foreign, [None] * 5, FOREIGN, rng.normal(size=(5, 384)))
    make_corrections(store, [{"item": h, "head": "digit", "labels": ("three",)} for h in foreign], by="someone")

    result = rescore(store, HeadVersion.load(tiny_repo, "animal"))
    assert result.rows == 120 and result.refused == {FOREIGN: 5}
    assert set(store.labels("animal")["sha256"].to_pylist()) == set(hashes)  # none of the foreign rows

    snapshot = export_snapshot(store, "digit", tmp_path / "snapshots", repository.fingerprint)
    assert snapshot.items == 120 and snapshot.refused == {FOREIGN: 5}

    # A head of the foreign encoder finds nothing it may read.
    card = HeadVersion.load(tiny_repo, "animal").card
    alien = tmp_path / "alien" / "1"
    weights = HeadWeights.from_onnx(HeadVersion.load(tiny_repo, "animal").model)
    from headmaster.export.heads import write_head

    write_head(alien, weights, HeadCard(**{**card.__dict__, "encoder_fingerprint": "sha256:" + "a" * 64}))
    with pytest.raises(FingerprintMismatchError, match="holds none of those"):
        rescore(store, HeadVersion(HeadCard.load(alien), alien))

    # A snapshot made for another encoder is refused by train-head in this repository.
    alien_snapshot = export_snapshot(store, "digit", tmp_path / "alien-snapshots", FOREIGN)
    assert alien_snapshot.items == 5
    with pytest.raises(FingerprintMismatchError):
        train_head(TrainOptions(name="digit", repo=clone_repo(tiny_repo, tmp_path / "repo"), data=alien_snapshot.path))
    only_foreign = ParquetStore(tmp_path / "only-foreign")
    only_foreign.add_embeddings(foreign, [None] * 5, FOREIGN, rng.normal(size=(5, 384)))
    make_corrections(only_foreign, [{"item": h, "head": "digit", "labels": ("x",)} for h in foreign], by="someone")
    with pytest.raises(DataError, match="reembed"):
        train_head(TrainOptions(name="digit", repo=tiny_repo, store=str(only_foreign.path)))


def test_reembed_brings_reachable_items_to_the_new_encoder(tiny_repo, digit_store, tmp_path):
    repository, paths, hashes, vectors = digit_store
    sources = tmp_path / "sources"
    shutil.copytree(paths[0].parent.parent, sources)
    files = sorted(sources.rglob("*.png"))[:10]
    store = ParquetStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    sha = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    store.add_embeddings(sha, [str(p) for p in files], FOREIGN, rng.normal(size=(10, 384)))  # the old encoder
    files[0].unlink()
    files[1].write_bytes(files[2].read_bytes())  # same path, other image now

    result = reembed(store, LocalEmbedder(repository))
    assert result.reembedded == 8 and result.already == 0
    assert sorted(s for s, _ in result.unreachable) == sorted(sha[:2])
    why = dict(result.unreachable)
    assert "source gone" in why[sha[0]] and "other bytes" in why[sha[1]]
    fresh = store.embeddings(sha, repository.fingerprint)
    assert set(fresh) == set(sha[2:])
    for h in sha[2:]:
        np.testing.assert_allclose(fresh[h], vectors[h], atol=1e-5)  # what the encoder gives today
    assert store.fingerprints() == {FOREIGN: 10, repository.fingerprint: 8}
    assert reembed(store, LocalEmbedder(repository)).already == 8  # nothing more to do


def test_suggest_lists_the_least_certain_uncorrected_items(tiny_repo, digit_store, tmp_path):
    repository, paths, hashes, vectors = digit_store
    store = ParquetStore(tmp_path / "store")
    store.add_embeddings(
        hashes, [str(p) for p in paths], repository.fingerprint, np.stack([vectors[h] for h in hashes])
    )
    rescore(store, HeadVersion.load(tiny_repo, "animal"))
    table = store.labels("animal")
    top = np.sort(np.array(table["scores"].to_pylist()), axis=1)
    margins = top[:, -1] - top[:, -2]  # top score minus the second
    order = [table["sha256"][int(i)].as_py() for i in np.argsort(margins)]
    make_corrections(store, [{"item": order[0], "head": "animal", "labels": ("cat",)}], by="me")
    version, found = suggest(store, "animal", n=5)
    assert [s.sha256 for s in found] == order[1:6]
    assert [s.uncertainty for s in found] == sorted(s.uncertainty for s in found)
    _, by_entropy = suggest(store, "animal", n=5, method="entropy")
    assert [s.uncertainty for s in by_entropy] == sorted((s.uncertainty for s in by_entropy), reverse=True)
    with pytest.raises(StoreError, match="holds no labels of head 'nothing'"):
        suggest(store, "nothing")
    # A later version scoring the same items does not hide the earlier one's rows.
    scores = np.array(table["scores"].to_pylist(), np.float32)
    store.add_labels(
        "animal",
        [
            label_table(
                table["sha256"],
                repository.fingerprint,
                version + 1,
                scores,
                ("bird", "cat", "dog"),
                scores > 0.5,
                "rescore",
            )
        ],
    )
    assert suggest(store, "animal", n=5)[0] == version + 1
    again_version, again = suggest(store, "animal", n=5, version=version)
    assert again_version == version and [s.sha256 for s in again] == [s.sha256 for s in found]
    with pytest.raises(
        StoreError,
        match=rf"no labels of head 'animal' from version 9 \(its newest are from versions \[{version + 1}\]\)",
    ):
        suggest(store, "animal", version=9)


WRITER = """
import sys, numpy as np
from headmaster.store import ParquetStore
store = ParquetStore(sys.argv[1])
rng = np.random.default_rng(0)
batch = 0
while True:
    hashes = [f"{batch:032x}{i:032x}" for i in range(20000)]
    store.add_embeddings(hashes, [None] * len(hashes), "sha256:" + "c" * 64, rng.normal(size=(len(hashes), 512)))
    batch += 1
    print(batch, flush=True)
"""


def test_a_killed_writer_leaves_the_store_readable_without_half_rows(tmp_path):
    path = tmp_path / "store"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "1"  # one batch is complete
        time.sleep(0.3)  # ... and the next is being written
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    store = open_store(path, create=False)
    (count,) = store.fingerprints().values()
    assert count % 20000 == 0 and count >= 20000
    for hashes, matrix in store.iter_embeddings("sha256:" + "c" * 64, 5000):
        assert matrix.shape == (len(hashes), 512) and np.isfinite(matrix).all()
    # Whatever the killed process left half-written is not a part file, and writing goes on.
    store.add_embeddings(["d" * 64], [None], "sha256:" + "c" * 64, np.ones((1, 512)))
    assert store.fingerprints() == {"sha256:" + "c" * 64: count + 1}


def test_store_errors_are_clear(tmp_path):
    with pytest.raises(StoreError, match="not a Headmaster store"):
        open_store(tmp_path / "missing", create=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("mine")
    with pytest.raises(StoreError, match="exists and is not a Headmaster store"):
        ParquetStore(tmp_path / "busy")
    store = ParquetStore(tmp_path / "store")
    with pytest.raises(StoreError, match="neither a stored sha256"):
        store.resolve("no-such-thing")
    (tmp_path / "store" / "store.json").write_text(json.dumps({"format": "headmaster-store", "schema": 99}))
    with pytest.raises(StoreError, match="schema 99 is not supported"):
        ParquetStore(tmp_path / "store")
