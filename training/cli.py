"""`headmaster zero-shot`: heads from text prompts (trained heads come with train-head)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


def _parse_thresholds(values: list[str]) -> dict[str, float]:
    thresholds = {}
    for value in values:
        label, sep, number = value.rpartition("=")
        try:
            thresholds[label.strip()] = float(number)
        except ValueError:
            label = ""
        if not sep or not label.strip():
            raise typer.BadParameter(f"{value!r}: expected LABEL=NUMBER, e.g. 'cat=0.7'", param_hint="--threshold")
    return thresholds


def zero_shot(
    name: Annotated[str, typer.Argument(help="Head name: lowercase letters, digits, '_'.")],
    label: Annotated[list[str], typer.Option(
        "--label", help="A label: 'text' or 'name=prompt text'. Repeat; two or more.")],
    repo: Annotated[Path, typer.Option("--repo", help="The model repository folder.")] = Path("model_repository"),
    template: Annotated[list[str] | None, typer.Option(
        "--template", help="Prompt template with {} for the label; repeat to average several. "
                           "Default: 'a photo of {}.'")] = None,
    threshold: Annotated[list[str] | None, typer.Option(
        "--threshold", help="LABEL=SCORE: accept LABEL only at or above SCORE (default 0: the top label).")] = None,
    server: Annotated[str | None, typer.Option(
        "--server", help="HTTP address (host:port) of a running server to hot-load the head into.")] = None,
) -> None:
    """Make (the next version of) a head from text prompts, embedded by the encoder's text tower."""
    from headmaster.training.zero_shot import DEFAULT_TEMPLATES, create_zero_shot_head

    card = create_zero_shot_head(repo, name, label, tuple(template or DEFAULT_TEMPLATES),
                                 _parse_thresholds(threshold or []))
    console.print(f"[green]head {card.name} v{card.version}[/] (zero-shot): {', '.join(card.labels)}")
    if server:
        from headmaster.model_repository import live

        live.head_published(server, card.name)
        console.print(f"loaded into the server at {server}")
