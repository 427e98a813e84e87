"""Re-embed a store for a new encoder: stored embeddings of the old one are never reused.

Every item that lacks an embedding of the target encoder is read again from its source URI,
checked against its sha256 (a file that changed is another image now), embedded, and
stored under the new fingerprint. Items whose sources are gone or changed are reported; the
old embeddings stay, under their own fingerprint, where no head of the new encoder reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from headmaster.store.base import Store, file_sha256


@dataclass
class ReembedResult:
    fingerprint: str
    reembedded: int = 0
    already: int = 0  # items that had an embedding of this encoder
    unreachable: list[tuple[str, str]] = field(default_factory=list)  # (sha256, why)


def reembed(store: Store, embedder, chunk: int = 256, progress: Callable[[int], None] | None = None) -> ReembedResult:
    """``embedder``: a LocalEmbedder or ServerEmbedder (paths -> embeddings or error strings)."""
    fingerprint = embedder.fingerprint
    result = ReembedResult(fingerprint)
    todo: list[tuple[str, Path]] = []
    for sha, by_encoder in store.uris().items():
        if fingerprint in by_encoder:
            result.already += 1
            continue
        sources = [Path(uri) for uri in by_encoder.values() if uri]
        found = next((p for p in sources if p.is_file() and file_sha256(p) == sha), None)
        if found is not None:
            todo.append((sha, found))
        elif any(p.is_file() for p in sources):
            result.unreachable.append((sha, f"{sources[0]} now holds other bytes (the image changed)"))
        else:
            result.unreachable.append((sha, f"source gone: {', '.join(map(str, sources)) or 'no URI stored'}"))
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        vectors = embedder([path for _, path in part], progress)
        good = [(sha, path, v) for (sha, path), v in zip(part, vectors) if not isinstance(v, str)]
        result.unreachable += [(sha, f"{path}: {v}") for (sha, path), v in zip(part, vectors) if isinstance(v, str)]
        if good:
            import numpy as np

            store.add_embeddings(
                [s for s, _, _ in good], [str(p) for _, p, _ in good], fingerprint, np.stack([v for _, _, v in good])
            )
            result.reembedded += len(good)
    return result
