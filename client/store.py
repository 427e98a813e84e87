"""The store: each image's embedding, the labels heads gave it, and people's corrections.

Embedding is the expensive step; everything after it (new heads, A/B tests, retraining,
corrections) runs on what is stored here, on CPU, with no encoder.

The default backend is a folder of Parquet files, written and read with pyarrow. Why Parquet
rather than LanceDB: it needs no service and no new dependency (pyarrow already holds the
embedding cache); it is columnar, so rescoring reads only the embedding column, in bounded
batches; every write is a new file renamed into place, so a killed writer leaves no
half-written rows, at most a ``.tmp`` file that readers ignore; and DuckDB, pandas, Polars or
Spark read the folder as it is. What LanceDB adds (approximate-nearest-neighbour indexes)
serves search, not classification. PostgreSQL + pgvector (``store_postgres.py``) implements
the same interface for users who outgrow a folder; :func:`open_store` picks by location.

Layout (schema version in ``store.json``)::

    items/<fingerprint>/part-*.parquet  sha256, uri, fingerprint, embedding, embedded_at
    labels/<head>/part-*.parquet        sha256, fingerprint, version, scores, labels, source, at
    corrections/part-*.parquet          sha256, head, labels, by, at, note

Items are partitioned by encoder fingerprint, so embeddings of two encoders never share a
file, a scan, or a matrix.
"""

from __future__ import annotations

import abc
import datetime as dt
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headmaster.export.errors import HeadmasterError

SCHEMA_VERSION = 1
STORE_FILE = "store.json"
EMBEDDING_DTYPES = ("float32", "float16")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class StoreError(HeadmasterError):
    """The store cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class StoredItem:
    sha256: str  # of the image bytes: the item's identity
    uri: str | None  # where the bytes were read from (for re-embedding after an encoder swap)
    fingerprint: str  # of the encoder + preprocessing that made the embedding
    embedding: np.ndarray  # [D], L2-normalised


@dataclass(frozen=True)
class Correction:
    """A person's label for an item under a head; the newest one for (head, item) counts."""

    sha256: str
    head: str
    labels: tuple[str, ...]  # one for single-label heads; any number (even none) for multi-label
    by: str
    at: dt.datetime
    note: str = ""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def label_schema():
    import pyarrow as pa

    return pa.schema([("sha256", pa.string()), ("fingerprint", pa.string()), ("version", pa.int32()),
                      ("scores", pa.list_(pa.float32())), ("labels", pa.list_(pa.string())),
                      ("source", pa.string()), ("at", pa.timestamp("us", tz="UTC"))])


def correction_schema():
    import pyarrow as pa

    return pa.schema([("sha256", pa.string()), ("head", pa.string()), ("labels", pa.list_(pa.string())),
                      ("by", pa.string()), ("at", pa.timestamp("us", tz="UTC")), ("note", pa.string())])


def label_table(hashes, fingerprint: str, version: int, scores: np.ndarray, label_names: Sequence[str],
                accepted: np.ndarray, source: str, at: dt.datetime | None = None):
    """Label rows as an Arrow table, built column-wise (a million rows take well under a second).
    ``accepted``: [n, L] bool, which labels each row accepted."""
    import pyarrow as pa

    n, width = scores.shape
    score_offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    score_lists = pa.ListArray.from_arrays(score_offsets, pa.array(scores.reshape(-1).astype(np.float32)))
    _, columns = np.nonzero(accepted)
    label_offsets = pa.array(np.concatenate([[0], np.cumsum(accepted.sum(axis=1))]).astype(np.int32))
    label_values = pa.array(list(label_names), pa.string()).take(pa.array(columns, pa.int32()))
    return pa.table({
        "sha256": hashes if isinstance(hashes, pa.Array) else pa.array(hashes, pa.string()),
        "fingerprint": pa.repeat(pa.scalar(fingerprint, pa.string()), n),
        "version": pa.repeat(pa.scalar(version, pa.int32()), n),
        "scores": score_lists,
        "labels": pa.ListArray.from_arrays(label_offsets, label_values),
        "source": pa.repeat(pa.scalar(source, pa.string()), n),
        "at": pa.repeat(pa.scalar(at or now(), pa.timestamp("us", tz="UTC")), n),
    }, schema=label_schema())


def classification_tables(results, fingerprint: str, source: str = "classify") -> dict[str, list]:
    """Label tables per head from client Classification results (grouped by head version,
    since a hot swap can land in the middle of a run)."""
    grouped: dict[tuple[str, int], list] = {}
    for result in results:
        for name, head in result.heads.items():
            grouped.setdefault((name, head.version), []).append((result.sha256, head))
    tables: dict[str, list] = {}
    at = now()
    for (name, version), rows in grouped.items():
        names = list(rows[0][1].scores)
        scores = np.array([[h.scores[label] for label in names] for _, h in rows], np.float32)
        accepted = np.array([[label in h.labels for label in names] for _, h in rows], bool)
        tables.setdefault(name, []).append(
            label_table([sha for sha, _ in rows], fingerprint, version, scores, names, accepted, source, at))
    return tables


def latest(table, keys: Sequence[str], order: str = "at"):
    """The newest row (by ``order``) for each distinct value of ``keys``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    # Ties in time go to the row written last (rows come in the order they were written).
    table = table.append_column("__row", pa.array(np.arange(table.num_rows)))
    ordered = table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]
                                         + [(order, "descending"), ("__row", "descending")])).drop_columns(["__row"])
    first = np.zeros(ordered.num_rows, bool)
    first[0] = True
    for key in keys:
        column = ordered[key].combine_chunks()
        changed = pc.not_equal(column.slice(1), column.slice(0, len(column) - 1)).fill_null(True)
        first[1:] |= changed.to_numpy(zero_copy_only=False)
    return ordered.filter(pa.array(first))


def embedding_column(matrix: np.ndarray):
    """[n, D] -> an Arrow fixed-size-list column (the embedding column of every Parquet file here)."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix).reshape(-1)), matrix.shape[1])


def embedding_matrix(column) -> np.ndarray:
    """An embedding column (array or chunked) -> float32 [n, D]; zero rows give [0, D].

    D comes from the column type (a fixed-size list), not from the data: reshaping zero values
    with ``-1`` fails, and a read that finds none of the asked items (day two of every store)
    is the usual case, not an error."""
    import pyarrow as pa

    values = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    flat = values.flatten().to_numpy(zero_copy_only=False)  # flatten honours slices; .values does not
    if pa.types.is_fixed_size_list(values.type):
        width = values.type.list_size
    else:  # variable-size lists (not written here, but readable): every row must be as long
        width = len(flat) // len(values) if len(values) else 0
        if width * len(values) != len(flat):
            raise StoreError(f"embedding rows of unequal length: {len(flat)} values in {len(values)} rows")
    return flat.astype(np.float32, copy=False).reshape(len(values), width)


def file_sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


class Store(abc.ABC):
    """What every backend answers. Rows are appended, never edited: "latest wins" reads give
    the current labels and corrections, and the history stays."""

    location: str

    # -- items ------------------------------------------------------------------------
    @abc.abstractmethod
    def add_embeddings(self, hashes: Sequence[str], uris: Sequence[str | None], fingerprint: str,
                       matrix: np.ndarray) -> None:
        """Add items embedded by ``fingerprint`` (column-wise, for bulk loads)."""

    def add_items(self, items: Sequence[StoredItem]) -> None:
        by_fingerprint: dict[str, list[StoredItem]] = {}
        for item in items:
            by_fingerprint.setdefault(item.fingerprint, []).append(item)
        for fingerprint, group in by_fingerprint.items():
            self.add_embeddings([i.sha256 for i in group], [i.uri for i in group], fingerprint,
                                np.stack([np.asarray(i.embedding, np.float32) for i in group]))

    @abc.abstractmethod
    def embeddings(self, hashes: Iterable[str], fingerprint: str) -> dict[str, np.ndarray]:
        """The stored embeddings (float32) of those items that were embedded by ``fingerprint``."""

    @abc.abstractmethod
    def fingerprints(self) -> dict[str, int]:
        """Encoder fingerprint -> number of items embedded with it."""

    @abc.abstractmethod
    def iter_embeddings(self, fingerprint: str, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """(hashes, float32 [n, D]) batches of the items embedded by ``fingerprint``, in bounded memory.
        The hashes are a list or an Arrow string array (what :func:`label_table` takes)."""

    @abc.abstractmethod
    def uris(self) -> dict[str, dict[str, str | None]]:
        """sha256 -> {fingerprint: uri} for every stored item."""

    # -- labels -----------------------------------------------------------------------
    @abc.abstractmethod
    def add_labels(self, head: str, batches: Iterable) -> int:
        """Append label tables (:func:`label_schema`) for ``head``, all or nothing; returns rows."""

    @abc.abstractmethod
    def labels(self, head: str, version: int | None = None):
        """The newest label row per item for ``head`` (optionally of one version), an Arrow table."""

    @abc.abstractmethod
    def label_heads(self) -> list[str]: ...

    # -- corrections ------------------------------------------------------------------
    @abc.abstractmethod
    def add_corrections(self, corrections: Sequence[Correction]) -> None: ...

    @abc.abstractmethod
    def corrections(self, head: str) -> dict[str, Correction]:
        """The newest correction per item for ``head``."""

    # -- shared -----------------------------------------------------------------------
    def add_classifications(self, results, fingerprint: str) -> None:
        for head, tables in classification_tables(results, fingerprint).items():
            self.add_labels(head, tables)

    def resolve(self, item: str, known: dict[str, dict] | None = None) -> str:
        """An item named by its sha256, a unique prefix of it (8+ hex digits), a stored URI, or
        the path of a file whose bytes are stored."""
        known = self.uris() if known is None else known
        if item in known:
            return item
        if re.fullmatch(r"[0-9a-f]{8,63}", item):
            matches = [sha for sha in known if sha.startswith(item)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise StoreError(f"item {item!r} matches {len(matches)} stored items; give more of its sha256")
        by_uri = [sha for sha, uris in known.items() if item in uris.values()]
        if len(by_uri) == 1:
            return by_uri[0]
        sha = file_sha256(Path(item)) if Path(item).is_file() else None
        if sha in known:
            return sha
        where = f"the file {item} was never classified with --store" if sha else \
            f"{item!r} is neither a stored sha256, a stored URI, nor a readable file"
        raise StoreError(f"unknown item: {where} (store: {self.location})")


class ParquetStore(Store):
    """The store as a folder of Parquet files (see the module docstring for the layout)."""

    def __init__(self, path: Path, *, create: bool = True, embedding_dtype: str = "float32"):
        self.path = Path(path)
        self.location = str(self.path)
        meta_path = self.path / STORE_FILE
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise StoreError(f"{meta_path} is not valid JSON: {e}") from None
            if meta.get("format") != "headmaster-store" or meta.get("schema") != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: store schema {meta.get('schema')!r} is not supported "
                                 f"(this Headmaster reads schema {SCHEMA_VERSION})")
        elif not create:
            raise StoreError(f"{self.path} is not a Headmaster store (no {STORE_FILE}); "
                             "`headmaster classify ... --store PATH` creates one")
        elif self.path.exists() and any(self.path.iterdir()):
            raise StoreError(f"{self.path} exists and is not a Headmaster store; choose an empty or new folder")
        else:
            if embedding_dtype not in EMBEDDING_DTYPES:
                raise StoreError(f"embedding dtype must be one of {EMBEDDING_DTYPES}, not {embedding_dtype!r}")
            meta = {"format": "headmaster-store", "schema": SCHEMA_VERSION, "embedding_dtype": embedding_dtype,
                    "created": now().isoformat(timespec="seconds")}
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            tmp.replace(meta_path)
        self.embedding_dtype = meta["embedding_dtype"]

    # -- files ------------------------------------------------------------------------
    @staticmethod
    def _parts(folder: Path) -> list[str]:
        return sorted(str(p) for p in folder.glob("part-*.parquet"))

    def _write(self, folder: Path, tables: Iterable) -> int:
        """Write tables into one new part file: a temporary name first, renamed when complete."""
        import pyarrow.parquet as pq

        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        tmp, final = folder / f".{name}.tmp", folder / f"{name}.parquet"
        rows, writer = 0, None
        try:
            for table in tables:
                if table.num_rows == 0:  # an empty part would make a head with no rows look present
                    continue
                if writer is None:
                    # Dictionary-encoding embeddings, scores or hashes (all distinct) only costs:
                    # it made reading embeddings three times slower.
                    repeated = [n for n in ("fingerprint", "source", "head", "by", "version") if n in table.schema.names]
                    writer = pq.ParquetWriter(tmp, table.schema, use_dictionary=repeated,
                                              compression={n: "none" if n in ("embedding", "scores") else "snappy"
                                                           for n in table.schema.names})
                writer.write_table(table, row_group_size=65536)
                rows += table.num_rows
        except BaseException:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)
            raise
        if writer is None:
            return 0
        writer.close()
        os.replace(tmp, final)
        return rows

    def _read(self, folder: Path, schema, filter=None):
        import pyarrow.dataset as ds

        parts = self._parts(folder)
        if not parts:
            return schema.empty_table()
        return ds.dataset(parts, format="parquet", schema=schema).to_table(filter=filter)

    def _items_folder(self, fingerprint: str) -> Path:
        return self.path / "items" / fingerprint.split(":")[-1][:32]

    def _item_schema(self, dim: int):
        import pyarrow as pa

        value = pa.float16() if self.embedding_dtype == "float16" else pa.float32()
        return pa.schema([("sha256", pa.string()), ("uri", pa.string()), ("fingerprint", pa.string()),
                          ("embedding", pa.list_(value, dim)), ("embedded_at", pa.timestamp("us", tz="UTC"))])

    def _item_dataset(self, fingerprint: str):
        import pyarrow.dataset as ds

        parts = self._parts(self._items_folder(fingerprint))
        return ds.dataset(parts, format="parquet") if parts else None

    # -- items ------------------------------------------------------------------------
    def add_embeddings(self, hashes: Sequence[str], uris: Sequence[str | None], fingerprint: str,
                       matrix: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or len(matrix) != len(hashes) or len(uris) != len(hashes):
            raise StoreError(f"add_embeddings needs one uri and one embedding row per hash: {len(hashes)} hashes, "
                             f"{len(uris)} uris, embeddings of shape {matrix.shape}")
        if not len(matrix):
            return
        parts = self._parts(self._items_folder(fingerprint))
        if parts:
            stored = pq.read_schema(parts[-1]).field("embedding").type.list_size
            if stored != matrix.shape[1]:
                raise StoreError(f"the store holds {stored}-dimensional embeddings of encoder {fingerprint}; "
                                 f"refusing {matrix.shape[1]}-dimensional ones")
        last = {sha: i for i, sha in enumerate(hashes)}  # one row per item: the last one given wins
        if len(last) < len(hashes):
            keep = sorted(last.values())
            hashes, uris, matrix = [hashes[i] for i in keep], [uris[i] for i in keep], matrix[keep]
        matrix = matrix.astype(self.embedding_dtype, copy=False)
        table = pa.table({
            "sha256": pa.array(hashes, pa.string()), "uri": pa.array(uris, pa.string()),
            "fingerprint": pa.repeat(pa.scalar(fingerprint, pa.string()), len(matrix)),
            "embedding": embedding_column(matrix),
            "embedded_at": pa.repeat(pa.scalar(now(), pa.timestamp("us", tz="UTC")), len(matrix)),
        }, schema=self._item_schema(matrix.shape[1]))
        self._write(self._items_folder(fingerprint), [table])

    def embeddings(self, hashes: Iterable[str], fingerprint: str) -> dict[str, np.ndarray]:
        import pyarrow.dataset as ds

        wanted = list(set(hashes))
        dataset = self._item_dataset(fingerprint)
        if dataset is None or not wanted:
            return {}
        table = dataset.to_table(columns=["sha256", "embedding"], filter=ds.field("sha256").isin(wanted))
        # Parts are read oldest first, so an item two writers stored keeps its newest row here.
        return dict(zip(table["sha256"].to_pylist(), embedding_matrix(table["embedding"])))

    def _item_tables(self, columns: list[str]):
        import pyarrow.dataset as ds

        for folder in sorted((self.path / "items").glob("*")):
            parts = self._parts(folder)
            if parts:
                yield ds.dataset(parts, format="parquet").to_table(columns=columns)

    def fingerprints(self) -> dict[str, int]:
        import pyarrow.compute as pc

        return {table["fingerprint"][0].as_py(): len(pc.unique(table["sha256"]))
                for table in self._item_tables(["sha256", "fingerprint"]) if table.num_rows}

    def _superseded(self, dataset) -> dict[str, object] | None:
        """For items stored more than once (concurrent writers), the newest row's time; None
        when every item is stored once, the usual case, which then costs one column scan."""
        import pyarrow.compute as pc

        table = dataset.to_table(columns=["sha256", "embedded_at"])
        counts = pc.value_counts(table["sha256"])
        repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        if len(repeated) == 0:
            return None
        rows = table.filter(pc.is_in(table["sha256"], repeated))
        newest = rows.group_by("sha256").aggregate([("embedded_at", "max")])
        return dict(zip(newest["sha256"].to_pylist(), newest["embedded_at_max"].to_pylist()))

    def iter_embeddings(self, fingerprint: str, batch_size: int = 65536) -> Iterator[tuple[list[str], np.ndarray]]:
        import pyarrow as pa

        dataset = self._item_dataset(fingerprint)
        if dataset is None:
            return
        newest, done = self._superseded(dataset), set()
        # Read-ahead of one batch and one file keeps memory at about two batches.
        columns = ["sha256", "embedding"] + (["embedded_at"] if newest else [])
        for batch in dataset.to_batches(columns=columns, batch_size=batch_size, batch_readahead=1, fragment_readahead=1):
            if newest:  # an item stored twice is yielded once, as its newest row
                keep = []
                for sha, at in zip(batch.column(0).to_pylist(), batch.column(2).to_pylist()):
                    ok = sha not in newest or (at == newest[sha] and sha not in done)
                    done.update([sha] if ok and sha in newest else [])
                    keep.append(ok)
                batch = batch.filter(pa.array(keep))
            if batch.num_rows:
                yield batch.column(0), embedding_matrix(batch.column(1))

    def uris(self) -> dict[str, dict[str, str | None]]:
        found: dict[str, dict[str, str | None]] = {}
        for table in self._item_tables(["sha256", "uri", "fingerprint"]):
            for sha, uri, fingerprint in zip(*(table[c].to_pylist() for c in ("sha256", "uri", "fingerprint"))):
                found.setdefault(sha, {})[fingerprint] = uri
        return found

    # -- labels -----------------------------------------------------------------------
    def add_labels(self, head: str, batches: Iterable) -> int:
        return self._write(self.path / "labels" / head, batches)

    def labels(self, head: str, version: int | None = None):
        import pyarrow.dataset as ds

        condition = ds.field("version") == version if version is not None else None
        return latest(self._read(self.path / "labels" / head, label_schema(), filter=condition), ["sha256"])

    def label_heads(self) -> list[str]:
        return sorted(p.name for p in (self.path / "labels").glob("*") if self._parts(p))

    # -- corrections ------------------------------------------------------------------
    def add_corrections(self, corrections: Sequence[Correction]) -> None:
        import pyarrow as pa

        if not corrections:
            return
        table = pa.table({
            "sha256": [c.sha256 for c in corrections], "head": [c.head for c in corrections],
            "labels": [list(c.labels) for c in corrections], "by": [c.by for c in corrections],
            "at": [c.at for c in corrections], "note": [c.note for c in corrections],
        }, schema=correction_schema())
        self._write(self.path / "corrections", [table])

    def corrections(self, head: str) -> dict[str, Correction]:
        import pyarrow.dataset as ds

        table = latest(self._read(self.path / "corrections", correction_schema(), filter=ds.field("head") == head),
                       ["sha256"])
        return {row["sha256"]: Correction(row["sha256"], row["head"], tuple(row["labels"]), row["by"], row["at"],
                                          row["note"] or "")
                for row in table.to_pylist()}


def open_store(location: str | Path, *, create: bool = True, embedding_dtype: str = "float32") -> Store:
    """A folder path -> :class:`ParquetStore`; ``postgresql://...`` -> the PostgreSQL store."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        from headmaster.client.store_postgres import PostgresStore

        return PostgresStore(text, create=create, embedding_dtype=embedding_dtype)
    return ParquetStore(Path(location), create=create, embedding_dtype=embedding_dtype)
