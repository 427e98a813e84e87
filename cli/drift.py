"""`headmaster drift NAME --store STORE`: has the world under a live head changed?

Exit status: 0 no drift, 3 drift (for cron and CI), 1 an error (a window too small, a head with
no reference), as every command.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headmaster.cli.common import DEFAULT_REPO, RepoOption, StoreOption, console, out

DRIFT_EXIT = 3


def _when(value: str | None, option: str) -> dt.datetime | None:
    from headmaster.errors import DataError

    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise DataError(
            f"{value!r} is not an ISO date or time (2026-12-01 or 2026-12-01T06:00)", option=option
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def drift_command(
    name: Annotated[str, typer.Argument(help="The head.")],
    store: StoreOption,
    repo: RepoOption = DEFAULT_REPO,
    version: Annotated[int | None, typer.Option(help="The head version to judge by (default: the live one).")] = None,
    since: Annotated[str | None, typer.Option(help="Current window: items stored from this time (ISO, UTC).")] = None,
    until: Annotated[str | None, typer.Option(help="Current window: items stored before this time (ISO, UTC).")] = None,
    reference_since: Annotated[
        str | None,
        typer.Option(
            help="Reference window from the store instead of the version's training embeddings: from this time."
        ),
    ] = None,
    reference_until: Annotated[
        str | None, typer.Option(help="Reference window from the store: before this time.")
    ] = None,
    min_items: Annotated[int, typer.Option(help="Fewest items a window must hold to be tested.")] = 50,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write the report as an HTML page here.")] = None,
    metrics_out: Annotated[
        Path | None,
        typer.Option(
            "--metrics-file",
            help="Write the figures in Prometheus's text format here (node_exporter's textfile "
            "collector, or a Pushgateway).",
        ),
    ] = None,
) -> None:
    """Compare a current window of stored items with a reference (label share, top-score
    distribution, OOD rate, embedding MMD and domain classifier); exit 3 when any check finds drift."""
    from headmaster.repository.head_version import HeadVersion
    from headmaster.repository.repo import Repository
    from headmaster.store import open_store
    from headmaster.training.evaluation import drift

    repository = Repository(repo)
    head = HeadVersion.load(repository, name, version)
    opened = open_store(store, create=False)
    ref_since, ref_until = _when(reference_since, "reference_since"), _when(reference_until, "reference_until")
    if ref_since or ref_until:
        reference = drift.store_window(opened, name, repository.fingerprint, ref_since, ref_until, "reference")
    else:
        reference = drift.version_window(head)
    current = drift.store_window(
        opened, name, repository.fingerprint, _when(since, "since"), _when(until, "until"), "current"
    )
    report = drift.detect(head, reference, current, min_items=min_items)

    table = Table(
        title=f"{head.title}: {report.current} ({report.n_current}) vs {report.reference} ({report.n_reference})"
    )
    for column in ("check", "statistic", "value", "threshold", "verdict"):
        table.add_column(column, justify="right")
    for c in report.checks:
        threshold = "bootstrap" if c.threshold != c.threshold else f"{c.threshold:.4g}"  # NaN: a bootstrap threshold
        table.add_row(c.name, c.statistic, f"{c.value:.4g}", threshold, "[red]DRIFT[/]" if c.drift else "ok")
    out.print(table)
    for path, text in (
        (json_out, drift.to_json(report)),
        (html_out, drift.to_html(report)),
        (metrics_out, drift.to_metrics(report)),
    ):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if report.drift:
        console.print(f"drift: {', '.join(c.name for c in report.checks if c.drift)}")
        raise typer.Exit(DRIFT_EXIT)
