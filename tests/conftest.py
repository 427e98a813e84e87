"""Shared fixtures: one exported encoder, one repository, one real Triton server per session.

The encoder is open_clip's ViT-S-32 architecture with random weights (seed 0): no model hub
is reachable here, and random weights exercise the same graphs as pretrained ones. Images
are real photos that ship inside scikit-image and scikit-learn.
"""

from __future__ import annotations

import importlib.resources
import io
import os
from pathlib import Path

import numpy as np
import pytest

MODEL = "ViT-S-32"
SEED = 0
ARTIFACTS = Path(os.environ.get("HEADMASTER_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))

# The native tier (opt-in): HEADMASTER_NATIVE_BACKENDS names a backend directory holding
# onnxruntime/ (Triton's onnxruntime backend) and python/, HEADMASTER_NATIVE_TRITON a
# tritonserver binary (default: the bundled one; either variable turns the tier on, the
# backends default to the binary's ../backends). Then the repositories the tests build are of
# the native flavour (encoders and heads on the onnxruntime_onnx platform) and every server
# the tests start runs that binary with those backends. HEADMASTER_NATIVE_DEVICE=gpu keeps the
# encoders on KIND_GPU (default cpu: KIND_CPU, for a Triton without GPU).
NATIVE_TRITON = os.environ.get("HEADMASTER_NATIVE_TRITON") or None
NATIVE_BACKENDS = os.environ.get("HEADMASTER_NATIVE_BACKENDS") or (
    str(Path(NATIVE_TRITON).resolve().parent.parent / "backends") if NATIVE_TRITON else None)
NATIVE = NATIVE_BACKENDS is not None
FLAVOUR = "native" if NATIVE else "portable"
NATIVE_DEVICE = "auto" if os.environ.get("HEADMASTER_NATIVE_DEVICE", "cpu") == "gpu" else "cpu"
# What build_repo adds to the build options of every repository on this tier.
TIER_OPTIONS = {"flavour": "native", "device": NATIVE_DEVICE} if NATIVE else {}


def pytest_report_header(config):
    if NATIVE:
        return (f"headmaster: native tier: flavour {FLAVOUR}, tritonserver {NATIVE_TRITON or '(bundled)'}, "
                f"backends {NATIVE_BACKENDS}")
    return None


def pytest_collection_modifyitems(config, items):
    """Tests marked ``portable_only(reason)`` skip on the native tier, saying why."""
    if not NATIVE:
        return
    for item in items:
        marker = item.get_closest_marker("portable_only")
        if marker:
            item.add_marker(pytest.mark.skip(reason="portable flavour only: " + " ".join(marker.args)))


def photo_bytes() -> dict[str, bytes]:
    """Real photos as their encoded bytes (PNG / JPEG files from installed packages)."""
    skimage_data = importlib.resources.files("skimage.data")
    sklearn_images = importlib.resources.files("sklearn.datasets") / "images"
    photos = {name: (skimage_data / name).read_bytes()
              for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png")}
    photos.update({name: (sklearn_images / name).read_bytes() for name in ("china.jpg", "flower.jpg")})
    return photos


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    return photo_bytes()


@pytest.fixture(scope="session")
def jpeg_photos(photos) -> dict[str, bytes]:
    """The same photos re-encoded as JPEG (what most clients send)."""
    from PIL import Image

    out = {}
    for name, data in photos.items():
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "JPEG", quality=90)
        out[name.rsplit(".", 1)[0] + ".jpg"] = buffer.getvalue()
    return out


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory) -> Path:
    from headmaster.export.encoder import ExportOptions, export_encoder

    out = tmp_path_factory.mktemp("encoder") / "vit-s-32"
    export_encoder(ExportOptions(model=MODEL, pretrained=None, out=out, seed=SEED))
    return out


@pytest.fixture(scope="session")
def open_clip_model():
    """The same random-weight model, straight from open_clip, with open_clip's own transform:
    the independent reference for served embeddings."""
    import open_clip
    import torch

    torch.manual_seed(SEED)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(MODEL)


ZERO_SHOT = {
    "animal": (["cat=a photo of a cat", "dog=a photo of a dog", "bird=a photo of a bird"], ("a photo of {}.",), {}),
    # A binary contest with a threshold on the positive label.
    "has_cat": (["cat=a photo containing a cat", "no cat=a photo with no cat"], ("{}",), {"cat": 0.52}),
}


def build_repo(encoder_dir: Path, repo: Path, heads=ZERO_SHOT, **options) -> Path:
    from headmaster.model_repository.build import build_repository
    from headmaster.model_repository.repository import BuildOptions
    from headmaster.training.heads.zero_shot import create_zero_shot_head

    if "flavour" not in options:  # the native tier builds native repositories
        options = {**TIER_OPTIONS, **options}
    build_repository(encoder_dir, repo, BuildOptions(**options))
    for name, (labels, templates, thresholds) in heads.items():
        create_zero_shot_head(repo, name, labels, templates, thresholds)
    return repo


@pytest.fixture(scope="session")
def repo(encoder_dir, tmp_path_factory) -> Path:
    return build_repo(encoder_dir, tmp_path_factory.mktemp("repo") / "model_repository",
                      max_queue_delay_us=20000, preferred_batch_sizes=(4, 8))


def start_server(repo: Path, log_dir: Path):
    from headmaster.model_repository.repository import Repository
    from headmaster.model_repository.server import ServerOptions, TritonServer, free_port

    repository = Repository(repo)
    native = {"binary": Path(NATIVE_TRITON) if NATIVE_TRITON else None,
              "backend_directory": Path(NATIVE_BACKENDS)} if NATIVE else {}
    options = ServerOptions(repository=repo, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), load_models=tuple(repository.model_names()),
                            exit_timeout_s=10, **native)
    log_dir.mkdir(parents=True, exist_ok=True)
    return TritonServer(options, log_path=log_dir / f"tritonserver-{repo.parent.name}.log").start()


@pytest.fixture(scope="session")
def server(repo):
    server = start_server(repo, ARTIFACTS)
    yield server
    server.stop()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's 1,797 labelled 8x8 digits, written as PNG files, one folder per digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits") / "digits"
    digits = load_digits()
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def embedding_cache(tmp_path_factory) -> Path:
    """One embedding cache for the session: each digit image is embedded once."""
    return tmp_path_factory.mktemp("embedding-cache")


def subset(digits_dir: Path, target: Path, per_label: dict[str, int], rename: dict[str, str] | None = None) -> Path:
    """A smaller folder dataset made of the first N images of some digits."""
    import shutil

    for digit, count in per_label.items():
        folder = target / (rename or {}).get(digit, digit)
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted((digits_dir / digit).glob("*.png"))[:count]:
            shutil.copy(path, folder / path.name)
    return target


def clone_repo(source: Path, target: Path) -> Path:
    """Copy a repository; model weights are hard-linked (never edited), the rest copied."""
    import shutil

    def copy(src, dst):
        if src.endswith((".onnx", ".pt")):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)
    shutil.copytree(source, target, copy_function=copy)
    return target


def written_version(repo: Path, name: str, rng: np.random.Generator, labels: tuple[str, ...]):
    """A head version written directly: random weights, random thresholds."""
    from headmaster.export.heads import HeadCard, HeadWeights
    from headmaster.model_repository.lifecycle import publish
    from headmaster.model_repository.repository import Repository

    repository = Repository(repo)
    weights = HeadWeights(((rng.normal(scale=3.0, size=(len(labels), 384)).astype(np.float32),
                            rng.normal(size=len(labels)).astype(np.float32)),), multi_label=False)
    thresholds = tuple(float(t) for t in rng.uniform(0.0, 0.6, size=len(labels)))
    return publish(repo, weights, lambda v: HeadCard(
        name=name, version=v, labels=labels, thresholds=thresholds, multi_label=False,
        encoder_fingerprint=repository.fingerprint, embed_dim=384, kind="linear", details={"written": True})).card
