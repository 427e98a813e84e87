"""How two versions of a head answered the same items, from the store: what `heads compare` shows.

During an A/B or shadow test every item classified with ``--store`` gets a label row from each
version (the answering one, and the other with source ``ab-other``); items labelled by both
versions at other times (a `rescore` of each) count the same way."""

from __future__ import annotations

from dataclasses import dataclass

from headmaster.errors import StoreError


@dataclass(frozen=True)
class Changed:
    sha256: str
    uri: str | None
    before: tuple[str, ...]  # the accepted labels of version a
    after: tuple[str, ...]  # of version b


@dataclass(frozen=True)
class Comparison:
    head: str
    a: int
    b: int
    items: int  # labelled by both versions
    agree: int  # the same accepted labels
    changed: list[Changed]
    only_a: int  # items labelled by a alone
    only_b: int

    @property
    def agreement(self) -> float:
        return self.agree / self.items if self.items else float("nan")

    def transitions(self) -> dict[tuple[tuple[str, ...], tuple[str, ...]], int]:
        """(labels under a, labels under b) -> number of items: where the changes go."""
        counts: dict = {}
        for change in self.changed:
            counts[change.before, change.after] = counts.get((change.before, change.after), 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def compare_versions(store, head: str, a: int, b: int) -> Comparison:
    """Agreement of versions ``a`` and ``b`` of ``head`` over the items both labelled."""
    if head not in store.label_heads():
        raise StoreError(
            f"the store at {store.location} holds no labels of head {head!r}; classify with --store while the test runs"
        )
    rows = {}
    for version in (a, b):
        table = store.labels(head, version)
        rows[version] = dict(zip(table["sha256"].to_pylist(), map(tuple, table["labels"].to_pylist())))
    both = sorted(set(rows[a]) & set(rows[b]))
    if not both:
        raise StoreError(
            f"no item in the store at {store.location} holds labels of both v{a} and v{b} of head "
            f"{head} (v{a}: {len(rows[a])} items, v{b}: {len(rows[b])})"
        )
    uris = store.uris()
    changed = [
        Changed(sha, next(iter(uris.get(sha, {}).values()), None), rows[a][sha], rows[b][sha])
        for sha in both
        if set(rows[a][sha]) != set(rows[b][sha])
    ]
    return Comparison(
        head,
        a,
        b,
        len(both),
        len(both) - len(changed),
        changed,
        len(set(rows[a]) - set(rows[b])),
        len(set(rows[b]) - set(rows[a])),
    )
