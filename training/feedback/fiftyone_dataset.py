"""Review tasks as a FiftyOne dataset directory, and the corrections in one a person exported back.

The format is FiftyOne's own full-dataset format, ``fiftyone.types.FiftyOneDataset``: a folder
with ``metadata.json`` (the dataset document: media type, classes, the schema of every sample
field) and ``samples.json`` (``{"samples": [...]}``, one MongoDB extended-JSON document per
sample; a large export may write a ``samples/`` folder of one file per sample instead). FiftyOne
reads it with ``fo.Dataset.from_dir(DIR, dataset_type=fo.types.FiftyOneDataset)`` and writes it
with ``dataset.export(DIR, dataset_type=fo.types.FiftyOneDataset)``. This module only reads and
writes those files: headmaster never imports fiftyone (its pins clash with ours; it lives in a
venv of its own, ``.tools/fiftyone``, for the round-trip test).

Each sample: ``filepath`` (the stored URI), ``sha256``, ``head``, ``version``, ``score``,
``strategy``; ``prediction``, the version's answer (a ``Classification`` with ``confidence`` for
a single-label head, ``Classifications`` for a multi-label one; each label carries ``head`` and
``version`` too), and ``ground_truth``, empty, of the same type, for the person to fill in.

Back: every sample whose ``ground_truth`` is set is a correction. Who: the ``annotator``
attribute of the ground truth label, or the sample's ``annotator`` field, else whoever runs
``correct`` (the OS user, or ``--by``). When: the sample's ``annotated_at`` field, else its
``last_modified_at`` (FiftyOne sets that when the label is saved). The note records the tool
(``fiftyone``), the dataset and sample ids, and the prediction it answers.

Written as FiftyOne 1.22 writes it (``version`` in ``metadata.json``): a newer FiftyOne migrates
it on import.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from pathlib import Path

from headmaster.errors import DataError
from headmaster.training.feedback.review import correction_row, parse_when

FORMAT_VERSION = "1.22.1"  # the FiftyOne version whose export this mirrors (and the test runs)
PREDICTION, GROUND_TRUTH = "prediction", "ground_truth"
_FIELDS = "fiftyone.core.fields."
_LABELS = "fiftyone.core.labels."


def _object_id() -> dict:
    return {"$oid": os.urandom(12).hex()}


def _field(
    name: str,
    ftype: str,
    embedded: str | None = None,
    subfield: str | None = None,
    fields: Sequence[dict] = (),
    db_field: str | None = None,
    read_only: bool = False,
) -> dict:
    return {
        "name": name,
        "ftype": _FIELDS + ftype,
        "embedded_doc_type": embedded,
        "subfield": None if subfield is None else _FIELDS + subfield,
        "fields": list(fields),
        "db_field": db_field if db_field is not None else name,
        "description": None,
        "info": None,
        "read_only": read_only,
        "created_at": None,
    }


def _classification_fields() -> list[dict]:
    return [
        _field("id", "ObjectIdField", db_field="_id"),
        _field("tags", "ListField", subfield="StringField"),
        _field("label", "StringField"),
        _field("confidence", "FloatField"),
        _field("logits", "VectorField"),
    ]


def _label_field(name: str, multi_label: bool) -> dict:
    if not multi_label:
        return _field(name, "EmbeddedDocumentField", _LABELS + "Classification", fields=_classification_fields())
    classifications = _field(
        "classifications",
        "ListField",
        _LABELS + "Classification",
        subfield="EmbeddedDocumentField",
        fields=_classification_fields(),
    )
    return _field(
        name,
        "EmbeddedDocumentField",
        _LABELS + "Classifications",
        fields=[classifications, _field("logits", "VectorField")],
    )


def metadata(name: str, labels: Sequence[str], multi_label: bool) -> dict:
    """The dataset document of ``metadata.json``."""
    sample_fields = [
        _field("id", "ObjectIdField", db_field="_id"),
        _field("filepath", "StringField"),
        _field("tags", "ListField", subfield="StringField"),
        _field("metadata", "EmbeddedDocumentField", "fiftyone.core.metadata.ImageMetadata"),
        _field("created_at", "DateTimeField", read_only=True),
        _field("last_modified_at", "DateTimeField", read_only=True),
        _field("_media_type", "StringField"),
        _field("_rand", "FloatField"),
        _field("_dataset_id", "ObjectIdField"),
        _field("sha256", "StringField"),
        _field("head", "StringField"),
        _field("version", "IntField"),
        _field("score", "FloatField"),
        _field("strategy", "StringField"),
        _label_field(PREDICTION, multi_label),
        _label_field(GROUND_TRUTH, multi_label),
    ]
    return {
        "name": name,
        "version": FORMAT_VERSION,
        "media_type": "image",
        "tags": [],
        "info": {"made_by": "headmaster suggest", "labels": list(labels), "multi_label": multi_label},
        "app_config": {"media_fields": ["filepath"], "grid_media_field": "filepath", "modal_media_field": "filepath"},
        "classes": {PREDICTION: list(labels), GROUND_TRUTH: list(labels)},
        "default_classes": list(labels),
        "mask_targets": {},
        "default_mask_targets": {},
        "skeletons": {},
        "sample_fields": sample_fields,
        "frame_fields": [],
        "saved_views": [],
        "workspaces": [],
        "annotation_runs": {},
        "brain_methods": {},
        "evaluations": {},
        "runs": {},
    }


def _classification(label: str, confidence: float | None, head: str, version: int) -> dict:
    return {
        "_id": _object_id(),
        "_cls": "Classification",
        "tags": [],
        "label": label,
        "confidence": confidence,
        "head": head,
        "version": version,
    }


def sample(item, multi_label: bool, index: int) -> dict:
    """One review item as a FiftyOne sample document (``item``: a review.ReviewItem)."""
    if multi_label:
        prediction = {
            "_cls": "Classifications",
            "classifications": [_classification(label, None, item.head, item.version) for label in item.prediction],
        }
    else:
        prediction = (
            _classification(item.prediction[0], item.score, item.head, item.version) if item.prediction else None
        )
    return {
        "_id": _object_id(),
        # FiftyOne needs a path per sample; an item stored without a URI gets one that names it
        "filepath": item.uri or f"/headmaster/no-uri/{item.sha256}",
        "tags": [],
        "metadata": None,
        "_media_type": "image",
        "_rand": (index * 0.6180339887498949) % 1.0,  # FiftyOne's random field (take/shuffle), seeded
        "sha256": item.sha256,
        "head": item.head,
        "version": item.version,
        "score": item.score,
        "strategy": item.strategy,
        PREDICTION: prediction,
        GROUND_TRUTH: None,
    }


def check_output(path: Path) -> Path:
    """The folder review tasks go to: new or empty (checked before any item is recorded as sent)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DataError(f"{path}: a FiftyOne dataset is written to a new or empty folder", option="output")
    return path


def write_fiftyone(items: Sequence, path: Path, labels: Sequence[str], multi_label: bool) -> list[Path]:
    """Write the review items as a FiftyOneDataset directory (a new or empty folder)."""
    path = check_output(path)
    head = items[0].head if items else "review"
    name = f"{head}-review-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    meta, samples = path / "metadata.json", path / "samples.json"
    meta.write_text(json.dumps(metadata(name, labels, multi_label)))
    samples.write_text(json.dumps({"samples": [sample(item, multi_label, i) for i, item in enumerate(items)]}))
    return [meta, samples]


# -- back -----------------------------------------------------------------------------------------
def _plain(value):
    """MongoDB extended JSON ({"$oid": ..}, {"$date": ..}) -> plain values."""
    if isinstance(value, dict):
        if set(value) == {"$oid"}:
            return value["$oid"]
        if set(value) == {"$date"}:
            date = value["$date"]
            if isinstance(date, dict):  # canonical mode: {"$numberLong": "ms since the epoch"}
                date = date.get("$numberLong")
            if isinstance(date, (int, str)) and str(date).lstrip("-").isdigit():
                return dt.datetime.fromtimestamp(int(date) / 1000, dt.timezone.utc)
            return parse_when(date)
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a FiftyOne dataset export ({what}: {e})") from None


def _samples(path: Path) -> list[dict]:
    single, folder = path / "samples.json", path / "samples"
    if single.is_file():
        data = _read_json(single, "samples.json")
        if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
            raise DataError(f'{single} is not a FiftyOne samples file: expected {{"samples": [...]}}')
        return data["samples"]
    if folder.is_dir():
        return [_read_json(p, p.name) for p in sorted(folder.glob("*.json"))]
    raise DataError(f"{path} is not a FiftyOne dataset export: no samples.json (or samples/) in it")


def _labels(value, field: str, where: str) -> tuple[list[str], dict] | None:
    """A Classification / Classifications document -> (labels, the label doc its attributes are on)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DataError(f"{where}: {field} is not a FiftyOne label")
    kind = value.get("_cls")
    if kind == "Classification":
        return ([value["label"]] if value.get("label") else []), value
    if kind == "Classifications":
        parts = value.get("classifications") or []
        found = [c.get("label") for c in parts if isinstance(c, dict) and c.get("label")]
        attributes = next((c for c in parts if isinstance(c, dict) and c.get("annotator")), value)
        return found, attributes
    raise DataError(f"{where}: {field} is a {kind!r}, not a Classification or Classifications")


def read_fiftyone(path: Path, head: str | None = None, field: str = GROUND_TRUTH) -> tuple[list[dict], list[str]]:
    """A FiftyOneDataset directory exported from FiftyOne after labelling -> correction rows (for
    ``make_corrections``) and what was skipped: the same rows ``read_label_studio`` yields."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} is not a FiftyOne dataset export (a folder with metadata.json and samples.json)")
    meta_path = path / "metadata.json"
    if not meta_path.is_file():
        raise DataError(
            f"{path} is not a FiftyOne dataset export: no metadata.json in it (export it with "
            "dataset_type=fo.types.FiftyOneDataset)"
        )
    meta = _read_json(meta_path, "metadata.json")
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} is not a FiftyOne dataset document (a JSON object)")
    samples = [_plain(s) for s in _samples(path)]
    if samples and not any(isinstance(s, dict) and s.get("sha256") for s in samples):
        raise DataError(
            f"{path}: none of its {len(samples)} samples has a sha256 field: not review tasks from "
            "`headmaster suggest --format fiftyone` (a dataset of other samples)"
        )
    known = {f.get("name") for f in meta.get("sample_fields") or [] if isinstance(f, dict)}
    if known and field not in known and not any(isinstance(s, dict) and s.get(field) for s in samples):
        raise DataError(f"{path}: its samples have no field {field!r} (fields: {', '.join(sorted(map(str, known)))})")
    rows, skipped = [], []
    for sample in samples:
        if not isinstance(sample, dict):
            raise DataError(f"{path}: a sample is not a JSON object")
        sid = sample.get("_id")
        where = f"sample {sid}"
        given = _labels(sample.get(field), field, where)
        if given is None:
            skipped.append(f"{where}: no {field} (not labelled)")
            continue
        choices, label_doc = given
        item, name = sample.get("sha256"), head or sample.get("head")
        if not item or not name:
            skipped.append(f"{where}: no sha256 or head field")
            continue
        predicted = _labels(sample.get(PREDICTION), PREDICTION, where)
        # no prediction field: not ours to say; an empty one: the version abstained (no label)
        predicted_labels = predicted[0] if predicted is not None else ([] if PREDICTION in sample else None)
        who = label_doc.get("annotator") or sample.get("annotator")
        at = parse_when(sample.get("annotated_at")) or parse_when(sample.get("last_modified_at"))
        where = {"dataset": meta.get("name"), "sample": sid, "field": field}
        rows.append(
            correction_row(
                item, name, choices, predicted_labels, sample, str(who) if who else None, at, "fiftyone", **where
            )
        )
    return rows, skipped
