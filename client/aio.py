"""asyncio client for the Headmaster ensembles, over gRPC or HTTP (tritonclient's aio clients).

Images go out in requests of ``batch_size``, at most ``max_in_flight`` at a time; Triton's
dynamic batcher merges concurrent requests on the server. When the server refuses a
request as invalid (a corrupt image), its images are re-sent one by one, so exactly the
bad ones come back as :class:`Failure` and the rest as :class:`Classification`.
On the server's own host, ``shared_memory="system"`` (or ``"cuda"``) passes images and
embeddings through shared memory instead of the socket (client/shared_memory.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headmaster.client.errors import (
    ClientError,
    InvalidInputError,
    ModelNotFoundError,
    RequestTimeoutError,
    ServerSideError,
    ServerUnavailableError,
)
from headmaster.client.results import Classification, Embedding, Failure
from headmaster.client.shared_memory import RegionPool, serialize_bytes
from headmaster.client.tracing import trace_headers

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
ImageInput = bytes | str | Path
TextInput = str | bytes  # a str is sent as UTF-8; bytes go as they are (the server checks they are UTF-8)

_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']+', ")


class _Abandoned(Exception):
    """A request not sent because another one of the same call failed."""


class _Gate:
    """At most ``n`` requests in flight; once one fails, those still waiting are not sent."""

    def __init__(self, n: int):
        self._slots = asyncio.Semaphore(n)
        self.failed = False

    async def __aenter__(self) -> None:
        await self._slots.acquire()
        if self.failed:
            self._slots.release()
            raise _Abandoned

    async def __aexit__(self, kind, error, traceback) -> None:
        self._slots.release()
        if kind is not None:
            self.failed = True


async def _gather(*coroutines) -> list:
    """asyncio.gather that waits for every request of the call before raising the first failure.
    gather alone would leave the others running, to fail later on a closed channel, unheard
    ("Task exception was never retrieved"); cancelling them instead would drop in-flight gRPC
    calls, which is what crashes Triton 2.51 (README, "A crashed server is restarted"). With a
    :class:`_Gate` the wait is short: requests not yet sent are abandoned."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, _Abandoned):
            raise result
    return results


def _translate(error: Exception, model: str) -> ClientError:
    """tritonclient's InferenceServerException (or a transport error) -> the client's family."""
    from tritonclient.utils import InferenceServerException

    if not isinstance(error, InferenceServerException):
        if isinstance(error, asyncio.TimeoutError):
            return RequestTimeoutError(f"no answer from the server within the timeout ({error})")
        return ServerUnavailableError(f"cannot reach the Triton server: {type(error).__name__}: {error}")
    status = str(error.status() or "")
    message = _ENSEMBLE_PREFIX.sub("", error.message() or str(error))
    if status in ("400", "StatusCode.INVALID_ARGUMENT"):
        return InvalidInputError(message)
    if "DEADLINE_EXCEEDED" in status or "Deadline" in message or "timed out" in message.lower():
        return RequestTimeoutError(message)
    if "UNAVAILABLE" in status or "failed to connect" in message.lower() or "connection refused" in message.lower():
        return ServerUnavailableError(f"cannot reach the Triton server: {message}")
    if (
        "unknown model" in message.lower()
        or "is not ready" in message.lower()
        or status in ("404", "StatusCode.NOT_FOUND")
    ):
        # A repository's text models load only when it was built asking for them.
        hint = "; an image encoder's repository serves it when built with `headmaster repo build --serve-text`"
        return ModelNotFoundError(
            f"model {model!r} is not served here: {message}{hint if model in _TEXT_MODELS else ''}"
        )
    return ServerSideError(message)


_TEXT_MODELS = ("embed_text", "tokenize", "text_encoder")


class _Transport:
    """The few calls we need, the same over both protocols."""

    def __init__(self, url: str, protocol: str, timeout_s: float):
        if protocol not in PROTOCOLS:
            raise ClientError(f"protocol must be grpc or http, not {protocol!r}")
        self.protocol = protocol
        self.timeout_s = timeout_s
        if protocol == "grpc":
            import tritonclient.grpc.aio as module

            self.client = module.InferenceServerClient(url)
        else:
            import tritonclient.http.aio as module

            self.client = module.InferenceServerClient(url, conn_timeout=timeout_s)
        self.module = module

    def bytes_input(self, name: str, items: Sequence[bytes]):
        tensor = self.module.InferInput(name, [len(items), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[i] for i in items], dtype=object))
        return tensor

    def fp32_input(self, name: str, array: np.ndarray):
        tensor = self.module.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return tensor

    def output(self, name: str):
        if self.protocol == "http":
            return self.module.InferRequestedOutput(name, binary_data=True)
        return self.module.InferRequestedOutput(name)

    async def infer(self, model: str, inputs, outputs: list[str]) -> dict[str, np.ndarray]:
        requested = [self.output(n) for n in outputs]
        try:
            headers = trace_headers() or None  # the caller's span, for a server that traces
            if self.protocol == "grpc":
                result = await self.client.infer(
                    model, inputs, outputs=requested, client_timeout=self.timeout_s, headers=headers
                )
            else:
                result = await asyncio.wait_for(
                    self.client.infer(model, inputs, outputs=requested, headers=headers), self.timeout_s
                )
        except Exception as e:
            raise _translate(e, model) from e
        return {n: result.as_numpy(n) for n in outputs}

    async def infer_shared(
        self, pool: RegionPool, model: str, items: Sequence[bytes], outputs: list[str], embedding_dim: int
    ) -> dict[str, np.ndarray]:
        """``infer`` with the images, and the EMBEDDING output, in a shared-memory region."""
        data = serialize_bytes(items)
        out_bytes = len(items) * embedding_dim * 4 if "EMBEDDING" in outputs else 0
        slot = await pool.acquire(len(data), out_bytes)
        try:
            slot.region.write(data)
            image = self.module.InferInput("IMAGE", [len(items), 1], "BYTES")
            image.set_shared_memory(slot.region.name, len(data))
            requested = []
            for name in outputs:
                output = self.output(name)
                if name == "EMBEDDING":
                    output.set_shared_memory(slot.region.name, out_bytes, offset=slot.input_capacity)
                requested.append(output)
            try:
                if self.protocol == "grpc":
                    result = await self.client.infer(model, [image], outputs=requested, client_timeout=self.timeout_s)
                else:
                    result = await asyncio.wait_for(
                        self.client.infer(model, [image], outputs=requested), self.timeout_s
                    )
            except Exception as e:
                raise _translate(e, model) from e
            answer = {n: result.as_numpy(n) for n in outputs if n != "EMBEDDING"}
            if "EMBEDDING" in outputs:
                answer["EMBEDDING"] = slot.region.read(slot.input_capacity, len(items) * embedding_dim).reshape(
                    len(items), embedding_dim
                )
            return answer
        finally:
            pool.release(slot)

    async def _metadata(self, model: str) -> dict:
        try:
            return (
                await self.client.get_model_metadata(model, as_json=True)
                if self.protocol == "grpc"
                else await self.client.get_model_metadata(model)
            )
        except Exception as e:
            raise _translate(e, model) from e

    async def input_dims(self, model: str, name: str) -> list[int]:
        """An input's shape from the model's metadata (an API the server leaves open)."""
        (tensor,) = [t for t in (await self._metadata(model))["inputs"] if t["name"] == name]
        return [int(d) for d in tensor["shape"]]

    async def has_input(self, model: str, name: str) -> bool:
        return any(t["name"] == name for t in (await self._metadata(model))["inputs"])

    async def output_dims(self, model: str, name: str) -> list[int]:
        (tensor,) = [t for t in (await self._metadata(model))["outputs"] if t["name"] == name]
        return [int(d) for d in tensor["shape"]]

    async def is_ready(self, model: str) -> bool:
        try:
            # Server *live*, not server *ready*: Triton reports the whole server not ready while any
            # model version is unloading, which every hot swap of a head causes for a moment.
            return bool(await self.client.is_server_live()) and bool(await self.client.is_model_ready(model))
        except Exception:
            return False

    async def close(self) -> None:
        await self.client.close()


@dataclass(frozen=True)
class _Item:
    source: str | None
    data: bytes
    sha256: str


def read_text(text: TextInput) -> _Item:
    """A text as the bytes sent (UTF-8), keyed by their sha256 (as a .txt file of it would be)."""
    if isinstance(text, str):
        data = text.encode("utf-8", "surrogatepass")
    elif isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
    else:
        raise ClientError(f"a text is a str or UTF-8 bytes, not {type(text).__name__}")
    return _Item(None, data, hashlib.sha256(data).hexdigest())


def read_image(image: ImageInput) -> _Item:
    """The bytes of an image given as bytes or a file path, with its name and content hash."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        source, data = None, bytes(image)
    else:
        source, data = str(image), Path(image).read_bytes()
    return _Item(source, data, hashlib.sha256(data).hexdigest())


class AsyncHeadmasterClient:
    """Classify and embed images (and embed text) against a Headmaster Triton repository.

    >>> async with AsyncHeadmasterClient("localhost:8001") as client:
    ...     results = await client.classify(["cat.jpg", "dog.png"])
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        *,
        timeout_s: float = 120.0,
        batch_size: int = 8,
        max_in_flight: int = 4,
        model: str = "classify",
        shared_memory: str | None = None,
        api_key: str | None = None,
        cuda_device: int = 0,
    ):
        """``shared_memory``: "system" or "cuda" to pass images and embeddings through shared
        memory (the server's host only); registering it needs the server's ``api_key`` (or
        HEADMASTER_API_KEY)."""
        if batch_size < 1 or max_in_flight < 1:
            raise ClientError("batch_size and max_in_flight must be >= 1")
        self.url = url or DEFAULT_URLS.get(protocol, "")
        self.protocol = protocol
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.model = model
        self._transport = _Transport(self.url, protocol, timeout_s)
        self._pool = (
            RegionPool(shared_memory, self._transport.client, protocol, api_key, max_in_flight, cuda_device)
            if shared_memory
            else None
        )
        self._embedding_dim: int | None = None

    async def __aenter__(self) -> AsyncHeadmasterClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        await self._transport.close()

    async def is_ready(self) -> bool:
        return await self._transport.is_ready(self.model)

    async def classifies_text(self) -> bool:
        """Whether the server's ``classify`` reads TEXT (a text encoder's repository) rather than IMAGE."""
        return await self._transport.has_input(self.model, "TEXT")

    # -- images ----------------------------------------------------------------------------
    async def _run_batch(
        self, model: str, outputs: list[str], batch: list[_Item], build, input_name: str = "IMAGE"
    ) -> list:
        try:
            if self._pool is None or input_name != "IMAGE":
                inputs = [self._transport.bytes_input(input_name, [item.data for item in batch])]
                out = await self._transport.infer(model, inputs, outputs)
            else:
                if self._embedding_dim is None:
                    self._embedding_dim = (await self._transport.output_dims(model, "EMBEDDING"))[-1]
                out = await self._transport.infer_shared(
                    self._pool, model, [item.data for item in batch], outputs, self._embedding_dim
                )
        except InvalidInputError as e:
            if len(batch) == 1:
                return [Failure(batch[0].source, re.sub(rf"^{input_name}\[0\]: ", "", str(e)), batch[0].sha256)]
            # One image spoiled the request: find which, by sending them one at a time.
            singles = await _gather(*(self._run_batch(model, outputs, [item], build, input_name) for item in batch))
            return [result for single in singles for result in single]
        return [build(item, *row) for item, *row in zip(batch, *(out[name] for name in outputs))]

    async def _run_all(
        self,
        model: str,
        outputs: list[str],
        images: Sequence,
        build,
        progress: Callable[[int], None] | None,
        input_name: str = "IMAGE",
    ) -> list:
        loaded: list[_Item | Failure] = []
        for image in images:
            if input_name == "TEXT":
                loaded.append(read_text(image))
                continue
            try:
                loaded.append(read_image(image))
            except OSError as e:
                loaded.append(Failure(str(image), f"cannot read file: {e.strerror or e}"))
        results: list = [r if isinstance(r, Failure) else None for r in loaded]
        todo = {i: r for i, r in enumerate(loaded) if isinstance(r, _Item)}  # index -> image to send
        if progress and len(todo) < len(loaded):
            progress(len(loaded) - len(todo))
        gate = _Gate(self.max_in_flight)

        async def run(indices: list[int]) -> None:
            async with gate:
                answers = await self._run_batch(model, outputs, [todo[i] for i in indices], build, input_name)
            for i, answer in zip(indices, answers):
                results[i] = answer
            if progress:
                progress(len(indices))

        order = list(todo)
        chunks = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        await _gather(*(run(chunk) for chunk in chunks))
        return results

    async def classify(
        self, images: Sequence[ImageInput], progress: Callable[[int], None] | None = None
    ) -> list[Classification | Failure]:
        """One result per image, in order. Unreadable files and images the server refuses come
        back as :class:`Failure`; transport problems raise (nothing can be classified then)."""

        def build(item: _Item, embedding: np.ndarray, result: np.ndarray) -> Classification:
            return Classification.from_result(item.source, item.sha256, embedding, result[0])

        return await self._run_all(self.model, ["EMBEDDING", "RESULT"], images, build, progress)

    async def classify_embeddings(
        self, embeddings: np.ndarray, sources: Sequence[str | None], hashes: Sequence[str]
    ) -> list[Classification]:
        """Run the heads on embeddings computed earlier (``classify_embedding``: no preprocess,
        no encoder). The caller vouches that they come from the served encoder."""
        embeddings = np.asarray(embeddings, np.float32).reshape(len(hashes), -1)
        gate = _Gate(self.max_in_flight)
        # The items' sha256 go along where the server takes them: an A/B test of a head picks each
        # item's arm by its image's sha256, so a stored item gets the arm its image gets.
        with_hashes = await self._transport.has_input("classify_embedding", "SHA256") if len(hashes) else False

        async def run(start: int) -> list[Classification]:
            rows = embeddings[start : start + self.batch_size]
            inputs = [self._transport.fp32_input("EMBEDDING", rows)]
            if with_hashes:
                inputs.append(
                    self._transport.bytes_input(
                        "SHA256", [str(h).encode("utf-8") for h in hashes[start : start + self.batch_size]]
                    )
                )
            async with gate:
                out = await self._transport.infer("classify_embedding", inputs, ["RESULT"])
            return [
                Classification.from_result(sources[start + i], hashes[start + i], row, result[0])
                for i, (row, result) in enumerate(zip(rows, out["RESULT"]))
            ]

        chunks = await _gather(*(run(s) for s in range(0, len(hashes), self.batch_size)))
        return [c for chunk in chunks for c in chunk]

    async def classify_one(self, image: ImageInput) -> Classification:
        """Classify one image; raises :class:`InvalidInputError` if the server refuses it."""
        (result,) = await self.classify([image])
        if isinstance(result, Failure):
            raise InvalidInputError(f"{result.source or 'image'}: {result.error}")
        return result

    async def embed(
        self, images: Sequence[ImageInput], progress: Callable[[int], None] | None = None
    ) -> list[Embedding | Failure]:
        """Embeddings through the ``embed`` ensemble (no heads run), one result per image."""

        def build(item: _Item, embedding: np.ndarray) -> Embedding:
            return Embedding(item.source, item.sha256, np.asarray(embedding, np.float32))

        return await self._run_all("embed", ["EMBEDDING"], images, build, progress)

    async def encoder_fingerprint(self) -> str:
        """The fingerprint of the encoder the server runs: every RESULT names it, so one zero
        embedding through ``classify_embedding`` (heads only, no encoder) asks for it through
        inference alone, which every Triton in front of the repository answers."""
        dims = await self._transport.input_dims("classify_embedding", "EMBEDDING")
        zeros = np.zeros((1, dims[-1]), np.float32)
        out = await self._transport.infer(
            "classify_embedding", [self._transport.fp32_input("EMBEDDING", zeros)], ["RESULT"]
        )
        fingerprint = json.loads(out["RESULT"].reshape(-1)[0]).get("encoder")
        if not fingerprint:
            raise ClientError(
                f"the server at {self.url} does not say which encoder it runs (a repository built by "
                "an older Headmaster): rebuild it with `headmaster repo build`"
            )
        return fingerprint

    async def classify_text(
        self, texts: Sequence[TextInput], progress: Callable[[int], None] | None = None
    ) -> list[Classification | Failure]:
        """One result per text, in order, from a repository with a text encoder (``classify`` reads
        TEXT there). Texts the server refuses (empty, not UTF-8, over its size limit) come back as
        :class:`Failure` naming why; each result's sha256 is that of the text's UTF-8 bytes."""

        def build(item: _Item, embedding: np.ndarray, result: np.ndarray) -> Classification:
            return Classification.from_result(item.source, item.sha256, embedding, result[0])

        return await self._run_all(self.model, ["EMBEDDING", "RESULT"], texts, build, progress, "TEXT")

    async def embed_texts(
        self, texts: Sequence[TextInput], progress: Callable[[int], None] | None = None
    ) -> list[Embedding | Failure]:
        """Like :meth:`embed` for texts (``embed_text``), with per-text failures."""

        def build(item: _Item, embedding: np.ndarray) -> Embedding:
            return Embedding(item.source, item.sha256, np.asarray(embedding, np.float32))

        return await self._run_all("embed_text", ["EMBEDDING"], texts, build, progress, "TEXT")

    async def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings [N, D] through the ``embed_text`` ensemble (same space as images)."""
        inputs = [self._transport.bytes_input("TEXT", [t.encode("utf-8") for t in texts])]
        return (await self._transport.infer("embed_text", inputs, ["EMBEDDING"]))["EMBEDDING"]
