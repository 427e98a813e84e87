"""Python client for a Headmaster Triton repository (gRPC or HTTP, blocking or asyncio)."""

from headmaster.client.aio import AsyncHeadmasterClient
from headmaster.client.errors import (
    ClientError,
    InvalidInputError,
    ModelNotFoundError,
    RequestTimeoutError,
    ServerSideError,
    ServerUnavailableError,
)
from headmaster.client.results import Classification, Embedding, Failure, HeadResult
from headmaster.client.sync import HeadmasterClient

__all__ = [
    "AsyncHeadmasterClient",
    "HeadmasterClient",
    "Classification",
    "Embedding",
    "Failure",
    "HeadResult",
    "ClientError",
    "InvalidInputError",
    "ModelNotFoundError",
    "RequestTimeoutError",
    "ServerSideError",
    "ServerUnavailableError",
]
