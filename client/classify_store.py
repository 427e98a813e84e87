"""Classify into a store: each image is embedded once per encoder, its labels recorded each time.

An image whose bytes the store already holds, embedded by the encoder the server runs now,
is not sent through the encoder again: its stored embedding goes to ``classify_embedding``
(heads + thresholds only). Results are written chunk by chunk, so an interrupted run keeps
what it finished.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headmaster.client.results import Classification, Failure
from headmaster.client.store import Store, StoredItem, file_sha256


@dataclass
class StoreStats:
    embedded: int = 0  # sent through the encoder
    reused: int = 0  # classified from a stored embedding
    failed: int = 0


def classify_into_store(client, store: Store, files: Sequence[Path], progress: Callable[[int], None] | None = None,
                        chunk: int = 256) -> tuple[list[Classification | Failure], StoreStats]:
    """``client`` is a :class:`HeadmasterClient`; returns one result per file, in order."""
    fingerprint = client.encoder_fingerprint()
    stats = StoreStats()
    results: list[Classification | Failure] = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(files), chunk):
            part = list(files[start:start + chunk])
            hashes = list(pool.map(file_sha256, part))
            known = store.embeddings([h for h in hashes if h], fingerprint)
            out: list[Classification | Failure | None] = [None] * len(part)
            fresh = [i for i, sha in enumerate(hashes) if sha not in known]
            reused = [i for i, sha in enumerate(hashes) if sha in known]
            for i, result in zip(fresh, client.classify([part[i] for i in fresh], progress)):
                out[i] = result
            if reused:
                vectors = np.stack([known[hashes[i]] for i in reused])
                for i, result in zip(reused, client.classify_embeddings(vectors, [str(part[i]) for i in reused],
                                                                        [hashes[i] for i in reused])):
                    out[i] = result
                if progress:
                    progress(len(reused))
            new_items = list({r.sha256: StoredItem(r.sha256, str(Path(r.source).resolve()) if r.source else None,
                                                   fingerprint, r.embedding)
                              for r in (out[i] for i in fresh) if r.ok}.values())  # a copy is one item
            store.add_items(new_items)
            store.add_classifications([r for r in out if r.ok], fingerprint)
            stats.embedded += len(new_items)
            stats.reused += len(reused)
            stats.failed += sum(not r.ok for r in out)
            results += out
    return results, stats
