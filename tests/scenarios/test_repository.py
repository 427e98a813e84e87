"""`headmaster repo build` / zero-shot heads: rendered, validated, fingerprint-checked.

On the tiny encoder (tests.helpers.TINY_MODEL): the repository's files are the subject; the
ViT-S-32 repository these tests once read is the one the session's server serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from headmaster.errors import FingerprintMismatchError, RepositoryError
from headmaster.export.card import EncoderCard
from headmaster.export.encoder import ExportOptions, export_encoder
from headmaster.export.heads import HeadCard, HeadWeights
from headmaster.lifecycle import operations as lifecycle
from headmaster.repository.build import build_repository
from headmaster.repository.config import parse
from headmaster.repository.consistency import check
from headmaster.repository.repo import BuildOptions, Repository
from tests.helpers import MODEL, SEED, TIER_OPTIONS, TINY_MODEL, ZERO_SHOT


@pytest.fixture(scope="module")
def tiny_open_clip_model():
    """The tiny encoder's random-weight model straight from open_clip (as conftest's
    open_clip_model is ViT-S-32's): the independent reference for its zero-shot weights."""
    import open_clip

    torch.manual_seed(SEED)
    model = open_clip.create_model(TINY_MODEL, pretrained=None)
    return model.eval(), None, open_clip.get_tokenizer(TINY_MODEL)


@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory):
    """Another encoder: same architecture, other weights (seed 1)."""
    out = tmp_path_factory.mktemp("other") / "enc"
    export_encoder(ExportOptions(model=MODEL, pretrained=None, out=out, seed=1, towers=("image",)))
    return out


def test_repository_has_every_model_and_validates(tiny_repo):
    repository = Repository(tiny_repo)
    check(repository.path)
    assert repository.model_names() == [
        "preprocess",
        "image_encoder",
        "tokenize",
        "text_encoder",
        "animal",
        "has_cat",
        "threshold",
        "classify",
        "classify_embedding",
        "embed",
        "embed_text",
    ]
    for name in repository.model_names():
        assert parse((tiny_repo / name / "config.pbtxt").read_text()).name == name


def test_native_flavour_renders_from_the_same_description(tiny_encoder_dir, tmp_path):
    from tests.helpers import build_repo

    native = build_repo(tiny_encoder_dir, tmp_path / "native", flavour="native")
    repository = Repository(native)
    platforms = {
        name: parse((native / name / "config.pbtxt").read_text()).platform for name in repository.model_names()
    }
    assert platforms["image_encoder"] == platforms["text_encoder"] == "onnxruntime_onnx"
    assert platforms["animal"] == platforms["has_cat"] == "onnxruntime_onnx"
    assert platforms["classify"] == "ensemble"
    assert (native / "image_encoder" / "1" / "model.onnx").is_file()


def test_zero_shot_weights_are_the_open_clip_text_embeddings(tiny_repo, tiny_open_clip_model):
    model, _, tokenizer = tiny_open_clip_model
    labels, templates, _ = ZERO_SHOT["animal"]
    prompts = [templates[0].format(label.split("=", 1)[1]) for label in labels]
    with torch.no_grad():
        text = model.encode_text(tokenizer(prompts), normalize=True).numpy()
    expected = model.logit_scale.exp().item() * text
    head = onnx.load(str(tiny_repo / "animal" / "1" / "model.onnx"))
    weight = {t.name: numpy_helper.to_array(t) for t in head.graph.initializer}["w0"]
    np.testing.assert_allclose(weight, expected, atol=1e-3)


def foreign_card(version: int) -> HeadCard:
    return HeadCard(
        name="stranger",
        version=version,
        labels=("a", "b"),
        thresholds=(0.0, 0.0),
        multi_label=False,
        encoder_fingerprint="sha256:" + "f" * 64,
        embed_dim=384,
        kind="linear",
    )


def test_a_head_from_another_encoder_is_refused(tiny_repo):
    weights = HeadWeights(((np.zeros((2, 384), np.float32), np.zeros(2, np.float32)),), False)
    with pytest.raises(
        FingerprintMismatchError, match="was made with encoder ffffffffffff, but this repository serves"
    ):
        lifecycle.publish(tiny_repo, lifecycle.HeadDraft(weights, foreign_card(1)))
    assert not (tiny_repo / "stranger").exists()


@pytest.mark.slow  # exports a second ViT-S-32 (other_encoder): 7.4 s of CPU, 29 s on 2 busy cores (2026-12-07)
def test_rebuilding_with_another_encoder_is_refused_while_its_heads_exist(repo, other_encoder):
    with pytest.raises(RepositoryError, match=r"cannot build .* head animal v1 .* was made with encoder"):
        build_repository(other_encoder, repo)
    check(repo)  # untouched


def test_validate_catches_a_tampered_head(tiny_encoder_dir, tmp_path):
    from tests.helpers import build_repo

    path = build_repo(tiny_encoder_dir, tmp_path / "r", heads={"animal": ZERO_SHOT["animal"]})
    head_json = path / "animal" / "1" / "head.json"
    doc = json.loads(head_json.read_text())
    doc["encoder_fingerprint"] = "sha256:" + "e" * 64
    head_json.write_text(json.dumps(doc))
    with pytest.raises(FingerprintMismatchError, match="head animal v1 was made with encoder eeeeeeeeeeee"):
        check(path)


def test_manifest_holds_the_encoder_card(tiny_repo, tiny_encoder_dir):
    assert Repository(tiny_repo).card == EncoderCard.load(tiny_encoder_dir)
    assert Repository(tiny_repo).options == BuildOptions(
        max_queue_delay_us=20000, preferred_batch_sizes=(4, 8), serve_text=True, **TIER_OPTIONS
    )


def test_not_a_repository_is_named(tmp_path):
    with pytest.raises(RepositoryError, match="is not a Headmaster model repository"):
        Repository(tmp_path)


def test_a_head_with_several_versions_is_one_model_serving_the_newest(tiny_encoder_dir, tmp_path):
    from headmaster.training.heads.zero_shot import create_zero_shot_head
    from tests.helpers import build_repo

    path = build_repo(tiny_encoder_dir, tmp_path / "r", heads={})
    for extra in ([], ["bird=a photo of a bird"]):
        create_zero_shot_head(path, "pet", ["cat=a photo of a cat", "dog=a photo of a dog", *extra])
    repository = Repository(path)
    assert repository.head_names() == ["pet"]
    assert repository.head("pet").versions == (1, 2) and repository.head("pet").live == 2
    steps = [s.model_name for s in parse((path / "classify" / "config.pbtxt").read_text()).ensemble_scheduling.step]
    assert steps == ["preprocess", "image_encoder", "pet", "threshold"]
    check(repository.path)


def test_docker_compose_serves_what_a_native_build_produces(tiny_encoder_dir, tmp_path):
    """docker-compose.yml cannot run here (no Docker engine, no GPU); check that what it
    mounts and loads matches a native-flavour repository built from the same description."""
    import yaml

    from tests.helpers import build_repo

    root = Path(__file__).parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    service = compose["services"]["triton"]
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in (root / service["build"]["dockerfile"]).read_text()
    # The repository is the bucket `headmaster repo push` fills with the native build (MinIO).
    (repository,) = [arg.split("=", 1)[1] for arg in service["command"] if arg.startswith("--model-repository=")]
    assert repository.startswith("s3://") and service["environment"]["HEADMASTER_REPOSITORY"] == repository
    loaded = [arg.split("=", 1)[1] for arg in service["command"] if arg.startswith("--load-model=")]
    # Built as the file's own comments build it: `repo build --flavour native`, lean by default.
    native = Repository(build_repo(tiny_encoder_dir, tmp_path / "model_repository", flavour="native", serve_text=False))
    assert set(loaded) <= set(native.model_names())
    # Loading those ensembles pulls in every model of the repository.
    used = {
        s.model_name
        for name in loaded
        for s in parse((native.path / name / "config.pbtxt").read_text()).ensemble_scheduling.step
    }
    assert used | set(loaded) == set(native.model_names())
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # Closed like `headmaster serve`: the same APIs behind the same header, on both transports,
    # and the ports on loopback unless the operator says otherwise.
    from headmaster.server.record import KEY_HEADER, RESTRICTED_APIS

    for flag in ("--http-restricted-api=", "--grpc-restricted-protocol="):
        (value,) = [arg.split("=", 1)[1] for arg in service["command"] if arg.startswith(flag)]
        apis, header = value.split(":", 1)
        assert set(apis.split(",")) == set(RESTRICTED_APIS)
        assert header.startswith(f"{KEY_HEADER}=${{HEADMASTER_API_KEY:?")
    assert all(port.startswith("127.0.0.1:") for port in service["ports"])
