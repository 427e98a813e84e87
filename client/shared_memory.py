"""Images and embeddings through shared memory instead of the socket, for callers on the server's host.

Triton reads a request's inputs from, and writes its outputs into, memory regions the client
registered (its system and CUDA shared-memory APIs). For an embedding-heavy caller on the same
machine this saves serialising every image and every embedding through gRPC or HTTP.

One region per request in flight (``max_in_flight``), registered once and reused; a region
grows (a new one is registered) when a batch's images do not fit. A system region is unlinked
from ``/dev/shm`` as soon as the server has mapped it: Triton maps a region when it is
registered and never opens it by name again, so nothing is left in ``/dev/shm`` even when the
client is killed. The server keeps its mapping until the region is unregistered (``close``) or
the server stops.

Registration is part of Triton's ``shared-memory`` API, which ``headmaster serve`` restricts:
it needs the server's key (``api_key``, or the ``HEADMASTER_API_KEY`` environment variable).
Mapping a region by name is only safe for callers the server trusts.
"""

from __future__ import annotations

import asyncio
import os
import uuid
import warnings
from collections.abc import Sequence
from multiprocessing import shared_memory

import numpy as np

from headmaster.client.errors import ClientError

KINDS = ("system", "cuda")
KEY_HEADER = "headmaster-api-key"  # the header `headmaster serve` asks for on restricted APIs
KEY_ENV = "HEADMASTER_API_KEY"
UNREGISTER_WAIT_S = 10.0  # how long close() waits for the server to let go of a region
_GRPC_PREFIX = "triton-grpc-protocol-"  # Triton reads restricted-protocol keys from this gRPC metadata


def key_headers(protocol: str, api_key: str | None) -> dict[str, str]:
    api_key = api_key or os.environ.get(KEY_ENV)
    if not api_key:
        return {}
    return {(_GRPC_PREFIX if protocol == "grpc" else "") + KEY_HEADER: api_key}


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """Triton's wire form of a BYTES tensor: each element as a 4-byte little-endian length, then its bytes."""
    parts = []
    for item in items:
        parts += [len(item).to_bytes(4, "little"), bytes(item)]
    return b"".join(parts)


class _SystemRegion:
    """A POSIX shared-memory region (``/dev/shm``) registered with the server."""

    def __init__(self, size: int):
        self.memory = shared_memory.SharedMemory(create=True, size=size, name=f"headmaster-{uuid.uuid4().hex[:16]}")
        self.name, self.size = self.memory.name, size
        self.linked = True

    async def register(self, client, headers: dict) -> None:
        await client.register_system_shared_memory(self.name, "/" + self.name, self.size, headers=headers)
        self._unlink()  # mapped by the server now: no name is left behind, whatever happens to us

    def _unlink(self) -> None:
        if self.linked:
            self.memory.unlink()
            self.linked = False

    def _buffer(self) -> memoryview:
        buffer = self.memory.buf
        if buffer is None:  # closed by release()
            raise ClientError(f"shared-memory region {self.name} was released; this client is closed")
        return buffer

    def write(self, data: bytes) -> None:
        self._buffer()[: len(data)] = data

    def read(self, offset: int, count: int) -> np.ndarray:
        return np.frombuffer(self._buffer(), np.float32, count, offset).copy()

    async def unregister(self, client, headers: dict) -> None:
        await client.unregister_system_shared_memory(self.name, headers=headers)

    def release(self) -> None:
        self._unlink()  # a region the server refused is still named
        self.memory.close()


class _CudaRegion:
    """A CUDA buffer on ``device`` shared with the server through a CUDA IPC handle (tritonclient)."""

    def __init__(self, size: int, device: int = 0):
        try:
            import tritonclient.utils.cuda_shared_memory as cudashm
        except Exception as e:  # cuda-python missing, or tritonclient's pkg_resources import
            raise ClientError(
                f"CUDA shared memory needs tritonclient's cuda_shared_memory, which failed to import "
                f"({type(e).__name__}: {e}); install cuda-python (and setuptools<81 for tritonclient "
                "2.51), or use shared_memory='system'"
            ) from None
        self.cudashm, self.device, self.size = cudashm, device, size
        self.name = f"headmaster-cuda-{uuid.uuid4().hex[:16]}"
        self.handle = cudashm.create_shared_memory_region(self.name, size, device)

    async def register(self, client, headers: dict) -> None:
        await client.register_cuda_shared_memory(
            self.name, self.cudashm.get_raw_handle(self.handle), self.device, self.size, headers=headers
        )

    def write(self, data: bytes) -> None:
        self.cudashm.set_shared_memory_region(self.handle, [np.frombuffer(data, np.uint8)])

    def read(self, offset: int, count: int) -> np.ndarray:
        return self.cudashm.get_contents_as_numpy(self.handle, np.float32, [count], offset)

    async def unregister(self, client, headers: dict) -> None:
        await client.unregister_cuda_shared_memory(self.name, headers=headers)

    def release(self) -> None:
        self.cudashm.destroy_shared_memory_region(self.handle)


class Slot:
    """One request's region: the serialized images from offset 0, the embeddings after them."""

    def __init__(self, region, input_capacity: int):
        self.region, self.input_capacity = region, input_capacity


class RegionPool:
    """``slots`` regions, each used by one request at a time."""

    def __init__(self, kind: str, client, protocol: str, api_key: str | None, slots: int, device: int = 0):
        if kind not in KINDS:
            raise ClientError(f"shared_memory must be one of {', '.join(KINDS)} (or None), not {kind!r}")
        self.kind, self.client, self.device = kind, client, device
        self.headers = key_headers(protocol, api_key)
        self.free: asyncio.Queue | None = None
        self.slots = slots
        self.all: list[Slot] = []

    def _new_region(self, size: int):
        return _SystemRegion(size) if self.kind == "system" else _CudaRegion(size, self.device)

    def _queue(self) -> asyncio.Queue:
        """The free slots, made on first use (inside the event loop that uses them)."""
        if self.free is None:
            self.free = asyncio.Queue()
            for _ in range(self.slots):
                self.free.put_nowait(None)  # an empty slot: its region is made on first use
        return self.free

    async def acquire(self, input_bytes: int, output_bytes: int) -> Slot:
        free = self._queue()
        slot = await free.get()
        if slot is None or slot.input_capacity < input_bytes or slot.region.size < slot.input_capacity + output_bytes:
            try:
                slot = await self._replace(
                    slot, max(input_bytes, 2 * (slot.input_capacity if slot else 0)), output_bytes
                )
            except BaseException:
                free.put_nowait(None)
                raise
        return slot

    async def _replace(self, old: Slot | None, input_capacity: int, output_bytes: int) -> Slot:
        from tritonclient.utils import InferenceServerException

        if old is not None:
            self.all.remove(old)
            await self._drop(old)
        # Outputs start on an 64-byte boundary: Triton writes FP32 embeddings there.
        input_capacity = -(-input_capacity // 64) * 64
        region = self._new_region(input_capacity + output_bytes)
        try:
            await region.register(self.client, self.headers)
        except InferenceServerException as e:
            region.release()
            message = e.message() or str(e)
            if "restricted" in message.lower() or str(e.status()) == "403":
                raise ClientError(
                    f"the server refused to register {self.kind} shared memory: its shared-memory API "
                    f"is restricted to callers with its key ({message}); pass api_key= or set "
                    f"{KEY_ENV}"
                ) from None
            raise ClientError(f"the server could not register {self.kind} shared memory: {message}") from None
        slot = Slot(region, input_capacity)
        self.all.append(slot)
        return slot

    def release(self, slot: Slot) -> None:
        self._queue().put_nowait(slot)

    async def _drop(self, slot: Slot) -> None:
        # Triton answers a request before it lets go of the request's buffers, and refuses to
        # unregister a region still in use: under load the unregister can arrive in that gap.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UNREGISTER_WAIT_S
        while True:
            try:
                await slot.region.unregister(self.client, self.headers)
                break
            except Exception as e:  # noqa: BLE001 - our side is released either way
                if "currently in use" not in str(e) or loop.time() > deadline:
                    # Left mapped by the server until someone with its key unregisters it, or it stops.
                    warnings.warn(
                        f"the server kept {self.kind} shared-memory region {slot.region.name!r} registered: {e}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    break
                await asyncio.sleep(0.05)
        slot.region.release()

    async def close(self) -> None:
        for slot in self.all:
            await self._drop(slot)
        self.all.clear()
