"""The split of the seed design: embed workers (GPU machines) put embeddings on a queue,
heads workers (CPU machines) run every live head on them and store the labels.

Streams (names are options; these are the defaults):

- ``headmaster:images``: one entry per image, ``uri`` (a path or ``s3://``) or ``data`` (the
  bytes), and ``enqueued_at`` (Unix time), from ``headmaster worker submit`` or any producer;
- ``headmaster:embeddings``: ``sha256``, ``fingerprint``, ``embedding`` (float32 bytes),
  ``uri``, ``enqueued_at``;
- ``<stream>:dead``: entries that failed ``max_tries`` times, with ``reason``.

Delivery is at least once: a worker acknowledges an entry after its effects are stored, and
one that dies leaves its entries pending until another member of its group claims them
(``claim_idle_ms``). Effects are made exactly once by checking the store first: an item is
embedded and stored once per (sha256, fingerprint); a label row is written once per (item,
head, version), since every batch leaves out the items that already hold a row of that version
(what a redelivered entry, or a second entry for the same image, finds).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headmaster.errors import HeadmasterError
from headmaster.pipelines.queue import Broker, Message
from headmaster.store.base import Store, label_table

LOG = logging.getLogger(__name__)
IMAGES = "headmaster:images"
EMBEDDINGS = "headmaster:embeddings"
EMBED_GROUP = "embed"
HEADS_GROUP = "heads"


def dead_letters(stream: str) -> str:
    return f"{stream}:dead"


def default_consumer() -> str:
    import os

    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class WorkerOptions:
    group: str
    consumer: str = field(default_factory=default_consumer)
    batch: int = 64  # entries read at once
    block_ms: int = 1000  # how long a read waits for new entries
    claim_idle_ms: int = 30000  # an entry pending this long belonged to a dead worker: take it over
    max_tries: int = 5  # deliveries before an entry that keeps failing goes to the dead-letter stream
    max_backlog: int = 10000  # bound on the output stream's unfinished entries (producers wait)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Worker:
    """The loop both workers share: claim what dead members left, read new entries, handle,
    acknowledge; failures are retried by redelivery and dead-lettered after ``max_tries``."""

    stream: str

    def __init__(self, broker: Broker, options: WorkerOptions):
        self.broker, self.options = broker, options
        self.processed = 0
        self.dead = 0

    def handle(self, messages: list[Message]) -> dict[str, str]:
        """Store the effects of ``messages``; returns the failed ones' ids with the reason."""
        raise NotImplementedError

    def step(self) -> int:
        o = self.options
        messages = self.broker.claim_stale(self.stream, o.group, o.consumer, o.claim_idle_ms, o.batch)
        if len(messages) < o.batch:
            messages += self.broker.read(
                self.stream, o.group, o.consumer, o.batch - len(messages), o.block_ms if not messages else 1
            )
        if not messages:
            return 0
        failed = self.handle(messages)
        done = [m.id for m in messages if m.id not in failed]
        for message in messages:
            reason = failed.get(message.id)
            if reason is None:
                continue
            if message.deliveries >= o.max_tries:
                fields = {k: v for k, v in message.fields.items() if k != "embedding" or len(v) < 1 << 20}
                fields.update(
                    {"reason": reason, "group": o.group, "deliveries": str(message.deliveries), "source_id": message.id}
                )
                self.broker.publish(dead_letters(self.stream), fields)
                done.append(message.id)
                self.dead += 1
                LOG.warning(
                    "%s: entry %s dead-lettered after %d tries: %s", self.stream, message.id, message.deliveries, reason
                )
            else:  # left pending: redelivered after claim_idle_ms, to this worker or another
                LOG.info(
                    "%s: entry %s failed (try %d of %d): %s",
                    self.stream,
                    message.id,
                    message.deliveries,
                    o.max_tries,
                    reason,
                )
        self.broker.ack(self.stream, o.group, done)
        self.processed += len(messages) - len(failed)
        return len(messages)

    def run(self, stop: Callable[[], bool] = lambda: False, idle_exit_s: float | None = None) -> None:
        """Until ``stop()`` says so (or, with ``idle_exit_s``, after that long with nothing to do).
        A broker that goes away is waited for (the broker reconnects with backoff), so a Redis
        restart pauses the loop; ``stop()`` also ends the wait."""
        self.broker.give_up_when(stop)
        self.broker.ensure_group(self.stream, self.options.group)
        idle_since = time.monotonic()
        last_trim = 0.0
        while not stop():
            if self.step():
                idle_since = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                break
            if time.monotonic() - last_trim > 1.0:  # acknowledged entries leave the stream: memory stays bounded
                self.broker.trim(self.stream)
                last_trim = time.monotonic()
        self.broker.trim(self.stream)  # what this worker acknowledged last leaves with it


class EmbedWorker(Worker):
    """Images stream -> embedding (server or local) -> store -> embeddings stream."""

    def __init__(
        self,
        broker: Broker,
        store: Store,
        embedder,
        options: WorkerOptions,
        stream: str = IMAGES,
        output: str = EMBEDDINGS,
    ):
        super().__init__(broker, options)
        self.store, self.embedder, self.stream, self.output = store, embedder, stream, output

    @staticmethod
    def _bytes(message: Message) -> bytes | str:
        if "data" in message.fields:
            return message.fields["data"]
        uri = _text(message.fields.get("uri", b""))
        if not uri:
            return "the entry has neither 'uri' nor 'data'"
        from headmaster.pipelines.sources import read_uri

        try:
            return read_uri(uri)
        except OSError as e:
            return f"cannot read {uri}: {e.strerror or e}"

    def handle(self, messages):
        import hashlib

        failed: dict[str, str] = {}
        read = {}
        for message in messages:
            got = self._bytes(message)
            if isinstance(got, str):
                failed[message.id] = got
            else:
                read[message.id] = (got, hashlib.sha256(got).hexdigest())
        fingerprint = self.embedder.fingerprint
        known = self.store.embeddings({sha for _, sha in read.values()}, fingerprint)
        todo: dict[str, bytes] = {}
        for data, sha in read.values():
            if sha not in known:
                todo.setdefault(sha, data)
        fresh: dict[str, np.ndarray] = {}
        for sha, result in zip(todo, self.embedder(list(todo.values()))):
            if isinstance(result, str):
                failed.update({i: result for i, (_, s) in read.items() if s == sha})
            else:
                fresh[sha] = np.asarray(result, np.float32)
        if fresh:
            uris = {}
            for message in messages:
                if message.id in read and read[message.id][1] in fresh:
                    uris.setdefault(read[message.id][1], _text(message.fields.get("uri", b"")) or None)
            self.store.add_embeddings(
                list(fresh), [uris.get(s) for s in fresh], fingerprint, np.stack(list(fresh.values()))
            )
        known.update(fresh)
        for message in messages:
            if message.id not in read or message.id in failed:
                continue
            sha = read[message.id][1]
            # Published even when the item was stored before: a worker that died between storing
            # and publishing left the heads without it; the heads worker skips what is labelled.
            self.broker.publish(
                self.output,
                {
                    "sha256": sha,
                    "fingerprint": fingerprint,
                    "embedding": known[sha].astype("<f4").tobytes(),
                    "uri": message.fields.get("uri", b""),
                    "enqueued_at": message.fields.get("enqueued_at", b""),
                },
                max_backlog=self.options.max_backlog,
            )
        return failed


class LiveHeads:
    """Every live head version of a repository, reloaded when the repository changes (a new
    version, a rollback, a head added or removed) without a restart."""

    def __init__(self, repo: Path, recheck_s: float = 1.0):
        self.repo, self.recheck_s = Path(repo), recheck_s
        self.versions: list = []
        self.fingerprint = ""
        self.embed_dim = 0
        self._signature = None
        self._checked = 0.0

    def current(self) -> list:
        from headmaster.repository.head_version import HeadVersion
        from headmaster.repository.repo import Repository

        if time.monotonic() - self._checked < self.recheck_s and self._signature is not None:
            return self.versions
        self._checked = time.monotonic()
        repository = Repository(self.repo)
        heads = repository.heads()
        signature = (repository.fingerprint, tuple((h.name, h.live) for h in heads))
        if signature != self._signature:
            self.versions = [HeadVersion.load(repository, h.name, h.live) for h in heads]
            self.fingerprint, self.embed_dim = repository.fingerprint, repository.card.embed_dim
            if self._signature is not None:
                LOG.info("heads now: %s", ", ".join(v.title for v in self.versions) or "(none)")
            self._signature = signature
        return self.versions


class HeadsWorker(Worker):
    """Embeddings stream -> every live head on CPU (onnxruntime, the server's threshold) -> store."""

    def __init__(
        self, broker: Broker, store: Store, heads: LiveHeads, options: WorkerOptions, stream: str = EMBEDDINGS
    ):
        super().__init__(broker, options)
        self.store, self.heads, self.stream = store, heads, stream
        self.latencies: list[float] = []  # enqueue -> label stored, seconds (when producers set enqueued_at)

    def _vector(self, message: Message) -> np.ndarray | str:
        fields = message.fields
        fingerprint = _text(fields.get("fingerprint", b""))
        if fingerprint != self.heads.fingerprint:
            return f"unknown encoder fingerprint {fingerprint or '(none)'}: the heads serve {self.heads.fingerprint}"
        raw = fields.get("embedding", b"")
        if len(raw) != 4 * self.heads.embed_dim:
            return f"embedding of {len(raw)} bytes; expected {self.heads.embed_dim} float32 ({4 * self.heads.embed_dim} bytes)"
        vector = np.frombuffer(raw, "<f4")
        if not np.all(np.isfinite(vector)) or not np.any(vector):
            return "embedding holds NaN, infinity or only zeros"
        sha = _text(fields.get("sha256", b""))
        if len(sha) != 64:
            return f"sha256 {sha!r} is not a sha256"
        return vector

    def handle(self, messages):
        versions = self.heads.current()
        failed: dict[str, str] = {}
        rows: dict[str, np.ndarray] = {}
        for message in messages:
            got = self._vector(message)
            if isinstance(got, str):
                failed[message.id] = got
            else:
                rows.setdefault(_text(message.fields["sha256"]), got)
        if not rows:
            return failed
        for version in versions:
            done = self.store.labelled(version.card.name, version.card.version, rows)
            todo = [sha for sha in rows if sha not in done]
            if not todo:
                continue
            try:
                scores = version.scores(np.stack([rows[sha] for sha in todo]))
            except HeadmasterError as e:  # e.g. a head of another size: the batch is retried, then dead-lettered
                return {m.id: f"{version.title}: {e}" for m in messages}
            self.store.add_labels(
                version.card.name,
                [
                    label_table(
                        todo,
                        self.heads.fingerprint,
                        version.card.version,
                        scores,
                        version.card.labels,
                        version.accepted_mask(scores),
                        "worker",
                    )
                ],
            )
        now = time.time()
        for message in messages:
            at = _text(message.fields.get("enqueued_at", b""))
            if message.id not in failed and at:
                self.latencies.append(now - float(at))
        return failed
