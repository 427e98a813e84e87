"""`headmaster eval`: a head version on labelled images kept aside -> terminal tables + a report folder.

The report folder gets index.html (one self-contained page to review mistakes), metrics.json,
corrections.csv (likely label errors, for `headmaster correct --csv`) and the plots as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headmaster.cli.common import DEFAULT_REPO, RepoOption, console, out, progress

SHOWN = 10  # findings listed in the terminal; the report has them all


def _per_label_table(e) -> Table:
    table = Table(title=f"{e.head.title}: per label ({e.metrics['n']} holdout images)")
    for column in ("label", "precision", "recall", "F1", "support", "threshold"):
        table.add_column(column, justify="right")
    for (label, m), t in zip(e.metrics["per_label"].items(), e.head.card.thresholds):
        table.add_row(
            label,
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
            f"{m['f1-score']:.3f}",
            str(int(m["support"])),
            f"{t:.3f}",
        )
    return table


def _confusion_table(e) -> Table:
    if e.multi_label:
        table = Table(title="per-label confusion")
        for column in ("label", "TP", "FN", "FP", "TN"):
            table.add_column(column, justify="right")
        for label, c in zip(e.labels, e.confusion):
            table.add_row(label, str(c[1, 1]), str(c[1, 0]), str(c[0, 1]), str(c[0, 0]))
        return table
    table = Table(title="confusion matrix (rows: actual, columns: top label)")
    table.add_column("")
    for label in e.labels:
        table.add_column(label, justify="right")
    for a, (label, row) in enumerate(zip(e.labels, e.confusion)):
        table.add_row(
            label, *(f"[bold]{v}[/]" if a == p else (f"[red]{v}[/]" if v else "0") for p, v in enumerate(row))
        )
    return table


def _summary(e) -> str:
    m = e.metrics
    if e.multi_label:
        text = f"subset accuracy {m['subset_accuracy']:.3f}  micro-F1 {m['micro_f1']:.3f}  macro-F1 {m['macro_f1']:.3f}"
    else:
        text = (
            f"accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  "
            + "".join(f"top-{k} {v:.3f}  " for k, v in m.get("top_k_accuracy", {}).items())
            + f"with thresholds: {m['thresholded']['coverage']:.1%} get a label, "
            f"{m['thresholded']['accuracy_of_accepted']:.3f} of those right"
        )
    text += f"  ECE {m['calibration']['ece']:.3f}"
    for label, pr in m.get("precision_recall", {}).items():
        text += f"  AP({label}) {pr['average_precision']:.3f}"
    return text


def _ood_summary(o: dict) -> str:
    text = (
        f"out of distribution ({o['ood_images']} images from {o['ood_source']}): AUROC {o['auroc']:.3f}  "
        f"FPR at 95% TPR {o['fpr_at_95_tpr']:.3f}  version threshold {o['version_threshold']:.4f} (k={o['k']}, "
        f"{o['policy']}): {o['holdout_kept']:.1%} of the holdout kept, {o['ood_rejected']:.1%} of the others "
        f"rejected; others given a label {o['ood_labelled_without_rule']:.1%} -> {o['ood_labelled_with_rule']:.1%} "
        "when abstaining"
    )
    if "holdout_with_rule" in o:
        a, b = o["holdout_without_rule"], o["holdout_with_rule"]
        text += (
            f"; holdout accuracy of accepted labels {a['accuracy_of_accepted']:.3f} ({a['coverage']:.1%} "
            f"labelled) -> {b['accuracy_of_accepted']:.3f} ({b['coverage']:.1%}) when abstaining"
        )
    return text


def print_run(run, quality, files) -> None:
    e, h = run.evaluation, run.holdout
    for path, why in h.skipped[:20]:
        console.print(f"[yellow]skipped[/] {path}: {why}", highlight=False)
    if len(h.skipped) > 20:
        console.print(f"[yellow]... and {len(h.skipped) - 20} more skipped files[/]")
    if e.missing_labels:
        console.print(f"[yellow]note:[/] head labels with no holdout image: {', '.join(e.missing_labels)}")
    out.print(_per_label_table(e))
    out.print(_confusion_table(e))
    out.print(_summary(e), highlight=False)
    if "ood" in e.metrics:
        out.print(_ood_summary(e.metrics["ood"]), highlight=False)
    c = run.comparison
    if c is not None:
        table = Table(title=f"{c.a.head.title} vs {c.b.head.title}")
        for column in ("metric", c.a.head.title, c.b.head.title, "change"):
            table.add_column(column, justify="right")
        for name, x, y in c.rows:
            colour = "green" if y > x else "red" if y < x else "white"
            table.add_row(name, f"{x:.3f}", f"{y:.3f}", f"[{colour}]{y - x:+.3f}[/]")
        out.print(table)
        out.print(f"{len(c.changed)} of {len(h)} images changed prediction (listed with thumbnails in the report)")
    if quality is not None:
        for note in quality.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        out.print(
            f"likely label errors (cleanlab): {len(quality.label_issues)}; suggested fixes in {files.corrections}",
            highlight=False,
        )
        if quality.label_issues:
            table = Table(title=f"likely label errors (cleanlab): {len(quality.label_issues)}, most likely first")
            for column in ("rank", "image", "labelled", "looks like", "p(label)"):
                table.add_column(column)
            for issue in quality.label_issues[:SHOWN]:
                table.add_row(
                    str(issue.rank),
                    issue.path,
                    " + ".join(issue.given),
                    " + ".join(issue.suggested),
                    f"{issue.self_confidence:.3f}",
                )
            out.print(table)
        out.print(
            f"near duplicates in the holdout: {len(quality.near_duplicates)} pairs; leakage from training: "
            + (
                f"{len({x.holdout_path for x in quality.leaks})} holdout images"
                if quality.leakage_checked
                else "not checked"
            )
        )
    console.print(
        f"[green]report:[/] {files.html}  (metrics.json, corrections.csv and the plots beside it)", highlight=False
    )


def _eval_task(options, report: Path) -> None:
    from headmaster.training.evaluation.task_eval import make_task_report
    from headmaster.training.heads.task_metrics import summary_lines

    bar, task = progress("embedding", None)
    with bar:
        e, files = make_task_report(options, report, lambda done, total: bar.update(task, completed=done, total=total))
    for path, why in e.skipped[:20]:
        console.print(f"[yellow]skipped[/] {path}: {why}", highlight=False)
    out.print(f"{e.head.title} ({e.head.card.task}) on {e.source}: {len(e.paths)} images", highlight=False)
    for line in summary_lines(e.metrics):
        out.print(f"  {line}", highlight=False)
    console.print(f"[green]report:[/] {files.html}  (metrics.json and the plots beside it)", highlight=False)


def eval_command(
    name: Annotated[str, typer.Argument(help="The head to evaluate.")],
    report: Annotated[
        Path, typer.Option("--report", help="Folder for index.html, metrics.json, corrections.csv and the plots.")
    ],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Holdout: one sub-folder of hand-labelled images per label, never trained on."),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option("--manifest", help="Holdout for multi-label heads: CSV (path,labels with ';') or JSONL."),
    ] = None,
    snapshot: Annotated[
        Path | None,
        typer.Option(
            "--snapshot",
            help="Holdout from a dataset snapshot folder (`headmaster dataset export`): people's "
            "labels and stored embeddings.",
        ),
    ] = None,
    version: Annotated[int | None, typer.Option("--version", help="The version to evaluate (default: live).")] = None,
    compare: Annotated[
        tuple[int, int] | None, typer.Option("--compare", help="Two versions of NAME, side by side: --compare 2 3.")
    ] = None,
    against: Annotated[
        str | None,
        typer.Option(
            "--against", help="Another head with the same label names (e.g. zero-shot vs trained), side by side."
        ),
    ] = None,
    train_data: Annotated[
        Path | None,
        typer.Option(
            "--train-data",
            help="The head's training folder: leakage check and more data for the label-error "
            "check (default: the folder recorded in the head, if it exists).",
        ),
    ] = None,
    repo: RepoOption = DEFAULT_REPO,
    server: Annotated[
        str | None,
        typer.Option(
            "--server", help="HTTP address (host:port) of a running server to embed through (default: embed here)."
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Embedding cache (default ~/.cache/headmaster/embeddings).")
    ] = None,
    quality: Annotated[bool, typer.Option(help="Check label errors, near duplicates and leakage.")] = True,
    ood: Annotated[
        Path | None,
        typer.Option(
            "--ood",
            help="Folder of images unlike the head's data: AUROC and FPR at 95% TPR of its out-of-distribution "
            "rule, and what its threshold does to the accepted labels.",
        ),
    ] = None,
) -> None:
    """Evaluate a head on labelled images kept aside; write a review page of its mistakes."""
    from headmaster.training.evaluation.evaluate import EvalOptions
    from headmaster.training.evaluation.report import make_report

    # typer gives an unset tuple option as (None, None).
    compare = tuple(compare) if compare and all(v is not None for v in compare) else None
    options = EvalOptions(
        name=name,
        repo=repo,
        data=data,
        manifest=manifest,
        snapshot=snapshot,
        version=version,
        compare=compare,
        against=against,
        server=server,
        cache_dir=cache_dir,
        train_data=train_data,
        ood=ood,
    )
    from headmaster.repository.head_version import HeadVersion

    if HeadVersion.load(repo, name, version if not compare else compare[0]).card.task != "labels":
        _eval_task(options, report)
        return
    bar, task = progress("embedding", None)
    with bar:
        run, checked, files = make_report(
            options, report, lambda done, total: bar.update(task, completed=done, total=total), quality=quality
        )
    print_run(run, checked, files)
