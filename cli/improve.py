"""`improve` (corrections -> a gated candidate, or a running test judged) and `history` (the ledger)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headmaster.cli.common import DEFAULT_REPO, RepoOption, ServerOption, StoreOption, console, out


def improve_command(
    name: Annotated[str, typer.Argument(help="The head to improve (it must have a live version).")],
    store: StoreOption = "store",
    golden: Annotated[
        Path | None,
        typer.Option(
            help="The frozen golden set the candidate is judged on: a dataset snapshot (`headmaster dataset export`) "
            "or a folder of label folders, never trained on. Recorded in the ledger; later runs reuse it."
        ),
    ] = None,
    replace_golden: Annotated[bool, typer.Option(help="Judge by another golden set than the recorded one.")] = False,
    repo: RepoOption = DEFAULT_REPO,
    server: ServerOption = None,
    model: Annotated[str, typer.Option("--model", help="linear or mlp (as train-head).")] = "linear",
    seed: Annotated[int, typer.Option(help="Same data and seed give the same candidate.")] = 0,
    drop_issues: Annotated[
        bool,
        typer.Option(
            "--drop-issues/--keep-issues",
            help="Leave the items cleanlab flags as likely mislabelled out of training (default: train on them; "
            "they are listed for people to check either way).",
        ),
    ] = False,
    max_accuracy_drop: Annotated[
        float, typer.Option(help="Refuse when golden accuracy falls by more than this (point estimate; -1: off).")
    ] = 0.0,
    require_gain: Annotated[
        bool,
        typer.Option(
            help="Refuse unless the golden set shows the candidate better: the interval of the accuracy difference "
            "wholly above 0 (a tie or a gain within the noise waits for more corrections)."
        ),
    ] = False,
    max_class_drop: Annotated[
        float, typer.Option(help="Refuse when a class's recall interval lies wholly below minus this.")
    ] = 0.0,
    ece_margin: Annotated[float, typer.Option(help="Refuse when the calibration error grows by more.")] = 0.03,
    ood_margin: Annotated[
        float, typer.Option(help="Refuse when the share of golden items flagged out of distribution grows by more.")
    ] = 0.05,
    confidence: Annotated[float, typer.Option(help="Of the bootstrap intervals.")] = 0.95,
    then: Annotated[
        str,
        typer.Option(
            help="After acceptance: none (a candidate on disk), shadow or canary (an A/B test through `heads canary`)."
        ),
    ] = "none",
    share: Annotated[float, typer.Option(help="With --then canary: the share of items the candidate answers.")] = 0.1,
    min_agreement: Annotated[
        float,
        typer.Option(help="A running test's candidate is promoted at or above this agreement with the live version..."),
    ] = 0.9,
    min_items: Annotated[int, typer.Option(help="... over at least this many items both versions labelled.")] = 100,
    force: Annotated[bool, typer.Option(help="Train even when nothing changed since the last decision.")] = False,
    cache: Annotated[Path | None, typer.Option(help="Embedding cache (for a golden folder of images).")] = None,
) -> None:
    """Train a candidate from the store's corrections, flag likely mislabels first, and gate it
    against the live version on a frozen golden set; accepted candidates are published (never
    live), refused ones leave the head untouched. With a test running, judge it instead.
    Every decision goes to the ledger (`headmaster history NAME`). Exit 3 when refused."""
    from headmaster.training.feedback.gate import GateOptions
    from headmaster.training.feedback.improve import ImproveOptions, improve
    from headmaster.training.heads.trainer import TrainConfig

    options = ImproveOptions(
        name=name,
        repo=repo,
        store=store,
        golden=golden,
        replace_golden=replace_golden,
        server=server,
        config=TrainConfig(kind=model, seed=seed),
        drop_issues=drop_issues,
        cache_dir=cache,
        gate=GateOptions(
            max_class_drop=max_class_drop,
            max_accuracy_drop=None if max_accuracy_drop < 0 else max_accuracy_drop,
            require_gain=require_gain,
            ece_margin=ece_margin,
            ood_margin=ood_margin,
            confidence=confidence,
            seed=seed,
        ),
        then=then,
        share=share,
        force=force,
        min_agreement=min_agreement,
        min_items=min_items,
    )
    result = improve(options)
    entry = result.entry
    if result.issues:
        console.print(
            f"[yellow]{len(result.issues)} likely mislabelled items[/] "
            f"({'left out of training' if drop_issues else 'trained on'}); check them in "
            f"{result.issues_csv}, then `headmaster correct --csv {result.issues_csv}`"
        )
    if result.gate is not None:
        _print_gate(result.gate)
    colour = {"accepted": "green", "promoted": "green", "refused": "red", "aborted": "red"}.get(
        result.decision, "yellow"
    )
    version = f" v{result.candidate}" if result.candidate else ""
    console.print(f"[{colour}]{result.decision}[/]{version}: {entry.get('reason', '')}", highlight=False)
    if result.decision == "accepted" and then == "none":
        console.print(
            f"a candidate, not live: `headmaster heads canary {name} --version {result.candidate} --shadow`, "
            "then `headmaster improve` again judges the test"
        )
    if result.decision in ("refused", "aborted"):
        raise typer.Exit(3)


def _print_gate(result) -> None:
    m = result.metrics
    table = Table(title=f"gate on {m['golden_items']} golden items: live v{m['live']['version']} vs candidate")
    for column in ("class", "items", "live recall", "candidate", "difference", "interval"):
        table.add_column(column)
    for label, c in m["classes"].items():
        worse = c["high"] < -m["options"]["max_class_drop"]
        table.add_row(
            label,
            str(c["items"]),
            f"{c['live']:.3f}",
            f"{c['candidate']:.3f}",
            f"[red]{c['difference']:+.3f}[/]" if worse else f"{c['difference']:+.3f}",
            f"[{c['low']:+.3f}, {c['high']:+.3f}]",
        )
    a = m["accuracy"]
    table.add_row(
        "(all)",
        str(m["golden_items"]),
        f"{m['live']['accuracy']:.3f}",
        f"{m['candidate']['accuracy']:.3f}",
        f"{a['difference']:+.3f}",
        f"[{a['low']:+.3f}, {a['high']:+.3f}]",
    )
    out.print(table)

    def rate(value) -> str:
        return "-" if value is None else f"{value:.1%}"

    out.print(
        f"ECE {m['live']['ece']:.3f} -> {m['candidate']['ece']:.3f}; out of distribution "
        f"{rate(m['live']['ood_rate'])} -> {rate(m['candidate']['ood_rate'])}"
    )
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")


def history_command(
    name: Annotated[str, typer.Argument(help="The head.")],
    repo: RepoOption = DEFAULT_REPO,
    last: Annotated[int, typer.Option(help="How many of the newest decisions to show (0: all).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ledger's entries as JSON lines.")] = False,
) -> None:
    """Every decision about the head's versions (improve's gate, tests started, promoted, aborted):
    when, what, which versions, the data it rested on, and why."""
    from headmaster.lifecycle import ledger
    from headmaster.repository.repo import Repository

    Repository(repo).head(name)  # an unknown head: that message, not an empty table
    entries = ledger.read(repo, name)
    if last:
        entries = entries[-last:]
    if as_json:
        for entry in entries:
            print(json.dumps(entry, default=str))
        return
    table = Table(title=f"history of head {name} ({len(entries)} decisions, {ledger.path(repo, name)})")
    for column in ("at", "decision", "live", "candidate", "data", "golden", "accuracy", "ECE", "reason"):
        table.add_column(column, overflow="fold")
    for e in entries:
        m = e.get("metrics") or {}
        accuracy = ece = ""
        if "live" in m and "candidate" in m:
            accuracy = f"{m['live']['accuracy']:.3f} -> {m['candidate']['accuracy']:.3f}"
            ece = f"{m['live']['ece']:.3f} -> {m['candidate']['ece']:.3f}"
        elif "agreement" in m:
            accuracy = f"agree {m['agreement']:.1%} of {m['items']}"
        snapshot = e.get("snapshot") or {}
        data = f"v{snapshot['number']} {snapshot['manifest_sha256'][7:19]} ({snapshot['items']})" if snapshot else ""
        golden = e.get("golden") or {}
        colour = {"accepted": "green", "promoted": "green", "refused": "red", "aborted": "red", "error": "red"}.get(
            e["decision"], ""
        )
        table.add_row(
            e["at"],
            f"[{colour}]{e['decision']}[/]" if colour else e["decision"],
            str(e.get("live_version") or ""),
            str(e.get("candidate_version") or ""),
            data,
            f"{golden['sha256'][7:19]} ({golden['items']})" if golden else "",
            accuracy,
            ece,
            e.get("reason", ""),
        )
    out.print(table)
