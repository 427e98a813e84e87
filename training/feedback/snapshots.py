"""Dataset snapshots: a head's training set, frozen, with an identity a head version records.

The training set of head NAME is every stored item a person labelled for it (the newest
correction per item wins). ``export_snapshot`` writes it to ``OUT/NAME/vN/``::

    snapshot.json       head, number, encoder fingerprint, manifest sha256, counts, what was left out
    manifest.jsonl      per item: path (inside the snapshot), sha256, labels, who labelled it and when, source URI
    embeddings.parquet  sha256 -> embedding, so training needs no encoder and no GPU
    images/...          hard links to (or copies of) the source files: deleting a source never
                        changes a snapshot; a source already gone is listed, its embedding still trains

A snapshot is never rewritten: exporting again with the same items and labels returns the
newest snapshot as it is; anything else becomes vN+1. The manifest sha256 is the same
``content_hash`` that ``train-head`` records in a head version, so a head names its data.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from headmaster.errors import DataError
from headmaster.export.card import require_same_encoder
from headmaster.export.heads import check_head_name
from headmaster.store.base import Store, embedding_column, embedding_matrix, file_sha256, now
from headmaster.training.data import Dataset, Example, content_hash

SNAPSHOT_FILE = "snapshot.json"
MANIFEST_FILE = "manifest.jsonl"
EMBEDDINGS_FILE = "embeddings.parquet"


@dataclass(frozen=True)
class Snapshot:
    path: Path
    head: str
    number: int
    fingerprint: str
    manifest_sha256: str
    multi_label: bool
    labels: tuple[str, ...]
    counts: dict[str, int]
    items: int
    created: str
    refused: dict[str, int] = field(default_factory=dict)  # labelled items without an embedding of this encoder
    missing_images: int = 0  # sources already gone when the snapshot was made
    reused: bool = False  # nothing had changed: the newest existing snapshot was returned

    @classmethod
    def load(cls, path: Path) -> Snapshot:
        path = Path(path)
        try:
            meta = json.loads((path / SNAPSHOT_FILE).read_text())
        except FileNotFoundError:
            raise DataError(f"{path} is not a dataset snapshot (no {SNAPSHOT_FILE})") from None
        meta["labels"] = tuple(meta["labels"])
        return cls(path=path, **{k: v for k, v in meta.items() if k not in ("path", "reused")})

    def dataset(self) -> Dataset:
        examples = []
        for line in (self.path / MANIFEST_FILE).read_text().splitlines():
            row = json.loads(line)
            # A source gone before the snapshot was made has no file here, but its embedding trains.
            path = self.path / row["path"] if row["path"] else Path(f"(missing) {row['source']}")
            examples.append(Example(path, tuple(row["labels"])))
        return Dataset(tuple(examples), self.labels, self.multi_label, f"snapshot {self.head} v{self.number}")

    def embeddings(self) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        table = pq.read_table(self.path / EMBEDDINGS_FILE)
        return dict(zip(table["sha256"].to_pylist(), embedding_matrix(table["embedding"])))

    def hashes(self) -> list[str]:
        return [json.loads(line)["sha256"] for line in (self.path / MANIFEST_FILE).read_text().splitlines()]


def is_snapshot(path: Path) -> bool:
    return (Path(path) / SNAPSHOT_FILE).is_file()


def _numbers(folder: Path) -> list[int]:
    return sorted(int(p.name[1:]) for p in folder.glob("v[0-9]*") if p.name[1:].isdigit() and is_snapshot(p))


def _place_image(sha: str, uris: dict[str, str | None], target_dir: Path) -> str | None:
    """Hard-link (or copy) the first source still holding these bytes; None if none does."""
    for uri in uris.values():
        if not uri or not Path(uri).is_file() or file_sha256(Path(uri)) != sha:
            continue
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / f"{sha[:16]}{Path(uri).suffix.lower()}"
        try:
            os.link(uri, target)
        except OSError:
            shutil.copy2(uri, target)
        return str(target)
    return None


def labelled_fingerprint(store: Store, head: str) -> str | None:
    """The one encoder that embedded the items labelled for ``head`` (what a snapshot is made
    of when no repository names it); None when nothing is labelled. Several encoders: an error
    that asks for ``--repo``, since which one the snapshot should hold is the user's choice."""
    corrections = store.corrections(head)
    if not corrections:
        return None
    uris = store.uris()
    counts: dict[str, int] = {}
    for sha in corrections:
        for fingerprint in uris.get(sha, {}):
            counts[fingerprint] = counts.get(fingerprint, 0) + 1
    if len(counts) > 1:
        found = ", ".join(f"{fp} ({n} items)" for fp, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        raise DataError(
            f"the items labelled for {head!r} are embedded by {len(counts)} encoders ({found}): "
            "name the repository whose encoder the snapshot is for",
            option="repo",
        )
    return next(iter(counts), None)


def export_snapshot(store: Store, head: str, out: Path, fingerprint: str, multi_label: bool | None = None) -> Snapshot:
    """Freeze the training set of ``head`` (its corrections) embedded by ``fingerprint``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_head_name(head)
    corrections = store.corrections(head)
    if not corrections:
        raise DataError(
            f"no item in {store.location} has a label for head {head!r}: label some with "
            "`headmaster correct ITEM --head NAME --label L` (or --csv FILE) first"
        )
    vectors = store.embeddings(corrections, fingerprint)
    by_encoder = store.uris()
    refused: dict[str, int] = {}
    for sha in corrections:
        if sha not in vectors:
            for fp in by_encoder.get(sha, {}) or {"(not in the store)": None}:
                refused[fp] = refused.get(fp, 0) + 1
    kept = sorted(sha for sha in corrections if sha in vectors)
    if not kept:
        raise DataError(
            f"none of the {len(corrections)} items labelled for {head!r} has an embedding of encoder "
            f"{fingerprint} (they are embedded with {sorted(refused)}); `headmaster reembed` first"
        )
    if multi_label is None:
        multi_label = any(len(corrections[sha].labels) != 1 for sha in kept)
    if not multi_label and any(len(corrections[sha].labels) != 1 for sha in kept):
        raise DataError(f"head {head!r} is single-label, but some corrections give no label or several")
    manifest_hash = content_hash([(sha, tuple(sorted(corrections[sha].labels))) for sha in kept])

    folder = Path(out) / head
    numbers = _numbers(folder)
    if numbers:
        newest = Snapshot.load(folder / f"v{numbers[-1]}")
        if newest.manifest_sha256 == manifest_hash and newest.fingerprint == fingerprint:
            return replace(newest, reused=True)
    number = (numbers[-1] if numbers else 0) + 1
    staging = folder / f".v{number}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    labels = sorted({label for sha in kept for label in corrections[sha].labels})
    lines, missing = [], 0
    for sha in kept:
        correction = corrections[sha]
        bucket = "_multi" if multi_label else correction.labels[0]
        placed = _place_image(sha, by_encoder.get(sha, {}), staging / "images" / bucket)
        missing += placed is None
        lines.append(
            {
                "path": os.path.relpath(placed, staging) if placed else None,
                "sha256": sha,
                "labels": sorted(correction.labels),
                "by": correction.by,
                "at": correction.at.isoformat(),
                "note": correction.note,
                "source": next(iter(by_encoder.get(sha, {}).values()), None),
            }
        )
    (staging / MANIFEST_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    matrix = np.stack([vectors[sha] for sha in kept]).astype(np.float32)
    pq.write_table(
        pa.table({"sha256": kept, "embedding": embedding_column(matrix)}, metadata={"fingerprint": fingerprint}),
        staging / EMBEDDINGS_FILE,
    )
    counts = {label: sum(label in corrections[sha].labels for sha in kept) for label in labels}
    snapshot = Snapshot(
        path=folder / f"v{number}",
        head=head,
        number=number,
        fingerprint=fingerprint,
        manifest_sha256=manifest_hash,
        multi_label=multi_label,
        labels=tuple(labels),
        counts=counts,
        items=len(kept),
        created=now().isoformat(timespec="seconds"),
        refused=refused,
        missing_images=missing,
    )
    meta = {k: v for k, v in asdict(snapshot).items() if k not in ("path", "reused")}
    (staging / SNAPSHOT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(staging, snapshot.path)  # a snapshot appears complete, or not at all
    return snapshot


def load_for_training(path: Path, fingerprint: str) -> tuple[Snapshot, list[str], dict[str, np.ndarray]]:
    """A snapshot's rows for train-head: refused loudly if made with another encoder."""
    snapshot = Snapshot.load(path)
    require_same_encoder(fingerprint, snapshot.fingerprint, f"dataset snapshot {snapshot.path}")
    return snapshot, snapshot.hashes(), snapshot.embeddings()
