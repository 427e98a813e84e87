"""Day two of a store, as users walk it: `headmaster classify --store` into yesterday's store.

Issue 9: a run of only-new images into a store that already held items crashed in
``embedding_matrix`` (``cannot reshape array of size 0``), and so did any folder of more than
256 new images (the second chunk found none of its items stored). Every case here runs the
real command line against the session's real Triton server, over both store backends: a
Parquet folder and a real PostgreSQL server. Images are scikit-learn's 8x8 digits as PNG files.
How many images went through the encoder is read from Triton's own statistics.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from headmaster.client import HeadmasterClient
from headmaster.store import open_store
from headmaster.store.base import Store
from tests import helpers
from tests.helpers import CLI, run_cli

# The PostgreSQL server's fixtures, shared with other modules through tests/helpers.py.
postgres_url, pgvector_available, postgres_schema = (
    helpers.postgres_url,
    helpers.pgvector_available,
    helpers.postgres_schema,
)

HEADS = ("animal", "has_cat")


@pytest.fixture(scope="module")
def digit_files(digits_dir) -> list[Path]:
    """All 1,797 digit PNGs, in a fixed order."""
    return sorted(digits_dir.rglob("*.png"), key=lambda p: p.name)


def place(files: list[Path], folder: Path, prefix: str = "") -> Path:
    """Copy images into a folder of their own (new names: users upload copies, not our paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy(path, folder / f"{prefix}{path.name}")
    return folder


class Backend:
    def __init__(self, name: str, location: str):
        self.name, self.location = name, location
        self.opened: list[Store] = []

    def open(self, create: bool = False) -> Store:
        self.opened.append(open_store(self.location, create=create))
        return self.opened[-1]

    def close(self) -> None:
        for store in self.opened:
            if hasattr(store, "close"):
                store.close()

    def raw_items(self) -> tuple[int, int]:
        """(rows, distinct sha256) in the items of the store, read past the Store interface."""
        if self.name == "parquet":
            import pyarrow.compute as pc
            import pyarrow.dataset as ds

            table = ds.dataset(sorted(Path(self.location, "items").rglob("part-*.parquet")), format="parquet").to_table(
                columns=["sha256"]
            )
            return table.num_rows, len(pc.unique(table["sha256"]))
        import psycopg

        with psycopg.connect(self.location) as conn:
            return conn.execute("SELECT count(*), count(DISTINCT sha256) FROM items").fetchone()

    def raw_label_rows(self, head: str) -> int:
        """Every label row of ``head``, not only the newest per item."""
        if self.name == "parquet":
            import pyarrow.parquet as pq

            return sum(pq.read_metadata(p).num_rows for p in Path(self.location, "labels", head).glob("part-*.parquet"))
        import psycopg

        with psycopg.connect(self.location) as conn:
            return conn.execute("SELECT count(*) FROM labels WHERE head = %s", (head,)).fetchone()[0]


@pytest.fixture(params=["parquet", "postgres"])
def backend(request, tmp_path):
    if request.param == "parquet":
        backend = Backend("parquet", str(tmp_path / "store"))
    else:
        backend = Backend("postgres", request.getfixturevalue("postgres_schema"))
    yield backend
    backend.close()


def encoder_images(server) -> int:
    """Images the image_encoder has run, from Triton's statistics (all versions)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics("image_encoder", as_json=True)
    finally:
        client.close()
    return sum(int(m.get("inference_count", 0)) for m in stats.get("model_stats", []))


def classify_cli(
    server, folder: Path, backend: Backend, output: Path, *extra
) -> tuple[subprocess.CompletedProcess, int]:
    """`headmaster classify FOLDER --store ...`; returns the run and the images the encoder ran."""
    before = encoder_images(server)
    result = run_cli(
        "classify",
        folder,
        "--url",
        server.grpc_url,
        "--store",
        backend.location,
        "--output",
        output,
        "--embeddings",
        "--batch-size",
        16,
        *extra,
    )
    return result, encoder_images(server) - before


def answers(output: Path) -> dict[str, dict]:
    """sha256 -> the server's answer, from a run's --output file."""
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert all(r["ok"] for r in rows)
    return {r["sha256"]: r for r in rows}


def assert_store_labels_are(store: Store, expected: dict[str, dict]) -> None:
    for head in HEADS:
        table = store.labels(head)
        assert sorted(table["sha256"].to_pylist()) == sorted(expected), head
        for sha, version, labels, scores in zip(
            *(table[c].to_pylist() for c in ("sha256", "version", "labels", "scores"))
        ):
            want = expected[sha]["heads"][head]
            assert (version, tuple(labels)) == (want["version"], tuple(want["labels"])), (head, sha)
            np.testing.assert_allclose(scores, list(want["scores"].values()), atol=1e-5)


def test_day_two_only_new_images_go_to_the_encoder(server, digit_files, backend, tmp_path):
    """600 images into a new store, then 600 more of which 300 are already stored: each image
    is stored once, the second run encodes only its 300 new ones, the labels are the server's."""
    day_one = place(digit_files[:600], tmp_path / "day1")
    day_two = tmp_path / "day2"
    place(digit_files[300:600], day_two / "again", prefix="upload-")  # the same bytes, other names
    place(digit_files[600:900], day_two / "new")

    first, encoded = classify_cli(server, day_one, backend, tmp_path / "day1.jsonl")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "600 classified, 0 failed" in first.stderr and "600 embedded, 0 from stored embeddings" in first.stderr
    assert encoded == 600

    second, encoded = classify_cli(server, day_two, backend, tmp_path / "day2.jsonl")
    assert second.returncode == 0, second.stderr[-3000:]  # was: ValueError: cannot reshape array of size 0
    assert "Traceback" not in second.stderr
    assert "600 classified, 0 failed" in second.stderr and "300 embedded, 300 from stored embeddings" in second.stderr
    assert encoded == 300  # the new ones only

    one, two = answers(tmp_path / "day1.jsonl"), answers(tmp_path / "day2.jsonl")
    assert len(one) == 600 and len(two) == 600 and len(set(one) & set(two)) == 300
    assert backend.raw_items() == (900, 900)  # every image stored exactly once
    store = backend.open()
    fingerprint = next(iter(store.fingerprints()))
    assert store.fingerprints() == {fingerprint: 900} and len(store.uris()) == 900
    streamed = [str(h) for hashes, _ in store.iter_embeddings(fingerprint, 256) for h in hashes]
    assert len(streamed) == len(set(streamed)) == 900
    # A stored image keeps its first embedding: the one the server gave on day one, which day
    # two's answers for the re-uploads came from.
    stored = store.embeddings(list(one) + list(two), fingerprint)
    for sha, row in (one | two).items():
        np.testing.assert_allclose(stored[sha], row["embedding"], atol=1e-6)
    # The store's newest labels are what the server answered, day two's where it answered twice.
    assert_store_labels_are(store, one | two)
    assert all(backend.raw_label_rows(head) == 1200 for head in HEADS)  # each run's answers are kept
    # ... and what the server answers now, for a sample of both kinds, straight from the files.
    sample = sorted(day_two.rglob("*.png"))[::30]
    with HeadmasterClient(server.grpc_url, batch_size=8) as client:
        fresh = {r.sha256: r for r in client.classify(sample)}
    for sha, result in fresh.items():
        assert {h: tuple(v["labels"]) for h, v in two[sha]["heads"].items()} == {
            h: r.labels for h, r in result.heads.items()
        }


def test_copies_in_one_run_are_one_item_and_a_stored_folder_skips_the_encoder(server, digit_files, backend, tmp_path):
    folder = place(digit_files[1000:1020], tmp_path / "photos")
    shutil.copy(digit_files[1005], folder / "copy-of-1005.png")
    (folder / "sub").mkdir()
    shutil.copy(digit_files[1005], folder / "sub" / "again.png")

    first, encoded = classify_cli(server, folder, backend, tmp_path / "first.jsonl")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "22 classified, 0 failed" in first.stderr and "20 embedded, 2 from stored embeddings" in first.stderr
    assert encoded == 20  # the copies went through the encoder once, with their original
    rows = [json.loads(line) for line in (tmp_path / "first.jsonl").read_text().splitlines()]
    copies = [r for r in rows if Path(r["source"]).name in ("1005.png", "copy-of-1005.png", "again.png")]
    assert len(copies) == 3 and len({r["sha256"] for r in copies}) == 1
    assert len({json.dumps(r["heads"], sort_keys=True) for r in copies}) == 1  # one answer, three names
    assert sorted(Path(r["source"]).name for r in copies) == ["1005.png", "again.png", "copy-of-1005.png"]
    assert backend.raw_items() == (20, 20)
    assert all(backend.raw_label_rows(head) == 20 for head in HEADS)  # one label row per item

    again, encoded = classify_cli(server, folder, backend, tmp_path / "again.jsonl")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "22 classified, 0 failed" in again.stderr and "0 embedded, 22 from stored embeddings" in again.stderr
    assert encoded == 0  # every image was stored: nothing went through the encoder
    assert backend.raw_items() == (20, 20)
    assert_store_labels_are(backend.open(), answers(tmp_path / "again.jsonl"))
    assert answers(tmp_path / "again.jsonl").keys() == answers(tmp_path / "first.jsonl").keys()


def test_a_store_other_writers_fill(server, digit_files, backend, tmp_path):
    """Another writer stored some images before this run (they skip the encoder); then two
    runs over overlapping folders write at the same time: every image is stored once."""
    from headmaster.store.classify import classify_into_store

    earlier = place(digit_files[1100:1140], tmp_path / "theirs")
    with HeadmasterClient(server.grpc_url, batch_size=8) as client:
        _, stats = classify_into_store(client, backend.open(create=True), sorted(earlier.iterdir()))
    assert (stats.embedded, stats.reused, stats.failed) == (40, 0, 0)
    mine = place(digit_files[1100:1180], tmp_path / "mine")
    result, encoded = classify_cli(server, mine, backend, tmp_path / "mine.jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "40 embedded, 40 from stored embeddings" in result.stderr and encoded == 40
    assert backend.raw_items() == (80, 80)

    # Two runs at once: 1180..1379 and 1280..1479 (100 in common, none stored yet).
    a, b = place(digit_files[1180:1380], tmp_path / "a"), place(digit_files[1280:1480], tmp_path / "b")
    before = encoder_images(server)
    runs = [
        subprocess.Popen(
            [
                *CLI,
                "classify",
                str(folder),
                "--url",
                server.grpc_url,
                "--store",
                backend.location,
                "--batch-size",
                "16",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in (a, b)
    ]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert 300 <= encoder_images(server) - before <= 400  # each new image once, or twice when both runs raced
    rows, distinct = backend.raw_items()
    assert distinct == 380
    # PostgreSQL keeps one row per item; a Parquet folder may hold a raced item twice, and reads it once.
    assert rows == 380 if backend.name == "postgres" else 380 <= rows <= 480
    store = backend.open()
    fingerprint = next(iter(store.fingerprints()))
    assert store.fingerprints() == {fingerprint: 380}
    streamed = [str(h) for hashes, _ in store.iter_embeddings(fingerprint, 128) for h in hashes]
    assert len(streamed) == len(set(streamed)) == 380
    assert store.labels("animal").num_rows == 380
