"""The `headmaster` command: one module per command group, assembled here.

export.py (export ...), repo.py (repo build / check / repair), serve.py (serve), heads.py
(zero-shot, train-head, heads, rollback), classify.py, store.py (rescore, correct, suggest,
reembed, dataset), improve.py (improve, history), eval.py, quickstart.py, backfill.py, worker.py (worker embed / heads /
submit / status); common.py holds the consoles and shared options.
Package errors print as one line without a traceback, naming the flag to change when the
library says which parameter was at fault.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.logging import RichHandler

from headmaster.cli import (
    ab,
    backfill,
    classify,
    distill,
    drift,
    eval,
    export,
    heads,
    improve,
    quickstart,
    repo,
    serve,
    store,
    worker,
)
from headmaster.cli.common import console, flag
from headmaster.client.errors import ClientError
from headmaster.errors import HeadmasterError

app = typer.Typer(
    name="headmaster",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Classify content with foundation-model embeddings and tiny heads on Triton.",
)
app.add_typer(export.app, name="export")
app.add_typer(repo.app, name="repo")
app.command("serve")(serve.serve)
app.command("zero-shot")(heads.zero_shot)
app.command("train-head")(heads.train_head_command)
app.add_typer(heads.heads_app, name="heads")
for _name, _command in (("canary", ab.canary), ("compare", ab.compare), ("promote", ab.promote), ("abort", ab.abort)):
    heads.heads_app.command(_name)(_command)
app.command("rollback")(heads.rollback)
app.command("rollout")(heads.rollout)
app.command("classify")(classify.classify)
app.command("rescore")(store.rescore_command)
app.command("correct")(store.correct_command)
app.command("suggest")(store.suggest_command)
app.command("reembed")(store.reembed_command)
app.add_typer(store.dataset_app, name="dataset")
app.command("eval")(eval.eval_command)
app.command("distill")(distill.distill_command)
app.command("quickstart")(quickstart.quickstart)
app.command("backfill")(backfill.backfill_command)
app.add_typer(worker.app, name="worker")
app.command("drift")(drift.drift_command)
app.command("improve")(improve.improve_command)
app.command("history")(improve.history_command)


@app.callback()
def _options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def main() -> None:
    try:
        app()
    except HeadmasterError as e:
        hint = f" (change {flag(e.option)})" if e.option else ""
        console.print(f"[bold red]error:[/] {e}{hint}", highlight=False)
        sys.exit(1)
    except ClientError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
