"""The Store contract, run against every backend: a Parquet folder and a real PostgreSQL server.

PostgreSQL: the session's server from tests/helpers.py (HEADMASTER_TEST_POSTGRES, or a
throwaway server from Debian's binaries); each test gets a schema of its own. The ``postgres``
case uses pgvector when the server has it; ``postgres-array`` always stores real[], so both
column types run wherever pgvector exists.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import uuid

import numpy as np
import pytest

from headmaster.errors import StoreError
from headmaster.store import ParquetStore, open_store
from headmaster.store.base import Correction, StoredItem, label_schema, label_table
from tests import helpers
from tests.helpers import free_port, with_schema

# The PostgreSQL server's fixtures, shared with other modules through tests/helpers.py.
postgres_url, pgvector_available, postgres_schema = (
    helpers.postgres_url,
    helpers.pgvector_available,
    helpers.postgres_schema,
)

# Every case a real store; the postgres ones reach PostgreSQL through request.getfixturevalue,
# which the tiers in tests/conftest.py cannot see.
pytestmark = pytest.mark.disk

PGVECTOR_MISSING = "pgvector extension not installed on this PostgreSQL (Debian: postgresql-15-pgvector)"
FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64
LABELS = ["cat", "dog", "bird"]


def sha(i: int) -> str:
    return hashlib.sha256(f"item-{i}".encode()).hexdigest()


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    matrix = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def items(start: int, n: int, fingerprint: str, dim: int, seed: int = 0) -> list[StoredItem]:
    return [
        StoredItem(sha(start + i), f"/photos/{start + i}.jpg", fingerprint, row)
        for i, row in enumerate(unit_rows(n, dim, seed))
    ]


def labelled(hashes, version: int, seed: int, at: dt.datetime, fingerprint: str = FP_A):
    scores = np.random.default_rng(seed).random((len(hashes), len(LABELS))).astype(np.float32)
    return label_table(hashes, fingerprint, version, scores, LABELS, scores > 0.5, "test", at)


T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(params=["parquet", "postgres", "postgres-array"])
def backend(request, tmp_path):
    """A function that opens (or reopens) this test's store on the backend under test."""
    if request.param == "parquet":
        return lambda **kw: ParquetStore(tmp_path / "store", **kw)
    from headmaster.store.postgres import PostgresStore

    dsn = request.getfixturevalue("postgres_schema")
    opened = []

    def make(**kw):
        if request.param == "postgres-array":
            kw.setdefault("use_pgvector", False)
        opened.append(PostgresStore(dsn, **kw))
        return opened[-1]

    request.addfinalizer(lambda: [s.close() for s in opened])
    make.dsn = dsn
    return make


@pytest.fixture
def store(backend):
    return backend()


# -- items -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embeddings_round_trip_per_fingerprint(backend, dtype):
    store = backend(embedding_dtype=dtype)
    a, b = items(0, 5, FP_A, 8, seed=1), items(3, 4, FP_B, 12, seed=2)  # items 3, 4 under both encoders
    store.add_items(a + b)
    tolerance = 1e-3 if dtype == "float16" else 0.0
    got = store.embeddings([i.sha256 for i in a] + [sha(99)], FP_A)
    assert set(got) == {i.sha256 for i in a}
    for item in a:
        assert got[item.sha256].dtype == np.float32 and got[item.sha256].shape == (8,)
        np.testing.assert_allclose(got[item.sha256], item.embedding, atol=tolerance, rtol=0)
    got_b = store.embeddings([i.sha256 for i in a + b], FP_B)
    assert set(got_b) == {i.sha256 for i in b}
    assert all(v.shape == (12,) for v in got_b.values())
    assert store.embeddings([i.sha256 for i in a], "sha256:" + "c" * 64) == {}
    assert store.embeddings([], FP_A) == {}


def test_fingerprints_and_uris(store):
    store.add_items(items(0, 5, FP_A, 8) + items(3, 4, FP_B, 12))
    assert store.fingerprints() == {FP_A: 5, FP_B: 4}
    uris = store.uris()
    assert len(uris) == 7
    assert uris[sha(3)] == {FP_A: "/photos/3.jpg", FP_B: "/photos/3.jpg"}
    assert uris[sha(0)] == {FP_A: "/photos/0.jpg"}


def test_adding_an_item_again_keeps_one_the_newest(store):
    first = items(0, 3, FP_A, 8, seed=1)
    store.add_items(first)
    again = StoredItem(sha(1), "/moved/1.jpg", FP_A, unit_rows(1, 8, seed=5)[0])
    store.add_items([again])
    assert store.fingerprints() == {FP_A: 3}
    assert store.uris()[sha(1)] == {FP_A: "/moved/1.jpg"}
    np.testing.assert_allclose(store.embeddings([sha(1)], FP_A)[sha(1)], again.embedding)
    streamed = [(str(h), row) for hashes, matrix in store.iter_embeddings(FP_A, 2) for h, row in zip(hashes, matrix)]
    assert sorted(h for h, _ in streamed) == sorted([sha(0), sha(1), sha(2)])  # once each, the newest
    np.testing.assert_allclose(dict(streamed)[sha(1)], again.embedding)


def test_iter_embeddings_covers_every_row_once(store):
    a = items(0, 150, FP_A, 8, seed=1)
    store.add_items(a[:100])
    store.add_items(a[100:] + items(1000, 30, FP_B, 12))
    seen: list[str] = []
    for hashes, matrix in store.iter_embeddings(FP_A, 64):
        hashes = [str(h) for h in hashes]
        assert 0 < len(hashes) <= 64 and matrix.shape == (len(hashes), 8) and matrix.dtype == np.float32
        expected = {i.sha256: i.embedding for i in a}
        np.testing.assert_allclose(matrix, np.stack([expected[h] for h in hashes]))
        seen += hashes
    assert len(seen) == len(set(seen)) == 150 and set(seen) == {i.sha256 for i in a}
    assert list(store.iter_embeddings("sha256:" + "c" * 64, 64)) == []


def test_labels_written_while_embeddings_stream(store):
    """rescore's shape: add_labels consumes batches that iter_embeddings is still producing."""
    store.add_items(items(0, 40, FP_A, 8))
    batches = (
        labelled(list(map(str, hashes)), 1, seed=len(hashes), at=T0) for hashes, _ in store.iter_embeddings(FP_A, 16)
    )
    assert store.add_labels("animal", batches) == 40
    assert store.labels("animal").num_rows == 40


# -- labels ------------------------------------------------------------------------------
def test_labels_latest_wins_and_version_filter(store):
    hashes = [sha(i) for i in range(6)]
    old, new = labelled(hashes, 1, seed=1, at=T0), labelled(hashes[:3], 2, seed=2, at=T0 + dt.timedelta(hours=1))
    assert store.add_labels("animal", [old]) == 6
    assert store.add_labels("animal", [new]) == 3
    store.add_labels("other", [labelled(hashes, 7, seed=3, at=T0)])

    table = store.labels("animal")
    assert table.schema == label_schema()
    rows = {r["sha256"]: r for r in table.to_pylist()}
    assert table["sha256"].to_pylist() == sorted(hashes)
    expected = {r["sha256"]: r for r in old.to_pylist()} | {r["sha256"]: r for r in new.to_pylist()}
    for sha256, row in rows.items():
        want = expected[sha256]
        assert (row["version"], row["labels"], row["at"], row["fingerprint"], row["source"]) == (
            want["version"],
            want["labels"],
            want["at"],
            want["fingerprint"],
            want["source"],
        )
        np.testing.assert_allclose(row["scores"], want["scores"])

    v1 = store.labels("animal", version=1)
    assert v1.schema == label_schema() and v1.num_rows == 6 and set(v1["version"].to_pylist()) == {1}
    assert store.labels("animal", version=2).num_rows == 3
    empty = store.labels("animal", version=9)
    assert empty.num_rows == 0 and empty.schema == label_schema()
    assert store.labels("nobody").schema == label_schema()
    assert store.label_heads() == ["animal", "other"]


def test_labelled_and_hashes_answer_what_a_resumed_pipeline_skips(store):
    """`labelled` (items holding a row of one head version) and `hashes` (items of one encoder):
    what the queue's heads workers and the backfill check before writing."""
    hashes = [sha(i) for i in range(6)]
    store.add_labels("animal", [labelled(hashes[:4], 1, seed=1, at=T0)])
    store.add_labels("animal", [labelled(hashes[2:], 2, seed=2, at=T0)])
    store.add_labels("other", [labelled(hashes, 1, seed=3, at=T0)])
    assert store.labelled("animal", 1) == set(hashes[:4])
    assert store.labelled("animal", 2, [hashes[0], hashes[3], hashes[5], sha(99)]) == {hashes[3], hashes[5]}
    assert store.labelled("animal", 3, hashes) == set()
    assert store.labelled("nobody", 1, hashes) == set()
    store.add_items(items(0, 5, FP_A, 8))
    store.add_items(items(3, 6, FP_B, 8))
    assert store.hashes(FP_A) == {sha(i) for i in range(5)}
    assert store.hashes(FP_B) == {sha(i) for i in range(3, 9)}
    assert store.hashes("sha256:" + "9" * 64) == set()


def test_add_labels_is_all_or_nothing(store):
    store.add_labels("animal", [labelled([sha(0)], 1, seed=0, at=T0)])

    def batches():
        yield labelled([sha(i) for i in range(1, 5)], 2, seed=1, at=T0 + dt.timedelta(hours=1))
        yield labelled([sha(i) for i in range(5, 9)], 2, seed=2, at=T0 + dt.timedelta(hours=1))
        raise RuntimeError("the head crashed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        store.add_labels("animal", batches())
    with pytest.raises(RuntimeError, match="half-way"):
        store.add_labels("fresh", batches())
    table = store.labels("animal")
    assert table["sha256"].to_pylist() == [sha(0)] and table["version"].to_pylist() == [1]
    assert store.label_heads() == ["animal"]
    assert store.add_labels("animal", []) == 0


# -- corrections -------------------------------------------------------------------------
def test_corrections_latest_wins_per_head_and_item(store):
    store.add_corrections(
        [
            Correction(sha(0), "animal", ("cat",), "ann", T0),
            Correction(sha(0), "animal", ("dog",), "bob", T0 + dt.timedelta(minutes=5), note="it barks"),
            Correction(sha(1), "animal", (), "ann", T0),
            Correction(sha(0), "colour", ("red", "blue"), "ann", T0 + dt.timedelta(hours=1)),
        ]
    )
    store.add_corrections([Correction(sha(1), "animal", ("bird",), "cy", T0 - dt.timedelta(days=1))])  # older
    store.add_corrections([])
    animal = store.corrections("animal")
    assert set(animal) == {sha(0), sha(1)}
    assert (animal[sha(0)].labels, animal[sha(0)].by, animal[sha(0)].note) == (("dog",), "bob", "it barks")
    assert animal[sha(0)].at == T0 + dt.timedelta(minutes=5)
    assert (animal[sha(1)].labels, animal[sha(1)].by, animal[sha(1)].note) == ((), "ann", "")
    assert store.corrections("colour")[sha(0)].labels == ("red", "blue")
    assert store.corrections("nobody") == {}


# -- resolve -----------------------------------------------------------------------------
def test_resolve_by_sha_prefix_and_uri(store, tmp_path):
    store.add_items(items(0, 5, FP_A, 8))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"not really a jpeg")
    photo_sha = hashlib.sha256(photo.read_bytes()).hexdigest()
    store.add_items([StoredItem(photo_sha, None, FP_B, unit_rows(1, 12, 0)[0])])
    assert store.resolve(sha(2)) == sha(2)
    assert store.resolve(sha(2)[:10]) == sha(2)
    assert store.resolve("/photos/4.jpg") == sha(4)
    assert store.resolve(str(photo)) == photo_sha
    with pytest.raises(StoreError, match="unknown item"):
        store.resolve("/photos/404.jpg")
    with pytest.raises(StoreError, match="unknown item"):
        store.resolve("0" * 12)


def test_resolve_ambiguous_prefix(store):
    # Two hashes that share their first 8 hex digits.
    first = "deadbeef" + "0" * 56
    second = "deadbeef" + "1" * 56
    store.add_items(
        [StoredItem(first, None, FP_A, unit_rows(1, 8, 0)[0]), StoredItem(second, None, FP_A, unit_rows(1, 8, 1)[0])]
    )
    with pytest.raises(StoreError, match="matches 2 stored items"):
        store.resolve("deadbeef")
    assert store.resolve("deadbeef1") == second


# -- edges: nothing found, nothing given, one row, one item twice, another writer -------
def every_read(store, fingerprint: str = FP_A) -> dict:
    """What every read of the interface answers, as plain values."""
    return {
        "embeddings": {h: v.tolist() for h, v in store.embeddings([sha(i) for i in range(10)], fingerprint).items()},
        "fingerprints": store.fingerprints(),
        "iter": [(list(map(str, h)), m.shape) for h, m in store.iter_embeddings(fingerprint, 4)],
        "uris": store.uris(),
        "labels": store.labels("animal").to_pylist(),
        "label_heads": store.label_heads(),
        "corrections": store.corrections("animal"),
    }


def test_a_new_store_answers_every_read_with_nothing(store):
    """A store whose fingerprint partition does not exist yet (day one, or a new encoder)."""
    assert every_read(store) == {
        "embeddings": {},
        "fingerprints": {},
        "iter": [],
        "uris": {},
        "labels": [],
        "label_heads": [],
        "corrections": {},
    }
    assert store.labels("animal").schema == label_schema()
    assert store.labels("animal", version=1).schema == label_schema()
    with pytest.raises(StoreError, match="unknown item"):
        store.resolve(sha(0))


def test_embeddings_of_only_new_items_in_a_store_that_holds_others(store):
    """Day two: none of the asked items is stored yet, under a fingerprint that has items (the
    Parquet store raised `cannot reshape array of size 0 into shape (0,newaxis)` here)."""
    store.add_items(items(0, 5, FP_A, 8))
    assert store.embeddings([sha(i) for i in range(100, 300)], FP_A) == {}
    assert store.embeddings([sha(100)], FP_A) == {}
    assert store.embeddings([], FP_A) == {}
    assert store.embeddings(iter([]), FP_A) == {}
    assert store.embeddings([sha(0)], FP_B) == {}  # a fingerprint with no partition
    # One found among many new ones, asked for three times in one call.
    got = store.embeddings([sha(100), sha(2), sha(2), sha(101), sha(2)], FP_A)
    assert list(got) == [sha(2)] and got[sha(2)].shape == (8,) and got[sha(2)].dtype == np.float32
    # A generator and a set are iterables too.
    assert set(store.embeddings((sha(i) for i in range(3)), FP_A)) == {sha(0), sha(1), sha(2)}
    assert set(store.embeddings({sha(3), sha(4)}, FP_A)) == {sha(3), sha(4)}


def test_one_row_everywhere(store):
    only = items(7, 1, FP_A, 8, seed=3)
    store.add_items(only)
    store.add_labels("animal", [labelled([sha(7)], 1, seed=1, at=T0)])
    store.add_corrections([Correction(sha(7), "animal", ("cat",), "ann", T0)])
    reads = every_read(store)
    assert list(reads["embeddings"]) == [sha(7)]
    np.testing.assert_allclose(reads["embeddings"][sha(7)], only[0].embedding)
    assert reads["fingerprints"] == {FP_A: 1}
    assert reads["iter"] == [([sha(7)], (1, 8))]
    assert reads["uris"] == {sha(7): {FP_A: "/photos/7.jpg"}}
    assert [r["sha256"] for r in reads["labels"]] == [sha(7)] and reads["label_heads"] == ["animal"]
    assert list(reads["corrections"]) == [sha(7)]
    assert store.resolve(sha(7)[:8]) == sha(7)


def test_batches_of_one(store):
    store.add_items(items(0, 3, FP_A, 8))
    batches = list(store.iter_embeddings(FP_A, 1))
    assert [m.shape for _, m in batches] == [(1, 8)] * 3
    assert sorted(str(h[0]) for h, _ in batches) == sorted(sha(i) for i in range(3))


def test_empty_writes_change_nothing(store):
    store.add_items([])
    store.add_embeddings([], [], FP_A, np.empty((0, 8), np.float32))
    assert store.add_labels("animal", []) == 0
    assert store.add_labels("animal", [labelled([], 1, seed=0, at=T0)]) == 0  # a table of zero rows
    store.add_corrections([])
    store.add_classifications([], FP_A)
    assert every_read(store) == {
        "embeddings": {},
        "fingerprints": {},
        "iter": [],
        "uris": {},
        "labels": [],
        "label_heads": [],
        "corrections": {},
    }
    # ... and the store still takes rows afterwards, of any dimension.
    store.add_items(items(0, 2, FP_A, 12))
    assert store.fingerprints() == {FP_A: 2}


def test_one_item_twice_in_one_call_is_stored_once_the_last_wins(store):
    rows = unit_rows(3, 8, seed=4)
    store.add_embeddings([sha(0), sha(1), sha(0)], ["/a.jpg", "/b.jpg", "/copy-of-a.jpg"], FP_A, rows)
    assert store.fingerprints() == {FP_A: 2}
    assert store.uris()[sha(0)] == {FP_A: "/copy-of-a.jpg"}
    got = store.embeddings([sha(0), sha(0)], FP_A)
    np.testing.assert_allclose(got[sha(0)], rows[2])
    streamed = [(str(h), m) for hashes, matrix in store.iter_embeddings(FP_A, 10) for h, m in zip(hashes, matrix)]
    assert sorted(h for h, _ in streamed) == sorted([sha(0), sha(1)])
    np.testing.assert_allclose(dict(streamed)[sha(0)], rows[2])

    # Labels and corrections: two rows for one item at the same time; the one written last counts.
    table = labelled([sha(0), sha(1), sha(0)], 1, seed=5, at=T0)
    assert store.add_labels("animal", [table]) == 3
    latest_rows = {r["sha256"]: r for r in store.labels("animal").to_pylist()}
    assert len(latest_rows) == 2
    np.testing.assert_allclose(latest_rows[sha(0)]["scores"], table["scores"][2].as_py())
    store.add_corrections(
        [Correction(sha(0), "animal", ("cat",), "ann", T0), Correction(sha(0), "animal", ("dog",), "bob", T0)]
    )
    assert store.corrections("animal")[sha(0)].by == "bob"


def test_writes_that_do_not_fit_are_refused(store):
    with pytest.raises(StoreError, match="one uri and one embedding row per hash"):
        store.add_embeddings([sha(0), sha(1)], [None], FP_A, unit_rows(2, 8, 0))
    with pytest.raises(StoreError, match="one uri and one embedding row per hash"):
        store.add_embeddings([sha(0)], [None], FP_A, unit_rows(2, 8, 0))
    with pytest.raises(StoreError, match="one uri and one embedding row per hash"):
        store.add_embeddings([sha(0)], [None], FP_A, unit_rows(1, 8, 0)[0])
    store.add_items(items(0, 2, FP_A, 8))
    with pytest.raises(StoreError, match=r"holds 8-dimensional embeddings of encoder .*refusing 12-dimensional"):
        store.add_items(items(5, 1, FP_A, 12))
    store.add_items(items(5, 1, FP_B, 12))  # another encoder, another size
    assert store.fingerprints() == {FP_A: 2, FP_B: 1}


def test_a_store_another_writer_filled(backend):
    """Two handles on one store (two processes, two users): what one writes the other reads,
    and items both add at once are stored once each."""
    mine, theirs = backend(), backend()
    theirs.add_items(items(0, 40, FP_A, 8, seed=1))
    assert mine.fingerprints() == {FP_A: 40}
    assert set(mine.embeddings([sha(i) for i in range(30, 60)], FP_A)) == {sha(i) for i in range(30, 40)}
    # Both add items 20..2019 at the same time, in opposite orders: PostgreSQL deadlocked here
    # (each writer held row locks the other waited for) until rows went in in sha256 order.
    forward = items(20, 2000, FP_A, 8, seed=2)
    errors: list[BaseException] = []

    def write(store, rows):
        try:
            store.add_items(rows)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=write, args=(mine, forward)),
        threading.Thread(target=write, args=(theirs, forward[::-1])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for store in (mine, theirs, backend()):
        assert store.fingerprints() == {FP_A: 2020}
        assert len(store.uris()) == 2020
        streamed = [str(h) for hashes, _ in store.iter_embeddings(FP_A, 512) for h in hashes]
        assert len(streamed) == len(set(streamed)) == 2020
        got = store.embeddings([i.sha256 for i in forward], FP_A)
        assert len(got) == 2000
        np.testing.assert_allclose(np.stack([got[i.sha256] for i in forward]), np.stack([i.embedding for i in forward]))


# -- opening -----------------------------------------------------------------------------
def test_reopen_keeps_rows_and_dtype(backend):
    backend(embedding_dtype="float16").add_items(items(0, 3, FP_A, 8))
    again = backend(embedding_dtype="float32")
    assert again.embedding_dtype == "float16"
    assert again.fingerprints() == {FP_A: 3}


def test_refuses_another_schema_version(backend):
    store = backend()
    if isinstance(store, ParquetStore):
        meta = json.loads((store.path / "store.json").read_text())
        (store.path / "store.json").write_text(json.dumps(meta | {"schema": 99}))
    else:
        store._conn.execute("UPDATE headmaster_meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(StoreError, match=r"store schema 99 is not supported \(this Headmaster reads schema 1\)"):
        backend()


# -- PostgreSQL only ---------------------------------------------------------------------
def test_open_store_picks_postgres(postgres_schema):
    from headmaster.store.postgres import PostgresStore

    store = open_store(postgres_schema)
    assert isinstance(store, PostgresStore)
    store.add_items(items(0, 2, FP_A, 8))
    assert store.fingerprints() == {FP_A: 2}
    store.close()


def test_embedding_column_follows_the_server(postgres_schema, pgvector_available, caplog):
    from headmaster.store.postgres import PostgresStore

    with caplog.at_level(logging.INFO, logger="headmaster.store.postgres"):
        store = PostgresStore(postgres_schema)
    assert store.embedding_type == ("vector" if pgvector_available else "real[]")
    assert f"embeddings in {'pgvector vector' if pgvector_available else 'real[]'} columns" in caplog.text
    meta = dict(store._conn.execute("SELECT key, value FROM headmaster_meta").fetchall())
    assert meta["embedding_type"] == store.embedding_type and meta["schema"] == "1"
    store.close()


def test_pgvector_columns(postgres_url, pgvector_available):
    """With pgvector: float32 stores use vector, float16 stores halfvec (pgvector >= 0.7), both
    without a fixed dimension, so two encoders' sizes share the column."""
    if not pgvector_available:
        pytest.skip(PGVECTOR_MISSING)
    import psycopg

    from headmaster.store.postgres import PostgresStore

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        has_halfvec = conn.execute("SELECT to_regtype('halfvec') IS NOT NULL").fetchone()[0]
        for dtype, column in (("float32", "vector"), ("float16", "halfvec" if has_halfvec else "vector")):
            schema = f"headmaster_test_{uuid.uuid4().hex[:12]}"
            conn.execute(f"CREATE SCHEMA {schema}")
            try:
                with PostgresStore(with_schema(postgres_url, schema), embedding_dtype=dtype) as store:
                    assert store.embedding_type == column
                    a, b = items(0, 3, FP_A, 8), items(10, 2, FP_B, 12)
                    store.add_items(a + b)
                    (kind,) = store._conn.execute(
                        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                        "WHERE attrelid = 'items'::regclass AND attname = 'embedding'"
                    ).fetchone()
                    assert kind == column
                    dims = dict(
                        store._conn.execute(
                            "SELECT fingerprint, max(vector_dims(embedding::vector)) FROM items GROUP BY 1"
                        ).fetchall()
                    )
                    assert dims == {FP_A: 8, FP_B: 12}
                    # pgvector's operators work on the stored rows: the nearest item to itself is itself.
                    (nearest,) = store._conn.execute(
                        "SELECT sha256 FROM items WHERE fingerprint = %s ORDER BY embedding::vector <=> "
                        "(SELECT embedding::vector FROM items WHERE sha256 = %s AND fingerprint = %s) LIMIT 1",
                        (FP_A, sha(1), FP_A),
                    ).fetchone()
                    assert nearest == sha(1)
                    np.testing.assert_allclose(
                        store.embeddings([sha(1)], FP_A)[sha(1)], a[1].embedding, atol=1e-3 if dtype == "float16" else 0
                    )
            finally:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_unreachable_server_is_a_store_error():
    pytest.importorskip("psycopg")
    from headmaster.store.postgres import PostgresStore

    with pytest.raises(StoreError, match=r"cannot connect to PostgreSQL at postgresql://me:\*\*\*@127\.0\.0\.1:"):
        PostgresStore(f"postgresql://me:secret@127.0.0.1:{free_port()}/nothing?connect_timeout=3")
    with pytest.raises(StoreError, match="not a valid PostgreSQL DSN"):
        PostgresStore("postgresql://localhost/db?no_such_option=1")


def test_refuses_foreign_tables(postgres_schema):
    import psycopg

    from headmaster.store.postgres import PostgresStore

    with psycopg.connect(postgres_schema, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int)")
    with pytest.raises(StoreError, match="already has tables named items that are not a Headmaster store"):
        PostgresStore(postgres_schema)
    with pytest.raises(StoreError, match="holds no Headmaster store"):
        PostgresStore(postgres_schema, create=False)
