"""The native flavour from the session's exported encoder: every config matches its file.

Triton's onnxruntime backend refuses a config whose dims differ from the ONNX file's own
(a head's SCORES is [batch, labels], fixed per version). The static check
(repository/native_check.py) makes the backend's comparisons over every model and
every version on disk, here for a head published with 2 labels and then with 3.

On the native tier (HEADMASTER_NATIVE_BACKENDS / HEADMASTER_NATIVE_TRITON, see conftest.py)
the live test serves it with Triton's onnxruntime backend; on the normal tier the same test
runs on the bundled server's python backend, from the same description.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from headmaster.client import HeadmasterClient
from headmaster.lifecycle import operations as lifecycle
from headmaster.repository.config import parse, to_proto
from headmaster.repository.native_check import check_repository, served_versions, version_problems
from headmaster.repository.repo import Repository
from headmaster.training.heads.zero_shot import create_zero_shot_head
from tests.helpers import ARTIFACTS, build_repo, start_server

TWO = ["cat=a photo of a cat", "dog=a photo of a dog"]
THREE = [*TWO, "bird=a photo of a bird"]


def scores_dims(repo: Path, head: str) -> list[int]:
    config = parse((repo / head / "config.pbtxt").read_text())
    return next(list(t.dims) for t in config.output if t.name == "SCORES")


@pytest.fixture(scope="module")
def native_repo(tiny_encoder_dir, tmp_path_factory) -> Path:
    # The tiny encoder: the native configs against the files are the subject, whatever the encoder.
    repo = build_repo(
        tiny_encoder_dir, tmp_path_factory.mktemp("native") / "repo", heads={}, flavour="native", device="cpu"
    )
    create_zero_shot_head(repo, "animals", TWO)
    create_zero_shot_head(repo, "animals", THREE)
    return repo


def test_every_model_and_version_matches_its_file(native_repo):
    repository = Repository(native_repo)
    assert repository.head("animals").versions == (1, 2) and repository.head("animals").live == 2
    platforms = {
        name: parse((native_repo / name / "config.pbtxt").read_text()).platform for name in repository.model_names()
    }
    assert platforms["image_encoder"] == platforms["text_encoder"] == platforms["animals"] == "onnxruntime_onnx"
    assert check_repository(repository) == []
    checked = []
    for name in repository.model_names():
        config = parse((native_repo / name / "config.pbtxt").read_text())
        if config.platform == "ensemble":
            continue
        heads = repository.head_names()
        for version in sorted(int(p.name) for p in (native_repo / name).iterdir() if p.name.isdigit()):
            # a head version is checked against the config that serves it when it is live
            served = to_proto(repository.head_model(name, version), "native") if name in heads else config
            assert version_problems(served, native_repo / name / str(version)) == [], f"{name} v{version}"
            checked.append((name, version))
    assert ("animals", 1) in checked and ("animals", 2) in checked and ("image_encoder", 1) in checked


def test_the_config_follows_the_live_versions_label_count(native_repo, tmp_path):
    repository = Repository(native_repo)
    assert scores_dims(native_repo, "animals") == [3]
    repository.set_live("animals", 1)
    try:
        assert scores_dims(native_repo, "animals") == [2]
        assert served_versions(
            parse((native_repo / "animals" / "config.pbtxt").read_text()), native_repo / "animals"
        ) == [1]
        assert check_repository(native_repo) == []
    finally:
        repository.set_live("animals", 2)
    assert scores_dims(native_repo, "animals") == [3]
    assert check_repository(native_repo) == []


def test_encoder_configs_are_the_exported_files_shapes(native_repo):
    import onnxruntime as ort

    for tower in ("image", "text"):
        config = parse((native_repo / f"{tower}_encoder" / "config.pbtxt").read_text())
        session = ort.InferenceSession(
            str(native_repo / f"{tower}_encoder" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        [model_input], [model_output] = session.get_inputs(), session.get_outputs()
        assert (config.input[0].name, model_input.shape[1:]) == (model_input.name, list(config.input[0].dims))
        assert (config.output[0].name, model_output.shape[1:]) == (model_output.name, list(config.output[0].dims))
        assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU  # device="cpu"


@pytest.mark.server
def test_a_version_with_another_label_count_hot_loads(encoder_dir, jpeg_photos, tmp_path):
    """Served (native tier: onnxruntime backend; otherwise the python backend): v1 with 2
    labels, then v2 with 3 hot-loaded, then a rollback to v1, each answering with its labels."""
    repo = build_repo(encoder_dir, tmp_path / "repo", heads={"animals": (TWO, ("{}",), {})})  # the tier's flavour
    images = list(jpeg_photos.values())[:3]
    server = start_server(repo, ARTIFACTS / "native-flavour")
    try:
        with HeadmasterClient(server.grpc_url) as client:

            def labels() -> set[tuple[int, tuple[str, ...]]]:
                results = client.classify(images)
                assert all(r.ok for r in results), [getattr(r, "error", r) for r in results if not r.ok]
                return {(r.heads["animals"].version, tuple(sorted(r.heads["animals"].scores))) for r in results}

            assert labels() == {(1, ("cat", "dog"))}
            create_zero_shot_head(repo, "animals", THREE, ("{}",))  # publishes v2 and loads it on the server
            assert scores_dims(repo, "animals") == [3]
            assert labels() == {(2, ("bird", "cat", "dog"))}
            lifecycle.rollback(repo, "animals", to=1)
            from headmaster.server import live

            live.head_published(server, "animals")
            assert scores_dims(repo, "animals") == [2]
            assert labels() == {(1, ("cat", "dog"))}
    finally:
        server.stop()


@pytest.mark.slow  # a full ViT-S-32 export in fp16 each: 7.6-8.9 s of CPU, 20-29 s on 2 busy cores (2026-12-07)
@pytest.mark.parametrize("fmt, precision", [("onnx", "fp16"), ("torchscript", "fp16")])
def test_a_gpu_native_repository_matches_its_files_as_nvidias_backends_check_them(tmp_path, fmt, precision):
    """What NVIDIA's container runs on a GPU: fp16 towers on KIND_GPU with the GPU batching
    defaults, checked statically as onnxruntime_backend / the PyTorch backend check at load
    (no GPU here to load them; a TensorRT plan needs TensorRT to be read at all)."""
    from headmaster.export.encoder import ExportOptions, export_encoder
    from headmaster.repository.build import build_repository
    from headmaster.repository.repo import BuildOptions
    from tests.helpers import MODEL, SEED

    encoder = tmp_path / "encoder"
    export_encoder(
        ExportOptions(
            model=MODEL, pretrained=None, out=encoder, seed=SEED, precision=precision, format=fmt, towers=("image",)
        )
    )
    repository = build_repository(encoder, tmp_path / "repo", BuildOptions.for_device("cuda", flavour="native"))
    assert check_repository(repository) == []
    config = parse((tmp_path / "repo" / "image_encoder" / "config.pbtxt").read_text())
    assert config.platform == {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}[fmt]
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU and config.instance_group[0].count == 2
    assert config.max_batch_size == 512 and list(config.dynamic_batching.preferred_batch_size) == [64, 128, 256, 512]
    preprocess = parse((tmp_path / "repo" / "preprocess" / "config.pbtxt").read_text())
    assert preprocess.instance_group[0].kind == preprocess.instance_group[0].KIND_GPU
    assert preprocess.parameters["decoder"].string_value == "torchvision"
