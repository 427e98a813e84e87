"""The store: embed once, then work on CPU (see :mod:`.base` for what every backend answers).

``open_store(location)`` opens a Parquet folder (:mod:`.parquet`) or, for a ``postgresql://``
DSN, a PostgreSQL store (:mod:`.postgres`, the ``[postgres]`` extra).
"""

from __future__ import annotations

from pathlib import Path

from headmaster.errors import StoreError
from headmaster.store.base import Correction, Store, StoredItem
from headmaster.store.parquet import ParquetStore

__all__ = ["Correction", "ParquetStore", "Store", "StoreError", "StoredItem", "open_store"]


def open_store(location: str | Path, *, create: bool = True, embedding_dtype: str = "float32") -> Store:
    """A folder path -> :class:`ParquetStore`; ``postgresql://...`` -> the PostgreSQL store."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        from headmaster.store.postgres import PostgresStore

        return PostgresStore(text, create=create, embedding_dtype=embedding_dtype)
    return ParquetStore(Path(location), create=create, embedding_dtype=embedding_dtype)
