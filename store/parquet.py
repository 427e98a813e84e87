"""The store as a folder of Parquet files, the default backend.

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

import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from headmaster.errors import StoreError
from headmaster.store.base import (
    EMBEDDING_DTYPES,
    OTHER_ARM,
    SCHEMA_VERSION,
    STORE_FILE,
    Correction,
    Store,
    correction_schema,
    embedding_column,
    embedding_matrix,
    label_schema,
    latest,
    now,
)


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
                raise StoreError(
                    f"{self.path}: store schema {meta.get('schema')!r} is not supported "
                    f"(this Headmaster reads schema {SCHEMA_VERSION})"
                )
        elif not create:
            raise StoreError(
                f"{self.path} is not a Headmaster store (no {STORE_FILE}); "
                "`headmaster classify ... --store PATH` creates one"
            )
        elif self.path.exists() and any(self.path.iterdir()):
            raise StoreError(f"{self.path} exists and is not a Headmaster store; choose an empty or new folder")
        else:
            if embedding_dtype not in EMBEDDING_DTYPES:
                raise StoreError(f"embedding dtype must be one of {EMBEDDING_DTYPES}, not {embedding_dtype!r}")
            meta = {
                "format": "headmaster-store",
                "schema": SCHEMA_VERSION,
                "embedding_dtype": embedding_dtype,
                "created": now().isoformat(timespec="seconds"),
            }
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
                    repeated = [
                        n for n in ("fingerprint", "source", "head", "by", "version") if n in table.schema.names
                    ]
                    writer = pq.ParquetWriter(
                        tmp,
                        table.schema,
                        use_dictionary=repeated,
                        compression={
                            n: "none" if n in ("embedding", "scores") else "snappy" for n in table.schema.names
                        },
                    )
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
        return pa.schema(
            [
                ("sha256", pa.string()),
                ("uri", pa.string()),
                ("fingerprint", pa.string()),
                ("embedding", pa.list_(value, dim)),
                ("embedded_at", pa.timestamp("us", tz="UTC")),
            ]
        )

    def _item_dataset(self, fingerprint: str):
        import pyarrow.dataset as ds

        parts = self._parts(self._items_folder(fingerprint))
        return ds.dataset(parts, format="parquet") if parts else None

    # -- items ------------------------------------------------------------------------
    def add_embeddings(
        self, hashes: Sequence[str], uris: Sequence[str | None], fingerprint: str, matrix: np.ndarray
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or len(matrix) != len(hashes) or len(uris) != len(hashes):
            raise StoreError(
                f"add_embeddings needs one uri and one embedding row per hash: {len(hashes)} hashes, "
                f"{len(uris)} uris, embeddings of shape {matrix.shape}"
            )
        if not len(matrix):
            return
        parts = self._parts(self._items_folder(fingerprint))
        if parts:
            stored = pq.read_schema(parts[-1]).field("embedding").type.list_size
            if stored != matrix.shape[1]:
                raise StoreError(
                    f"the store holds {stored}-dimensional embeddings of encoder {fingerprint}; "
                    f"refusing {matrix.shape[1]}-dimensional ones"
                )
        last = {sha: i for i, sha in enumerate(hashes)}  # one row per item: the last one given wins
        if len(last) < len(hashes):
            keep = sorted(last.values())
            hashes, uris, matrix = [hashes[i] for i in keep], [uris[i] for i in keep], matrix[keep]
        matrix = matrix.astype(self.embedding_dtype, copy=False)
        table = pa.table(
            {
                "sha256": pa.array(hashes, pa.string()),
                "uri": pa.array(uris, pa.string()),
                "fingerprint": pa.repeat(pa.scalar(fingerprint, pa.string()), len(matrix)),
                "embedding": embedding_column(matrix),
                "embedded_at": pa.repeat(pa.scalar(now(), pa.timestamp("us", tz="UTC")), len(matrix)),
            },
            schema=self._item_schema(matrix.shape[1]),
        )
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

        return {
            table["fingerprint"][0].as_py(): len(pc.unique(table["sha256"]))
            for table in self._item_tables(["sha256", "fingerprint"])
            if table.num_rows
        }

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
        for batch in dataset.to_batches(
            columns=columns, batch_size=batch_size, batch_readahead=1, fragment_readahead=1
        ):
            if newest:  # an item stored twice is yielded once, as its newest row
                keep = []
                for sha, at in zip(batch.column(0).to_pylist(), batch.column(2).to_pylist()):
                    ok = sha not in newest or (at == newest[sha] and sha not in done)
                    done.update([sha] if ok and sha in newest else [])
                    keep.append(ok)
                batch = batch.filter(pa.array(keep))
            if batch.num_rows:
                yield batch.column(0), embedding_matrix(batch.column(1))

    def hashes(self, fingerprint: str) -> set[str]:
        dataset = self._item_dataset(fingerprint)
        return set() if dataset is None else set(dataset.to_table(columns=["sha256"])["sha256"].to_pylist())

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

        condition = ds.field("version") == version if version is not None else ds.field("source") != OTHER_ARM
        return latest(self._read(self.path / "labels" / head, label_schema(), filter=condition), ["sha256"])

    def labelled(self, head: str, version: int, hashes: Iterable[str] | None = None) -> set[str]:
        import pyarrow.dataset as ds

        parts = self._parts(self.path / "labels" / head)
        if not parts:
            return set()
        condition = ds.field("version") == version
        if hashes is not None:
            condition &= ds.field("sha256").isin(list(set(hashes)))
        table = ds.dataset(parts, format="parquet", schema=label_schema()).to_table(
            columns=["sha256"], filter=condition
        )
        return set(table["sha256"].to_pylist())

    def label_heads(self) -> list[str]:
        return sorted(p.name for p in (self.path / "labels").glob("*") if self._parts(p))

    # -- corrections ------------------------------------------------------------------
    def add_corrections(self, corrections: Sequence[Correction]) -> None:
        import pyarrow as pa

        if not corrections:
            return
        table = pa.table(
            {
                "sha256": [c.sha256 for c in corrections],
                "head": [c.head for c in corrections],
                "labels": [list(c.labels) for c in corrections],
                "by": [c.by for c in corrections],
                "at": [c.at for c in corrections],
                "note": [c.note for c in corrections],
            },
            schema=correction_schema(),
        )
        self._write(self.path / "corrections", [table])

    def corrections(self, head: str) -> dict[str, Correction]:
        import pyarrow.dataset as ds

        table = latest(
            self._read(self.path / "corrections", correction_schema(), filter=ds.field("head") == head), ["sha256"]
        )
        return {
            row["sha256"]: Correction(
                row["sha256"], row["head"], tuple(row["labels"]), row["by"], row["at"], row["note"] or ""
            )
            for row in table.to_pylist()
        }
