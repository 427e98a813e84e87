"""The field's backbones: one export per family (random weights, smallest size, real photos for
the export check), a timm backbone served by a real Triton server against timm's own pipeline,
image-only repositories without zero-shot, and SigLIP's sigmoid zero-shot scoring.

EVA-CLIP (EVA02-B-16, the smallest open_clip EVA: 80-150 s to export on two shared cores) and
MobileCLIP (MobileCLIP2-S0: 30-40 s) run only with HEADMASTER_TEST_HEAVY_FAMILIES=1, to keep the
suite's time; by default they are loaded and classified into their family, not exported.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headmaster.client import HeadmasterClient
from headmaster.errors import ExportError
from headmaster.export.card import EncoderCard, fingerprint_of
from headmaster.export.encoder import ExportOptions, export_encoder
from headmaster.export.encoders import FAMILIES, family_of, load
from headmaster.export.reference import reference_images
from headmaster.repository.repo import Repository
from headmaster.training.heads.train_head import TrainOptions, train_head
from headmaster.training.heads.zero_shot import classifier, create_zero_shot_head
from tests.helpers import ARTIFACTS, CLI, build_repo, cosine_rows, run_cli, start_server, subset

HEAVY = os.environ.get("HEADMASTER_TEST_HEAVY_FAMILIES") == "1"
# DINOv2's pretrained config asks for 518x518 (1,369 tokens); the test exports it at 224.
IMAGE_SIZE = {"dinov2": 224}


def _model_name(family) -> str:
    return ("timm:" if family.library == "timm" else "") + family.smallest


@pytest.fixture(scope="module")
def family_exports(tmp_path_factory) -> Iterator[dict]:
    exports = {"root": tmp_path_factory.mktemp("families")}
    yield exports
    shutil.rmtree(exports["root"], ignore_errors=True)


def _export(family_exports, family) -> EncoderCard:
    if family.name not in family_exports:
        out = family_exports["root"] / family.name
        towers = ("image",)  # the text towers are the export path every CLIP test already covers
        family_exports[family.name] = export_encoder(
            ExportOptions(
                model=_model_name(family),
                pretrained=None,
                out=out,
                towers=towers,
                image_size=IMAGE_SIZE.get(family.name),
            )
        )
    return family_exports[family.name]


@pytest.mark.slow  # an export and its check against PyTorch per family: about 10 minutes for all on 2 cores
@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f.library in ("open_clip", "timm") and f.name != "clip"], ids=lambda f: f.name
)
def test_each_family_exports_and_matches_pytorch_on_real_photos(family, family_exports):
    if family.name in ("eva-clip", "mobileclip") and not HEAVY:
        pytest.skip(f"{family.smallest} takes long to export here; HEADMASTER_TEST_HEAVY_FAMILIES=1 runs it")
    card = _export(family_exports, family)
    check = card.verification["image"]
    assert check["min_cosine"] >= 0.9999 and check["inputs"] >= 8, check
    assert card.family == family.name and card.pooling == family.pooling
    assert "text" not in card.towers
    if family.library == "timm":
        assert card.model == f"timm:{family.smallest}" and card.context_length == 0 and "timm" in card.tools
        # The fingerprint covers the pooling: the same weights pooled otherwise are another space.
        other = next(p for p in ("cls", "mean", "head-less") if p != card.pooling)
        assert (
            fingerprint_of(card.model, card.weights_sha256, card.preprocessing, card.embed_dim, other)
            != card.fingerprint
        )
    if family.name == "siglip":
        assert card.logit_bias is not None
    else:
        assert card.logit_bias is None


def test_open_clip_models_fall_into_their_families():
    assert family_of("MobileCLIP2-S0").name == "mobileclip" and family_of("EVA02-B-16").name == "eva-clip"
    assert family_of("ViT-B-16-SigLIP").zero_shot == "sigmoid" and family_of("ViT-B-32").name == "clip"
    assert family_of("timm:vit_base_patch16_dinov3").name == "dinov3"


@pytest.mark.slow  # creates every timm family's model: 40 s on 2 busy cores (2026-12-07)
def test_timm_preprocessing_comes_from_the_models_own_config():
    import timm
    from timm.data import resolve_data_config

    for name in ("timm:vit_small_patch14_dinov2", "timm:convnext_atto"):
        encoder = load(name, None)
        config = resolve_data_config({}, model=timm.create_model(name[5:], pretrained=False))
        p = encoder.preprocessing
        assert p.size == tuple(config["input_size"][1:]) and p.mean == tuple(config["mean"])
        assert p.crop_pct == config["crop_pct"] and p.interpolation == config["interpolation"]
    assert load("timm:vit_small_patch14_dinov2", None).preprocessing.size == (518, 518)


def test_a_timm_checkpoint_by_path_loads_with_its_classifier_dropped(tmp_path):
    import timm
    import torch

    torch.manual_seed(1)
    trained = timm.create_model("convnext_atto", pretrained=False)  # with its 1000-class head
    torch.save(trained.state_dict(), tmp_path / "convnext.pth")
    encoder = load("timm:convnext_atto", str(tmp_path / "convnext.pth"))
    assert encoder.pretrained == str(tmp_path / "convnext.pth") and encoder.seed is None
    trained.reset_classifier(0)
    from headmaster.export.encoders import weights_sha256

    assert encoder.weights_sha256 == weights_sha256(trained) != load("timm:convnext_atto", None).weights_sha256
    with pytest.raises(ExportError, match=r"cannot read checkpoint .*broken\.pth: "):
        (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
        load("timm:convnext_atto", str(tmp_path / "broken.pth"))


def test_unknown_and_unsupported_models_are_refused_by_name(cli):
    with pytest.raises(ExportError, match="timm model 'resnet18' belongs to no supported family"):
        family_of("timm:resnet18")
    with pytest.raises(ExportError, match="unknown timm model 'timm:vit_tiny_patch14_dinov2'"):
        load("timm:vit_tiny_patch14_dinov2", None)  # of the DINOv2 family's pattern, but not in timm
    # Typos: the closest names by edit distance over the whole registry, before any family check.
    with pytest.raises(
        ExportError,
        match=r"unknown timm model 'timm:mobilenetv3_smal_100'; closest known names: "
        r"timm:mobilenetv3_small_100, ",
    ) as e:
        load("timm:mobilenetv3_smal_100", None)
    assert "convnext" not in str(e.value) and e.value.option == "model"
    with pytest.raises(
        ExportError,
        match=r"unknown timm model 'timm:vit_small_patch14_dinov'; closest known names: "
        r"timm:vit_small_patch14_dinov2, ",
    ):
        load("timm:vit_small_patch14_dinov", None)
    with pytest.raises(ExportError, match=r"unknown open_clip model 'ViT-B-33'; closest known names: ViT-B-32, "):
        load("ViT-B-33", None)
    # The command in this process (timm's registry already imported): the message, one line.
    result = cli("export", "encoder", "--model", "timm:mobilenetv3_smal_100", "--out", "/nonexistent/never")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "closest known names: timm:mobilenetv3_small_100" in result.stderr
    with pytest.raises(ExportError, match="--image-size is for timm backbones"):
        load("ViT-S-32", None, image_size=224)
    result = cli("export", "encoder", "--model", "ViT-B-32-SigLIP2-256", "--out", "/nonexistent/never")
    assert result.returncode == 1 and "needs its tokenizer" in result.stderr and "--towers image" in result.stderr


@pytest.mark.slow  # the command lists timm's registry: 41 s on 2 busy cores (2026-12-07)
def test_export_list_shows_families_and_licences():
    result = subprocess.run(
        [*CLI, "export", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    )  # a wide terminal
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for family in FAMILIES:
        assert family.name in text
    assert "DINOv3 License" in text and "image only" in text
    names = run_cli("export", "list", "--models").stdout.split()
    assert "timm:vit_small_patch16_dinov3" in names and "ViT-B-16-SigLIP2" in names and "MobileCLIP2-S0" in names


@pytest.mark.slow  # exports SigLIP's image tower when the family test did not
def test_siglip_zero_shot_scores_as_the_model_does(family_exports):
    """sigmoid(scale * cosine + bias) per label, against open_clip's own SigLIP forward pass
    (random weights; token ids stand in for the Hugging Face tokenizer this machine lacks)."""
    import open_clip
    import torch

    siglip = next(f for f in FAMILIES if f.name == "siglip")
    card = _export(family_exports, siglip)
    torch.manual_seed(card.seed)
    model = open_clip.create_model(siglip.smallest, pretrained=None).eval()
    pixels = torch.rand(3, 3, *card.preprocessing["size"])
    tokens = torch.randint(1, 1000, (2, card.context_length))
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        theirs = torch.sigmoid(image @ text.T * model.logit_scale.exp() + model.logit_bias).numpy()
    assert card.logit_scale == pytest.approx(model.logit_scale.exp().item())
    head = classifier(text.numpy(), card.logit_scale, card.logit_bias)
    assert head.multi_label
    np.testing.assert_allclose(head.scores(image.numpy()), theirs, atol=1e-5)


@pytest.fixture(scope="module")
def convnext_served(family_exports, tmp_path_factory, digits_dir):
    family = next(f for f in FAMILIES if f.name == "convnext")
    _export(family_exports, family)
    root = tmp_path_factory.mktemp("convnext")
    repo = build_repo(family_exports["root"] / "convnext", root / "repo", heads={})
    data = subset(digits_dir, root / "digits", {"0": 20, "1": 20, "7": 20})
    train_head(TrainOptions(name="digit", repo=repo, data=data, cache_dir=root / "cache"))
    server = start_server(repo, ARTIFACTS)
    yield repo, server, data
    server.stop()


def test_a_served_timm_backbone_matches_timms_own_pipeline(convnext_served):
    """Served embeddings of real photos vs timm itself: its transform, its model, head-less."""
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    repo, server, _ = convnext_served
    card = Repository(repo).card
    photos = [data for _, data in reference_images()]
    with HeadmasterClient(server.http_url, "http", batch_size=4) as client:
        served = np.stack([e.embedding for e in client.embed(photos)])
    torch.manual_seed(card.seed)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=0).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in photos])
        theirs = torch.nn.functional.normalize(model(batch), dim=-1).numpy()
    assert cosine_rows(served, theirs).min() >= 0.9999


def test_image_only_repositories_train_heads_but_refuse_zero_shot(convnext_served):
    repo, server, data = convnext_served
    repository = Repository(repo)
    assert "embed_text" not in repository.model_names() and "tokenize" not in repository.model_names()
    with HeadmasterClient(server.http_url, "http") as client:
        results = client.classify(sorted(Path(data).rglob("*.png"))[:6])
    assert all(
        r.ok
        and r.heads["digit"].version == 1
        and set(r.heads["digit"].scores) == {"0", "1", "7"}
        and r.heads["digit"].ood is not None
        for r in results
    )
    with pytest.raises(ExportError, match="is an image-only backbone \\(convnext\\): it has no text tower"):
        create_zero_shot_head(repo, "animal", ["cat", "dog"])
    result = run_cli("zero-shot", "animal", "--label", "cat", "--label", "dog", "--repo", repo)
    assert result.returncode == 1 and "image-only backbone" in result.stderr and "Traceback" not in result.stderr
