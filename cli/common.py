"""What every command module shares: the consoles, the options named the same everywhere,
progress bars."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)  # messages, progress, errors
out = Console(soft_wrap=True)  # results: tables a user may pipe or read

DEFAULT_REPO = Path("model_repository")


def repo_path(value) -> Path:
    """--repo: a folder, or s3://[host:port/]bucket/prefix, whose fresh local working copy the
    command then works on (repository/s3.py); a change to it is pushed back in order."""
    from headmaster.repository import s3

    return s3.working_copy(value)


RepoOption = Annotated[
    Path,
    typer.Option(
        "--repo",
        parser=repo_path,
        help="The model repository: a folder, or s3://BUCKET/PREFIX (endpoint from "
        "AWS_ENDPOINT_URL, or s3://HOST:PORT/BUCKET/PREFIX; credentials from AWS_*).",
    ),
]
ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="HTTP address (host:port) of the server to make the change live on (default: the server "
        "`headmaster serve` recorded in the repository, if it runs; its key from HEADMASTER_API_KEY "
        "otherwise). Several, separated by commas: the replicas of one S3 repository, changed in turn.",
    ),
]
StoreOption = Annotated[
    str,
    typer.Option(
        "--store",
        envvar="HEADMASTER_STORE",
        help="The store: a folder (written by `classify --store`) or postgresql://... [env HEADMASTER_STORE]",
    ),
]
# Parameters whose flag is not simply --<name with dashes>: used to name the flag to change.
FLAGS = {"kind": "--model", "data": "DATA", "format": "--format", "val_fraction": "--val-fraction"}


def flag(option: str) -> str:
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def progress(what: str, total: int | None = None) -> tuple[Progress, object]:
    """A transient progress bar (count, bar, ETA) and its task."""
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=console, transient=True)
    return bar, bar.add_task(what, total=total)
