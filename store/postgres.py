"""The store in PostgreSQL: the same interface and behaviour as the Parquet folder, for users
who outgrow a folder (several writers, one database their other tools already read).

Tables, created on first use in the first schema of the connection's ``search_path`` (put
``options=-csearch_path=NAME`` in the DSN to keep a store in its own schema)::

    headmaster_meta  key, value             format, schema version, embedding dtype and column type
    items            sha256, fingerprint, uri, embedding, embedded_at   primary key (sha256, fingerprint)
    labels           id, head, sha256, fingerprint, version, scores real[], labels text[], source, at
    corrections      id, sha256, head, labels text[], by, at, note

Embeddings use pgvector's ``vector`` (``halfvec`` for float16 stores, pgvector >= 0.7) when
``CREATE EXTENSION IF NOT EXISTS vector`` succeeds, and ``real[]`` when it does not; the column
carries no dimension, since stores hold embeddings of several encoders. Classification needs
neither an index nor vector operators, so both columns behave the same here; pgvector adds
similarity search in SQL for other tools. ``id`` (insertion order) breaks ties between rows
with the same ``at``: the row written last wins, as its ``at`` would if clocks had more digits.

Label rows arrive by binary COPY inside one transaction, so a failing ``add_labels`` leaves
nothing behind. ``iter_embeddings`` reads through a server-side cursor on a connection of its
own, so a caller may write (``add_labels``) while it is still reading, as rescoring does.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from headmaster.errors import StoreError
from headmaster.store.base import EMBEDDING_DTYPES, OTHER_ARM, SCHEMA_VERSION, Correction, Store, label_schema, now

if TYPE_CHECKING:
    from typing_extensions import Self

LOG = logging.getLogger(__name__)

META_TABLE = "headmaster_meta"
TABLES = ("items", "labels", "corrections")
EMBEDDING_TYPES = ("vector", "halfvec", "real[]")
# pg_advisory_xact_lock key that serialises creating the tables (two writers starting at once).
SETUP_LOCK = 0x4865_6164_6D61  # "Headma"
FETCH_ROWS = 65536  # rows per round trip when reading whole tables
FLOAT4_OID, FLOAT4_ARRAY_OID = 700, 1021
_ARRAY_ITEM = np.dtype([("length", ">i4"), ("value", ">f4")])  # one element of a binary float4[]


def _masked(dsn: str) -> str:
    """The DSN without its password, for messages and ``location``."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[-1]
            user = parts.username or ""
            return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
        return dsn
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _utc(at: dt.datetime | None) -> dt.datetime | None:
    """A naive time is taken as UTC, as the Parquet store's timestamp columns take it."""
    return at.replace(tzinfo=dt.timezone.utc) if at is not None and at.tzinfo is None else at


def _float4_adapters():
    """Binary float4[] <-> numpy, so embeddings and scores never pass through Python floats."""
    from psycopg.adapt import Dumper, Loader
    from psycopg.pq import Format

    class Float4ArrayDumper(Dumper):
        format = Format.BINARY
        oid = FLOAT4_ARRAY_OID

        def dump(self, obj):
            values = np.asarray(obj, dtype=np.float32).reshape(-1)
            if not len(values):
                return struct.pack("!iiI", 0, 0, FLOAT4_OID)
            items = np.empty(len(values), _ARRAY_ITEM)
            items["length"] = 4
            items["value"] = values
            return struct.pack("!iiIii", 1, 0, FLOAT4_OID, len(values), 1) + items.tobytes()

    class Float4ArrayLoader(Loader):
        format = Format.BINARY

        def load(self, data):
            ndim, has_null, _ = struct.unpack_from("!iiI", data)
            if ndim == 0:
                return np.empty(0, np.float32)
            if ndim != 1:
                raise StoreError(f"expected a one-dimensional real[] in the store, found {ndim} dimensions")
            (count,) = struct.unpack_from("!i", data, 12)
            if not has_null:
                return np.frombuffer(data, _ARRAY_ITEM, count, offset=20)["value"].astype(np.float32)
            values, offset = np.full(count, np.nan, np.float32), 20
            for i in range(count):  # NULL elements carry no bytes, so the fixed layout does not hold
                (length,) = struct.unpack_from("!i", data, offset)
                offset += 4
                if length >= 0:
                    (values[i],) = struct.unpack_from("!f", data, offset)
                    offset += length
            return values

    return Float4ArrayDumper, Float4ArrayLoader


class PostgresStore(Store):
    """The store in a PostgreSQL database (see the module docstring for the tables)."""

    def __init__(
        self, dsn: str, *, create: bool = True, embedding_dtype: str = "float32", use_pgvector: bool | None = None
    ):
        """``use_pgvector``: None uses pgvector when the server has it, False always stores
        ``real[]``, True refuses to create a store without it. An existing store keeps the
        column type it was created with."""
        self.dsn = dsn
        self.location = _masked(dsn)
        self._conn = self._connect()
        try:
            meta = self._setup(create, embedding_dtype, use_pgvector)
            self.embedding_dtype = meta["embedding_dtype"]
            self.embedding_type = meta["embedding_type"]
            self._register_vector(self._conn)
        except BaseException:
            self._conn.close()
            raise

    # -- connections ------------------------------------------------------------------
    def _connect(self):
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise StoreError("the PostgreSQL store needs psycopg: pip install 'headmaster[postgres]'") from None
        try:
            options = {} if "connect_timeout" in conninfo_to_dict(self.dsn) else {"connect_timeout": 10}
            conn = psycopg.connect(self.dsn, autocommit=True, **options)
        except psycopg.ProgrammingError as e:
            raise StoreError(f"{self.location} is not a valid PostgreSQL DSN: {_first_line(e)}") from None
        except psycopg.Error as e:
            raise StoreError(
                f"cannot connect to PostgreSQL at {self.location}: {_first_line(e)}; check that the "
                "server is running and that the DSN's host, port, user and database are right"
            ) from None
        try:
            conn.execute("SET TIME ZONE 'UTC'")  # timestamps come back in UTC, as from Parquet
            dumper, loader = _float4_adapters()
            conn.adapters.register_dumper(None, dumper)
            conn.adapters.register_loader(FLOAT4_ARRAY_OID, loader)
        except BaseException:
            conn.close()
            raise
        return conn

    def _register_vector(self, conn) -> None:
        if self.embedding_type == "real[]":
            return
        import psycopg

        try:
            from pgvector.psycopg import register_vector
        except ImportError:
            raise StoreError(
                f"the store {self.location} keeps embeddings in pgvector's {self.embedding_type} "
                "column; install the pgvector package: pip install 'headmaster[postgres]'"
            ) from None
        try:
            register_vector(conn)
        except psycopg.Error as e:
            raise StoreError(
                f"the store {self.location} keeps embeddings in pgvector's {self.embedding_type} "
                f"column, but the database has no such type ({_first_line(e)}); was the vector "
                "extension dropped, or is it in a schema outside the search_path?"
            ) from None

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- setup ------------------------------------------------------------------------
    def _existing(self, name: str) -> bool:
        return self._conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]

    def _setup(self, create: bool, embedding_dtype: str, use_pgvector: bool | None) -> dict[str, str]:
        import psycopg

        try:
            with self._conn.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK,))
                if self._existing(META_TABLE):
                    meta = dict(self._conn.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
                    if meta.get("format") != "headmaster-store" or meta.get("schema") != str(SCHEMA_VERSION):
                        schema = meta.get("schema")  # as the Parquet store words it: a number, or its repr
                        schema = int(schema) if schema and schema.isdigit() else repr(schema)
                        raise StoreError(
                            f"{self.location}: store schema {schema} is not supported "
                            f"(this Headmaster reads schema {SCHEMA_VERSION})"
                        )
                    if meta.get("embedding_type") not in EMBEDDING_TYPES:
                        raise StoreError(
                            f"{self.location}: unknown embedding column type "
                            f"{meta.get('embedding_type')!r} in {META_TABLE}"
                        )
                    return meta
                if not create:
                    raise StoreError(
                        f"{self.location} holds no Headmaster store (no {META_TABLE} table); "
                        "`headmaster classify ... --store DSN` creates one"
                    )
                found = [t for t in TABLES if self._existing(t)]
                if found:
                    raise StoreError(
                        f"{self.location} already has tables named {', '.join(found)} that are not a "
                        "Headmaster store; use another database, or another schema "
                        "(options=-csearch_path=NAME in the DSN)"
                    )
                if embedding_dtype not in EMBEDDING_DTYPES:
                    raise StoreError(f"embedding dtype must be one of {EMBEDDING_DTYPES}, not {embedding_dtype!r}")
                column = self._embedding_column(embedding_dtype, use_pgvector)
                self._create_tables(column, embedding_dtype)
                return dict(self._conn.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
        except psycopg.Error as e:
            raise StoreError(f"cannot set up the store in {self.location}: {_first_line(e)}") from None

    def _embedding_column(self, embedding_dtype: str, use_pgvector: bool | None) -> str:
        import psycopg

        if use_pgvector is False:
            LOG.info("store %s: embeddings in real[] columns (pgvector not requested)", self.location)
            return "real[]"
        try:
            with self._conn.transaction():  # a savepoint: a refusal must not end the setup transaction
                self._conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error as e:
            if use_pgvector:
                raise StoreError(
                    f"pgvector is needed but CREATE EXTENSION vector failed on {self.location}: "
                    f"{_first_line(e)} (Debian: apt-get install postgresql-NN-pgvector)"
                ) from None
            LOG.info(
                "store %s: embeddings in real[] columns; pgvector is not available (%s)", self.location, _first_line(e)
            )
            return "real[]"
        if embedding_dtype == "float16":
            if self._conn.execute("SELECT to_regtype('halfvec') IS NOT NULL").fetchone()[0]:
                LOG.info("store %s: embeddings in pgvector halfvec columns", self.location)
                return "halfvec"
            LOG.info(
                "store %s: embeddings in pgvector vector columns (float32: halfvec needs pgvector >= 0.7)",
                self.location,
            )
            return "vector"
        LOG.info("store %s: embeddings in pgvector vector columns", self.location)
        return "vector"

    def _create_tables(self, column: str, embedding_dtype: str) -> None:
        for statement in (
            f"CREATE TABLE {META_TABLE} (key text PRIMARY KEY, value text NOT NULL)",
            f"""CREATE TABLE items (sha256 text NOT NULL, fingerprint text NOT NULL, uri text,
                embedding {column} NOT NULL, embedded_at timestamptz NOT NULL, PRIMARY KEY (sha256, fingerprint))""",
            "CREATE INDEX items_fingerprint ON items (fingerprint)",
            """CREATE TABLE labels (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, head text NOT NULL,
                sha256 text NOT NULL, fingerprint text, version integer, scores real[], labels text[], source text,
                "at" timestamptz)""",
            "CREATE INDEX labels_head ON labels (head, sha256)",
            """CREATE TABLE corrections (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, sha256 text NOT NULL,
                head text NOT NULL, labels text[] NOT NULL, "by" text, "at" timestamptz NOT NULL, note text)""",
            "CREATE INDEX corrections_head ON corrections (head, sha256)",
        ):
            self._conn.execute(statement)
        meta = {
            "format": "headmaster-store",
            "schema": str(SCHEMA_VERSION),
            "embedding_dtype": embedding_dtype,
            "embedding_type": column,
            "created": now().isoformat(timespec="seconds"),
        }
        with self._conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {META_TABLE} (key, value) VALUES (%s, %s)", list(meta.items()))

    # -- embeddings -------------------------------------------------------------------
    def _to_column(self, vector: np.ndarray):
        if self.embedding_type == "halfvec":
            from pgvector import HalfVector

            return HalfVector(vector)
        return vector

    @staticmethod
    def _from_column(value) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        return np.asarray(value.to_numpy(), np.float32)  # pgvector's Vector / HalfVector

    def _column_oid(self) -> int:
        if self.embedding_type == "real[]":
            return FLOAT4_ARRAY_OID
        return self._conn.adapters.types[self.embedding_type].oid

    # -- items ------------------------------------------------------------------------
    def add_embeddings(
        self, hashes: Sequence[str], uris: Sequence[str | None], fingerprint: str, matrix: np.ndarray
    ) -> None:
        matrix = np.asarray(matrix, np.float32)
        if matrix.ndim != 2 or len(matrix) != len(hashes) or len(uris) != len(hashes):
            raise StoreError(
                f"add_embeddings needs one uri and one embedding row per hash: {len(hashes)} hashes, "
                f"{len(uris)} uris, embeddings of shape {matrix.shape}"
            )
        if not len(matrix):
            return
        if self.embedding_dtype == "float16":  # what a float16 store gives back, whatever the column
            matrix = matrix.astype(np.float16).astype(np.float32)
        rows = {sha: i for i, sha in enumerate(hashes)}  # one row per item: the last one given wins
        at = now()
        with self._conn.transaction():
            stored = self._conn.execute(
                "SELECT embedding FROM items WHERE fingerprint = %s LIMIT 1", (fingerprint,), binary=True
            ).fetchone()
            if stored is not None and len(self._from_column(stored[0])) != matrix.shape[1]:
                raise StoreError(
                    f"the store holds {len(self._from_column(stored[0]))}-dimensional embeddings of "
                    f"encoder {fingerprint}; refusing {matrix.shape[1]}-dimensional ones"
                )
            self._conn.execute("CREATE TEMPORARY TABLE items_in (LIKE items) ON COMMIT DROP")
            with (
                self._conn.cursor() as cur,
                cur.copy(
                    "COPY items_in (sha256, fingerprint, uri, embedding, embedded_at) FROM STDIN (FORMAT BINARY)"
                ) as copy,
            ):
                copy.set_types(["text", "text", "text", self._column_oid(), "timestamptz"])
                for sha, i in rows.items():
                    copy.write_row((sha, fingerprint, uris[i], self._to_column(matrix[i]), at))
            # A re-added item replaces its row, as the newest Parquet part wins there. Rows go in
            # sha256 order: two writers adding the same items (two classify runs over overlapping
            # folders) then lock them in the same order, instead of deadlocking.
            self._conn.execute(
                'INSERT INTO items SELECT * FROM items_in ORDER BY sha256 COLLATE "C" '
                "ON CONFLICT (sha256, fingerprint) DO UPDATE "
                "SET uri = excluded.uri, embedding = excluded.embedding, embedded_at = excluded.embedded_at"
            )

    def embeddings(self, hashes: Iterable[str], fingerprint: str) -> dict[str, np.ndarray]:
        wanted = list(set(hashes))
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(wanted), 10000):
            rows = self._conn.execute(
                "SELECT sha256, embedding FROM items WHERE fingerprint = %s AND sha256 = ANY(%s::text[])",
                (fingerprint, wanted[start : start + 10000]),
                binary=True,
            ).fetchall()
            found.update((sha, self._from_column(value)) for sha, value in rows)
        return found

    def fingerprints(self) -> dict[str, int]:
        return dict(
            self._conn.execute(
                'SELECT fingerprint, count(*) FROM items GROUP BY fingerprint ORDER BY fingerprint COLLATE "C"'
            ).fetchall()
        )

    def iter_embeddings(self, fingerprint: str, batch_size: int = 65536) -> Iterator[tuple[list[str], np.ndarray]]:
        # A connection of its own: the caller may write to the store between batches (rescore
        # streams these batches straight into add_labels' COPY), which one connection cannot do.
        conn = self._connect()
        try:
            self._register_vector(conn)
            with conn.transaction(), conn.cursor("headmaster_iter_embeddings", binary=True) as cur:
                cur.execute("SELECT sha256, embedding FROM items WHERE fingerprint = %s", (fingerprint,))
                while rows := cur.fetchmany(batch_size):
                    yield [sha for sha, _ in rows], np.stack([self._from_column(value) for _, value in rows])
        finally:
            conn.close()

    def uris(self) -> dict[str, dict[str, str | None]]:
        found: dict[str, dict[str, str | None]] = {}
        with self._conn.transaction(), self._conn.cursor("headmaster_uris") as cur:
            cur.execute("SELECT sha256, fingerprint, uri FROM items")
            while rows := cur.fetchmany(FETCH_ROWS):
                for sha, fingerprint, uri in rows:
                    found.setdefault(sha, {})[fingerprint] = uri
        return found

    # -- labels -----------------------------------------------------------------------
    def add_labels(self, head: str, batches: Iterable) -> int:
        schema = label_schema()
        rows = 0
        with (
            self._conn.transaction(),
            self._conn.cursor() as cur,
            cur.copy(
                'COPY labels (head, sha256, fingerprint, version, scores, labels, source, "at") '
                "FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["text", "text", "text", "int4", FLOAT4_ARRAY_OID, "text[]", "text", "timestamptz"])
            for table in batches:
                if not table.schema.equals(schema):
                    try:
                        table = table.select(schema.names).cast(schema)
                    except (KeyError, ValueError, TypeError) as e:
                        raise StoreError(
                            f"label rows for head {head} do not fit the label schema "
                            f"({e}); build them with label_table()"
                        ) from None
                scores = table["scores"].combine_chunks()
                offsets, values = scores.offsets.to_numpy(), scores.values.to_numpy(zero_copy_only=False)
                columns = [
                    table[name].to_pylist() for name in ("sha256", "fingerprint", "version", "labels", "source", "at")
                ]
                for i, (sha, fingerprint, version, labels, source, at) in enumerate(zip(*columns)):
                    copy.write_row(
                        (head, sha, fingerprint, version, values[offsets[i] : offsets[i + 1]], labels, source, _utc(at))
                    )
                rows += table.num_rows
        return rows

    def labels(self, head: str, version: int | None = None):
        import pyarrow as pa

        schema = label_schema()
        condition, params = (
            ("AND version = %s", (head, version))
            if version is not None
            else ("AND source IS DISTINCT FROM %s", (head, OTHER_ARM))
        )
        batches = []
        with self._conn.transaction(), self._conn.cursor("headmaster_labels", binary=True) as cur:
            cur.execute(
                'SELECT DISTINCT ON (sha256 COLLATE "C") sha256, fingerprint, version, scores, labels, source, "at" '
                f'FROM labels WHERE head = %s {condition} ORDER BY sha256 COLLATE "C", "at" DESC, id DESC',
                params,
            )
            while rows := cur.fetchmany(FETCH_ROWS):
                sha, fingerprint, versions, scores, labels, source, at = zip(*rows)
                lengths = np.array([0 if s is None else len(s) for s in scores], np.int32)
                flat = [s for s in scores if s is not None]
                batches.append(
                    pa.RecordBatch.from_arrays(
                        [
                            pa.array(sha, pa.string()),
                            pa.array(fingerprint, pa.string()),
                            pa.array(versions, pa.int32()),
                            pa.ListArray.from_arrays(
                                pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                                pa.array(np.concatenate(flat) if flat else np.empty(0, np.float32), pa.float32()),
                                mask=pa.array([s is None for s in scores]),
                            ),
                            pa.array(labels, pa.list_(pa.string())),
                            pa.array(source, pa.string()),
                            pa.array(at, pa.timestamp("us", tz="UTC")),
                        ],
                        schema=schema,
                    )
                )
        return pa.Table.from_batches(batches, schema=schema)

    def labelled(self, head: str, version: int, hashes=None) -> set[str]:
        # One indexed lookup (labels_head) per batch: what every queue batch asks.
        if hashes is None:
            rows = self._conn.execute(
                "SELECT DISTINCT sha256 FROM labels WHERE head = %s AND version = %s", (head, version)
            )
        else:
            rows = self._conn.execute(
                "SELECT DISTINCT sha256 FROM labels WHERE head = %s AND version = %s AND sha256 = ANY(%s)",
                (head, version, list(set(hashes))),
            )
        return {sha for (sha,) in rows.fetchall()}

    def label_heads(self) -> list[str]:
        return [
            head for (head,) in self._conn.execute('SELECT DISTINCT head COLLATE "C" FROM labels ORDER BY 1').fetchall()
        ]

    # -- corrections ------------------------------------------------------------------
    def add_corrections(self, corrections: Sequence[Correction]) -> None:
        if not corrections:
            return
        with (
            self._conn.transaction(),
            self._conn.cursor() as cur,
            cur.copy('COPY corrections (sha256, head, labels, "by", "at", note) FROM STDIN (FORMAT BINARY)') as copy,
        ):
            copy.set_types(["text", "text", "text[]", "text", "timestamptz", "text"])
            for c in corrections:
                copy.write_row((c.sha256, c.head, list(c.labels), c.by, _utc(c.at), c.note))

    def corrections(self, head: str) -> dict[str, Correction]:
        rows = self._conn.execute(
            'SELECT DISTINCT ON (sha256) sha256, head, labels, "by", "at", note FROM corrections WHERE head = %s '
            'ORDER BY sha256, "at" DESC, id DESC',
            (head,),
        ).fetchall()
        return {
            sha: Correction(sha, head_, tuple(labels), by, at, note or "") for sha, head_, labels, by, at, note in rows
        }
