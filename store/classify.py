"""Classify into a store: each image is embedded once per encoder, its labels recorded each time.

An image whose bytes the store already holds, embedded by the encoder the server runs now,
is not sent through the encoder again: its stored embedding goes to ``classify_embedding``
(heads + thresholds only). Nor is a second copy of an image in the same run (the same bytes
under another name): it gets the first copy's answer. Each file is read once, in a thread
pool: its bytes are hashed to look the item up, and the same bytes go to the server.
Results are written chunk by chunk, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headmaster.client.results import Classification, Failure
from headmaster.store.base import Store, StoredItem


@dataclass
class StoreStats:
    embedded: int = 0  # new items: sent through the encoder once each
    reused: int = 0  # classified without the encoder: a stored embedding, or another copy in this run
    failed: int = 0


def _read(path: Path) -> tuple[bytes, str] | Failure:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Failure(str(path), f"cannot read file: {e.strerror or e}")
    return data, hashlib.sha256(data).hexdigest()


def classify_into_store(
    client, store: Store, files: Sequence[Path], progress: Callable[[int], None] | None = None, chunk: int = 256
) -> tuple[list[Classification | Failure], StoreStats]:
    """``client`` is a :class:`HeadmasterClient`; returns one result per file, in order. Against a
    text encoder's server (``classify`` reads TEXT) each file's bytes are one text (a .txt file):
    the item's sha256 is the text's."""
    fingerprint = client.encoder_fingerprint()
    send = client.classify_text if client.classifies_text() else client.classify
    stats = StoreStats()
    results: list[Classification | Failure] = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(files), chunk):
            part = list(files[start : start + chunk])
            out: list[Classification | Failure | None] = [None] * len(part)
            read = list(pool.map(_read, part))
            hashes: list[str | None] = [None] * len(part)
            for i, got in enumerate(read):
                if isinstance(got, Failure):
                    out[i] = got
                else:
                    hashes[i] = got[1]
            known = store.embeddings({h for h in hashes if h}, fingerprint)
            first: dict[str, int] = {}  # sha256 -> the first file in this chunk with those bytes
            for i, sha in enumerate(hashes):
                if sha is not None:
                    first.setdefault(sha, i)
            fresh = [i for sha, i in first.items() if sha not in known]
            reused = [i for sha, i in first.items() if sha in known]
            if fresh:
                answers = send([read[i][0] for i in fresh], progress)
                for i, answer in zip(fresh, answers):  # sent as bytes: the answer names no file yet
                    out[i] = dataclasses.replace(answer, source=str(part[i]))
            if reused:
                vectors = np.stack([known[hashes[i]] for i in reused])
                for i, answer in zip(
                    reused,
                    client.classify_embeddings(vectors, [str(part[i]) for i in reused], [hashes[i] for i in reused]),
                ):
                    out[i] = answer
            copies = [i for i, sha in enumerate(hashes) if sha is not None and first[sha] != i]
            for i in copies:
                out[i] = dataclasses.replace(out[first[hashes[i]]], source=str(part[i]))
            if progress:
                progress(len(reused) + len(copies) + sum(h is None for h in hashes))
            new_items = [
                StoredItem(out[i].sha256, str(Path(part[i]).resolve()), fingerprint, out[i].embedding)
                for i in fresh
                if out[i].ok
            ]
            store.add_items(new_items)
            # Labels once per item, from the first copy (the others got the same answer).
            store.add_classifications([out[i] for i in first.values() if out[i].ok], fingerprint)
            stats.embedded += len(new_items)
            stats.reused += sum(
                1 for i, sha in enumerate(hashes) if sha is not None and out[i].ok and (sha in known or first[sha] != i)
            )
            stats.failed += sum(not r.ok for r in out)
            results += out
    return results, stats
