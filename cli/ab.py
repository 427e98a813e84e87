"""A/B and shadow tests of head versions: `heads canary`, `heads compare`, `heads promote`, `heads abort`.

Starting and finishing a test changes the repository and the server through
`lifecycle.operations` (the reload order that keeps every request answerable is there)."""

from __future__ import annotations

from typing import Annotated

import typer

from headmaster.cli.common import DEFAULT_REPO, RepoOption, ServerOption, StoreOption, console, out


def canary(
    name: Annotated[str, typer.Argument(help="The head to test a version of.")],
    version: Annotated[int, typer.Option("--version", help="The candidate: a version of the head on disk.")],
    share: Annotated[
        float,
        typer.Option(
            help="Share of items the candidate answers, chosen by image sha256 (the same image always "
            "gets the same version)."
        ),
    ] = 0.1,
    shadow: Annotated[
        bool, typer.Option("--shadow", help="Run the candidate on every item without letting it answer.")
    ] = False,
    repo: RepoOption = DEFAULT_REPO,
    server: ServerOption = None,
) -> None:
    """Serve a candidate version beside the live one: to a stable share of items, or in shadow.
    Both versions' answers are in every RESULT (and the store); finish with promote or abort."""
    from headmaster.lifecycle import operations as lifecycle
    from headmaster.server import live

    target = live.find(repo, server)
    test = lifecycle.start_test(repo, name, version, share, shadow, server)
    what = "in shadow (it never answers)" if test.mode == "shadow" else f"to {test.share:.1%} of items"
    console.print(
        f"[green]head {name}[/]: v{test.version} runs beside v{test.live} {what}"
        + (f"; live on the server at {target.http_url}" if target else "; no server serves this repository"),
        highlight=False,
    )


def compare(
    name: Annotated[str, typer.Argument(help="The head under test (or tested).")],
    store: StoreOption = "store",
    repo: RepoOption = DEFAULT_REPO,
    versions: Annotated[
        tuple[int, int] | None,
        typer.Option("--versions", help="Compare these two versions (default: the running test's live and candidate)."),
    ] = None,
    show: Annotated[int, typer.Option(help="How many changed images to list.")] = 20,
) -> None:
    """Agreement between the two versions of a test over the items both labelled, and the
    images whose labels changed, from the store."""
    from rich.table import Table

    from headmaster.errors import RepositoryError
    from headmaster.repository import ab
    from headmaster.repository.repo import Repository
    from headmaster.store import open_store
    from headmaster.store.ab import compare_versions

    if versions is None:
        Repository(repo).head(name)
        test = ab.running(repo, name)
        if test is None:
            raise RepositoryError(f"head {name} runs no test in {repo}; name two versions with --versions A B")
        versions = (test.live, test.version)
    a, b = versions
    result = compare_versions(open_store(store, create=False), name, a, b)
    out.print(
        f"head {name}: v{a} and v{b} agree on {result.agree} of {result.items} items "
        f"({result.agreement:.1%}); {len(result.changed)} changed"
        + (
            f"; labelled by one version only: v{a} {result.only_a}, v{b} {result.only_b}"
            if result.only_a or result.only_b
            else ""
        ),
        highlight=False,
    )
    if result.changed:
        moves = Table(title="where the changes go")
        for column in (f"v{a}", f"v{b}", "items"):
            moves.add_column(column)
        for (before, after), count in result.transitions().items():
            moves.add_row(", ".join(before) or "(none)", ", ".join(after) or "(none)", str(count))
        out.print(moves)
        images = Table(title=f"changed images (first {min(show, len(result.changed))})")
        for column in ("sha256", "image", f"v{a}", f"v{b}"):
            images.add_column(column)
        for change in result.changed[:show]:
            images.add_row(
                change.sha256[:12],
                change.uri or "",
                ", ".join(change.before) or "(none)",
                ", ".join(change.after) or "(none)",
            )
        out.print(images)


def promote(
    name: Annotated[str, typer.Argument(help="The head whose candidate becomes live.")],
    repo: RepoOption = DEFAULT_REPO,
    server: ServerOption = None,
) -> None:
    """End the test: the candidate answers every item from now on."""
    _finish(name, True, repo, server)


def abort(
    name: Annotated[str, typer.Argument(help="The head whose test stops.")],
    repo: RepoOption = DEFAULT_REPO,
    server: ServerOption = None,
) -> None:
    """End the test: the live version answers every item again; the candidate stays on disk."""
    _finish(name, False, repo, server)


def _finish(name: str, promote_it: bool, repo, server) -> None:
    from headmaster.lifecycle import operations as lifecycle

    change = lifecycle.finish_test(repo, name, promote_it, server)
    console.print(
        f"head {name} now serves v{change.version} alone"
        + (f"; live on the server at {change.server}" if change.server else ""),
        highlight=False,
    )
