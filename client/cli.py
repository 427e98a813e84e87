"""The `headmaster` command: every folder's command group, assembled.

export/cli.py (export ...), model_repository/cli.py (repo ..., serve), training/cli.py
(zero-shot), and here the client side: classify and the end-to-end quickstart.
Package errors (HeadmasterError, ClientError) print as one clear line, without a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from headmaster.client.errors import ClientError
from headmaster.export import cli as export_cli
from headmaster.export.errors import HeadmasterError
from headmaster.model_repository import cli as repository_cli
from headmaster.model_repository.backends.preprocess import IMAGE_SUFFIXES
from headmaster.training import cli as training_cli
from headmaster.training import eval_cli, store_cli

console = Console(stderr=True, soft_wrap=True)
app = typer.Typer(name="headmaster", no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Classify content with foundation-model embeddings and tiny heads on Triton.")
app.add_typer(export_cli.app, name="export")
app.add_typer(repository_cli.app, name="repo")
app.command("serve")(repository_cli.serve)
app.command("zero-shot")(training_cli.zero_shot)
app.command("train-head")(training_cli.train_head_command)
app.add_typer(repository_cli.heads_app, name="heads")
app.command("rollback")(repository_cli.rollback)
app.command("rescore")(store_cli.rescore_command)
app.command("correct")(store_cli.correct_command)
app.command("suggest")(store_cli.suggest_command)
app.command("reembed")(store_cli.reembed_command)
app.add_typer(store_cli.dataset_app, name="dataset")
app.command("eval")(eval_cli.eval_command)



@app.callback()
def _options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])


def collect_images(paths: list[Path]) -> list[Path]:
    """Files named explicitly, plus the image files found under named folders."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)  # sent as-is: a missing or broken file gets its own error line
    return files


def _label_cell(result) -> str:
    if not result.ok:
        return f"[red]error: {result.error}[/]"
    return "  ".join(f"{name}: [bold]{', '.join(h.labels) or '-'}[/] ({h.top[1]:.2f})" for name, h in result.heads.items()) \
        or "(no heads)"


@app.command("classify")
def classify(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    url: Annotated[str | None, typer.Option(help="Server address host:port (default localhost:8001 for gRPC, "
                                                 "localhost:8000 for HTTP).")] = None,
    protocol: Annotated[str, typer.Option(help="grpc or http.")] = "grpc",
    output: Annotated[Path | None, typer.Option(help="Write one JSON line per image here.")] = None,
    embeddings: Annotated[bool, typer.Option(help="Include each embedding in --output.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per request.")] = 8,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for one request.")] = 120.0,
    store: Annotated[str | None, typer.Option(help="Keep embeddings and labels in this store (a folder, created "
                                                   "if new, or postgresql://...); stored images skip the encoder.")] = None,
    store_float16: Annotated[bool, typer.Option("--store-float16", help="A new store keeps embeddings as float16 "
                                                                      "(half the size).")] = False,
) -> None:
    """Classify images with the `classify` ensemble; prints labels, exits 2 if any image failed."""
    from headmaster.client import HeadmasterClient

    files = collect_images(paths)
    if not files:
        raise ClientError(f"no image files in {', '.join(map(str, paths))} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    with HeadmasterClient(url, protocol, batch_size=batch_size, max_in_flight=concurrency, timeout_s=timeout) as client:
        if not client.is_ready():
            raise ClientError(f"no ready Headmaster server at {client.url} ({protocol}); start one with `headmaster serve`")
        columns = (TextColumn("classifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("classify", total=len(files))
            advance = lambda n: progress.advance(task, n)  # noqa: E731
            if store:
                from headmaster.client.classify_store import classify_into_store
                from headmaster.client.store import open_store

                opened = open_store(store, embedding_dtype="float16" if store_float16 else "float32")
                results, stats = classify_into_store(client, opened, files, advance)
            else:
                results = client.classify(files, progress=advance)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w") as f:
            for result in results:
                f.write(json.dumps(result.to_dict(with_embedding=embeddings)) + "\n")
    table = Table(show_header=True, header_style="bold")
    table.add_column("image")
    table.add_column("labels (top score)")
    for result in results:
        table.add_row(result.source or "-", _label_cell(result))
    Console().print(table)
    failed = sum(not r.ok for r in results)
    console.print(f"{len(results) - failed} classified, {failed} failed" + (f"; results in {output}" if output else ""))
    if store:
        console.print(f"store {store}: {stats.embedded} embedded, {stats.reused} from stored embeddings")
    if failed:
        raise typer.Exit(2)


@app.command("quickstart")
def quickstart(
    workdir: Annotated[Path, typer.Option(help="Where the encoder, repository, images and results go.")] = Path("build/quickstart"),
    model: Annotated[str, typer.Option(help="open_clip model.")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="Pretrained tag or checkpoint; 'none' = random weights.")] = "none",
    images: Annotated[Path | None, typer.Option(help="Your own images (default: photos shipped in scikit-image/-learn).")] = None,
) -> None:
    """Export -> build the repository -> zero-shot heads -> serve -> classify real photos into a store -> print
    labels -> rescore the stored embeddings on CPU."""
    from headmaster.client.quickstart import run_quickstart

    run_quickstart(workdir, model, None if pretrained.lower() == "none" else pretrained, images, console)


def main() -> None:
    try:
        app()
    except (HeadmasterError, ClientError) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
