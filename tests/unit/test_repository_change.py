"""The repository-change transaction (lifecycle/change.py) and the operations written with it.

- Undo: registered steps run newest first when a load is refused, and the error says what they
  undid; on the session's real Triton, a head version and an A/B candidate that Triton refuses to
  load leave the repository naming what the server still serves.
- Order: a recording stand-in for Triton's control API (tests/control_recorder.py)
  notes each call with what the disk said at that moment, so the phases of a head's removal and of
  an A/B test's start and end are checked against the disk, not just their order of calls.
- Distillation publishes its student through the same change: checked, refused during its
  teacher's test.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from headmaster.errors import InvalidVersionError, RepositoryError, ServerError
from headmaster.export.heads import MODEL_FILE, HeadCard, HeadWeights, write_head
from headmaster.lifecycle import operations as lifecycle
from headmaster.lifecycle.change import RepositoryChange
from headmaster.repository import ab
from headmaster.repository.consistency import problems
from headmaster.repository.layout import copy_backend
from headmaster.repository.repo import Repository
from headmaster.repository.topology import HEAD_DEPENDENT
from headmaster.server import live
from tests.control_recorder import ControlRecorder
from tests.helpers import build_repo, clone_repo, free_port

HEAD = "animal"
ENSEMBLES = [
    "classify",
    "classify_embedding",
]  # in HEAD_DEPENDENT's order  # a zero-shot head of tests.helpers.ZERO_SHOT: cat, dog, bird
POSTS = ("load", "unload", "index")  # the control calls but the model-config reads


# -- the transaction alone -------------------------------------------------------------------------
def test_a_refusal_runs_the_undo_steps_newest_first_and_names_what_they_undid(tmp_path):
    ran = []

    def second() -> None:
        ran.append("second")
        raise ServerError("the server refused the undo's own load too")  # the other steps still run

    with pytest.raises(ServerError) as refused, RepositoryChange(tmp_path, None) as change:
        change.undo_with("first put back", lambda: ran.append("first"))
        change.undo_with("second put back", second)
        raise ServerError("the server at x could not load model 'h'")
    assert ran == ["second", "first"]
    assert str(refused.value) == "the server at x could not load model 'h'; second put back; first put back"


def test_other_errors_and_a_change_without_undo_steps_pass_through(tmp_path):
    ran = []
    with pytest.raises(RepositoryError, match=r"^not a refusal$"), RepositoryChange(tmp_path, None) as change:
        change.undo_with("never", lambda: ran.append("undo"))
        raise RepositoryError("not a refusal")
    with pytest.raises(ServerError, match=r"^refused$"), RepositoryChange(tmp_path, None):
        raise ServerError("refused")
    assert ran == []


# -- undo on the session's real Triton ---------------------------------------------------------------
def broken_version(repo: Path, folder: Path, name: str, version: int, labels: tuple[str, ...]) -> Path:
    """A sound head version (it validates) whose runner cannot start: Triton refuses to load it."""
    repository = Repository(repo)
    rng = np.random.default_rng(version)
    weights = HeadWeights(
        (
            (
                rng.normal(size=(len(labels), repository.card.embed_dim)).astype(np.float32),
                np.zeros(len(labels), np.float32),
            ),
        ),
        multi_label=False,
    )
    card = HeadCard(
        name=name,
        version=version,
        labels=labels,
        thresholds=(0.0,) * len(labels),
        multi_label=False,
        encoder_fingerprint=repository.fingerprint,
        embed_dim=repository.card.embed_dim,
        kind="linear",
    )
    write_head(folder, weights, card)
    copy_backend("runtime", folder)
    (folder / "model.py").write_text("raise RuntimeError('this runner cannot start')\n")
    return folder


def test_a_new_head_triton_refuses_is_moved_aside_and_the_server_keeps_serving(server, repo):
    name = "txn_refused"
    broken_version(repo, repo / name / "1", name, 1, ("yes", "no"))  # dropped in by hand
    try:
        with pytest.raises(ServerError, match=r"(?s)could not load model 'txn_refused'.*; the head was moved aside to"):
            lifecycle.adopt(repo, name, 1, server)
        aside = next(repo.glob(f".refused-{name}-*"))
        assert (aside / "1" / MODEL_FILE).is_file() and not (repo / name).exists()
        assert name not in Repository(repo).head_names() and problems(repo) == []
        for model in HEAD_DEPENDENT:  # the disk and the server name the head nowhere
            assert name not in (repo / model / "config.pbtxt").read_text()
            assert live.loaded(server).get(model) == "1"
    finally:
        shutil.rmtree(repo / name, ignore_errors=True)
        for folder in repo.glob(f".refused-{name}-*"):
            shutil.rmtree(folder)


def test_a_candidate_triton_refuses_leaves_no_test_running(server, repo, tmp_path):
    state = Repository(repo).head(HEAD)
    candidate = max(state.versions) + 1
    broken_version(repo, repo / HEAD / str(candidate), HEAD, candidate, state.card.labels)
    try:
        with pytest.raises(
            ServerError,
            match=rf"(?s)could not load model .*; the test was not started: head {HEAD} serves v{state.live} alone",
        ):
            lifecycle.start_test(repo, HEAD, candidate, share=0.5, server=server, record=False)
        assert ab.running(repo, HEAD) is None
        assert Repository(repo).head(HEAD).live == state.live and problems(repo) == []
        assert live.loaded(server)[HEAD] == str(state.live)
        config = (repo / HEAD / "config.pbtxt").read_text()
        assert f"versions: {state.live}" in config and f"versions: {candidate}" not in config
    finally:
        shutil.rmtree(repo / HEAD / str(candidate), ignore_errors=True)


# -- the order of loads, against the disk: a recording control API --------------------------------------
def naming(repo: Path, head: str) -> dict:
    """Which head-dependent configs on disk name ``head``, its folder, and the A/B record."""
    return {
        **{
            model: bool(re.search(rf"\b{head}\b", (repo / model / "config.pbtxt").read_text()))
            for model in HEAD_DEPENDENT
        },
        "folder": (repo / head).is_dir(),
        "test": ab.running(repo, head) is not None,
    }


@pytest.fixture
def disk_repo(tiny_encoder_dir, tmp_path_factory) -> Path:
    """A repository of its own (nothing serves it) with the zero-shot heads, on the tiny encoder."""
    source = tmp_path_factory.getbasetemp() / "change-repo" / "model_repository"
    if not source.exists():
        build_repo(tiny_encoder_dir, source)
    return clone_repo(source, tmp_path_factory.mktemp("change") / "model_repository")


def test_a_head_leaves_in_two_phases_each_loaded_against_its_own_disk(disk_repo):
    with ControlRecorder(look=lambda: naming(disk_repo, HEAD)) as recorder:
        lifecycle.remove(disk_repo, HEAD, server=recorder.http_url)
    ensembles_named = {"threshold": True, "classify": False, "classify_embedding": False, "folder": False}
    phase_one = {**ensembles_named, "test": False}
    phase_two = dict.fromkeys(HEAD_DEPENDENT, False) | {"folder": False, "test": False}
    # The ensembles load while threshold's config still fits the head (never collapsed into one write:
    # Triton would reload threshold with them and drop the still-old classify meanwhile).
    assert recorder.seen(*POSTS) == [
        ("load", "classify_embedding", phase_one),
        ("load", "classify", phase_one),
        ("unload", HEAD, phase_one),
        ("load", "threshold", phase_two),
    ]
    assert problems(disk_repo) == []


def test_an_ab_test_starts_and_ends_in_phases(disk_repo):
    state = Repository(disk_repo).head(HEAD)
    folder = disk_repo / HEAD / str(state.live)
    draft = lifecycle.HeadDraft(HeadWeights.from_onnx(folder / MODEL_FILE), replace(state.card, details={}))
    candidate = lifecycle.publish(disk_repo, draft, go_live=False).card.version

    def look() -> dict:
        config = (disk_repo / HEAD / "config.pbtxt").read_text()
        served = tuple(v for v in (state.live, candidate) if f"versions: {v}" in config)
        ensembles = (disk_repo / "classify" / "config.pbtxt").read_text()
        steps = re.findall(rf'model_name: "{HEAD}"\s+model_version: (-?\d+)', ensembles)
        return {"test": ab.running(disk_repo, HEAD) is not None, "head": served, "steps": tuple(map(int, steps))}

    with ControlRecorder(look=look) as recorder:
        lifecycle.start_test(disk_repo, HEAD, candidate, share=0.5, server=recorder.http_url, record=False)
        started = recorder.seen(*POSTS)
        recorder.calls.clear()
        lifecycle.finish_test(disk_repo, HEAD, promote=True, server=recorder.http_url, record=False)
    live_version = state.live
    # Start: the ensembles pin the live version, then the head loads both, threshold and the ensembles run both.
    assert started == [
        *[("load", model, {"test": False, "head": (live_version,), "steps": (live_version,)}) for model in ENSEMBLES],
        *[
            ("load", model, {"test": True, "head": (live_version, candidate), "steps": (live_version, candidate)})
            for model in (HEAD, *HEAD_DEPENDENT)
        ],
    ]
    # Promote: the ensembles pin the candidate alone, then the head loads it alone, and the ensembles say -1 again.
    assert recorder.seen(*POSTS) == [
        *[
            ("load", model, {"test": True, "head": (live_version, candidate), "steps": (candidate,)})
            for model in ENSEMBLES
        ],
        *[("load", model, {"test": False, "head": (candidate,), "steps": (-1,)}) for model in (HEAD, *HEAD_DEPENDENT)],
    ]
    assert Repository(disk_repo).head(HEAD).live == candidate and problems(disk_repo) == []


# -- distillation's student goes through the same change -----------------------------------------------
def student_onnx(path: Path, labels: int) -> Path:
    """A student-shaped ONNX file: PIXELS [batch, 3, H, W] -> SCORES [batch, labels] (a softmax)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((3, labels), 0.1, np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["PIXELS"], ["mean"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["mean", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["SCORES"], axis=1),
        ],
        "student",
        [helper.make_tensor_value_info("PIXELS", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, ["batch", labels])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def student_card(labels: int) -> dict:
    names = [str(i) for i in range(labels)]
    return {
        "name": f"{HEAD}_student",
        "teacher": f"{HEAD} v1",
        "architecture": "test",
        "labels": names,
        "thresholds": [0.0] * labels,
        "multi_label": False,
        "preprocessing": {"size": 8, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3},
        "report": {},
    }


def test_a_student_is_checked_numbered_and_refused_during_its_teachers_test(disk_repo, tmp_path):
    from headmaster.training.distill import publish_student

    name = f"{HEAD}_student"
    wrong = student_onnx(tmp_path / "wrong.onnx", 2)
    with pytest.raises(InvalidVersionError, match=r"model.onnx gives SCORES of shape \[2, 2\], not \[2, 3\]"):
        publish_student(disk_repo, HEAD, wrong, student_card(3))
    assert not (disk_repo / name).exists()

    good = student_onnx(tmp_path / "good.onnx", 3)
    assert [publish_student(disk_repo, HEAD, good, student_card(3)) for _ in range(3)] == [1, 2, 3]
    assert sorted(p.name for p in (disk_repo / name).iterdir() if p.name.isdigit()) == ["2", "3"]  # keeps 2
    card = json.loads((disk_repo / name / "3" / "student.json").read_text())
    assert card["version"] == 3 and card["report"]["version"] == 3
    assert name in Repository(disk_repo).model_names()

    ab.record(disk_repo, ab.AbTest.new(HEAD, 1, 2, 0.5, False))
    with pytest.raises(RepositoryError, match=f"cannot distill a student of head {HEAD}: it runs a"):
        publish_student(disk_repo, HEAD, good, student_card(3))
    assert sorted(p.name for p in (disk_repo / name).iterdir() if p.name.isdigit()) == ["2", "3"]


def test_a_student_no_server_could_load_is_moved_aside_and_the_previous_one_stays(disk_repo, tmp_path):
    """The server named is gone (a replica that went away): the load fails like a refusal, and the
    new version leaves the repository again; the first one then takes the whole model with it."""
    from headmaster.training.distill import publish_student

    name, gone = f"{HEAD}_student", f"127.0.0.1:{free_port()}"
    good = student_onnx(tmp_path / "good.onnx", 3)
    with pytest.raises(ServerError, match=rf"(?s)cannot reach .*{gone}.*; the student {name} v1 was moved aside to"):
        publish_student(disk_repo, HEAD, good, student_card(3), server=gone)
    assert not (disk_repo / name).exists() and name not in Repository(disk_repo).model_names()
    assert [p.name for p in disk_repo.glob(f".refused-{name}-1-*/1")] == ["1"]

    assert publish_student(disk_repo, HEAD, good, student_card(3)) == 1  # a new model again, as a new head would be
    with pytest.raises(ServerError, match=rf"; the student {name} v2 was moved aside to"):
        publish_student(disk_repo, HEAD, good, student_card(3), server=gone)
    assert sorted(p.name for p in (disk_repo / name).iterdir() if p.name.isdigit()) == ["1"]
    assert name in Repository(disk_repo).model_names() and problems(disk_repo) == []
