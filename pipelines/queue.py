"""The broker interface the workers use: durable streams, consumer groups, redelivery.

Workers see only this interface; :mod:`.redis_streams` implements it with Redis Streams. A
second broker (NATS JetStream, Kafka) implements the same few calls: append with a bound,
read as a member of a group, acknowledge, claim what a dead member left pending, and report
lag and pending per group. Delivery is at least once; the workers make the effects exactly
once (see :mod:`.workers`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Message:
    id: str  # the broker's id, what :meth:`Broker.ack` takes
    fields: dict[str, bytes]
    deliveries: int = 1  # how many times it was handed to a consumer, this time included


@dataclass(frozen=True)
class GroupStatus:
    stream: str
    group: str
    length: int  # entries in the stream
    lag: int  # entries the group has not read yet
    pending: int  # read but not acknowledged
    consumers: dict[str, int] = field(default_factory=dict)  # consumer -> its pending entries


class Broker(abc.ABC):
    """Durable append-only streams with consumer groups (at-least-once delivery)."""

    @abc.abstractmethod
    def publish(
        self,
        stream: str,
        fields: dict[str, bytes | str],
        *,
        max_backlog: int | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """Append one entry. With ``max_backlog``, wait while the stream's backlog (entries no
        group has finished with) is at the bound: producers stop, memory does not grow.
        Raises :class:`headmaster.errors.QueueError` when ``timeout_s`` passes first."""

    @abc.abstractmethod
    def ensure_group(self, stream: str, group: str) -> None:
        """Create the consumer group (from the stream's start) unless it exists."""

    @abc.abstractmethod
    def read(self, stream: str, group: str, consumer: str, count: int, block_ms: int) -> list[Message]:
        """New entries for this consumer, at most ``count``, waiting up to ``block_ms``."""

    @abc.abstractmethod
    def claim_stale(self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int) -> list[Message]:
        """Entries another consumer read but left unacknowledged for ``min_idle_ms`` (it died),
        now this consumer's; ``deliveries`` counts every hand-over."""

    @abc.abstractmethod
    def ack(self, stream: str, group: str, ids: list[str]) -> None: ...

    @abc.abstractmethod
    def trim(self, stream: str) -> int:
        """Drop the entries every group has acknowledged; returns how many went."""

    @abc.abstractmethod
    def status(self, streams: list[str] | None = None) -> list[GroupStatus]:
        """Lag and pending per group of each stream (all streams when None)."""

    def give_up_when(self, stop: Callable[[], bool]) -> None:
        """While the broker is unreachable, calls wait and reconnect; once ``stop()`` is true
        they raise instead, so a worker told to exit during an outage exits. A broker that
        never waits ignores it."""
        return  # not abstract: a broker that never waits needs nothing here

    @abc.abstractmethod
    def close(self) -> None: ...
