"""The repository on disk describes what is served: `problems()` finds every way it does not,
`repair()` fixes what the disk allows, and no path makes a broken head version live.

Real repositories built from the session's exported encoder; no server is started.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from headmaster.errors import FingerprintMismatchError, InvalidVersionError, RepositoryError
from headmaster.lifecycle import operations as lifecycle
from headmaster.repository.config import parse
from headmaster.repository.consistency import check, problems, repair
from headmaster.repository.repo import Repository
from headmaster.repository.validation import validate_version
from tests.helpers import build_repo, clone_repo, run_cli, written_version

LABELS = ("cat", "dog", "bird")


@pytest.fixture(scope="module")
def base(tiny_encoder_dir, tmp_path_factory) -> Path:
    # The tiny encoder: these tests damage and repair the repository's files, whatever it serves.
    return build_repo(tiny_encoder_dir, tmp_path_factory.mktemp("consistency") / "base")


@pytest.fixture
def repo(base, tmp_path) -> Path:
    """A copy of the base repository for one test (model files hard-linked: replace, never edit)."""
    return clone_repo(base, tmp_path / "repo")


def replace_file(path: Path, content: bytes | str) -> None:
    path.unlink()
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def edit_card(folder: Path, **changes) -> None:
    doc = json.loads((folder / "head.json").read_text())
    doc.update(changes)
    replace_file(folder / "head.json", json.dumps(doc))


def four_labels(folder: Path) -> None:
    """head.json gets a fourth label; model.onnx still gives three scores."""
    doc = json.loads((folder / "head.json").read_text())
    edit_card(folder, labels=doc["labels"] + ["fish"], thresholds=doc["thresholds"] + [0.5])


def live_version(repo: Path, head: str) -> int:
    return max(parse((repo / head / "config.pbtxt").read_text()).version_policy.specific.versions)


def head_steps(repo: Path, ensemble: str = "classify") -> list[str]:
    steps = parse((repo / ensemble / "config.pbtxt").read_text()).ensemble_scheduling.step
    return [s.model_name for s in steps if s.model_name not in ("preprocess", "image_encoder", "threshold")]


def repaired(repo: Path) -> list[str]:
    actions = repair(repo)
    assert problems(repo) == [], "repair left problems"
    check(repo)
    assert repair(repo) == []  # nothing left to do
    return actions


def test_a_built_repository_is_clean(base):
    assert problems(base) == []
    check(base)
    assert repair(base) == []


def test_a_corrupt_live_version_is_found_and_the_previous_one_served_again(repo):
    """The failed load of issue 10: config.pbtxt names v2, v2 does not load, the server kept v1."""
    written_version(repo, "animal", np.random.default_rng(0), LABELS)
    replace_file(repo / "animal" / "2" / "model.onnx", b"\x08not an onnx file")
    found = problems(repo)
    assert len(found) == 1
    assert found[0].startswith("head version animal/2: model.onnx does not load in onnxruntime: ")
    assert found[0].endswith("(the version animal/config.pbtxt serves)")
    with pytest.raises(
        RepositoryError,
        match=r"1 problem\(s\):\n  - head version animal/2: (.|\n)*"
        r"fix them with `headmaster repo repair --repo ",
    ):
        check(repo)

    actions = repaired(repo)
    assert actions[0].startswith("moved the invalid animal/2 to animal/.invalid-2-")
    assert actions[1] == "head animal serves v1; its config named v2 (rewrote animal/config.pbtxt)"
    assert live_version(repo, "animal") == 1
    assert Repository(repo).head("animal").versions == (1,)
    assert len(list((repo / "animal").glob(".invalid-2-*/model.onnx"))) == 1  # kept aside, out of Triton's sight


def test_a_head_folder_deleted_by_hand_is_found_and_taken_out_of_the_ensembles(repo):
    shutil.rmtree(repo / "has_cat")
    assert problems(repo) == [
        "threshold expects heads that are not on disk: has_cat",
        "ensemble classify runs heads that are not on disk: has_cat",
        "ensemble classify_embedding runs heads that are not on disk: has_cat",
    ]
    with pytest.raises(RepositoryError, match="3 problem"):
        check(repo)
    assert repaired(repo) == [
        "rewrote threshold/config.pbtxt for heads [animal]",
        "rewrote classify/config.pbtxt for heads [animal]",
        "rewrote classify_embedding/config.pbtxt for heads [animal]",
    ]
    assert head_steps(repo) == head_steps(repo, "classify_embedding") == ["animal"]
    assert "has_cat" not in Repository(repo).model_names()


def test_three_scores_for_four_labels_never_go_live(repo, tmp_path):
    written_version(repo, "animal", np.random.default_rng(0), LABELS)  # v2, live, sound
    four_labels(repo / "animal" / "1")
    message = "head version .*animal/1: model.onnx gives 3 scores per embedding, but head.json has 4 labels"
    with pytest.raises(InvalidVersionError, match=message):
        validate_version(repo, "animal", 1)
    with pytest.raises(InvalidVersionError, match=message):
        lifecycle.rollback(repo, "animal", to=1)
    with pytest.raises(InvalidVersionError, match=message):
        lifecycle.rollback(repo, "animal")  # the default target: the version before the live one
    assert live_version(repo, "animal") == 2
    assert problems(repo) == [
        "head version animal/1: model.onnx gives 3 scores per embedding, but head.json has 4 "
        "labels ['cat', 'dog', 'bird', 'fish']"
    ]

    outside = shutil.copytree(repo / "animal" / "1", tmp_path / "elsewhere" / "1")
    with pytest.raises(InvalidVersionError, match=r"head version .*elsewhere/1: model\.onnx gives 3 scores"):
        lifecycle.import_version(repo, outside)
    assert Repository(repo).head("animal").versions == (1, 2)


def test_a_sound_version_imports_and_rolls_back(repo, tmp_path):
    outside = shutil.copytree(repo / "animal" / "1", tmp_path / "elsewhere" / "1")
    card = lifecycle.import_version(repo, outside, name="pets").card
    assert (card.name, card.version) == ("pets", 1)
    written_version(repo, "animal", np.random.default_rng(0), LABELS)
    assert lifecycle.rollback(repo, "animal").version == 1
    assert problems(repo) == []


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda r: (r / "preprocess" / "config.pbtxt").unlink(), "preprocess/config.pbtxt is missing"),
        (
            lambda r: replace_file(r / "classify" / "config.pbtxt", "name: [[["),
            "classify/config.pbtxt: not a valid config.pbtxt: 1:7 : 'name: [[[': Expected string but found: '['",
        ),
        (
            lambda r: replace_file(r / "animal" / "config.pbtxt", (r / "has_cat" / "config.pbtxt").read_text()),
            "head animal: animal/config.pbtxt names the model 'has_cat', not 'animal'",
        ),
        (
            lambda r: replace_file(
                r / "embed" / "config.pbtxt",
                (r / "embed" / "config.pbtxt").read_text().replace("max_batch_size: 64", "max_batch_size: 8"),
            ),
            "embed/config.pbtxt is not what the manifest renders",
        ),
    ],
)
def test_configs_missing_unreadable_or_naming_another_model(repo, damage, expected):
    damage(repo)
    assert problems(repo)[0] == expected
    repaired(repo)


def test_a_live_version_that_is_not_on_disk(repo):
    written_version(repo, "animal", np.random.default_rng(0), LABELS)
    shutil.rmtree(repo / "animal" / "2")
    assert problems(repo) == ["head animal: animal/config.pbtxt serves v2, which is not on disk (versions: [1])"]
    assert repaired(repo) == ["head animal serves v1; its config named v2 (rewrote animal/config.pbtxt)"]


def test_a_version_whose_head_json_disagrees_with_its_folder(repo):
    shutil.copytree(repo / "animal" / "1", repo / "animal" / "2")  # not live: the config still serves v1
    assert problems(repo) == ["head version animal/2: head.json says version 1, not 2"]
    assert repaired(repo)[0].startswith("moved the invalid animal/2 to animal/.invalid-2-")
    assert live_version(repo, "animal") == 1


def test_a_head_with_no_valid_version_is_moved_aside(repo):
    replace_file(repo / "has_cat" / "1" / "head.json", "{}")
    found = problems(repo)
    assert found[0].startswith("head version has_cat/1: head.json is not a valid head card: ")
    assert found[1:] == [
        "head has_cat: no valid version on disk (versions: [1])",
        "threshold expects heads with no valid version: has_cat",
        "ensemble classify runs heads with no valid version: has_cat",
        "ensemble classify_embedding runs heads with no valid version: has_cat",
    ]
    actions = repaired(repo)
    assert actions[0].startswith(
        "head has_cat has no valid version (versions: [1]): moved has_cat/ to .invalid-has_cat-"
    )
    assert head_steps(repo) == ["animal"] and not (repo / "has_cat").exists()


def test_a_head_with_another_encoder_fails_validate_as_a_fingerprint_mismatch(repo):
    edit_card(repo / "animal" / "1", encoder_fingerprint="sha256:" + "e" * 64)
    with pytest.raises(FingerprintMismatchError, match="head animal v1 was made with encoder eeeeeeeeeeee"):
        check(repo)


def test_a_head_folder_without_config_is_reported_and_adopted(repo):
    (repo / "animal" / "config.pbtxt").unlink()
    assert problems(repo) == [
        "head animal: animal/config.pbtxt is missing, so it is not served (a head folder copied in by hand and "
        "not adopted yet?)",
        "threshold expects heads that have no config.pbtxt: animal",
        "ensemble classify runs heads that have no config.pbtxt: animal",
        "ensemble classify_embedding runs heads that have no config.pbtxt: animal",
    ]
    assert repaired(repo) == ["head animal serves v1 (rewrote animal/config.pbtxt)"]


def test_leftovers_are_found_and_cleared(repo):
    (repo / "animal" / ".staging-2-abc").mkdir()
    (repo / ".removed-pets-12").mkdir()
    (repo / "image_encoder" / "1").rename(repo / "image_encoder" / ".old-1-99")
    (repo / "classify" / ".config.pbtxt.x1y2").write_text("half")
    found = problems(repo)
    assert found[:5] == [
        ".removed-pets-12: leftover of an interrupted `heads remove`",
        "animal/.staging-2-abc: leftover of an interrupted write",
        "classify/.config.pbtxt.x1y2: leftover of an interrupted write",
        "image_encoder/.old-1-99: leftover of an interrupted rebuild, and image_encoder/1 is missing",
        f"image_encoder/1/ is missing; rebuild with `headmaster repo build --encoder DIR --repo {repo}`",
    ]
    assert sorted(repaired(repo)) == [
        "removed the leftover .removed-pets-12",
        "removed the leftover animal/.staging-2-abc",
        "removed the leftover classify/.config.pbtxt.x1y2",
        "restored image_encoder/1 from the leftover image_encoder/.old-1-99",
    ]


def test_missing_encoder_files_name_the_rebuild(repo):
    (repo / "image_encoder" / "1" / "model.onnx").unlink()
    expected = [
        f"image_encoder/1/model.onnx is missing; rebuild with `headmaster repo build --encoder DIR --repo {repo}`"
    ]
    assert problems(repo) == expected
    assert repair(repo) == []
    assert problems(repo) == expected


def test_a_damaged_manifest_is_one_problem_and_nothing_raises(repo):
    replace_file(repo / "headmaster.json", "{not json")
    found = problems(repo)
    assert len(found) == 1 and "headmaster.json is not valid JSON" in found[0]
    with pytest.raises(RepositoryError, match="is not valid JSON"):
        repair(repo)
    replace_file(repo / "headmaster.json", json.dumps({"schema": 1, "build": {"flavour": "portable"}, "encoder": 3}))
    assert len(problems(repo)) == 1


def test_problems_never_raises_on_a_thoroughly_damaged_repository(repo):
    for config in repo.glob("*/config.pbtxt"):
        replace_file(config, "}}}")
    for version in repo.glob("*/1"):
        shutil.rmtree(version)
    found = problems(repo)
    assert found and all(isinstance(p, str) and "\n" not in p for p in found)
    repair(repo)
    assert all("is missing; rebuild with" in p for p in problems(repo))


# -- the command line --------------------------------------------------------------------
def test_repo_check_names_every_problem_and_repair_fixes_them(repo, cli):
    shutil.rmtree(repo / "has_cat")
    (repo / "animal" / ".staging-2-abc").mkdir()
    check = run_cli("repo", "check", "--repo", repo)
    assert check.returncode == 1, check.stderr
    lines = check.stderr.strip().splitlines()
    assert lines[:4] == [
        "animal/.staging-2-abc: leftover of an interrupted write",
        "threshold expects heads that are not on disk: has_cat",
        "ensemble classify runs heads that are not on disk: has_cat",
        "ensemble classify_embedding runs heads that are not on disk: has_cat",
    ]
    assert lines[4] == f"4 problem(s) in {repo}; fix them with `headmaster repo repair --repo {repo}`"
    # repair and the second check in this process (the `cli` fixture): their entry points run as
    # subprocesses in test_s3_replicas.py and test_lean_repository.py.
    fixed = cli("repo", "repair", "--repo", repo)
    assert fixed.returncode == 0, fixed.stderr
    assert "removed the leftover animal/.staging-2-abc" in fixed.stderr
    assert "rewrote classify/config.pbtxt for heads [animal]" in fixed.stderr
    again = cli("repo", "check", "--repo", repo)
    assert again.returncode == 0 and again.stderr.startswith(f"ok {repo}"), again.stderr


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda f: replace_file(f / "model.onnx", b"\x08garbage"), "model.onnx does not load in onnxruntime"),
        (lambda f: replace_file(f / "head.json", "{not json"), "head.json is not a valid head card"),
        (lambda f: replace_file(f / "head.json", '{"schema": 1}'), "head.json is not a valid head card"),
        (lambda f: (f / "model.onnx").unlink(), "model.onnx is missing"),
        (four_labels, "model.onnx gives 3 scores per embedding, but head.json has 4 labels"),
    ],
)
def test_importing_a_corrupt_folder_prints_one_line(repo, tmp_path, cli, damage, match):
    import re

    folder = shutil.copytree(repo / "animal" / "1", tmp_path / "elsewhere" / "1", copy_function=shutil.copy)
    damage(folder)
    result = cli("heads", "import", folder, "--repo", repo)  # in this process: 1 s of CPU less each
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert output.startswith(f"error: head version {folder}: ") and re.search(match, output), output
    assert Repository(repo).head_names() == ["animal", "has_cat"] and Repository(repo).head("animal").versions == (1,)
