"""`headmaster backfill`: a catalogue into the store on Ray Data (the `[ray]` extra)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from headmaster.cli.common import DEFAULT_REPO, RepoOption, StoreOption, console, out
from headmaster.errors import PipelineError


def _progress_printer(every_s: float = 2.0):
    last = [0.0]

    def show(report) -> None:
        if time.monotonic() - last[0] < every_s:
            return
        last[0] = time.monotonic()
        done = report.embedded + report.skipped + len(report.failures)
        rate = done / report.seconds if report.seconds else 0.0
        eta = (report.total - done) / rate if rate else float("nan")
        console.print(
            f"backfill: {done} of {report.total} ({100 * done / max(report.total, 1):.0f}%), "
            f"{rate:.1f} img/s, ETA {eta:.0f} s",
            highlight=False,
        )

    return show


def backfill_command(
    source: Annotated[
        str,
        typer.Argument(
            help="A folder, an s3:// prefix, or a .parquet/.csv listing of URIs (column 'uri', else the first)."
        ),
    ],
    store: StoreOption,
    repo: RepoOption = DEFAULT_REPO,
    server: Annotated[
        str | None,
        typer.Option(help="Embed through this Triton server's `embed` model (gRPC host:port); without it, --local."),
    ] = None,
    local: Annotated[
        bool,
        typer.Option(
            "--local", help="Run the repository's exported encoder in each actor (the default when no --server)."
        ),
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(
            help="Join this Ray cluster (ray://... or host:port); without it a local cluster runs for the command."
        ),
    ] = None,
    actors: Annotated[int, typer.Option(help="Embedding actors.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Images per actor call.")] = 32,
    write_batch: Annotated[int, typer.Option(help="Items per store write.")] = 256,
    failures: Annotated[Path | None, typer.Option(help="Write the unreadable images and why as CSV here.")] = None,
) -> None:
    """Embed and label a catalogue into the store; resumable (stored images are skipped)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise PipelineError("backfill runs on Ray: pip install 'headmaster[ray]'") from None
    from headmaster.pipelines.backfill import BackfillOptions, backfill
    from headmaster.store import open_store

    if server and local:
        raise PipelineError("give --server or --local, not both", option="local")
    options = BackfillOptions(
        repo=repo, server=server, address=address, actors=actors, embed_batch=batch_size, write_batch=write_batch
    )
    report = backfill(source, open_store(store), options, progress=_progress_printer())
    for uri, reason in report.failures[:20]:
        console.print(f"unreadable: {uri}: {reason}", highlight=False)
    if len(report.failures) > 20:
        console.print(f"... and {len(report.failures) - 20} more" + (f" (all in {failures})" if failures else ""))
    if failures:
        import csv

        failures.parent.mkdir(parents=True, exist_ok=True)
        with open(failures, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["uri", "reason"])
            writer.writerows(report.failures)
    labelled = ", ".join(f"{head} {n}" for head, n in sorted(report.labelled.items())) or "none"
    out.print(
        f"{report.total} images: {report.embedded} embedded, {report.skipped} already stored, "
        f"{len(report.failures)} unreadable; labels written: {labelled}"
        + (f" ({report.relabelled} completed from stored embeddings)" if report.relabelled else "")
        + f"; {report.seconds:.1f} s, {report.rate:.1f} img/s",
        highlight=False,
    )
    if report.failures:
        raise typer.Exit(2)
