"""`headmaster worker ...`: embed and heads workers on a queue (Redis Streams; the `[queue]` extra)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headmaster.cli.common import DEFAULT_REPO, RepoOption, StoreOption, console, out
from headmaster.errors import PipelineError
from headmaster.pipelines.workers import EMBED_GROUP, EMBEDDINGS, HEADS_GROUP, IMAGES

app = typer.Typer(no_args_is_help=True, help="Embed -> queue -> heads workers on Redis Streams.")
RedisOption = Annotated[
    str,
    typer.Option("--redis", envvar="HEADMASTER_REDIS", help="redis://[:password@]host:port/db [env HEADMASTER_REDIS]"),
]
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
ClaimOption = Annotated[int, typer.Option(help="Take over entries a dead worker left pending this many ms.")]
TriesOption = Annotated[int, typer.Option(help="Deliveries before a failing entry goes to STREAM:dead.")]
IdleOption = Annotated[float | None, typer.Option(help="Exit after this many seconds with nothing to do.")]


def _broker(url: str, patience_s: float | None = 60.0):
    """The broker; a worker (``patience_s=None``) waits for a lost Redis for as long as it takes."""
    try:
        from headmaster.pipelines.redis_streams import RedisStreams
    except ImportError:
        raise PipelineError("the workers need the Redis client: pip install 'headmaster[queue]'") from None
    return RedisStreams(url, patience_s=patience_s)


def _run(worker, exit_when_idle: float | None) -> None:
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # finish the batch in hand, then exit
        signal.signal(sig, lambda *_: stopping.append(True))
    worker.run(stop=lambda: bool(stopping), idle_exit_s=exit_when_idle)
    console.print(f"{worker.processed} entries done, {worker.dead} dead-lettered", highlight=False)


@app.command("embed")
def embed_command(
    store: StoreOption,
    redis: RedisOption = DEFAULT_REDIS,
    repo: RepoOption = DEFAULT_REPO,
    server: Annotated[
        str | None,
        typer.Option(
            help="Embed through this server's `embed` model (gRPC host:port); "
            "without it, locally with the repository's encoder."
        ),
    ] = None,
    stream: Annotated[str, typer.Option(help="Images stream (entries with 'uri' or 'data').")] = IMAGES,
    output: Annotated[str, typer.Option(help="Embeddings stream.")] = EMBEDDINGS,
    group: str = EMBED_GROUP,
    consumer: Annotated[str | None, typer.Option(help="This worker's name in the group (default host-pid).")] = None,
    batch: Annotated[int, typer.Option(help="Entries per read.")] = 32,
    claim_idle_ms: ClaimOption = 30000,
    max_tries: TriesOption = 5,
    max_backlog: Annotated[
        int, typer.Option(help="Wait while the embeddings stream holds this many unfinished entries.")
    ] = 10000,
    exit_when_idle: IdleOption = None,
) -> None:
    """Consume image references, embed, store the embeddings, publish them for the heads."""
    from headmaster.pipelines.embedders import bytes_embedder
    from headmaster.pipelines.workers import EmbedWorker, WorkerOptions
    from headmaster.repository.repo import Repository
    from headmaster.store import open_store

    options = WorkerOptions(
        group=group,
        batch=batch,
        claim_idle_ms=claim_idle_ms,
        max_tries=max_tries,
        max_backlog=max_backlog,
        **({"consumer": consumer} if consumer else {}),
    )
    worker = EmbedWorker(
        _broker(redis, None), open_store(store), bytes_embedder(Repository(repo), server), options, stream, output
    )
    _run(worker, exit_when_idle)


@app.command("heads")
def heads_command(
    store: StoreOption,
    redis: RedisOption = DEFAULT_REDIS,
    repo: RepoOption = DEFAULT_REPO,
    stream: Annotated[str, typer.Option(help="Embeddings stream.")] = EMBEDDINGS,
    group: str = HEADS_GROUP,
    consumer: Annotated[str | None, typer.Option(help="This worker's name in the group (default host-pid).")] = None,
    batch: Annotated[int, typer.Option(help="Entries per read.")] = 256,
    claim_idle_ms: ClaimOption = 30000,
    max_tries: TriesOption = 5,
    exit_when_idle: IdleOption = None,
) -> None:
    """Run every live head of the repository on queued embeddings (CPU), store the labels."""
    from headmaster.pipelines.workers import HeadsWorker, LiveHeads, WorkerOptions
    from headmaster.store import open_store

    heads = LiveHeads(repo)
    if not heads.current():  # a broken repository fails here too, in one line
        raise PipelineError(
            f"{repo} serves no head: the worker would acknowledge every entry without a label; "
            "make a head first (`headmaster zero-shot` or `train-head`)",
            option="repo",
        )
    options = WorkerOptions(
        group=group,
        batch=batch,
        claim_idle_ms=claim_idle_ms,
        max_tries=max_tries,
        **({"consumer": consumer} if consumer else {}),
    )
    worker = HeadsWorker(_broker(redis, None), open_store(store), heads, options, stream)
    _run(worker, exit_when_idle)
    if worker.latencies:
        import numpy as np

        lat = np.array(worker.latencies)
        console.print(
            f"enqueue -> stored label: p50 {np.percentile(lat, 50) * 1000:.0f} ms, "
            f"p99 {np.percentile(lat, 99) * 1000:.0f} ms",
            highlight=False,
        )


@app.command("submit")
def submit_command(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    redis: RedisOption = DEFAULT_REDIS,
    stream: Annotated[str, typer.Option(help="Images stream.")] = IMAGES,
    send_bytes: Annotated[
        bool,
        typer.Option(
            "--bytes", help="Put the image bytes on the queue, not their path (for workers on other machines)."
        ),
    ] = False,
    max_backlog: Annotated[int, typer.Option(help="Wait while the stream holds this many unfinished entries.")] = 10000,
    timeout: Annotated[float, typer.Option(help="Give up when the stream stays full this many seconds.")] = 600.0,
) -> None:
    """Queue images for the embed workers (waiting while the stream is at its bound)."""
    from headmaster.images import collect_images

    files = collect_images(paths)
    broker = _broker(redis)
    for path in files:
        fields = {"data": path.read_bytes()} if send_bytes else {"uri": str(path.resolve())}
        fields["enqueued_at"] = repr(time.time())
        broker.publish(stream, fields, max_backlog=max_backlog, timeout_s=timeout)
    console.print(f"{len(files)} images queued on {stream}", highlight=False)


@app.command("status")
def status_command(
    redis: RedisOption = DEFAULT_REDIS,
    stream: Annotated[list[str] | None, typer.Option(help="Only these streams (default: every stream).")] = None,
) -> None:
    """Length, lag and pending entries per consumer group of each stream."""
    table = Table(show_header=True, header_style="bold")
    for column in ("stream", "group", "length", "lag", "pending", "pending per consumer"):
        table.add_column(column)
    broker = _broker(redis)
    rows = broker.status(stream or None)
    for row in rows:
        table.add_row(
            row.stream,
            row.group,
            str(row.length),
            str(row.lag) if row.lag >= 0 else "?",
            str(row.pending),
            ", ".join(f"{c} {n}" for c, n in row.consumers.items()),
        )
    for name in sorted(set(stream or []) - {r.stream for r in rows}):
        table.add_row(name, "(no group reads it)", "-", "-", "-", "")
    out.print(table)
