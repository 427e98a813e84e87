"""Blocking client: the asyncio client driven on a private event loop thread.

One implementation of batching, concurrency and failure isolation serves both APIs.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Sequence

import numpy as np

from headmaster.client.aio import AsyncHeadmasterClient, ImageInput, TextInput
from headmaster.client.results import Classification, Embedding, Failure
from headmaster.client.tracing import in_context


class HeadmasterClient:
    """Same methods as :class:`AsyncHeadmasterClient`, blocking.

    >>> with HeadmasterClient("localhost:8000", protocol="http") as client:
    ...     for result in client.classify(["cat.jpg"]):
    ...         print(result.heads["animal"].labels)
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", **options):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="headmaster-client", daemon=True)
        self._thread.start()

        async def create() -> AsyncHeadmasterClient:
            # tritonclient's aio clients bind to the loop they are created in.
            return AsyncHeadmasterClient(url, protocol, **options)

        self._client = self._run(create())

    def _run(self, coroutine):
        # The caller's context (its current trace span) goes along to the loop thread.
        return asyncio.run_coroutine_threadsafe(in_context(coroutine, contextvars.copy_context()), self._loop).result()

    @property
    def url(self) -> str:
        return self._client.url

    def is_ready(self) -> bool:
        return self._run(self._client.is_ready())

    def classifies_text(self) -> bool:
        return self._run(self._client.classifies_text())

    def classify(
        self, images: Sequence[ImageInput], progress: Callable[[int], None] | None = None
    ) -> list[Classification | Failure]:
        return self._run(self._client.classify(images, progress))

    def classify_embeddings(
        self, embeddings: np.ndarray, sources: Sequence[str | None], hashes: Sequence[str]
    ) -> list[Classification]:
        return self._run(self._client.classify_embeddings(embeddings, sources, hashes))

    def classify_one(self, image: ImageInput) -> Classification:
        return self._run(self._client.classify_one(image))

    def embed(
        self, images: Sequence[ImageInput], progress: Callable[[int], None] | None = None
    ) -> list[Embedding | Failure]:
        return self._run(self._client.embed(images, progress))

    def encoder_fingerprint(self) -> str:
        return self._run(self._client.encoder_fingerprint())

    def classify_text(
        self, texts: Sequence[TextInput], progress: Callable[[int], None] | None = None
    ) -> list[Classification | Failure]:
        return self._run(self._client.classify_text(texts, progress))

    def embed_texts(
        self, texts: Sequence[TextInput], progress: Callable[[int], None] | None = None
    ) -> list[Embedding | Failure]:
        return self._run(self._client.embed_texts(texts, progress))

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        return self._run(self._client.embed_text(texts))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> HeadmasterClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
