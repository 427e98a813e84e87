"""`headmaster classify`: images through the served `classify` ensemble (optionally into a store)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headmaster.cli.common import console, out, progress
from headmaster.client.errors import ClientError
from headmaster.images import IMAGE_SUFFIXES, collect_images
from headmaster.texts import TEXT_SUFFIXES


def _label_cell(result) -> str:
    if not result.ok:
        return f"[red]error: {result.error}[/]"
    return "  ".join(_head_cell(name, h) for name, h in result.heads.items()) or "(no heads)"


def _head_cell(name: str, h) -> str:
    if h.value is not None:  # regression
        return f"{name}: [bold]{h.value:.3f}[/]"
    if h.ordinal_class is not None:
        return f"{name}: [bold]{h.ordinal_class}[/] (expected rank {h.expected:.2f})"
    # Flat labels, or a hierarchy's path (root first).
    return f"{name}: [bold]{', '.join(h.labels) or '-'}[/] ({h.top[1]:.2f})"


def classify(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Image files and/or folders (searched recursively); .txt files against a text encoder's server."
        ),
    ],
    url: Annotated[
        str | None,
        typer.Option(help="Server address host:port (default localhost:8001 for gRPC, localhost:8000 for HTTP)."),
    ] = None,
    protocol: Annotated[str, typer.Option(help="grpc or http.")] = "grpc",
    output: Annotated[Path | None, typer.Option(help="Write one JSON line per image here.")] = None,
    embeddings: Annotated[bool, typer.Option(help="Include each embedding in --output.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per request.")] = 8,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for one request.")] = 120.0,
    store: Annotated[
        str | None,
        typer.Option(
            help="Keep embeddings and labels in this store (a folder, created "
            "if new, or postgresql://...); stored images skip the encoder."
        ),
    ] = None,
    store_float16: Annotated[
        bool, typer.Option("--store-float16", help="A new store keeps embeddings as float16 (half the size).")
    ] = False,
) -> None:
    """Classify images with the `classify` ensemble; prints labels, exits 2 if any image failed."""
    from headmaster.client import HeadmasterClient

    with HeadmasterClient(url, protocol, batch_size=batch_size, max_in_flight=concurrency, timeout_s=timeout) as client:
        if not client.is_ready():
            raise ClientError(
                f"no ready Headmaster server at {client.url} ({protocol}); start one with `headmaster serve`"
            )
        text = client.classifies_text()  # a text encoder's server: .txt files, each one text
        suffixes = TEXT_SUFFIXES if text else IMAGE_SUFFIXES
        files = collect_images(paths, suffixes)
        if not files:
            raise ClientError(
                f"no {'text' if text else 'image'} files in {', '.join(map(str, paths))} "
                f"(looked for {', '.join(sorted(suffixes))})"
            )
        bar, task = progress("classifying", len(files))
        with bar:
            advance = lambda n: bar.advance(task, n)  # noqa: E731
            if store:
                from headmaster.store import open_store
                from headmaster.store.classify import classify_into_store

                opened = open_store(store, embedding_dtype="float16" if store_float16 else "float32")
                results, stats = classify_into_store(client, opened, files, advance)
            elif text:
                import dataclasses

                results = [
                    dataclasses.replace(r, source=str(f))
                    for f, r in zip(files, client.classify_text([f.read_bytes() for f in files], progress=advance))
                ]
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
    out.print(table)
    failed = sum(not r.ok for r in results)
    console.print(f"{len(results) - failed} classified, {failed} failed" + (f"; results in {output}" if output else ""))
    if store:
        console.print(f"store {store}: {stats.embedded} embedded, {stats.reused} from stored embeddings")
    if failed:
        raise typer.Exit(2)
