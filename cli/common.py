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
RepoOption = Annotated[Path, typer.Option("--repo", help="The model repository folder.")]
ServerOption = Annotated[str | None, typer.Option(
    "--server", help="HTTP address (host:port) of the server to make the change live on (default: the server "
                     "`headmaster serve` recorded in the repository, if it runs; its key from HEADMASTER_API_KEY "
                     "otherwise).")]
StoreOption = Annotated[str, typer.Option(
    "--store", envvar="HEADMASTER_STORE",
    help="The store: a folder (written by `classify --store`) or postgresql://... [env HEADMASTER_STORE]")]
# Parameters whose flag is not simply --<name with dashes>: used to name the flag to change.
FLAGS = {"kind": "--model", "data": "DATA", "format": "--format", "val_fraction": "--val-fraction"}


def flag(option: str) -> str:
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def progress(what: str, total: int | None = None) -> tuple[Progress, object]:
    """A transient progress bar (count, bar, ETA) and its task."""
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=console, transient=True)
    return bar, bar.add_task(what, total=total)
