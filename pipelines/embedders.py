"""Embedding image bytes, through a server's ``embed`` model or here with the repository's
exported encoder (the same preprocess code the server runs): what backfill actors and embed
workers call. Both answer one embedding or one error message per image, in order."""

from __future__ import annotations

import numpy as np

from headmaster.export.card import require_same_encoder
from headmaster.repository.repo import Repository


class LocalBytesEmbedder:
    def __init__(self, repo: Repository, batch_size: int = 32):
        from headmaster.training.embeddings import LocalEmbedder

        self.local = LocalEmbedder(repo, batch_size)
        self.fingerprint = repo.fingerprint

    def pixels(self, data: bytes) -> np.ndarray | str:
        """Decode and preprocess as the server does; a message when the bytes are not a usable image."""
        from headmaster.served.preprocess import InvalidImage, preprocess_bytes

        try:
            return preprocess_bytes(data, self.local.preprocessing)
        except InvalidImage as e:
            return str(e)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        spec = self.local.spec
        out = []
        for start in range(0, len(pixels), self.local.batch_size):
            out.append(
                self.local.runner({spec.input_name: pixels[start : start + self.local.batch_size]}, [spec.output_name])[
                    0
                ]
            )
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def __call__(self, images: list[bytes]) -> list[np.ndarray | str]:
        pixels = list(self.local.pool.map(self.pixels, images))
        good = [p for p in pixels if not isinstance(p, str)]
        vectors = iter(self.embed_pixels(np.stack(good))) if good else iter(())
        return [p if isinstance(p, str) else next(vectors) for p in pixels]


class ServerBytesEmbedder:
    """The ``embed`` model of a running server, after checking it serves the repository's encoder."""

    def __init__(self, repo: Repository, url: str, protocol: str = "grpc", batch_size: int = 16):
        from headmaster.client import HeadmasterClient

        self.fingerprint = repo.fingerprint
        self.client = HeadmasterClient(url, protocol, batch_size=batch_size, max_in_flight=4)
        require_same_encoder(repo.fingerprint, self.client.encoder_fingerprint(), f"the server at {url}")

    def __call__(self, images: list[bytes]) -> list[np.ndarray | str]:
        return [r.embedding if r.ok else r.error for r in self.client.embed(images)] if images else []

    def close(self) -> None:
        self.client.close()


def bytes_embedder(repo: Repository, server: str | None, protocol: str = "grpc"):
    return ServerBytesEmbedder(repo, server, protocol) if server else LocalBytesEmbedder(repo)
