"""A lean repository (the default of `repo build` for an image+text encoder): the text tower and
tokenizer stay in the repository, zero-shot heads are still made from them (also into a running
server), and the server is asked to load neither; `repo build --serve-text` serves them, and a
repository built before that default keeps serving what it served."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from headmaster.client import HeadmasterClient
from headmaster.client.errors import ModelNotFoundError
from headmaster.repository import consistency
from headmaster.repository.layout import MANIFEST
from headmaster.repository.repo import Repository
from headmaster.training.heads.zero_shot import create_zero_shot_head
from tests.helpers import ZERO_SHOT, Ports, build_repo, read_until_ready, run_cli, serve_command

ROOT = Path(__file__).resolve().parents[2]
TEXT_MODELS = {"tokenize", "text_encoder", "embed_text"}
NOTE = "embed_text is not served"


def test_a_lean_repository_makes_zero_shot_heads_but_serves_no_text_model(tiny_encoder_dir, tmp_path):
    repo = build_repo(
        tiny_encoder_dir, tmp_path / "model_repository", heads={"animal": ZERO_SHOT["animal"]}, serve_text=False
    )
    repository = Repository(repo)
    assert repository.head("animal").live == 1  # made from the text tower on disk
    assert (repo / "text_encoder" / "1").is_dir()
    names = repository.model_names()
    assert not TEXT_MODELS & set(names), names
    assert {"preprocess", "image_encoder", "animal", "classify", "embed"} <= set(names)
    consistency.check(repo)  # a servable state


def test_repo_build_is_lean_unless_asked_with_serve_text(tiny_encoder_dir, tmp_path, cli):
    lean, full = tmp_path / "lean", tmp_path / "full"
    built = run_cli("repo", "build", "--encoder", tiny_encoder_dir, "--repo", lean)
    assert built.returncode == 0, built.stderr
    assert not TEXT_MODELS & set(Repository(lean).model_names())
    assert (lean / "text_encoder" / "1").is_dir() and (lean / "tokenize" / "1").is_dir()  # on disk all the same
    said = built.stdout + built.stderr
    assert said.count(NOTE) == 1 and "repo build --serve-text" in said, said
    # The deployments' default model lists ask a default-built repository only for what it has.
    chart = yaml.safe_load((ROOT / "deploy" / "helm" / "headmaster" / "values.yaml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    loaded = [a.split("=", 1)[1] for a in compose["services"]["triton"]["command"] if a.startswith("--load-model=")]
    for asked in (chart["repository"]["loadModels"], loaded):
        assert asked and set(asked) <= set(Repository(lean).model_names()), asked
    checked = run_cli("repo", "check", "--repo", lean)
    assert checked.returncode == 0, checked.stderr
    assert (checked.stdout + checked.stderr).count(NOTE) == 1, checked.stdout + checked.stderr

    # The next two builds in this process (the `cli` fixture): the first was the subprocess.
    built = cli("repo", "build", "--encoder", tiny_encoder_dir, "--repo", full, "--serve-text")
    assert built.returncode == 0, built.stderr
    assert set(Repository(full).model_names()) >= TEXT_MODELS
    assert NOTE not in built.stdout + built.stderr

    # Rebuilding a repository that served text without the flag drops it, and says that it did.
    rebuilt = cli("repo", "build", "--encoder", tiny_encoder_dir, "--repo", full, "--no-serve-text")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert not TEXT_MODELS & set(Repository(full).model_names())
    assert "its previous build served it" in rebuilt.stdout + rebuilt.stderr


def test_a_repository_built_before_serve_text_keeps_serving_text(tiny_encoder_dir, tmp_path):
    repo = build_repo(tiny_encoder_dir, tmp_path / "model_repository", heads={}, serve_text=True)
    manifest = json.loads((repo / MANIFEST).read_text())
    del manifest["build"]["serve_text"]  # as every manifest written before the option existed
    (repo / MANIFEST).write_text(json.dumps(manifest))
    repository = Repository(repo)
    assert repository.options.serve_text is True
    assert set(repository.model_names()) >= TEXT_MODELS
    assert repository.text_note() is None
    consistency.check(repo)  # its configs are what it describes: nothing to repair on upgrade
    create_zero_shot_head(repo, "animal", *ZERO_SHOT["animal"])  # re-renders the head-dependent models
    consistency.check(repo)
    assert set(Repository(repo).model_names()) >= TEXT_MODELS


@pytest.mark.server  # runs `headmaster serve`
def test_a_zero_shot_head_hot_loads_into_a_served_lean_repository(tiny_encoder_dir, tmp_path, jpeg_photos):
    import tritonclient.http as http

    repo = build_repo(
        tiny_encoder_dir, tmp_path / "model_repository", heads={"animal": ZERO_SHOT["animal"]}, serve_text=False
    )
    image = next(iter(jpeg_photos.values()))
    ports = Ports.free()
    serve = subprocess.Popen(serve_command(repo, ports), stderr=subprocess.PIPE, text=True)
    try:
        printed = "".join(read_until_ready(serve))
        assert printed.count(NOTE) == 1 and "repo build --serve-text" in printed, printed
        probe = http.InferenceServerClient(f"127.0.0.1:{ports.http}")
        assert probe.is_model_ready("classify") and probe.is_model_ready("embed")
        assert not any(probe.is_model_ready(name) for name in TEXT_MODELS)
        with HeadmasterClient(f"127.0.0.1:{ports.grpc}") as client:
            assert set(client.classify([image])[0].heads) == {"animal"}
            with pytest.raises(ModelNotFoundError, match=r"'embed_text' is not served here.*--serve-text"):
                client.embed_text(["a photo of a cat"])
            # No --server: the head goes live on the server `serve` recorded in the repository.
            result = run_cli(
                "zero-shot", "vehicle", "--repo", repo, "--label", "car=a photo of a car", "--label", "bike=a bicycle"
            )
            assert result.returncode == 0, result.stderr
            head = client.classify([image])[0].heads["vehicle"]
            assert (head.version, set(head.scores)) == (1, {"car", "bike"})
        assert not any(probe.is_model_ready(name) for name in TEXT_MODELS)  # the head came from disk
        probe.close()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(90)
    assert serve.returncode == 0
