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
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headmaster.errors import DataError
from headmaster.images import IMAGE_SUFFIXES
from headmaster.texts import TEXT_SUFFIXES


@dataclass(frozen=True)
class Example:
    path: Path
    labels: tuple[str, ...]  # one label for folder data; any number from a manifest; a root-first path (hierarchy)
    value: float | None = None  # regression: the image's number


@dataclass(frozen=True)
class Dataset:
    examples: tuple[Example, ...]
    labels: tuple[str, ...]  # sorted: the head's label order
    multi_label: bool
    source: str  # the folder or manifest it came from
    skipped: tuple[tuple[str, str], ...] = ()  # (path, why) of files left out before embedding
    task: str = "labels"  # labels | hierarchy | regression | ordinal (see training/heads/tasks.py)
    parents: dict | None = None  # hierarchy: child label -> parent label

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.labels, 0)
        for example in self.examples:
            for label in example.labels:
                counts[label] += 1
        return counts


def _is_visible(path: Path) -> bool:
    return not path.name.startswith(".")


def from_folders(root: Path, text: bool = False) -> Dataset:
    """One sub-folder per bucket (label = folder name), images anywhere below it (``text``: .txt files)."""
    suffixes, kind = (TEXT_SUFFIXES, "text") if text else (IMAGE_SUFFIXES, "image")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give a folder with one sub-folder per bucket")
    buckets = sorted(p for p in root.iterdir() if p.is_dir() and _is_visible(p))
    if not buckets:
        raise DataError(f"{root} has no sub-folders: put each bucket's images in a folder named after its label")
    if len(buckets) == 1:
        raise DataError(
            f"{root} has a single bucket ({buckets[0].name}): a head needs two or more. For a "
            f"yes/no head add a folder of images without it, e.g. 'not {buckets[0].name}'"
        )
    examples, skipped = [], []
    for bucket in buckets:
        files = sorted(p for p in bucket.rglob("*") if p.is_file() and _is_visible(p))
        images = [p for p in files if p.suffix.lower() in suffixes]
        skipped += [
            (str(p), f"not {'a' if text else 'an'} {kind} file name") for p in files if p.suffix.lower() not in suffixes
        ]
        if not images:
            raise DataError(
                f"bucket {bucket.name!r} in {root} has no {kind}s (looked for {', '.join(sorted(suffixes))})"
            )
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
                raise DataError(f'{manifest}:{number}: expected {{"path": ..., "labels": [...]}}: {e}') from None
    else:
        with open(manifest, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "labels"} <= set(reader.fieldnames):
                hint = ""
                if reader.fieldnames and "path" in reader.fieldnames and len(reader.fieldnames) == 2:
                    other = next(n for n in reader.fieldnames if n != "path")
                    hint = (
                        f"; path,{other} (a number per image) is what a regression head trains on: "
                        "`train-head --task regression`"
                    )
                raise DataError(
                    f"{manifest}: a CSV manifest needs the columns path,labels (got {reader.fieldnames}){hint}"
                )
            rows = [(row["path"], _split_labels(row["labels"] or "")) for row in reader]
    if not rows:
        raise DataError(f"manifest {manifest} lists no images")
    labels = sorted({label for _, row_labels in rows for label in row_labels})
    if not labels:
        raise DataError(f"manifest {manifest} gives no labels at all")
    examples = tuple(
        Example((manifest.parent / path).resolve() if not Path(path).is_absolute() else Path(path), row_labels)
        for path, row_labels in rows
    )
    for label in labels:
        positives = sum(label in e.labels for e in examples)
        if positives == len(examples):
            raise DataError(
                f"label {label!r} is on every image of {manifest}: a multi-label head needs images without it too"
            )
    return Dataset(examples, tuple(labels), True, str(manifest))


def content_hash(labelled: list[tuple[str, tuple[str, ...]]]) -> str:
    """The training set's identity: sha256 over (image sha256, labels), order-free."""
    digest = hashlib.sha256()
    for sha, labels in sorted(labelled):
        digest.update(f"{sha}\t{';'.join(labels)}\n".encode())
    return "sha256:" + digest.hexdigest()


def text_files_dir() -> Path:
    """Where the texts of a CSV are kept as files, one per text, named by its sha256 (content-addressed,
    so shared safely): $XDG_CACHE_HOME/headmaster/texts."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "headmaster" / "texts"


def from_text_csv(manifest: Path, folder: Path | None = None) -> Dataset:
    """A CSV with the columns ``text,label`` (one label per text: a single-label head). Each text is
    kept as ``<sha256>.txt`` under ``folder`` (default ``text_files_dir()``) so that it is embedded,
    cached, stored and reviewed as a text file is."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"text CSV {manifest} does not exist", option="manifest")
    folder = Path(folder) if folder is not None else text_files_dir()
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise DataError(
                f"{manifest}: a text CSV needs the columns text,label (got {reader.fieldnames})", option="manifest"
            )
        rows = []
        for number, row in enumerate(reader, 2):
            text, label = row["text"] or "", (row["label"] or "").strip()
            if not text.strip() or not label:
                raise DataError(f"{manifest}:{number}: a row needs a non-empty text and a label", option="manifest")
            rows.append((text, label))
    labels = sorted({label for _, label in rows})
    if len(labels) < 2:
        raise DataError(f"{manifest} has {len(labels)} label(s): a head needs two or more", option="manifest")
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for text, label in rows:
        data = text.encode("utf-8")
        path = folder / f"{hashlib.sha256(data).hexdigest()}.txt"
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_bytes(data)
            tmp.rename(path)
        examples.append(Example(path, (label,)))
    return Dataset(tuple(examples), tuple(labels), False, str(manifest))


def read_labelled(data: Path | None, manifest: Path | None, text: bool = False) -> Dataset:
    """The one way labelled images are read, for training and evaluation alike: a folder of
    bucket folders (single-label) or a manifest (multi-label), exactly one of them. ``text`` (a
    text encoder's repository): folders of .txt files, or a CSV of text,label."""
    if (data is None) == (manifest is None):
        raise DataError(
            "give one labelled data source: a folder with one sub-folder per label, or a manifest "
            "(CSV path,labels or JSONL; text,label for a text encoder)",
            option="data",
        )
    if text:
        return from_folders(data, text=True) if data is not None else from_text_csv(manifest)
    return from_folders(data) if data is not None else from_manifest(manifest)


# -- taxonomies, values and ordered classes (training/heads/tasks.py) ---------------------------
def read_taxonomy(path: Path) -> dict[str, str]:
    """A CSV of ``parent,child`` rows -> {child: parent}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"taxonomy {path} does not exist", option="taxonomy")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"parent", "child"} <= set(reader.fieldnames):
            raise DataError(
                f"{path}: a taxonomy is a CSV with the columns parent,child (got {reader.fieldnames})",
                option="taxonomy",
            )
        parents: dict[str, str] = {}
        for number, row in enumerate(reader, 2):
            parent, child = (row["parent"] or "").strip(), (row["child"] or "").strip()
            if not parent or not child or parent == child:
                raise DataError(f"{path}:{number}: a row names a parent and a different child", option="taxonomy")
            if parents.get(child, parent) != parent:
                raise DataError(
                    f"{path}:{number}: {child!r} has two parents ({parents[child]!r} and {parent!r}); "
                    "a taxonomy is a tree",
                    option="taxonomy",
                )
            parents[child] = parent
    if not parents:
        raise DataError(f"taxonomy {path} has no parent,child rows", option="taxonomy")
    return parents


def path_to_root(label: str, parents: dict[str, str]) -> tuple[str, ...]:
    """``label`` and its ancestors, root first; a cycle is an error."""
    path = [label]
    while path[-1] in parents:
        if parents[path[-1]] in path:
            raise DataError(f"the taxonomy has a cycle through {label!r}", option="taxonomy")
        path.append(parents[path[-1]])
    return tuple(reversed(path))


def from_hierarchy(root: Path, taxonomy: Path | dict | None = None) -> Dataset:
    """Images in nested folders (``animal/cat/x.jpg`` is a cat, and so an animal), or in folders
    named after the taxonomy's nodes (any depth) with ``taxonomy`` (a parent,child CSV or a
    {child: parent} dict) giving the tree. Each image's labels are its node and every ancestor:
    a parent's examples include its children's."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give a folder of label folders (nested for a taxonomy)")
    given = read_taxonomy(taxonomy) if isinstance(taxonomy, (str, Path)) else dict(taxonomy or {})
    parents: dict[str, str] = dict(given)
    where: dict[str, str] = {}  # label -> the folder that defined it (names must be unique in the tree)
    examples, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        parts = path.relative_to(root).parts[:-1]
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((str(path), "not an image file name"))
            continue
        if not parts:
            skipped.append((str(path), "not inside a label folder"))
            continue
        if given:
            node = parts[-1]
            if node not in given and node not in given.values():
                raise DataError(
                    f"folder {path.parent} is named {node!r}, which the taxonomy does not have", option="taxonomy"
                )
        else:
            for i, part in enumerate(parts):
                folder = "/".join(parts[: i + 1])
                if where.setdefault(part, folder) != folder:
                    raise DataError(
                        f"label {part!r} is both {where[part]}/ and {folder}/ in {root}: labels of a "
                        "taxonomy must be unique (rename one)",
                        option="data",
                    )
                if i:
                    parents[part] = parts[i - 1]
            node = parts[-1]
        examples.append(Example(path, path_to_root(node, parents)))
    if not examples:
        raise DataError(f"{root} has no images inside label folders")
    labels = tuple(sorted({label for e in examples for label in e.labels} | set(parents) | set(parents.values())))
    roots = [label for label in labels if label not in parents]
    if len(roots) < 2:
        raise DataError(
            f"the taxonomy in {root} has {len(roots)} top-level label(s) ({', '.join(roots)}): a "
            "hierarchy head needs two or more",
            option="data",
        )
    for label in labels:
        path_to_root(label, parents)
    return Dataset(tuple(examples), labels, True, str(root), tuple(skipped), "hierarchy", parents)


def from_values(manifest: Path) -> Dataset:
    """A CSV of ``path,<name>``: one number per image (e.g. ``path,quality``); the second
    column's name names the value. Relative paths start at the CSV."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"values file {manifest} does not exist", option="manifest")
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        names = [n for n in (reader.fieldnames or []) if n != "path"]
        if "path" not in (reader.fieldnames or []) or len(names) != 1:
            raise DataError(
                f"{manifest}: a values CSV has the columns path and one value column (e.g. "
                f"path,quality), got {reader.fieldnames}",
                option="manifest",
            )
        examples = []
        for number, row in enumerate(reader, 2):
            try:
                value = float(row[names[0]])
            except (TypeError, ValueError):
                raise DataError(
                    f"{manifest}:{number}: {names[0]} {row[names[0]]!r} is not a number", option="manifest"
                ) from None
            if not np.isfinite(value):
                raise DataError(f"{manifest}:{number}: {names[0]} must be a finite number", option="manifest")
            path = Path(row["path"])
            examples.append(Example(path if path.is_absolute() else (manifest.parent / path).resolve(), (), value))
    if len(examples) < 2 or len({e.value for e in examples}) < 2:
        raise DataError(
            f"{manifest}: a regression head needs images with at least two different values", option="manifest"
        )
    return Dataset(tuple(examples), (names[0],), False, str(manifest), (), "regression")


def ordered(dataset: Dataset, order: tuple[str, ...] | None) -> Dataset:
    """A folder dataset as ordinal classes, lowest first: ``order`` (every folder exactly once),
    or numeric order when every folder name is a number."""
    labels = dataset.labels
    if order is None:
        try:
            order = tuple(sorted(labels, key=float))
        except ValueError:
            raise DataError(
                f"ordinal classes need an order (e.g. --order {','.join(labels)}): the folders "
                f"{', '.join(labels)} are not all numbers",
                option="order",
            ) from None
    if sorted(order) != sorted(labels) or len(set(order)) != len(order):
        raise DataError(
            f"--order {','.join(order)} must name each class folder once: {', '.join(labels)}", option="order"
        )
    return Dataset(dataset.examples, tuple(order), False, dataset.source, dataset.skipped, "ordinal")


def by_content(examples, hashes: list[str | None], failures: dict[str, str]) -> dict[str, list[int]]:
    """The indices of the readable examples, per image content (sha256): copies of one image
    under several paths land together, to be kept once or dropped when their labels disagree."""
    groups: dict[str, list[int]] = {}
    for i, (example, sha) in enumerate(zip(examples, hashes)):
        if sha is not None and str(example.path) not in failures:
            groups.setdefault(sha, []).append(i)
    return groups
