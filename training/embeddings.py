"""Embeddings for training: computed once per image content and encoder, then cached.

Two ways to embed, same numbers: through a running server (the ``embed`` ensemble), or
locally with the repository's own exported encoder and the very preprocess code the server
runs. The cache is a folder of Parquet files per encoder fingerprint, keyed by the sha256 of
each image's bytes, so a retrain (or a renamed or copied file) never re-embeds, and
embeddings of different encoders can never meet.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from headmaster.errors import UnsupportedHereError
from headmaster.export.card import require_same_encoder
from headmaster.repository.layout import encoder_artifact
from headmaster.repository.repo import Repository
from headmaster.repository.topology import text_only
from headmaster.store.base import embedding_column, embedding_matrix, file_sha256

LOG = logging.getLogger(__name__)
Progress = Callable[[int], None] | None


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "headmaster" / "embeddings"


class EmbeddingCache:
    """sha256 of image bytes -> embedding, for one encoder fingerprint."""

    def __init__(self, root: Path, fingerprint: str):
        self.fingerprint = fingerprint
        self.folder = Path(root) / fingerprint.split(":")[-1]

    def load(self) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        found: dict[str, np.ndarray] = {}
        for shard in sorted(self.folder.glob("*.parquet")):
            table = pq.read_table(shard)
            stored = (table.schema.metadata or {}).get(b"fingerprint", b"").decode()
            require_same_encoder(self.fingerprint, stored, f"cached embeddings in {shard}")
            found.update(zip(table.column("sha256").to_pylist(), embedding_matrix(table.column("embedding"))))
        return found

    def add(self, embeddings: dict[str, np.ndarray]) -> None:
        if not embeddings:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        matrix = np.stack(list(embeddings.values())).astype(np.float32)
        table = pa.table(
            {"sha256": list(embeddings), "embedding": embedding_column(matrix)},
            metadata={"fingerprint": self.fingerprint},
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{time.time_ns()}-{os.getpid()}.parquet"
        tmp = final.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.rename(final)  # readers never see half a shard


class LocalEmbedder:
    """The repository's image encoder, run here with onnxruntime / TorchScript."""

    def __init__(self, repo: Repository, batch_size: int = 32):
        from headmaster.served.runtime import load_runner

        self.fingerprint = repo.fingerprint
        self.preprocessing = repo.card.preprocessing
        self.spec = repo.card.towers["image"]
        if self.spec.format == "plan":
            raise UnsupportedHereError(
                "the image encoder is a TensorRT plan, which runs only in Triton on its GPU: "
                "embed through the server with --server HOST:PORT"
            )
        path = encoder_artifact(repo.path, "image", self.spec.format)
        self.runner = load_runner(str(path), device="auto", optimization=self.spec.graph_optimization)
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)

    def _pixels(self, path: Path):
        from headmaster.served.preprocess import InvalidImage, preprocess_bytes

        try:
            return preprocess_bytes(path.read_bytes(), self.preprocessing)
        except InvalidImage as e:
            return str(e)
        except OSError as e:
            return f"cannot read file: {e.strerror or e}"

    def __call__(self, paths: list[Path], progress: Progress = None) -> list[np.ndarray | str]:
        results: list[np.ndarray | str] = []
        for start in range(0, len(paths), self.batch_size):
            pixels = list(self.pool.map(self._pixels, paths[start : start + self.batch_size]))
            good = [p for p in pixels if not isinstance(p, str)]
            vectors = (
                iter(self.runner({self.spec.input_name: np.stack(good)}, [self.spec.output_name])[0])
                if good
                else iter(())
            )
            results += [p if isinstance(p, str) else next(vectors) for p in pixels]
            if progress:
                progress(len(pixels))
        return results


def _read_texts(paths: list[Path]) -> list[str]:
    """Each .txt file's text, or why it is refused (as the served tokenize model refuses it)."""
    from headmaster.served.tokenize import InvalidText, decode_texts

    found: list[str] = []
    for path in paths:
        try:
            found.append(decode_texts([path.read_bytes()])[0])
        except InvalidText as e:
            found.append(_Refused(str(e).removeprefix("TEXT[0]: ")))
        except OSError as e:
            found.append(_Refused(f"cannot read file: {e.strerror or e}"))
    return found


class _Refused(str):
    """Why a text file is not embedded (not the text itself)."""


class LocalTextEmbedder:
    """A text encoder's repository (st:FOLDER): the served tokenizer and text tower, run here."""

    def __init__(self, repo: Repository, batch_size: int = 32):
        from headmaster.served.runtime import load_runner
        from headmaster.served.tokenize import TOKENIZER_DIR, folder_tokenizer

        card = repo.card
        self.fingerprint = repo.fingerprint
        self.spec = card.towers["text"]
        self.tokens = folder_tokenizer(
            repo.path / "tokenize" / "1" / TOKENIZER_DIR, card.context_length, card.tokenizer["pad_id"], card.tokenizer
        )
        path = encoder_artifact(repo.path, "text", self.spec.format)
        self.runner = load_runner(str(path), device="auto", optimization=self.spec.graph_optimization)
        self.batch_size = batch_size

    def __call__(self, paths: list[Path], progress: Progress = None) -> list[np.ndarray | str]:
        results: list[np.ndarray | str] = []
        for start in range(0, len(paths), self.batch_size):
            texts = _read_texts(paths[start : start + self.batch_size])
            good = [t for t in texts if not isinstance(t, _Refused)]
            vectors = (
                iter(self.runner({self.spec.input_name: self.tokens(good)}, [self.spec.output_name])[0])
                if good
                else iter(())
            )
            results += [str(t) if isinstance(t, _Refused) else next(vectors) for t in texts]
            if progress:
                progress(len(texts))
        return results


class ServerEmbedder:
    """The ``embed`` ensemble of a running server, after checking it runs the same encoder."""

    def __init__(self, repo: Repository, url: str, protocol: str = "http"):
        from headmaster.client import HeadmasterClient

        self.fingerprint = repo.fingerprint
        self.url, self.protocol = url, protocol
        self.text = text_only(repo.card)
        with HeadmasterClient(url, protocol) as client:
            require_same_encoder(repo.fingerprint, client.encoder_fingerprint(), f"the server at {url}")

    def __call__(self, paths: list[Path], progress: Progress = None) -> list[np.ndarray | str]:
        from headmaster.client import HeadmasterClient

        with HeadmasterClient(self.url, self.protocol, batch_size=16, max_in_flight=4) as client:
            if self.text:  # the files' bytes as TEXT; the server refuses what the local path refuses
                found = [
                    r.embedding if r.ok else r.error
                    for r in client.embed_texts([p.read_bytes() if p.is_file() else b"" for p in paths], progress)
                ]
                return [f"cannot read file: {p}" if not p.is_file() else r for p, r in zip(paths, found)]
            return [r.embedding if r.ok else r.error for r in client.embed(paths, progress)]


def embedder_for(repo: Repository, server: str | None):
    """Through the server at ``server`` (HTTP host:port) when given, else here; of several
    replicas (``a,b,c``) the first embeds."""
    if server:
        return ServerEmbedder(repo, server.split(",")[0].strip())
    return LocalTextEmbedder(repo) if text_only(repo.card) else LocalEmbedder(repo)


def embed_files(
    paths: list[Path], embedder, cache: EmbeddingCache | None, progress: Progress = None
) -> tuple[list[str | None], dict[str, np.ndarray], dict[str, str]]:
    """Embed what the cache lacks. Returns each path's sha256 (None if unreadable), the
    embeddings by sha256, and the failures by path."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        hashes = list(pool.map(file_sha256, paths))
    known = cache.load() if cache else {}
    todo: dict[str, Path] = {}
    for path, sha in zip(paths, hashes):
        if sha is not None and sha not in known and sha not in todo:
            todo[sha] = path
    if progress:
        progress(len(paths) - len(todo))  # cached and unreadable ones are done already
    LOG.info("%d images, %d cached, %d to embed", len(paths), len(paths) - len(todo), len(todo))
    fresh: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}  # by sha256: every copy of an unreadable image is reported
    if todo:
        for sha, result in zip(todo, embedder(list(todo.values()), progress)):
            if isinstance(result, str):
                failed[sha] = result
            else:
                fresh[sha] = np.asarray(result, np.float32)
        if cache:
            cache.add(fresh)
    known.update(fresh)
    failures = {
        str(p): "cannot read file" if h is None else failed[h]
        for p, h in zip(paths, hashes)
        if h is None or h in failed
    }
    return hashes, known, failures


def embed_paths(
    paths: list[Path],
    repo: Repository,
    server: str | None,
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
):
    """``embed_files`` for training: the repository's encoder here (or through ``server``), the
    embedding cache, and ``progress(done, total)``."""
    embedder = embedder_for(repo, server)
    cache = EmbeddingCache(cache_dir or default_cache_dir(), repo.fingerprint)
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], len(paths))

    return embed_files(paths, embedder, cache, advance)
