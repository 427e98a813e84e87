"""What every store backend answers, and the pieces they share.

The store keeps each image's embedding, the labels heads gave it, and people's corrections.
Embedding is the expensive step; everything after it (new heads, A/B tests, retraining,
corrections) runs on what is stored, on CPU, with no encoder. Backends: a folder of Parquet
files (:mod:`.parquet`, the default) and PostgreSQL (:mod:`.postgres`); :func:`open_store`
picks by location. Rows are appended, never edited: "latest wins" reads give the current
labels and corrections, and the history stays.
"""

from __future__ import annotations

import abc
import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headmaster.errors import StoreError

SCHEMA_VERSION = 1
STORE_FILE = "store.json"
EMBEDDING_DTYPES = ("float32", "float16")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The source of label rows from the version of an A/B test that did not answer: read by version
# (``labels(head, version)``, ``heads compare``), skipped by "the current labels" (no version).
OTHER_ARM = "ab-other"


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

    return pa.schema(
        [
            ("sha256", pa.string()),
            ("fingerprint", pa.string()),
            ("version", pa.int32()),
            ("scores", pa.list_(pa.float32())),
            ("labels", pa.list_(pa.string())),
            ("source", pa.string()),
            ("at", pa.timestamp("us", tz="UTC")),
        ]
    )


def correction_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("sha256", pa.string()),
            ("head", pa.string()),
            ("labels", pa.list_(pa.string())),
            ("by", pa.string()),
            ("at", pa.timestamp("us", tz="UTC")),
            ("note", pa.string()),
        ]
    )


def label_table(
    hashes,
    fingerprint: str,
    version: int,
    scores: np.ndarray,
    label_names: Sequence[str],
    accepted: np.ndarray,
    source: str,
    at: dt.datetime | None = None,
):
    """Label rows as an Arrow table, built column-wise (a million rows take well under a second).
    ``accepted``: [n, L] bool, which labels each row accepted."""
    import pyarrow as pa

    n, width = scores.shape
    score_offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    score_lists = pa.ListArray.from_arrays(score_offsets, pa.array(scores.reshape(-1).astype(np.float32)))
    _, columns = np.nonzero(accepted)
    label_offsets = pa.array(np.concatenate([[0], np.cumsum(accepted.sum(axis=1))]).astype(np.int32))
    label_values = pa.array(list(label_names), pa.string()).take(pa.array(columns, pa.int32()))
    return pa.table(
        {
            "sha256": hashes if isinstance(hashes, pa.Array) else pa.array(hashes, pa.string()),
            "fingerprint": pa.repeat(pa.scalar(fingerprint, pa.string()), n),
            "version": pa.repeat(pa.scalar(version, pa.int32()), n),
            "scores": score_lists,
            "labels": pa.ListArray.from_arrays(label_offsets, label_values),
            "source": pa.repeat(pa.scalar(source, pa.string()), n),
            "at": pa.repeat(pa.scalar(at or now(), pa.timestamp("us", tz="UTC")), n),
        },
        schema=label_schema(),
    )


def classification_tables(results, fingerprint: str, source: str = "classify") -> dict[str, list]:
    """Label tables per head from client Classification results (grouped by head version,
    since a hot swap can land in the middle of a run)."""
    grouped: dict[tuple[str, int, str], list] = {}
    for result in results:
        for name, head in result.heads.items():
            grouped.setdefault((name, head.version, source), []).append((result.sha256, head.scores, head.labels))
            if head.ab:  # the version of an A/B test that did not answer: kept, never the current label
                other = head.ab["other"]
                grouped.setdefault((name, int(other["version"]), OTHER_ARM), []).append(
                    (result.sha256, other["scores"], other["labels"])
                )
    tables: dict[str, list] = {}
    at = now()
    for (name, version, origin), rows in grouped.items():
        names = list(rows[0][1])
        scores = np.array([[row_scores[label] for label in names] for _, row_scores, _ in rows], np.float32)
        accepted = np.array([[label in labels for label in names] for _, _, labels in rows], bool)
        tables.setdefault(name, []).append(
            label_table([sha for sha, _, _ in rows], fingerprint, version, scores, names, accepted, origin, at)
        )
    return tables


def latest(table, keys: Sequence[str], order: str = "at"):
    """The newest row (by ``order``) for each distinct value of ``keys``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    # Ties in time go to the row written last (rows come in the order they were written).
    table = table.append_column("__row", pa.array(np.arange(table.num_rows)))
    ordered = table.take(
        pc.sort_indices(
            table, sort_keys=[(k, "ascending") for k in keys] + [(order, "descending"), ("__row", "descending")]
        )
    ).drop_columns(["__row"])
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
    def add_embeddings(
        self, hashes: Sequence[str], uris: Sequence[str | None], fingerprint: str, matrix: np.ndarray
    ) -> None:
        """Add items embedded by ``fingerprint`` (column-wise, for bulk loads)."""

    def add_items(self, items: Sequence[StoredItem]) -> None:
        by_fingerprint: dict[str, list[StoredItem]] = {}
        for item in items:
            by_fingerprint.setdefault(item.fingerprint, []).append(item)
        for fingerprint, group in by_fingerprint.items():
            self.add_embeddings(
                [i.sha256 for i in group],
                [i.uri for i in group],
                fingerprint,
                np.stack([np.asarray(i.embedding, np.float32) for i in group]),
            )

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

    def hashes(self, fingerprint: str) -> set[str]:
        """The items embedded by ``fingerprint`` (what a backfill skips)."""
        found: set[str] = set()
        for hashes, _ in self.iter_embeddings(fingerprint, 65536):
            found.update(hashes.to_pylist() if hasattr(hashes, "to_pylist") else hashes)
        return found

    @abc.abstractmethod
    def uris(self) -> dict[str, dict[str, str | None]]:
        """sha256 -> {fingerprint: uri} for every stored item."""

    # -- labels -----------------------------------------------------------------------
    @abc.abstractmethod
    def add_labels(self, head: str, batches: Iterable) -> int:
        """Append label tables (:func:`label_schema`) for ``head``, all or nothing; returns rows."""

    @abc.abstractmethod
    def labels(self, head: str, version: int | None = None):
        """The newest label row per item for ``head`` (optionally of one version), an Arrow table.
        Without a version, rows of an A/B test's non-answering version (source OTHER_ARM) are skipped."""

    def labelled(self, head: str, version: int, hashes: Iterable[str] | None = None) -> set[str]:
        """The items (of ``hashes``, or all) that hold a label row of this head version: what a
        redelivered message or a resumed backfill must not label again."""
        stored = set(self.labels(head, version)["sha256"].to_pylist())
        return stored if hashes is None else stored & set(hashes)

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
        where = (
            f"the file {item} was never classified with --store"
            if sha
            else f"{item!r} is neither a stored sha256, a stored URI, nor a readable file"
        )
        raise StoreError(f"unknown item: {where} (store: {self.location})")
