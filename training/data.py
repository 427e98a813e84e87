"""Training data: a folder per bucket, or a manifest (CSV / JSONL) of path -> labels.

Folders give single-label heads (binary with two buckets, softmax with more); a manifest
gives a multi-label head (one sigmoid per label). Problems that make training meaningless
(no data, an empty bucket, a single bucket) are errors; files that are not images are
listed, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from headmaster.errors import DataError
from headmaster.images import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Example:
    path: Path
    labels: tuple[str, ...]  # one label for folder data; any number from a manifest


@dataclass(frozen=True)
class Dataset:
    examples: tuple[Example, ...]
    labels: tuple[str, ...]  # sorted: the head's label order
    multi_label: bool
    source: str  # the folder or manifest it came from
    skipped: tuple[tuple[str, str], ...] = ()  # (path, why) of files left out before embedding

    def counts(self) -> dict[str, int]:
        counts = {label: 0 for label in self.labels}
        for example in self.examples:
            for label in example.labels:
                counts[label] += 1
        return counts


def _is_visible(path: Path) -> bool:
    return not path.name.startswith(".")


def from_folders(root: Path) -> Dataset:
    """One sub-folder per bucket (label = folder name), images anywhere below it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give a folder with one sub-folder per bucket")
    buckets = sorted(p for p in root.iterdir() if p.is_dir() and _is_visible(p))
    if not buckets:
        raise DataError(f"{root} has no sub-folders: put each bucket's images in a folder named after its label")
    if len(buckets) == 1:
        raise DataError(f"{root} has a single bucket ({buckets[0].name}): a head needs two or more. For a "
                        f"yes/no head add a folder of images without it, e.g. 'not {buckets[0].name}'")
    examples, skipped = [], []
    for bucket in buckets:
        files = sorted(p for p in bucket.rglob("*") if p.is_file() and _is_visible(p))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped += [(str(p), "not an image file name") for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            raise DataError(f"bucket {bucket.name!r} in {root} has no images "
                            f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        examples += [Example(p, (bucket.name,)) for p in images]
    return Dataset(tuple(examples), tuple(b.name for b in buckets), False, str(root), tuple(skipped))


def _split_labels(text: str) -> tuple[str, ...]:
    separator = ";" if ";" in text else "|"
    return tuple(sorted({label.strip() for label in text.split(separator) if label.strip()}))


def from_manifest(manifest: Path) -> Dataset:
    """CSV with columns ``path,labels`` (labels separated by ';' or '|'; may be empty), or
    JSONL lines ``{"path": ..., "labels": [...]}``. Relative paths start at the manifest."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist")
    rows: list[tuple[str, tuple[str, ...]]] = []
    if manifest.suffix.lower() in (".jsonl", ".ndjson"):
        for number, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append((record["path"], tuple(sorted(set(record.get("labels", []))))))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{manifest}:{number}: expected {{\"path\": ..., \"labels\": [...]}}: {e}") from None
    else:
        with open(manifest, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "labels"} <= set(reader.fieldnames):
                raise DataError(f"{manifest}: a CSV manifest needs the columns path,labels (got {reader.fieldnames})")
            rows = [(row["path"], _split_labels(row["labels"] or "")) for row in reader]
    if not rows:
        raise DataError(f"manifest {manifest} lists no images")
    labels = sorted({label for _, row_labels in rows for label in row_labels})
    if not labels:
        raise DataError(f"manifest {manifest} gives no labels at all")
    examples = tuple(Example((manifest.parent / path).resolve() if not Path(path).is_absolute() else Path(path), row_labels)
                     for path, row_labels in rows)
    for label in labels:
        positives = sum(label in e.labels for e in examples)
        if positives == len(examples):
            raise DataError(f"label {label!r} is on every image of {manifest}: a multi-label head needs images "
                            "without it too")
    return Dataset(examples, tuple(labels), True, str(manifest))


def content_hash(labelled: list[tuple[str, tuple[str, ...]]]) -> str:
    """The training set's identity: sha256 over (image sha256, labels), order-free."""
    digest = hashlib.sha256()
    for sha, labels in sorted(labelled):
        digest.update(f"{sha}\t{';'.join(labels)}\n".encode())
    return "sha256:" + digest.hexdigest()


def read_labelled(data: Path | None, manifest: Path | None) -> Dataset:
    """The one way labelled images are read, for training and evaluation alike: a folder of
    bucket folders (single-label) or a manifest (multi-label), exactly one of them."""
    if (data is None) == (manifest is None):
        raise DataError("give one labelled data source: a folder with one sub-folder per label, or a manifest "
                        "(CSV path,labels or JSONL)", option="data")
    return from_folders(data) if data is not None else from_manifest(manifest)
