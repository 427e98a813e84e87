"""The loop's pure pieces: the review mix, k-center, Label Studio files read back, the ledger file."""

from __future__ import annotations

import json
import socket
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from headmaster.errors import DataError, LabelingToolError
from headmaster.lifecycle import ledger
from headmaster.training.feedback.label_studio_api import LabelStudio
from headmaster.training.feedback.review import _allocate, k_center, label_config, parse_mix, read_label_studio


def test_the_mix_is_parsed_normalised_and_allocated_to_exactly_n():
    assert parse_mix("margin=3,random=1") == {"margin": 0.75, "random": 0.25}
    assert parse_mix("diversity") == {"diversity": 1.0}
    assert sum(parse_mix(None).values()) == pytest.approx(1.0)
    for n in (0, 1, 7, 50, 101):
        counts = _allocate(n, parse_mix(None))
        assert sum(counts.values()) == n and all(v >= 0 for v in counts.values())
    with pytest.raises(DataError, match="unknown review strategy 'loud'"):
        parse_mix("loud=1")
    with pytest.raises(DataError, match="expected STRATEGY=SHARE"):
        parse_mix("margin=half")
    with pytest.raises(DataError, match="every strategy a share of 0"):
        parse_mix("margin=0")


def test_k_center_picks_the_unexplored_cluster_first_and_never_twice():
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=64) for _ in range(3))
    pool = np.vstack(
        [
            a + 0.05 * rng.normal(size=(20, 64)),
            b + 0.05 * rng.normal(size=(20, 64)),
            c + 0.05 * rng.normal(size=(5, 64)),
        ]
    )
    labelled = np.vstack([a, b])  # people labelled near a and b already
    picks = k_center(pool, labelled, 3)
    assert len(set(picks)) == 3 and picks[0] >= 40  # the first pick is from the c cluster
    assert sorted(k_center(pool, np.zeros((0, 64)), 100)) == list(range(45))  # at most the pool, each once


def test_a_label_studio_export_is_read_as_corrections_with_who_when_and_the_prediction(tmp_path):
    task = {
        "id": 3,
        "data": {
            "image": "/x.png",
            "sha256": "a" * 64,
            "head": "animal",
            "version": 2,
            "prediction": ["cat"],
            "score": 0.61,
        },
        "annotations": [
            {
                "id": 1,
                "completed_by": 4,
                "result": [{"type": "choices", "value": {"choices": ["cat"]}}],
                "created_at": "2026-12-01T09:00:00Z",
                "updated_at": "2026-12-01T09:00:00Z",
            },
            {
                "id": 2,
                "completed_by": 5,
                "created_username": "zoe",
                "result": [{"type": "choices", "value": {"choices": ["dog"]}}],
                "created_at": "2026-12-02T09:00:00Z",
                "updated_at": "2026-12-02T09:00:00Z",
            },
            {"id": 9, "was_cancelled": True, "result": [], "created_at": "2026-12-03T09:00:00Z"},
        ],
    }
    path = tmp_path / "export.json"
    path.write_text(json.dumps([task, {"id": 4, "data": {"sha256": "b" * 64}, "annotations": []}]))
    rows, skipped = read_label_studio(path)
    assert skipped == ["task 4: no annotation"]
    (row,) = rows
    assert row["labels"] == ("dog",) and row["by"] == "zoe" and row["at"].isoformat() == "2026-12-02T09:00:00+00:00"
    note = json.loads(row["note"])
    assert note == {
        "tool": "label-studio",
        "task": 3,
        "annotation": 2,
        "corrects": {"labels": ["cat"], "score": 0.61, "version": 2},
        "agrees": False,
    }
    path.write_text("{}")
    with pytest.raises(DataError, match="not a Label Studio JSON export"):
        read_label_studio(path)
    config = ET.fromstring(label_config(["cat", 'a "dog" & <co>'], False))
    assert [c.get("value") for c in config.iter("Choice")] == ["cat", 'a "dog" & <co>']
    assert config.find("Choices").get("choice") == "single"
    assert ET.fromstring(label_config(["cat"], True)).find("Choices").get("choice") == "multiple"


def test_the_ledger_appends_lines_and_skips_a_torn_one(tmp_path):
    ledger.append(tmp_path, "animal", "accepted", candidate_version=3, by="ann")
    with open(ledger.path(tmp_path, "animal"), "a") as f:
        f.write('{"at": "2026-12-0')  # a write cut short
    ledger.append(tmp_path, "animal", "refused", reason="class 'cat' is worse")
    entries = ledger.read(tmp_path, "animal")
    assert [e["decision"] for e in entries] == ["accepted", "refused"]  # the torn line alone is lost
    assert ledger.read(tmp_path, "other") == []


def test_the_label_studio_client_needs_a_key_and_says_when_nobody_answers():
    with pytest.raises(LabelingToolError, match="no Label Studio API key: set LABEL_STUDIO_API_KEY"):
        LabelStudio("127.0.0.1:8080", None)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = LabelStudio(f"127.0.0.1:{port}", "a-legacy-token", timeout=5)
    assert client.url == f"http://127.0.0.1:{port}"
    with pytest.raises(LabelingToolError, match=f"cannot reach Label Studio at http://127.0.0.1:{port}"):
        client.whoami()
    pat = LabelStudio(f"127.0.0.1:{port}", "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln", timeout=5)
    with pytest.raises(LabelingToolError, match="cannot reach Label Studio"):  # the PAT's exchange comes first
        pat.whoami()


class _Fixed:
    """A head version whose answers are fixed: the gate only needs card, scores and the OOD flags."""

    def __init__(self, version: int, predicted: np.ndarray):
        from types import SimpleNamespace

        self.card = SimpleNamespace(version=version, labels=("a", "b"), multi_label=False)
        self.predicted = predicted

    def scores(self, x: np.ndarray) -> np.ndarray:
        return np.eye(2)[self.predicted] * 0.8 + 0.1

    def out_of_distribution(self, x: np.ndarray):
        return None


def test_require_gain_refuses_a_tie_and_a_gain_within_the_noise_but_passes_a_clear_gain():
    from headmaster.training.feedback.gate import GateOptions, gate

    truth = ["a", "b"] * 200
    right = np.array([0, 1] * 200)
    live = right.copy()
    live[:40] = 1 - live[:40]  # 40 of 400 wrong
    x = np.zeros((len(truth), 1))
    tie = live.copy()
    tie[:2], tie[40:42] = right[:2], 1 - right[40:42]  # two fixed, two broken: same accuracy
    small = live.copy()
    small[:2] = right[:2]  # +2 items: inside the noise of 400
    clear = live.copy()
    clear[:30] = right[:30]  # +30 items
    strict = GateOptions(require_gain=True, ece_margin=1.0)  # fixed scores: calibration is not the point here
    for candidate in (tie, small):
        assert gate(_Fixed(1, live), _Fixed(2, candidate), x, truth).accepted  # the default: no fall, passes
        refused = gate(_Fixed(1, live), _Fixed(2, candidate), x, truth, strict)
        assert not refused.accepted and refused.reasons[0].startswith("accuracy is not shown better")
        assert refused.metrics["accuracy"]["low"] <= 0 and refused.metrics["options"]["require_gain"]
    accepted = gate(_Fixed(1, live), _Fixed(2, clear), x, truth, strict)
    assert accepted.accepted, accepted.reasons
    assert accepted.metrics["accuracy"]["low"] > 0
