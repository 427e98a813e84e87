"""The Store contract, run against every backend: a Parquet folder and a real PostgreSQL server.

PostgreSQL: the DSN in HEADMASTER_TEST_POSTGRES (a ``postgresql://`` URL) when set, else a
throwaway server started from Debian's binaries (/usr/lib/postgresql/NN/bin) in a temp folder,
listening on a unix socket only, as the ``postgres`` user when the tests run as root (the
server refuses root). Each test gets a schema of its own. No binaries: the postgres cases are
skipped, or fail when CI is set. The ``postgres`` case uses pgvector when the server has it;
``postgres-array`` always stores real[], so both column types run wherever pgvector exists.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
import pytest

from headmaster.client.store import (
    Correction,
    ParquetStore,
    StoredItem,
    StoreError,
    label_schema,
    label_table,
    open_store,
)

PG_ENV = "HEADMASTER_TEST_POSTGRES"
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
    return [StoredItem(sha(start + i), f"/photos/{start + i}.jpg", fingerprint, row)
            for i, row in enumerate(unit_rows(n, dim, seed))]


def labelled(hashes, version: int, seed: int, at: dt.datetime, fingerprint: str = FP_A):
    scores = np.random.default_rng(seed).random((len(hashes), len(LABELS))).astype(np.float32)
    return label_table(hashes, fingerprint, version, scores, LABELS, scores > 0.5, "test", at)


T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


# -- the PostgreSQL server ---------------------------------------------------------------
def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the PostgreSQL store must be tested)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url():
    """The base URL of a PostgreSQL server for the whole session."""
    if os.environ.get(PG_ENV):
        yield os.environ[PG_ENV]
        return
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
    data, port = os.path.join(root, "data"), _free_port()
    started = False
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--locale=C", "--no-sync"], check=True, capture_output=True, timeout=60)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", data, "-l", os.path.join(root, "server.log"), "-w",
                        "-o", f"-p {port} -k {root} -c listen_addresses='' -c fsync=off -c full_page_writes=off", "start"], check=True, capture_output=True, timeout=60)
        started = True
        yield f"postgresql://postgres@/postgres?{urlencode({'host': root, 'port': port})}"
    except subprocess.CalledProcessError as e:
        log = Path(root, "server.log")
        pytest.fail(f"could not start PostgreSQL: {e.stderr.decode(errors='replace')}"
                    f"{log.read_text() if log.is_file() else ''}")
    finally:
        if started:
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
                           check=False, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


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


@pytest.fixture(params=["parquet", "postgres", "postgres-array"])
def backend(request, tmp_path):
    """A function that opens (or reopens) this test's store on the backend under test."""
    if request.param == "parquet":
        return lambda **kw: ParquetStore(tmp_path / "store", **kw)
    from headmaster.client.store_postgres import PostgresStore

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
    batches = (labelled(list(map(str, hashes)), 1, seed=len(hashes), at=T0)
               for hashes, _ in store.iter_embeddings(FP_A, 16))
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
        assert (row["version"], row["labels"], row["at"], row["fingerprint"], row["source"]) == \
            (want["version"], want["labels"], want["at"], want["fingerprint"], want["source"])
        np.testing.assert_allclose(row["scores"], want["scores"])

    v1 = store.labels("animal", version=1)
    assert v1.schema == label_schema() and v1.num_rows == 6 and set(v1["version"].to_pylist()) == {1}
    assert store.labels("animal", version=2).num_rows == 3
    empty = store.labels("animal", version=9)
    assert empty.num_rows == 0 and empty.schema == label_schema()
    assert store.labels("nobody").schema == label_schema()
    assert store.label_heads() == ["animal", "other"]


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
    store.add_corrections([
        Correction(sha(0), "animal", ("cat",), "ann", T0),
        Correction(sha(0), "animal", ("dog",), "bob", T0 + dt.timedelta(minutes=5), note="it barks"),
        Correction(sha(1), "animal", (), "ann", T0),
        Correction(sha(0), "colour", ("red", "blue"), "ann", T0 + dt.timedelta(hours=1)),
    ])
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
    store.add_items([StoredItem(first, None, FP_A, unit_rows(1, 8, 0)[0]),
                     StoredItem(second, None, FP_A, unit_rows(1, 8, 1)[0])])
    with pytest.raises(StoreError, match="matches 2 stored items"):
        store.resolve("deadbeef")
    assert store.resolve("deadbeef1") == second


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
    from headmaster.client.store_postgres import PostgresStore

    store = open_store(postgres_schema)
    assert isinstance(store, PostgresStore)
    store.add_items(items(0, 2, FP_A, 8))
    assert store.fingerprints() == {FP_A: 2}
    store.close()


def test_embedding_column_follows_the_server(postgres_schema, pgvector_available, caplog):
    from headmaster.client.store_postgres import PostgresStore

    with caplog.at_level(logging.INFO, logger="headmaster.client.store_postgres"):
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

    from headmaster.client.store_postgres import PostgresStore

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
                    kind, = store._conn.execute(
                        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                        "WHERE attrelid = 'items'::regclass AND attname = 'embedding'").fetchone()
                    assert kind == column
                    dims = dict(store._conn.execute(
                        "SELECT fingerprint, max(vector_dims(embedding::vector)) FROM items GROUP BY 1").fetchall())
                    assert dims == {FP_A: 8, FP_B: 12}
                    # pgvector's operators work on the stored rows: the nearest item to itself is itself.
                    nearest, = store._conn.execute(
                        "SELECT sha256 FROM items WHERE fingerprint = %s ORDER BY embedding::vector <=> "
                        "(SELECT embedding::vector FROM items WHERE sha256 = %s AND fingerprint = %s) LIMIT 1",
                        (FP_A, sha(1), FP_A)).fetchone()
                    assert nearest == sha(1)
                    np.testing.assert_allclose(store.embeddings([sha(1)], FP_A)[sha(1)], a[1].embedding,
                                               atol=1e-3 if dtype == "float16" else 0)
            finally:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_unreachable_server_is_a_store_error():
    pytest.importorskip("psycopg")
    from headmaster.client.store_postgres import PostgresStore

    with pytest.raises(StoreError, match=r"cannot connect to PostgreSQL at postgresql://me:\*\*\*@127\.0\.0\.1:"):
        PostgresStore(f"postgresql://me:secret@127.0.0.1:{_free_port()}/nothing?connect_timeout=3")
    with pytest.raises(StoreError, match="not a valid PostgreSQL DSN"):
        PostgresStore("postgresql://localhost/db?no_such_option=1")


def test_refuses_foreign_tables(postgres_schema):
    import psycopg

    from headmaster.client.store_postgres import PostgresStore

    with psycopg.connect(postgres_schema, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int)")
    with pytest.raises(StoreError, match="already has tables named items that are not a Headmaster store"):
        PostgresStore(postgres_schema)
    with pytest.raises(StoreError, match="holds no Headmaster store"):
        PostgresStore(postgres_schema, create=False)
