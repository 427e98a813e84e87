"""Redis Streams as the broker (:class:`.queue.Broker`).

Why Redis first: one small server (Debian's ``redis-server``) that many deployments already
run; streams are durable (AOF) and give consumer groups, per-consumer pending lists,
``XAUTOCLAIM`` for what a dead consumer left, and delivery counts: every primitive the
guarantees need, with no JVM (Kafka) and no second protocol to learn. NATS JetStream or
Kafka fit the same interface when the volume outgrows one Redis.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

from headmaster.errors import QueueError
from headmaster.pipelines.queue import Broker, GroupStatus, Message


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


class RedisStreams(Broker):
    def __init__(self, url: str, *, connect_timeout_s: float = 5.0):
        import redis

        self.url = url
        self._errors = (redis.RedisError, OSError)
        try:
            self.redis = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s, decode_responses=False)
            self.redis.ping()
        except ValueError as e:
            raise QueueError(f"--redis {safe_url(url)!r} is not a Redis URL ({e}); "
                             "give redis://[:password@]host:port/db", option="redis") from None
        except self._errors as e:
            raise QueueError(f"cannot reach Redis at {safe_url(url)}: {e}", option="redis") from None
        self._claim_cursor: dict[tuple[str, str], str] = {}

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as e:
            raise QueueError(f"Redis at {safe_url(self.url)}: {what} failed: {e}") from None

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
                    raise QueueError(f"stream {stream} stayed at its bound of {max_backlog} unfinished entries for "
                                     f"{timeout_s:g} s: are its consumers running? (`headmaster worker status`)",
                                     option="max_backlog")
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
        return _text(self._call("XADD", self.redis.xadd, stream, fields))

    # -- consuming ------------------------------------------------------------------------
    def ensure_group(self, stream, group) -> None:
        import redis

        try:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise QueueError(f"cannot create group {group} on {stream}: {e}") from None
        except self._errors as e:
            raise QueueError(f"Redis at {safe_url(self.url)}: XGROUP CREATE failed: {e}") from None

    def read(self, stream, group, consumer, count, block_ms) -> list[Message]:
        answer = self._call("XREADGROUP", self.redis.xreadgroup, group, consumer, {stream: ">"},
                            count=count, block=block_ms)
        return [Message(_text(i), _fields(f)) for _, entries in answer or [] for i, f in entries if f]

    def claim_stale(self, stream, group, consumer, min_idle_ms, count) -> list[Message]:
        key = (stream, group)
        cursor, claimed, deleted = self._call(
            "XAUTOCLAIM", self.redis.xautoclaim, stream, group, consumer, min_idle_ms,
            start_id=self._claim_cursor.get(key, "0-0"), count=count)[:3]
        self._claim_cursor[key] = _text(cursor)
        if deleted:  # trimmed while pending: nothing left to deliver
            self.ack(stream, group, [_text(d) for d in deleted])
        entries = [(_text(i), f) for i, f in claimed if f]
        if not entries:
            return []
        pending = self._call("XPENDING", self.redis.xpending_range, stream, group, min=entries[0][0],
                             max=entries[-1][0], count=len(entries) * 4 + 16, consumername=consumer)
        counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        return [Message(i, _fields(f), counts.get(i, 2)) for i, f in entries]

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
        import redis

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
                found.append(GroupStatus(stream, name, length, -1 if lag is None else int(lag),
                                         int(group["pending"]), consumers))
        return found

    def close(self) -> None:
        self.redis.close()
