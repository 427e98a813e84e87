"""People's labels for stored items: one at a time, or in bulk from CSV.

CSV columns: ``item`` (sha256, a unique prefix, a stored URI or a file path), ``label``
(several separated by ';' for multi-label heads; empty means "none of the labels"), and
optionally ``head`` (else --head), ``by`` and ``note``. ``headmaster eval`` writes its
suggested fixes in this format.
"""

from __future__ import annotations

import csv
from pathlib import Path

from headmaster.errors import DataError, HeadmasterError, RepositoryError
from headmaster.export.heads import check_head_name
from headmaster.store.base import Correction, Store, now


def head_labels(repo: Path | None, head: str) -> tuple[tuple[str, ...], bool] | None:
    """The labels and multi-label flag of the live version, when the repository has the head."""
    from headmaster.repository.repo import Repository

    if repo is None:
        return None
    try:
        card = Repository(repo).head(head).card
    except RepositoryError:
        return None  # no repository here, or a head not made yet: its labels are whatever people give
    return card.labels, card.multi_label


def make_corrections(store: Store, rows: list[dict], by: str, repo: Path | None = None) -> list[Correction]:
    """rows: {"item", "head", "labels": tuple, "note"?, "by"?, "at"? (when the person said so; default
    now)}. Every row is checked before any is kept."""
    known = store.uris()
    heads: dict[str, tuple | None] = {}
    corrections, problems = [], []
    at = now()
    for number, row in enumerate(rows, 1):
        try:
            head = check_head_name(row["head"])
            if head not in heads:
                heads[head] = head_labels(repo, head)
            labels = tuple(sorted(set(row["labels"])))
            if heads[head] is not None:
                allowed, multi_label = heads[head]
                unknown = [label for label in labels if label not in allowed]
                if unknown:
                    raise DataError(
                        f"head {head} has no label {', '.join(map(repr, unknown))} (its labels: {', '.join(allowed)})"
                    )
                if not multi_label and len(labels) != 1:
                    raise DataError(f"head {head} is single-label: give exactly one label, not {len(labels)}")
            sha = store.resolve(row["item"], known)
            corrections.append(
                Correction(sha, head, labels, row.get("by") or by, row.get("at") or at, row.get("note") or "")
            )
        except HeadmasterError as e:  # collect them all: a bulk file should be fixed in one go
            problems.append(f"row {number} ({row.get('item')}): {e}")
    if problems:
        raise DataError(
            f"{len(problems)} of {len(rows)} corrections were refused, none stored:\n  " + "\n  ".join(problems[:20])
        )
    store.add_corrections(corrections)
    return corrections


def read_csv(path: Path, head: str | None) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if not {"item", "label"} <= columns or ("head" not in columns and head is None):
            raise DataError(
                f"{path}: a corrections CSV needs the columns item,label (and head, or --head); "
                f"it has {sorted(columns)}"
            )
        # A review CSV (`suggest --mix --output F.csv`) also names the prediction each row answers.
        from headmaster.training.feedback.review import note_for_csv

        return [
            {
                "item": row["item"],
                "head": row.get("head") or head,
                "labels": tuple(label.strip() for label in (row["label"] or "").split(";") if label.strip()),
                "by": row.get("by"),
                "note": note_for_csv(row),
            }
            for row in reader
            # a review CSV's rows left empty were not reviewed (a filled-in one says "none" with ';')
            if not ("strategy" in columns and not (row["label"] or "").strip())
        ]
