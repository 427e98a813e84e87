"""Redis Streams as the broker (:class:`.queue.Broker`).

Why Redis first: one small server (Debian's ``redis-server``) that many deployments already
run; streams are durable (AOF) and give consumer groups, per-consumer pending lists,
``XAUTOCLAIM`` for what a dead consumer left, and delivery counts: every primitive the
guarantees need, with no JVM (Kafka) and no second protocol to learn. NATS JetStream or
Kafka fit the same interface when the volume outgrows one Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from headmaster.errors import QueueError
from headmaster.pipelines.queue import Broker, GroupStatus, Message

LOG = logging.getLogger(__name__)


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: dict) -> dict[str, bytes]:
    return {_text(k): v for k, v in raw.items()}


class Reconnecting(Retry):
    """redis-py's :class:`~redis.retry.Retry` (exponential backoff with jitter, so a fleet of
    workers does not reconnect in lockstep) that keeps trying while Redis is away, for
    ``patience_s`` seconds (forever when None) or until ``stop()`` is true, says in the log
    when Redis went away and when it answered again, and counts the reconnections.

    Only a Redis that answered once is waited for: a wrong URL or a server that is not there
    at the start fails at once, in one line. redis-py retries the command that failed (and,
    inside it, the connect); what a retry can repeat or lose is handled by the broker: see
    :meth:`RedisStreams.read`.
    """

    def __init__(self, where: str, patience_s: float | None):
        super().__init__(EqualJitterBackoff(cap=5.0, base=0.05), retries=-1)
        self.where, self.patience_s = where, patience_s
        self.stop: Callable[[], bool] = lambda: False
        self.answered = False  # Redis answered once: from then on, a lost connection is waited for
        self.down_since: float | None = None
        self.reconnects = 0
        self.stopped = False  # gave up because stop() said so
        self._nesting = threading.local()  # the connect inside a command retries too: report the outer call
        self._last_note = 0.0

    def __deepcopy__(self, memo):
        # redis-py copies its retry into the pool and every connection: one shared state
        # (down since when, how many reconnections) is what the broker reads.
        return self

    def call_with_retry(self, do, fail, *args, **kwargs):
        depth = getattr(self._nesting, "depth", 0)

        def failed(error, *rest):
            fail(error, *rest)  # redis-py's own handler: drops the broken connection
            if not self.answered:
                raise error
            now = time.monotonic()
            if self.down_since is None:
                self.down_since = self._last_note = now
                LOG.warning("lost Redis at %s (%s): reconnecting with backoff", self.where, error)
            elif now - self._last_note > 30:
                self._last_note = now
                LOG.warning(
                    "Redis at %s still unreachable after %.0f s (%s): still trying",
                    self.where,
                    now - self.down_since,
                    error,
                )
            if self.stop():
                self.stopped = True
                raise error
            if self.patience_s is not None and now - self.down_since > self.patience_s:
                raise error

        self._nesting.depth = depth + 1
        try:
            result = super().call_with_retry(do, failed, *args, **kwargs)
        finally:
            self._nesting.depth = depth
        if depth == 0:
            if self.down_since is not None:
                LOG.warning("reconnected to Redis at %s after %.1f s", self.where, time.monotonic() - self.down_since)
                self.down_since = None
                self.reconnects += 1
            self.answered = True
        return result


class _NotingPool(redis.ConnectionPool):
    """redis-py's pool, which also tells :class:`Reconnecting` when a connection that was up is
    made again without a failed command: the pool found it closed while idle (Redis restarted
    between two commands) and reconnected on its own, a reconnection the log should show too."""

    retry: Reconnecting

    def make_connection(self):
        connection = super().make_connection()
        connection.register_connect_callback(self._connected)
        return connection

    def _connected(self, connection) -> None:
        again = getattr(connection, "_was_connected", False)
        connection._was_connected = True
        retry = self.retry
        if again and retry.answered and retry.down_since is None:  # a failed command reports its own
            LOG.warning("lost Redis at %s while idle (the server closed the connection)", retry.where)
            LOG.warning("reconnected to Redis at %s", retry.where)
            retry.reconnects += 1


class RedisStreams(Broker):
    """The broker on Redis Streams.

    A lost connection (Redis restarted, failed over, or a network blip) is retried with
    backoff by redis-py itself (:class:`Reconnecting`): for ``patience_s`` seconds, or for as
    long as it takes with ``patience_s=None`` (what the workers use) until
    :meth:`give_up_when` says to stop. Entries survive a Redis crash only as far as Redis
    persists them: ``appendonly yes`` with ``appendfsync always`` loses no acknowledged write.
    """

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0, patience_s: float | None = 60.0):
        self.url = url
        self._errors = (redis.RedisError, OSError)
        self._retry = Reconnecting(safe_url(url), patience_s)
        try:
            # socket_timeout: a read that hangs on a dead peer (no RST, e.g. a partition) becomes
            # a TimeoutError, which is retried; reads block at most a few seconds by design.
            pool = _NotingPool.from_url(
                url,
                socket_connect_timeout=connect_timeout_s,
                socket_timeout=30,
                socket_keepalive=True,
                retry=self._retry,
                decode_responses=False,
            )
            pool.retry = self._retry
            self.redis = redis.Redis(connection_pool=pool)
            self.redis.ping()
        except ValueError as e:
            raise QueueError(
                f"--redis {safe_url(url)!r} is not a Redis URL ({e}); give redis://[:password@]host:port/db",
                option="redis",
            ) from None
        except self._errors as e:
            raise QueueError(f"cannot reach Redis at {safe_url(url)}: {e}", option="redis") from None
        self._claim_cursor: dict[tuple[str, str], str] = {}
        self._own_cursor: dict[tuple[str, str, str], str] = {}  # re-reading a consumer's own pending list
        self._own_checked: dict[tuple[str, str, str], int] = {}  # ... as of which reconnection

    @property
    def reconnects(self) -> int:
        """How many times the connection to Redis was lost and made again."""
        return self._retry.reconnects

    def give_up_when(self, stop: Callable[[], bool]) -> None:
        self._retry.stop = stop

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as e:
            if self._retry.stopped:
                raise QueueError(
                    f"Redis at {safe_url(self.url)}: {what} failed: {e}; stopped while reconnecting "
                    "(entries this worker held stay pending for its group)"
                ) from None
            if (
                isinstance(e, (redis.ConnectionError, redis.TimeoutError))
                and self._retry.answered
                and self._retry.patience_s is not None
            ):
                raise QueueError(
                    f"Redis at {safe_url(self.url)}: {what} failed: {e}; still unreachable after "
                    f"{self._retry.patience_s:g} s of reconnecting"
                ) from None
            raise QueueError(f"Redis at {safe_url(self.url)}: {what} failed: {e}") from None

    def _group_call(self, what: str, stream: str, group: str, fn, *args, **kwargs):
        """``_call`` for a command on a group, which makes the group again if Redis lost it."""
        try:
            return self._call(what, fn, *args, **kwargs)
        except QueueError as e:
            if "NOGROUP" not in str(e):
                raise
        # Redis came back without its data (no persistence, or a new server): the group is gone,
        # and whatever it held with it. Make it again, from the start of what is there, and go on.
        LOG.warning(
            "group %s of %s is gone from Redis at %s (restarted without its data? see docs/pipelines.md on "
            "appendonly): made again; entries queued before the restart may be lost",
            group,
            stream,
            safe_url(self.url),
        )
        self.ensure_group(stream, group)
        self._claim_cursor.pop((stream, group), None)
        return self._call(what, fn, *args, **kwargs)

    def _counted(self, stream: str, group: str, consumer: str, entries: list) -> list[Message]:
        """Messages with the delivery count Redis keeps for each (this delivery included)."""
        if not entries:
            return []
        pending = self._call(
            "XPENDING",
            self.redis.xpending_range,
            stream,
            group,
            min=entries[0][0],
            max=entries[-1][0],
            count=len(entries) * 4 + 16,
            consumername=consumer,
        )
        counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        return [Message(i, _fields(f), counts.get(i, 2)) for i, f in entries]

    # -- producing ------------------------------------------------------------------------
    def backlog(self, stream: str) -> int:
        """Entries not yet finished by the slowest group (the whole stream when no group reads it)."""
        groups = self._call("XINFO GROUPS", self._groups, stream)
        if not groups:
            return int(self._call("XLEN", self.redis.xlen, stream))
        worst = 0
        for group in groups:
            lag = group.get("lag")
            if lag is None:  # Redis cannot tell after deletions: count from the group's position
                lag = len(self.redis.xrange(stream, min=_next_id(_text(group["last-delivered-id"])), max="+"))
            worst = max(worst, int(lag) + int(group["pending"]))
        return worst

    def publish(self, stream, fields, *, max_backlog=None, timeout_s=None) -> str:
        if max_backlog is not None:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            pause = 0.01
            while self.backlog(stream) >= max_backlog:
                if deadline is not None and time.monotonic() > deadline:
                    raise QueueError(
                        f"stream {stream} stayed at its bound of {max_backlog} unfinished entries for "
                        f"{timeout_s:g} s: are its consumers running? (`headmaster worker status`)",
                        option="max_backlog",
                    )
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
        return _text(self._call("XADD", self.redis.xadd, stream, fields))

    # -- consuming ------------------------------------------------------------------------
    def ensure_group(self, stream, group) -> None:
        try:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise QueueError(f"cannot create group {group} on {stream}: {e}") from None
        except self._errors as e:
            raise QueueError(f"Redis at {safe_url(self.url)}: XGROUP CREATE failed: {e}") from None

    def read(self, stream, group, consumer, count, block_ms) -> list[Message]:
        """New entries; but first, at the first read and after every reconnection, the entries
        already pending for this consumer.

        A retried XREADGROUP can lose a batch: Redis handed it over (it sits in this consumer's
        pending list, and with ``appendfsync always`` it is still there after a crash) while the
        reply died with the connection, and the retry asks for the next one. Only XAUTOCLAIM,
        ``claim_idle_ms`` later, would find it, so the consumer's own pending list is read back
        at once (XREADGROUP from id 0; what it held before a restart under the same name, too).
        Entries handled twice that way are the at-least-once redelivery the workers already
        make harmless (a label is written once per item and head version).
        """
        key = (stream, group, consumer)
        if self._own_checked.get(key) != self.reconnects:
            self._own_checked[key] = self.reconnects
            self._own_cursor[key] = "0-0"
        cursor = self._own_cursor.get(key)
        if cursor is not None:
            answer = self._group_call(
                "XREADGROUP", stream, group, self.redis.xreadgroup, group, consumer, {stream: cursor}, count=count
            )
            raw = [(_text(i), f) for _, entries in answer or [] for i, f in entries]
            if len(raw) < count:
                self._own_cursor.pop(key, None)
            else:
                self._own_cursor[key] = raw[-1][0]
            deleted = [i for i, f in raw if not f]
            if deleted:  # trimmed while pending: nothing left to deliver
                self.ack(stream, group, deleted)
            mine = self._counted(stream, group, consumer, [(i, f) for i, f in raw if f])
            if mine:
                LOG.info("%s: %d entries pending for %s read again", stream, len(mine), consumer)
                return mine
        answer = self._group_call(
            "XREADGROUP",
            stream,
            group,
            self.redis.xreadgroup,
            group,
            consumer,
            {stream: ">"},
            count=count,
            block=block_ms,
        )
        return [Message(_text(i), _fields(f)) for _, entries in answer or [] for i, f in entries if f]

    def claim_stale(self, stream, group, consumer, min_idle_ms, count) -> list[Message]:
        key = (stream, group)
        cursor, claimed, deleted = self._group_call(
            "XAUTOCLAIM",
            stream,
            group,
            self.redis.xautoclaim,
            stream,
            group,
            consumer,
            min_idle_ms,
            start_id=self._claim_cursor.get(key, "0-0"),
            count=count,
        )[:3]
        self._claim_cursor[key] = _text(cursor)
        if deleted:  # trimmed while pending: nothing left to deliver
            self.ack(stream, group, [_text(d) for d in deleted])
        return self._counted(stream, group, consumer, [(_text(i), f) for i, f in claimed if f])

    def ack(self, stream, group, ids) -> None:
        if ids:
            self._call("XACK", self.redis.xack, stream, group, *ids)

    def trim(self, stream) -> int:
        groups = self._call("XINFO GROUPS", self._groups, stream)
        if not groups:
            return 0
        keep = []
        for group in groups:
            name = _text(group["name"])
            summary = self._call("XPENDING", self.redis.xpending, stream, name)
            if summary["pending"]:
                keep.append(_text(summary["min"]))
            else:
                keep.append(_next_id(_text(group["last-delivered-id"])))
        oldest = min(keep, key=lambda i: tuple(int(x) for x in i.split("-")))
        return int(self._call("XTRIM", self.redis.xtrim, stream, minid=oldest, approximate=False))

    # -- watching -------------------------------------------------------------------------
    def _groups(self, stream: str) -> list[dict]:
        try:
            return [{_text(k): v for k, v in g.items()} for g in self.redis.xinfo_groups(stream)]
        except redis.ResponseError as e:
            if "no such key" in str(e).lower():
                return []
            raise

    def status(self, streams=None) -> list[GroupStatus]:
        if streams is None:
            streams = sorted(_text(s) for s in self._call("SCAN", lambda: list(self.redis.scan_iter(_type="STREAM"))))
        found = []
        for stream in streams:
            length = int(self._call("XLEN", self.redis.xlen, stream))
            for group in self._call("XINFO GROUPS", self._groups, stream):
                name = _text(group["name"])
                summary = self._call("XPENDING", self.redis.xpending, stream, name)
                consumers = {_text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or []}
                lag = group.get("lag")
                found.append(
                    GroupStatus(stream, name, length, -1 if lag is None else int(lag), int(group["pending"]), consumers)
                )
        return found

    def close(self) -> None:
        self.redis.close()
