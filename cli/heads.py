"""The head commands: `zero-shot`, `train-head`, `heads` (list, remove, import), `rollback`.

Each changes the repository through `lifecycle.operations`, which also makes the change
live on the server that serves it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headmaster.cli.common import DEFAULT_REPO, RepoOption, ServerOption, console, out, progress


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
    label: Annotated[
        list[str], typer.Option("--label", help="A label: 'text' or 'name=prompt text'. Repeat; two or more.")
    ],
    repo: RepoOption = DEFAULT_REPO,
    template: Annotated[
        list[str] | None,
        typer.Option(
            "--template",
            help="Prompt template with {} for the label; repeat to average several. "
            "Default: 'a photo of {}.' (a text encoder: '{}', the description as written)",
        ),
    ] = None,
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            "--threshold", help="LABEL=SCORE: accept LABEL only at or above SCORE (default 0: the top label)."
        ),
    ] = None,
    server: ServerOption = None,
    replace_trained: Annotated[bool, typer.Option(help="Replace a live trained head of that name.")] = False,
    logit_scale: Annotated[
        float | None,
        typer.Option(
            "--logit-scale",
            help="Multiply cosines by this before the softmax. Default: the encoder's own; "
            "20 for a text encoder, which has none.",
        ),
    ] = None,
) -> None:
    """Make (the next version of) a head from text prompts, embedded by the encoder's text tower.

    On a text encoder's repository (st:...), the head scores texts against the labels'
    descriptions, embedded by the same encoder."""
    from headmaster.server import live
    from headmaster.training.heads.zero_shot import create_zero_shot_head

    target = live.find(repo, server)
    card = create_zero_shot_head(
        repo,
        name,
        label,
        tuple(template) if template else None,
        _parse_thresholds(threshold or []),
        replace_trained,
        server,
        logit_scale,
    )
    console.print(
        f"[green]head {card.name} v{card.version}[/] (zero-shot, logit scale "
        f"{card.details['logit_scale']:g}): {', '.join(card.labels)}"
        + (f"; live on the server at {target.http_url}" if target else "; no server serves this repository")
    )


def _print_report(result) -> None:
    checks, metrics, card = result.checks, result.metrics, result.card
    data = Table(title="data", show_header=True)
    for column in ("label", "images", "class weight"):
        data.add_column(column)
    for label, count in checks.counts.items():
        data.add_row(label, str(count), f"{checks.class_weights.get(label, 1.0):.2f}")
    out.print(data)
    for warning in checks.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    for path, why in checks.unreadable[:20]:
        console.print(f"[yellow]skipped[/] {path}: {why}")
    if len(checks.unreadable) > 20:
        console.print(f"[yellow]... and {len(checks.unreadable) - 20} more skipped files[/]")
    for a, b, cosine in checks.near_duplicates[:10]:
        console.print(f"near duplicate ({cosine:.3f}): {a} ~ {b}")
    if card.task != "labels":
        from headmaster.training.heads.task_metrics import summary_lines

        out.print(f"validation ({metrics['n']} images, never trained on), {card.task} head:")
        for line in summary_lines(metrics):
            out.print(f"  {line}")
        return
    per_label = Table(title=f"validation ({metrics['n']} images, never trained on)", show_header=True)
    for column in ("label", "precision", "recall", "F1", "support", "threshold", "why this threshold"):
        per_label.add_column(column)
    for row in result.thresholds:
        m = metrics["per_label"][row["label"]]
        per_label.add_row(
            row["label"],
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
            f"{m['f1-score']:.3f}",
            str(int(m["support"])),
            f"{row['threshold']:.3f}",
            row["why"],
        )
    out.print(per_label)
    if metrics["multi_label"]:
        out.print(
            f"micro-F1 {metrics['micro_f1']:.3f}  macro-F1 {metrics['macro_f1']:.3f}  "
            f"exact-set accuracy {metrics['subset_accuracy']:.3f}"
        )
    else:
        out.print(
            f"accuracy (top label) {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}  "
            f"with thresholds: {metrics['thresholded']['coverage']:.1%} of images get a label, "
            f"{metrics['thresholded']['accuracy_of_accepted']:.3f} of those correct"
        )
        matrix = Table(title="confusion matrix (rows: actual, columns: predicted)", show_header=True)
        matrix.add_column("")
        for label in card.labels:
            matrix.add_column(label)
        for label, row in zip(card.labels, metrics["confusion_matrix"]):
            matrix.add_row(label, *map(str, row))
        out.print(matrix)


def train_head_command(
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Folder with one sub-folder of images per bucket (the folder name is the label; .txt files for a "
            "text encoder's repository), or a dataset snapshot (`headmaster dataset export`)."
        ),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Head name: lowercase letters, digits, '_'.")] = ...,
    repo: RepoOption = DEFAULT_REPO,
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="Multi-label data instead of folders: CSV (path,labels with ';') or JSONL ({path, labels}); for a "
            "text encoder's repository, a CSV of text,label (single-label)."
        ),
    ] = None,
    model: Annotated[
        str, typer.Option("--model", help="linear (L-BFGS, its L2 chosen on validation) or mlp (AdamW).")
    ] = "linear",
    hidden: Annotated[int, typer.Option(help="MLP hidden width.")] = 512,
    epochs: Annotated[int, typer.Option(help="MLP: most epochs (early stopping on validation loss).")] = 300,
    learning_rate: Annotated[float, typer.Option(help="MLP: AdamW learning rate.")] = 5e-3,
    seed: Annotated[int, typer.Option(help="Same data and seed give the same head.")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Share of the images kept for validation.")] = 0.2,
    thresholds: Annotated[str, typer.Option(help="best-f1, precision (see --target-precision) or none.")] = "best-f1",
    target_precision: Annotated[float, typer.Option(help="With --thresholds precision.")] = 0.9,
    positive: Annotated[
        str | None, typer.Option(help="Binary heads: the label that gets a threshold; the other is the fallback.")
    ] = None,
    server: ServerOption = None,
    local: Annotated[bool, typer.Option(help="Embed on this machine even when --server is given.")] = False,
    cache: Annotated[
        Path | None, typer.Option(help="Embedding cache (default ~/.cache/headmaster/embeddings).")
    ] = None,
    keep: Annotated[int, typer.Option(help="Versions kept on disk for rollback.")] = 5,
    store: Annotated[
        str | None,
        typer.Option(
            help="Train from the people's labels in this store: frozen as a snapshot first (in STORE/snapshots), "
            "embeddings as stored."
        ),
    ] = None,
    ood: Annotated[
        str,
        typer.Option(
            "--ood",
            help="Images unlike the training data (kNN distance to it beyond the 95%-of-validation "
            "threshold): 'flag' labels them with \"ood\": true, 'abstain' gives them no label, 'off' "
            "keeps no reference set.",
        ),
    ] = "flag",
    ood_references: Annotated[
        int,
        typer.Option(
            "--ood-references",
            help="Training embeddings kept for the kNN (a seeded subsample beyond; "
            "beyond 10,000 they are searched through faiss IVF).",
        ),
    ] = 100_000,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="labels (flat), hierarchy (nested label folders, or --taxonomy), regression (--manifest "
            "CSV path,<value>) or ordinal (class folders, lowest first by --order).",
        ),
    ] = "labels",
    taxonomy: Annotated[
        Path | None,
        typer.Option("--taxonomy", help="Hierarchy: a CSV of parent,child rows (default: the folders' nesting)."),
    ] = None,
    order: Annotated[
        str | None,
        typer.Option(
            "--order",
            help="Ordinal: the class folders lowest first, comma-separated, e.g. G,PG,R,X "
            "(default: numeric order of the folder names).",
        ),
    ] = None,
    candidate: Annotated[
        bool,
        typer.Option(
            "--candidate",
            help="Publish without going live, to test it first: `headmaster heads canary NAME "
            "--version N --share 0.1` (or --shadow).",
        ),
    ] = False,
) -> None:
    """Train the next version of a head from labelled images and publish it (hot-loaded with --server)."""
    from headmaster.training.heads.train_head import TrainOptions, train_head
    from headmaster.training.heads.trainer import TrainConfig

    options = TrainOptions(
        name=name,
        repo=repo,
        data=data,
        manifest=manifest,
        server=server,
        local=local,
        config=TrainConfig(kind=model, hidden=hidden, epochs=epochs, learning_rate=learning_rate, seed=seed),
        val_fraction=val_fraction,
        thresholds=thresholds,
        target_precision=target_precision,
        positive=positive,
        cache_dir=cache,
        keep=keep,
        store=store,
        ood=ood,
        ood_references=ood_references,
        task=task,
        taxonomy=taxonomy,
        order=tuple(o.strip() for o in order.split(",")) if order else None,
        candidate=candidate,
    )
    bar, task = progress("embedding", None)
    with bar:
        result = train_head(options, lambda done, total: bar.update(task, completed=done, total=total))
    _print_report(result)
    if result.card.ood:
        o = result.card.ood
        console.print(
            f"out of distribution ({o['policy']}): kNN k={o['k']} over {o['references']} training "
            f"embeddings, distance > {o['threshold']:.4f} (95% of validation images are nearer)"
        )
    console.print(
        f"[green]head {result.card.name} v{result.card.version}[/] ({result.card.kind}, "
        f"{_task_words(result.card)}): {', '.join(result.card.labels)}"
        + (
            "; a candidate, not live: test it with `headmaster heads canary "
            f"{result.card.name} --version {result.card.version} --share 0.1` (or --shadow)"
            if candidate
            else f"; live on the server at {result.server}"
            if result.server
            else "; no server serves this repository"
        )
    )


def _task_words(card) -> str:
    """What kind of head it is, in the words the summary line uses (a regression head has one
    output, which is no 'single label')."""
    if card.task != "labels":
        return card.task
    return "multi-label" if card.multi_label else "single-label"


heads_app = typer.Typer(help="List, remove and import heads.", invoke_without_command=True)


def _metric(card) -> str:
    metrics = card.details.get("metrics") or {}
    if "accuracy" in metrics:
        return f"acc {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
    if "micro_f1" in metrics:
        return f"micro-F1 {metrics['micro_f1']:.3f}"
    return "-"


@heads_app.callback()
def heads(ctx: typer.Context, repo: RepoOption = DEFAULT_REPO) -> None:
    """List heads: versions on disk, the live one, labels, kind and validation metrics."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from headmaster.export.heads import HeadCard
    from headmaster.repository.layout import version_dir
    from headmaster.repository.repo import Repository

    repository = Repository(repo)
    table = Table(title=f"heads in {repo} (encoder {repository.card.model} {repository.card.short_fingerprint})")
    for column in ("head", "version", "live", "kind", "labels", "validation", "created"):
        table.add_column(column)
    for state in repository.heads():
        for version in reversed(state.versions):
            card = HeadCard.load(version_dir(repository.path, state.name, version))
            table.add_row(
                state.name,
                str(version),
                "[green]live[/]" if version == state.live else "",
                card.kind + (" multi-label" if card.multi_label else ""),
                ", ".join(card.labels),
                _metric(card),
                card.created,
            )
    out.print(table)


@heads_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="The head to take out.")],
    repo: RepoOption = DEFAULT_REPO,
    server: ServerOption = None,
) -> None:
    """Take a head out of the repository, and out of the server that serves it."""
    from headmaster.lifecycle import operations as lifecycle

    change = lifecycle.remove(repo, name, server)
    console.print(f"removed head {name} from {repo}" + _where(change))


@heads_app.command("import")
def import_(
    version_dir: Annotated[Path, typer.Argument(help="A head version folder (model.onnx + head.json).")],
    repo: RepoOption = DEFAULT_REPO,
    name: Annotated[str | None, typer.Option(help="Publish under another name.")] = None,
    server: ServerOption = None,
) -> None:
    """Publish a head version made elsewhere as the next version here (same encoder only)."""
    from headmaster.lifecycle import operations as lifecycle
    from headmaster.repository.repo import Repository
    from headmaster.repository.validation import check_version_dir

    here = Repository(repo)  # a corrupt folder is refused in one line (InvalidVersionError), before anything
    check_version_dir(version_dir, here.fingerprint, here.card.embed_dim)

    change = lifecycle.import_version(repo, version_dir, name, server)
    card = change.card
    console.print(f"[green]head {card.name} v{card.version}[/] imported from {version_dir}" + _where(change))


def rollback(
    name: Annotated[str, typer.Argument(help="The head to roll back.")],
    to: Annotated[int | None, typer.Option(help="Version to serve (default: the one before the live one).")] = None,
    repo: RepoOption = DEFAULT_REPO,
    server: ServerOption = None,
) -> None:
    """Serve an older version of a head again (validated first)."""
    from headmaster.lifecycle import operations as lifecycle

    change = lifecycle.rollback(repo, name, to, server)
    console.print(f"head {name} now serves v{change.version}" + _where(change))


def _where(change) -> str:
    return f"; live on the server at {change.server}" if change.server else "; no server serves this repository"


def rollout(
    repo: RepoOption = DEFAULT_REPO,
    server: Annotated[
        str,
        typer.Option(
            "--server",
            help="The replicas' HTTP addresses (host:port), separated by commas; the key from HEADMASTER_API_KEY.",
        ),
    ] = ...,
) -> None:
    """Make every replica of a repository load the head versions it names now, one replica after
    another, then check that they all serve the same versions; stragglers are named (exit 1)."""
    from headmaster.repository import s3
    from headmaster.repository.repo import Repository
    from headmaster.server import live

    repository = Repository(repo)
    wanted = {state.name: str(state.live) for state in repository.heads()}
    replicas = live.find(repo, server)
    report = live.rollout(replicas, list(wanted))
    stragglers = {url: why for url, why in report.items() if why}
    for control in live.members(replicas):
        if control.http_url in stragglers:
            continue
        serving = live.loaded(control)
        wrong = {head: serving.get(head) for head, version in wanted.items() if serving.get(head) != version}
        if wrong:
            stragglers[control.http_url] = "serves " + ", ".join(f"{h} v{v}" for h, v in wrong.items())
    for url in report:
        console.print(
            f"  {url}: " + (f"[red]straggler[/]: {stragglers[url]}" if url in stragglers else "[green]ok[/]"),
            highlight=False,
        )
    versions = ", ".join(f"{head} v{version}" for head, version in wanted.items()) or "no heads"
    if stragglers:
        console.print(
            f"[red]{len(stragglers)} of {len(report)} replicas do not serve[/] {versions} from {s3.describe(repo)}",
            highlight=False,
        )
        raise typer.Exit(1)
    console.print(f"[green]{len(report)} replicas serve[/] {versions} from {s3.describe(repo)}", highlight=False)
