"""Caches by content for the served models: least recently used out first, within a byte bound,
and their counters and gauges on Triton's metrics port.

One class for both caches of the image path: preprocess keeps decoded pixels by the sha256 of an
image's bytes as received (a repeated image skips decode and resize), the image encoder keeps
embeddings by the sha256 of the pixels it was given (a repeated image skips the encoder). Keys
are always content, never a name or a URL, so an entry is only ever returned for exactly the
bytes it was made from. Each cache lives in its model's instance: a model that is reloaded
(rebuilt, re-exported) starts empty, so it never answers with what an older build made.

Copied beside preprocess's and the runner's ``model.py`` as ``headmaster_cache.py``
(repository/layout.py, ``copy_backend``): numpy and hashlib only, nothing of Headmaster.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

ENTRY_OVERHEAD = 256  # bytes per entry beyond its arrays: the key, the dict slot, the array headers

# The series of each cache: <prefix>_hits_total, _misses_total, _entries, _bytes, labelled by model.
EMBEDDING_PREFIX = "headmaster_embedding_cache"  # the image encoder's (served/runtime.py)
DECODED_PREFIX = "headmaster_decoded_cache"  # preprocess's (served/preprocess.py)
CACHE_HITS_METRIC = f"{EMBEDDING_PREFIX}_hits_total"
CACHE_MISSES_METRIC = f"{EMBEDDING_PREFIX}_misses_total"
CACHE_ENTRIES_METRIC = f"{EMBEDDING_PREFIX}_entries"
CACHE_BYTES_METRIC = f"{EMBEDDING_PREFIX}_bytes"
DECODED_HITS_METRIC = f"{DECODED_PREFIX}_hits_total"
DECODED_MISSES_METRIC = f"{DECODED_PREFIX}_misses_total"
DECODED_ENTRIES_METRIC = f"{DECODED_PREFIX}_entries"
DECODED_BYTES_METRIC = f"{DECODED_PREFIX}_bytes"


class ContentCache:
    """Tuples of arrays by a content key (``key`` of an array, ``key_of_bytes`` of encoded bytes),
    least recently used evicted past ``max_bytes``. Not locked: each model touches its cache from
    the thread that runs ``execute`` only."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, tuple[np.ndarray, ...]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def key(row: np.ndarray) -> bytes:
        """An array's key: the sha256 of its bytes, with its dtype and shape (the same bytes as
        another shape are other pixels)."""
        return hashlib.sha256(np.ascontiguousarray(row).data).digest() + str((row.dtype, row.shape)).encode()

    @staticmethod
    def key_of_bytes(data: bytes) -> bytes:
        return hashlib.sha256(data).digest()

    @staticmethod
    def size(rows: tuple[np.ndarray, ...]) -> int:
        return sum(r.nbytes for r in rows) + ENTRY_OVERHEAD

    def get(self, key: bytes):
        rows = self.entries.get(key)
        if rows is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return rows

    def lookup(self, keys: list[bytes], make) -> tuple[list, int]:
        """The entry of each key: held ones from the cache, the others from ``make(missing)``
        (the indices of the keys the cache lacks -> their entries, in that order), which are kept;
        a made entry that is not a tuple of arrays (an exception: a refused image) is handed back
        but never kept. Returns the entries and how many were made."""
        found = [self.get(key) for key in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            for i, entry in zip(missing, make(missing)):
                found[i] = entry
                if isinstance(entry, tuple):
                    self.put(keys[i], entry)
        return found, len(missing)

    def put(self, key: bytes, rows: tuple[np.ndarray, ...]) -> None:
        size = self.size(rows)
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = tuple(np.array(r, copy=True) for r in rows)  # not a view of a batch
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= self.size(evicted)


class CacheMetrics:
    """A cache's counters and gauges on Triton's metrics port (``prefix``: whose series), labelled
    by model; ``held``: what one entry is, for the descriptions."""

    def __init__(self, pb_utils, model: str, prefix: str = EMBEDDING_PREFIX, held: str = "embeddings"):
        labels = {"model": model}
        self.names = {
            "hits": f"{prefix}_hits_total",
            "misses": f"{prefix}_misses_total",
            "entries": f"{prefix}_entries",
            "bytes": f"{prefix}_bytes",
        }
        kinds = {
            "hits": ("COUNTER", f"images whose {held} came from the model's cache"),
            "misses": ("COUNTER", f"images whose {held} the model made because its cache did not hold them"),
            "entries": ("GAUGE", f"{held} held in the model's cache"),
            "bytes": ("GAUGE", f"bytes held in the model's cache of {held} (its bound is the cache_bytes parameter)"),
        }
        # The families are kept: one that is garbage-collected is removed from the server.
        self.families = {
            what: pb_utils.MetricFamily(
                name=self.names[what], description=description, kind=getattr(pb_utils.MetricFamily, kind)
            )
            for what, (kind, description) in kinds.items()
        }
        self.metrics = {what: family.Metric(labels=labels) for what, family in self.families.items()}

    def record(self, hits: int, misses: int, cache: ContentCache) -> None:
        if hits:
            self.metrics["hits"].increment(hits)
        if misses:
            self.metrics["misses"].increment(misses)
        self.metrics["entries"].set(len(cache.entries))
        self.metrics["bytes"].set(cache.bytes)


def open_cache(pb_utils, config: dict, max_bytes: int, prefix: str, held: str):
    """A served model's cache (None when ``max_bytes`` is 0) and its metrics, labelled by the
    model's name from its ``config`` (None where this Triton has no custom metrics: the cache
    still works)."""
    if max_bytes <= 0:
        return None, None
    store = ContentCache(max_bytes)
    try:
        return store, CacheMetrics(pb_utils, config["name"], prefix, held)
    except Exception as e:  # noqa: BLE001 - no metrics (an old Triton)
        pb_utils.Logger.log_warn(f"headmaster {prefix} metrics: {type(e).__name__}: {e}")
        return store, None
