"""Commands on the store: rescore, correct, suggest, reembed, dataset export.

None of them needs a GPU or a server except ``reembed`` (which needs the new encoder, here
or in a running server).
"""

from __future__ import annotations

import csv
import getpass
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headmaster.cli.common import DEFAULT_REPO, RepoOption, StoreOption, console, out, progress, repo_path
from headmaster.errors import HeadmasterError

dataset_app = typer.Typer(no_args_is_help=True, help="Frozen training sets made from the store.")


def _open(store: str):
    from headmaster.store import open_store

    return open_store(store, create=False)


def rescore_command(
    name: Annotated[str, typer.Argument(help="The head.")],
    store: StoreOption = "store",
    version: Annotated[int | None, typer.Option(help="Head version (default: the live one).")] = None,
    repo: RepoOption = DEFAULT_REPO,
    batch_size: Annotated[int, typer.Option(help="Embeddings per onnxruntime call.")] = 65536,
) -> None:
    """Run a head version over every stored embedding on CPU and record its labels (no encoder, no server)."""
    from headmaster.repository.head_version import HeadVersion
    from headmaster.training.feedback.rescore import rescore

    bar, task = progress("rescoring", None)
    with bar:
        result = rescore(
            _open(store),
            HeadVersion.load(repo, name, version),
            batch_size,
            lambda done, total: bar.update(task, completed=done, total=total),
        )
    for fingerprint, count in result.refused.items():
        console.print(
            f"[yellow]refused[/] {count} items embedded with another encoder ({fingerprint}): "
            "`headmaster reembed` brings them to this one"
        )
    counts = ", ".join(f"{label} {n}" for label, n in result.label_counts.items())
    console.print(
        f"[green]{result.head} v{result.version}[/]: {result.rows} items rescored in "
        f"{result.seconds:.1f} s; accepted: {counts}"
    )


def correct_command(
    item: Annotated[str | None, typer.Argument(help="sha256 (or a unique prefix), stored URI, or image path.")] = None,
    head: Annotated[str | None, typer.Option("--head", help="The head the label is for.")] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="The right label; repeat for a multi-label head.")
    ] = None,
    none: Annotated[bool, typer.Option("--none", help="Multi-label heads: none of the labels applies.")] = False,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Many at once: columns item,label[,head,by,note].")
    ] = None,
    label_studio: Annotated[
        Path | None,
        typer.Option(
            "--label-studio",
            help="Many at once: a Label Studio JSON export of tasks made by `suggest --mix --output "
            "F.json` (the newest annotation per task; who and when from Label Studio).",
        ),
    ] = None,
    fiftyone: Annotated[
        Path | None,
        typer.Option(
            "--fiftyone",
            help="Many at once: a FiftyOne dataset folder exported (fo.types.FiftyOneDataset) after labelling "
            "the ground_truth field of `suggest --mix --format fiftyone` tasks (who: an annotator attribute, "
            "else --by; when: annotated_at, else last_modified_at).",
        ),
    ] = None,
    label_studio_url: Annotated[
        str | None,
        typer.Option(
            help="Many at once, over Label Studio's API: the server (http://host:port); with --project. "
            "The API key comes from $LABEL_STUDIO_API_KEY (a Personal Access Token or legacy token)."
        ),
    ] = None,
    project: Annotated[
        int | None, typer.Option(help="With --label-studio-url: the project `suggest --label-studio-url` made.")
    ] = None,
    store: StoreOption = "store",
    by: Annotated[str | None, typer.Option(help="Who says so (default: the login name).")] = None,
    note: Annotated[str, typer.Option(help="Why, for the record.")] = "",
    repo: RepoOption = DEFAULT_REPO,
) -> None:
    """Store a person's label for an item (checked against the head's labels when the repository has it)."""
    from headmaster.errors import DataError
    from headmaster.training.feedback.corrections import make_corrections, read_csv

    if sum(x is not None for x in (item, csv_file, label_studio, label_studio_url, fiftyone)) != 1:
        raise DataError(
            "give an ITEM (with --head and --label), --csv FILE, --label-studio FILE, --label-studio-url URL "
            "or --fiftyone DIR"
        )
    if fiftyone is not None:
        from headmaster.training.feedback.fiftyone_dataset import read_fiftyone

        rows, skipped = read_fiftyone(fiftyone, head)
        for why in skipped[:20]:
            console.print(f"[yellow]skipped[/] {why}")
    elif label_studio_url is not None:
        from headmaster.training.feedback.label_studio_api import KEY_ENV, LabelStudio, pull

        if project is None:
            raise DataError("--label-studio-url needs --project ID (the project the tasks went to)", option="project")
        rows, skipped = pull(LabelStudio(label_studio_url, os.environ.get(KEY_ENV)), project, head)
        for why in skipped[:20]:
            console.print(f"[yellow]skipped[/] {why}")
    elif label_studio is not None:
        from headmaster.training.feedback.review import read_label_studio

        rows, skipped = read_label_studio(label_studio, head)
        for why in skipped[:20]:
            console.print(f"[yellow]skipped[/] {why}")
    elif csv_file is not None:
        rows = read_csv(csv_file, head)
    else:
        if head is None or (not label and not none):
            raise DataError("a correction needs --head and --label (or --none for a multi-label head)")
        rows = [{"item": item, "head": head, "labels": tuple(label or ()), "note": note}]
    stored = make_corrections(_open(store), rows, by or getpass.getuser(), repo)
    for correction in stored[:20]:
        console.print(
            f"{correction.sha256[:12]} {correction.head}: {', '.join(correction.labels) or '(none)'} "
            f"(by {correction.by})"
        )
    console.print(f"[green]{len(stored)} corrections stored[/]")


def suggest_command(
    name: Annotated[str, typer.Argument(help="The head.")],
    n: Annotated[int, typer.Option("--n", help="How many items.")] = 50,
    store: StoreOption = "store",
    version: Annotated[int | None, typer.Option(help="Head version (default: the newest one in the store).")] = None,
    method: Annotated[
        str, typer.Option(help="margin (default) or entropy; see `headmaster suggest --help`.")
    ] = "margin",
    repo: RepoOption = DEFAULT_REPO,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Write a CSV (item,head,label,uncertainty,uri) to fill in and give to `correct --csv`; with --mix, "
            "F.json writes Label Studio tasks (and F.xml, its labelling config), F.csv a review CSV."
        ),
    ] = None,
    mix: Annotated[
        str | None,
        typer.Option(
            help="Review selection instead: shares of margin, threshold, ood, disagreement, diversity, random, e.g. "
            "'margin=0.5,ood=0.1,disagreement=0.1,diversity=0.2,random=0.1' ('default' for that). Items sent are "
            "recorded and never sent again."
        ),
    ] = None,
    max_per_day: Annotated[
        int | None, typer.Option(help="With --mix: at most this many items per head in 24 h.")
    ] = None,
    other: Annotated[
        int | None,
        typer.Option(help="With --mix: the version to disagree with (default: the running A/B test's candidate)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="With --mix: the random control's and diversity's seed.")] = 0,
    image_prefix: Annotated[
        str | None,
        typer.Option(
            help="Label Studio tasks: image URLs are this + the path under --image-root (e.g. '/data/local-files/?d=')."
        ),
    ] = None,
    image_root: Annotated[
        Path | None, typer.Option(help="With --image-prefix: the folder paths are relative to.")
    ] = None,
    output_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="With --mix: 'fiftyone' writes --output DIR as a FiftyOne dataset (fo.types.FiftyOneDataset: "
            "prediction and an empty ground_truth field); back with `correct --fiftyone EXPORT_DIR`.",
        ),
    ] = None,
    label_studio_url: Annotated[
        str | None,
        typer.Option(
            help="With --mix: import the batch as tasks into this Label Studio server (http://host:port), in a new "
            "project unless --label-studio-project; the API key comes from $LABEL_STUDIO_API_KEY."
        ),
    ] = None,
    label_studio_project: Annotated[
        int | None, typer.Option(help="With --label-studio-url: add the tasks to this project instead.")
    ] = None,
) -> None:
    """List the stored items the head is least sure about and nobody has corrected.

    margin: top score minus the second (single-label) or the smallest |score - threshold|
    (multi-label); smallest first. entropy: of the scores; largest first. With --mix: a review
    batch from several strategies, each item with the version's prediction, score and version."""
    from headmaster.errors import DataError
    from headmaster.repository.head_version import HeadVersion
    from headmaster.training.feedback.suggest import suggest

    if mix is None and (label_studio_url is not None or label_studio_project is not None):
        raise DataError("Label Studio tasks are a review batch: add --mix (e.g. --mix default)", option="mix")
    if output_format not in (None, "fiftyone"):
        raise DataError(f"unknown --format {output_format!r}: 'fiftyone' (else --output's suffix decides)")
    if output_format and (mix is None or output is None):
        raise DataError("--format fiftyone writes review tasks: give --mix and --output DIR")
    if output_format and output is not None:
        from headmaster.training.feedback.fiftyone_dataset import check_output

        check_output(output)
    opened = _open(store)
    if mix is not None:
        from headmaster.repository import ab
        from headmaster.store.base import now
        from headmaster.training.feedback.review import parse_mix, record_sent, select, write_tasks

        head_version = HeadVersion.load(repo, name, version)
        client = None
        if label_studio_url is not None:
            from headmaster.training.feedback.label_studio_api import KEY_ENV, LabelStudio

            client = LabelStudio(label_studio_url, os.environ.get(KEY_ENV))
            client.whoami()  # a wrong key or a server that is not there fails before anything is recorded as sent
            if label_studio_project is not None:
                client.project(label_studio_project)
        elif label_studio_project is not None:
            raise DataError("--label-studio-project needs --label-studio-url", option="label_studio_url")
        test = ab.running(repo, name)
        if other is None and test is not None:
            other = test.version if test.version != head_version.card.version else test.live
        items = select(
            opened,
            head_version,
            n,
            parse_mix(None if mix == "default" else mix),
            repo,
            other,
            max_per_day,
            seed,
            record=client is None,  # with Label Studio: recorded as sent once it took them (below)
        )
        table = Table(title=f"{name} v{head_version.card.version}: {len(items)} items for review")
        for column in ("item", "strategy", "value", "prediction", "score", "source"):
            table.add_column(column)
        for i in items:
            table.add_row(
                i.sha256[:12],
                i.strategy,
                f"{i.why:.4f}",
                ", ".join(i.prediction) or "-",
                f"{i.score:.3f}",
                i.uri or "-",
            )
        out.print(table)
        if output and output_format == "fiftyone":
            from headmaster.training.feedback.fiftyone_dataset import write_fiftyone

            write_fiftyone(items, output, head_version.card.labels, head_version.card.multi_label)
            console.print(
                f"written: {output} (a FiftyOne dataset: fo.Dataset.from_dir(DIR, dataset_type="
                f"fo.types.FiftyOneDataset)); label ground_truth, export it the same way, then "
                f"`headmaster correct --fiftyone EXPORT_DIR`"
            )
        elif output:
            written = write_tasks(
                items, output, head_version.card.labels, head_version.card.multi_label, image_prefix, image_root
            )
            console.print(
                f"written: {', '.join(map(str, written))}; labels come back with "
                f"`headmaster correct --label-studio EXPORT.json` or `--csv`"
            )
        if client is not None and not items:
            console.print("nothing to review: no tasks imported into Label Studio")
        elif client is not None:
            from headmaster.training.feedback.label_studio_api import push

            card = head_version.card
            project_id, count = push(
                client,
                items,
                card.labels,
                card.multi_label,
                f"{name} v{card.version} review {now().strftime('%Y-%m-%d %H:%M:%S')}",
                label_studio_project,
                image_prefix,
                image_root,
            )
            record_sent(repo, items, now().strftime("%Y%m%dT%H%M%S"))
            console.print(
                f"{count} tasks imported into Label Studio project {project_id} ({client.url}/projects/{project_id}); "
                f"labels come back with `headmaster correct --label-studio-url {client.url} --project {project_id}`"
            )
        return
    multi_label, thresholds = False, None
    try:
        card = HeadVersion.load(repo, name, version).card
        multi_label, thresholds = card.multi_label, card.thresholds
    except HeadmasterError:  # no repository or version here: scores alone still rank (thresholds 0.5)
        pass
    scored, found = suggest(opened, name, n, version, method, multi_label, thresholds)
    table = Table(title=f"{name} v{scored}: {len(found)} least certain uncorrected items ({method})")
    for column in ("item", "uncertainty", "labels now", "source"):
        table.add_column(column)
    for s in found:
        table.add_row(s.sha256[:12], f"{s.uncertainty:.4f}", ", ".join(s.labels) or "-", s.uri or "-")
    out.print(table)
    if output:
        with open(output, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["item", "head", "label", "uncertainty", "uri"])
            writer.writerows([s.sha256, name, "", f"{s.uncertainty:.6f}", s.uri or ""] for s in found)
        console.print(f"written to {output}: fill in the label column, then `headmaster correct --csv {output}`")


def reembed_command(
    store: StoreOption = "store",
    repo: RepoOption = DEFAULT_REPO,
    server: Annotated[
        str | None, typer.Option(help="Embed through this server (HTTP host:port) instead of here.")
    ] = None,
) -> None:
    """Embed every stored item again with the repository's encoder, from its source file."""
    from headmaster.repository.repo import Repository
    from headmaster.training.embeddings import embedder_for
    from headmaster.training.feedback.reembed import reembed

    opened = _open(store)
    repository = Repository(repo)
    embedder = embedder_for(repository, server)
    bar, task = progress("re-embedding", None)
    with bar:
        result = reembed(opened, embedder, progress=lambda n: bar.advance(task, n))
    for sha, why in result.unreachable[:50]:
        console.print(f"[yellow]not re-embedded[/] {sha[:12]}: {why}")
    console.print(
        f"[green]{result.reembedded} re-embedded[/] with {result.fingerprint}; {result.already} had it "
        f"already; {len(result.unreachable)} unreachable"
    )
    if result.unreachable:
        raise typer.Exit(2)


@dataset_app.command("export")
def dataset_export_command(
    name: Annotated[str, typer.Argument(help="The head whose training set to freeze.")],
    out: Annotated[Path, typer.Option("--out", help="Snapshots go to OUT/NAME/vN/.")],
    store: StoreOption = "store",
    repo: Annotated[
        Path | None,
        typer.Option(
            "--repo",
            parser=repo_path,
            help="The repository whose encoder's embeddings the snapshot holds (and whose "
            "head gives its kind). Default: ./model_repository when there is one, "
            "else the one encoder that embedded the labelled items.",
        ),
    ] = None,
    multi_label: Annotated[
        bool | None,
        typer.Option(
            "--multi-label/--single-label", help="Default: the head's kind in the repository, else from the labels."
        ),
    ] = None,
) -> None:
    """Write an immutable snapshot of the head's training set (people's labels, embeddings, images)."""
    from headmaster.repository.repo import Repository
    from headmaster.training.feedback.corrections import head_labels
    from headmaster.training.feedback.snapshots import export_snapshot, labelled_fingerprint

    opened = _open(store)
    if repo is None and DEFAULT_REPO.is_dir():
        repo = DEFAULT_REPO
    if repo is not None:
        fingerprint = Repository(repo).fingerprint
    else:  # a labeller's machine without the repository: the store knows which encoder embedded the items
        fingerprint = labelled_fingerprint(opened, name) or ""
    if multi_label is None:
        known = head_labels(repo, name)
        multi_label = known[1] if known else None
    snapshot = export_snapshot(opened, name, out, fingerprint, multi_label)
    state = "unchanged since" if snapshot.reused else "written:"
    console.print(
        f"[green]{name} snapshot v{snapshot.number}[/] {state} {snapshot.path} ({snapshot.items} items, "
        f"{snapshot.manifest_sha256})"
    )
    for fingerprint, count in snapshot.refused.items():
        console.print(f"[yellow]left out[/] {count} labelled items embedded only with {fingerprint}")
    if snapshot.missing_images:
        console.print(
            f"[yellow]{snapshot.missing_images} source images were already gone[/] (their embeddings are "
            "in the snapshot)"
        )
    print(snapshot.path, file=sys.stdout)
