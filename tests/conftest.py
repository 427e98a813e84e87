"""Shared fixtures: one exported encoder, one repository, one real Triton server per session.

The encoder is open_clip's ViT-S-32 architecture with random weights (seed 0): no model hub
is reachable here, and random weights exercise the same graphs as pretrained ones. Images
are real photos that ship inside scikit-image and scikit-learn.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    ARTIFACTS,
    FLAVOUR,
    MODEL,
    NATIVE,
    NATIVE_BACKENDS,
    NATIVE_TRITON,
    SEED,
    build_repo,
    photo_bytes,
    start_server,
)


def pytest_report_header(config):
    if NATIVE:
        return (f"headmaster: native tier: flavour {FLAVOUR}, tritonserver {NATIVE_TRITON or '(bundled)'}, "
                f"backends {NATIVE_BACKENDS}")
    return None


def pytest_collection_modifyitems(config, items):
    """The scenario tier (real exports, a real Triton) is marked ``server``, so ``pytest -m "not
    server"`` runs the fast tier alone; tests marked ``portable_only(reason)`` skip on the native
    tier, saying why."""
    for item in items:
        if "scenarios" in item.path.parts:
            item.add_marker(pytest.mark.server)
        marker = item.get_closest_marker("portable_only")
        if NATIVE and marker:
            item.add_marker(pytest.mark.skip(reason="portable flavour only: " + " ".join(marker.args)))


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


@pytest.fixture(scope="session")
def repo(encoder_dir, tmp_path_factory) -> Path:
    return build_repo(encoder_dir, tmp_path_factory.mktemp("repo") / "model_repository",
                      max_queue_delay_us=20000, preferred_batch_sizes=(4, 8))


@pytest.fixture(scope="session")
def server(repo):
    server = start_server(repo, ARTIFACTS)
    yield server
    server.stop()


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


