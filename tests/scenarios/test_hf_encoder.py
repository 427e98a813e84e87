"""Bring your own encoder as a Hugging Face folder (``--model hf:FOLDER``): transformers CLIP,
SigLIP and DINOv2 models with small configs and random weights, saved with ``save_pretrained``
together with their image processors, exported, checked against the folder's own processor and
model on real photos, refused in one line when the folder is not one, and served by a real Triton."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from headmaster.client import HeadmasterClient
from headmaster.errors import ExportError
from headmaster.export.encoder import ExportOptions, export_encoder
from headmaster.export.encoders import weights_sha256
from headmaster.export.reference import reference_images
from headmaster.model_repository.backends.preprocess import preprocess_bytes
from headmaster.model_repository.backends.runtime import load_runner
from tests.helpers import ARTIFACTS, build_repo, cosine_rows, run_cli, start_server

transformers = pytest.importorskip("transformers", reason="hf:FOLDER needs transformers (pip install 'headmaster[hf]')")

TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _save(folder: Path, kind: str) -> Path:
    """A random-init transformers model of `kind` and its image processor, as save_pretrained writes them."""
    import torch

    torch.manual_seed(7)
    vision = dict(TOWER, image_size=64, patch_size=16)
    if kind == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=vision, text_config=dict(TOWER, max_position_embeddings=77), projection_dim=32))
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    elif kind == "siglip":
        model = transformers.SiglipModel(transformers.SiglipConfig(
            vision_config=vision, text_config=dict(TOWER, vocab_size=1000, max_position_embeddings=64,
                                                   bos_token_id=1, eos_token_id=2, pad_token_id=1)))
        processor = transformers.SiglipImageProcessor(size={"height": 64, "width": 64})
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TOWER, image_size=56, patch_size=14))
        processor = transformers.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo-hf")
    yield {kind: _save(root / kind, kind) for kind in ("clip", "siglip", "dinov2")}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def exports(folders):
    return {kind: (export_encoder(ExportOptions(model=f"hf:{folder}", pretrained=None,
                                                out=folder.parent / f"{kind}-encoder")), folder.parent / f"{kind}-encoder")
            for kind, folder in folders.items()}


def _theirs(kind: str, folder: Path, photos: list[bytes]) -> np.ndarray:
    """The folder's own image processor and model, as a transformers user embeds an image."""
    import torch
    from PIL import Image

    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    pixels = processor(images=[Image.open(io.BytesIO(d)).convert("RGB") for d in photos],
                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels).pooler_output if kind == "dinov2" else \
            model.get_image_features(pixel_values=pixels).pooler_output
    return torch.nn.functional.normalize(out, dim=-1).numpy()


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_a_save_pretrained_folder_exports_and_matches_transformers_on_real_photos(kind, folders, exports):
    card, out = exports[kind]
    assert card.model == f"hf:{kind}" and card.family == "hf" and set(card.towers) == {"image"}
    assert card.pooling == ("cls" if kind == "dinov2" else None) and card.verification["image"]["min_cosine"] >= 0.9999
    assert card.weights_sha256 == weights_sha256(transformers.AutoModel.from_pretrained(folders[kind]))
    photos = [d for _, d in reference_images()]
    pixels = np.stack([preprocess_bytes(d, card.preprocessing) for d in photos])
    ours = load_runner(str(out / "image.onnx"), device="cpu")({"PIXELS": pixels}, ["EMBEDDING"])[0]
    # The served preprocessing reproduces the folder's processor (resize, crop offsets, normalisation).
    assert cosine_rows(ours, _theirs(kind, folders[kind], photos)).min() >= 0.9999


def test_the_fingerprint_follows_the_weights_and_the_processor(folders, exports, tmp_path):
    changed = tmp_path / "dinov2"
    shutil.copytree(folders["dinov2"], changed)
    config = json.loads((changed / "preprocessor_config.json").read_text())
    (changed / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 2}))
    card = export_encoder(ExportOptions(model=f"hf:{changed}", pretrained=None, out=tmp_path / "e"))
    assert card.preprocessing["interpolation"] == "bilinear"
    assert card.weights_sha256 == exports["dinov2"][0].weights_sha256
    assert card.fingerprint != exports["dinov2"][0].fingerprint


def test_what_is_not_a_supported_folder_is_refused_in_one_line(folders, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(folders["dinov2"], bare)
    (bare / "preprocessor_config.json").unlink()
    result = run_cli("export", "encoder", "--model", f"hf:{bare}", "--out", tmp_path / "e")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no preprocessor_config.json (save the image processor into the folder too" in result.stderr
    vit = tmp_path / "vit"
    transformers.ViTModel(transformers.ViTConfig(**TOWER, image_size=32, patch_size=16)).save_pretrained(vit)
    with pytest.raises(ExportError, match="model_type 'vit' in config.json is not supported; supported: clip, "
                                          "siglip, dinov2"):
        export_encoder(ExportOptions(model=f"hf:{vit}", pretrained=None, out=tmp_path / "e"))
    with pytest.raises(ExportError, match="text tower of a Hugging Face folder is not exported"):
        export_encoder(ExportOptions(model=f"hf:{folders['clip']}", pretrained=None, out=tmp_path / "e",
                                     towers=("text",)))
    with pytest.raises(ExportError, match="hf:.*/absent: no such folder"):
        export_encoder(ExportOptions(model=f"hf:{tmp_path / 'absent'}", pretrained=None, out=tmp_path / "e"))
    assert not (tmp_path / "e").exists()


def test_a_served_hf_encoder_embeds_as_transformers_does(folders, exports, tmp_path):
    repo = build_repo(exports["clip"][1], tmp_path / "repo", heads={})
    server = start_server(repo, ARTIFACTS)
    try:
        photos = [d for _, d in reference_images()]
        with HeadmasterClient(server.http_url, "http", batch_size=4) as client:
            served = np.stack([e.embedding for e in client.embed(photos)])
    finally:
        server.stop()
    assert cosine_rows(served, _theirs("clip", folders["clip"], photos)).min() >= 0.9999
