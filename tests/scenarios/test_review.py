"""Review selection (`suggest --mix`) and the files that go to Label Studio and come back.

The head, store and clusters of test_improve: served traffic is stored items a live version
labelled (rescored here, as the server would have), a shadow version labels them too, and a few
items from nowhere near the training data stand for out-of-distribution traffic. The Label
Studio export read back is built the way Label Studio 1.x writes its JSON export (tasks with
``annotations``: ``result``, ``completed_by``, ``created_at``, ``was_cancelled``); no Label Studio
server runs here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import xml.etree.ElementTree as ET

import numpy as np

from headmaster.lifecycle import operations as lifecycle
from headmaster.repository.head_version import HeadVersion
from headmaster.training.feedback.rescore import rescore
from headmaster.training.feedback.review import parse_mix, select, sent_items, write_tasks
from headmaster.training.heads.train_head import TrainOptions, train_head
from tests.scenarios.test_improve import HEAD, LABELS, add, loop  # noqa: F401 (loop: the fixture)


def test_a_review_batch_mixes_strategies_never_repeats_and_round_trips_through_label_studio(loop, tmp_path, cli):  # noqa: F811
    repository, world, store, _ = loop
    fingerprint = repository.fingerprint
    # A candidate from more labels, in shadow beside v1.
    add(store, fingerprint, *world.draw(30))
    train_head(TrainOptions(name=HEAD, repo=repository.path, store=str(store.path), candidate=True))
    lifecycle.start_test(repository.path, HEAD, 2, shadow=True)
    # Served traffic: 400 items from the clusters and 8 from nowhere near them, labelled by both versions.
    hashes, x, _ = world.draw(100)
    far = world.rng.normal(size=(8, x.shape[1])).astype(np.float32)
    far_hashes = [hashlib.sha256(f"far {i}".encode()).hexdigest() for i in range(8)]
    store.add_embeddings(
        hashes + far_hashes,
        [f"/photos/{h[:8]}.png" for h in hashes + far_hashes],
        fingerprint,
        np.vstack([x, far / np.linalg.norm(far, axis=1, keepdims=True)]),
    )
    live = HeadVersion.load(repository.path, HEAD, 1)
    for version in (1, 2):
        rescore(store, HeadVersion.load(repository.path, HEAD, version))

    mix = parse_mix("margin=0.4,ood=0.1,disagreement=0.2,diversity=0.2,random=0.1")
    batch = select(store, live, 50, mix, repository.path, other=2, seed=0)
    by = {s: [i for i in batch if i.strategy == s] for s in mix}
    assert {s: len(v) for s, v in by.items()} == {
        "margin": 20,
        "ood": 5,
        "disagreement": 10,
        "diversity": 10,
        "random": 5,
    }
    assert len({i.sha256 for i in batch}) == 50
    assert {i.sha256 for i in by["ood"]} <= set(far_hashes)
    v1, v2 = ({r["sha256"]: set(r["labels"]) for r in store.labels(HEAD, v).to_pylist()} for v in (1, 2))
    assert all(v1[i.sha256] != v2[i.sha256] for i in by["disagreement"])
    corrected = set(store.corrections(HEAD))
    assert not corrected & {i.sha256 for i in batch}
    # Margin picks are the least certain of what was left, in order.
    scores = {r["sha256"]: sorted(r["scores"])[-2:] for r in store.labels(HEAD, 1).to_pylist()}
    margins = [scores[i.sha256][1] - scores[i.sha256][0] for i in by["margin"]]
    assert margins == sorted(margins) and margins[-1] < np.median([b - a for a, b in scores.values()])
    # Diversity spreads away from what people labelled: farther from it than the random control.
    done = np.stack(list(store.embeddings(list(corrected), fingerprint).values()))
    stored = store.embeddings([i.sha256 for i in batch], fingerprint)

    def distance(items) -> float:
        return float(np.mean([1 - (done @ stored[i.sha256]).max() for i in items]))

    assert distance(by["diversity"]) > distance(by["random"])
    for item in batch:  # the pre-annotation
        assert item.version == 1 and item.prediction == tuple(sorted(i for i in v1[item.sha256]))
        assert 0 < item.score <= 1

    # Never the same item twice; the cap counts what was sent today.
    again = select(store, live, 50, mix, repository.path, other=2, seed=0, max_per_day=60)
    assert len(again) == 10 and not {i.sha256 for i in again} & {i.sha256 for i in batch}
    assert len(sent_items(repository.path, HEAD)) == 60
    assert select(store, live, 50, mix, repository.path, max_per_day=60) == []

    # Label Studio tasks with predictions, and the labelling config they are made for.
    tasks_path, config_path = write_tasks(batch, tmp_path / "tasks.json", live.card.labels, False)
    tasks = json.loads(tasks_path.read_text())
    first = tasks[0]
    assert first["predictions"][0]["model_version"] == f"{HEAD} v1"
    assert first["predictions"][0]["score"] == batch[0].score
    assert first["predictions"][0]["result"][0]["value"]["choices"] == list(batch[0].prediction)
    assert first["data"]["image"] == batch[0].uri and first["data"]["sha256"] == batch[0].sha256
    config = ET.fromstring(config_path.read_text())
    assert [c.get("value") for c in config.iter("Choice")] == list(LABELS)

    # What Label Studio exports after people worked: one task confirmed, one corrected, one
    # cancelled, one untouched.
    exported = []
    for number, task in enumerate(tasks[:4], 1):
        predicted = task["data"]["prediction"]
        answer = predicted if number == 1 else [next(label for label in LABELS if label not in predicted)]
        annotations = (
            []
            if number == 4
            else [
                {
                    "id": 100 + number,
                    "completed_by": {"id": 7, "email": "ann@example.com"},
                    "result": [
                        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": answer}}
                    ],
                    "was_cancelled": number == 3,
                    "created_at": f"2026-12-0{number}T10:00:00.000000Z",
                    "updated_at": f"2026-12-0{number}T10:00:00.000000Z",
                }
            ]
        )
        exported.append({**task, "id": number, "annotations": annotations})
    export_path = tmp_path / "export.json"
    export_path.write_text(json.dumps(exported))
    # The commands in this process (the `cli` fixture): `suggest` and `correct` run as subprocesses in
    # test_store.py's test_classify_cli_with_store_then_rescore_suggest_correct and test_label_studio.py.
    result = cli("correct", "--label-studio", export_path, "--store", store.path, "--repo", repository.path)
    assert result.returncode == 0, result.stderr
    assert "2 corrections stored" in result.stderr and result.stderr.count("skipped") == 2
    now = store.corrections(HEAD)
    confirmed, corrected_one = now[tasks[0]["data"]["sha256"]], now[tasks[1]["data"]["sha256"]]
    assert confirmed.by == "ann@example.com" and confirmed.at.isoformat().startswith("2026-12-01T10:00:00")
    note = json.loads(confirmed.note)
    assert note["tool"] == "label-studio" and note["task"] == 1 and note["annotation"] == 101 and note["agrees"]
    assert note["corrects"] == {"labels": list(batch[0].prediction), "score": batch[0].score, "version": 1}
    assert json.loads(corrected_one.note)["agrees"] is False
    assert corrected_one.labels != tuple(batch[1].prediction)
    assert tasks[2]["data"]["sha256"] not in now and tasks[3]["data"]["sha256"] not in now

    # The plain CSV both ways: rows left empty are not reviewed.
    (csv_path,) = write_tasks(again, tmp_path / "review.csv", live.card.labels, False)
    rows = list(csv.DictReader(csv_path.open()))
    rows[0]["label"], rows[0]["by"] = "dog", "bob"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys()])
        writer.writeheader()
        writer.writerows(rows)
    result = cli("correct", "--csv", csv_path, "--store", store.path, "--repo", repository.path)
    assert result.returncode == 0 and "1 corrections stored" in result.stderr, result.stderr
    row = store.corrections(HEAD)[rows[0]["item"]]
    assert row.by == "bob" and json.loads(row.note)["tool"] == "csv"
    assert json.loads(row.note)["corrects"]["version"] == 1

    # The command: a default mix, Label Studio tasks out.
    result = cli(
        "suggest",
        HEAD,
        "--mix",
        "default",
        "--n",
        "5",
        "--store",
        store.path,
        "--repo",
        repository.path,
        "--output",
        tmp_path / "cli.json",
        "--version",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads((tmp_path / "cli.json").read_text())) == 5 and (tmp_path / "cli.xml").is_file()
    bad = cli("suggest", HEAD, "--mix", "loudest=1", "--store", store.path, "--repo", repository.path)
    assert bad.returncode == 1 and "unknown review strategy 'loudest'" in bad.stderr
