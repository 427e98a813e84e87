"""Bring your own encoder as a Hugging Face folder (``--model hf:FOLDER``): transformers CLIP,
SigLIP and DINOv2 models with small configs and random weights, saved with ``save_pretrained``
together with their image processors, exported, checked against the folder's own processor and
model on real photos, refused in one line when the folder is not one, and served by a real Triton.
The CLIP folder carries its tokenizer (built offline from open_clip's bundled BPE vocabulary) and
the SigLIP folder a SiglipTokenizer (a sentencepiece model trained here on generated text), so their
text towers are exported and served with those tokenizers, and zero-shot heads classify as
transformers does (softmax for CLIP, sigmoid with the model's logit_bias for SigLIP)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from headmaster.client import HeadmasterClient
from headmaster.errors import CardError, ExportError, RepositoryError
from headmaster.export.card import EncoderCard
from headmaster.export.encoder import ExportOptions, export_encoder
from headmaster.export.encoders import weights_sha256
from headmaster.export.reference import reference_images
from headmaster.repository.build import build_repository
from headmaster.served.preprocess import preprocess_bytes
from headmaster.served.runtime import load_runner
from headmaster.served.tokenize import folder_tokenizer
from headmaster.training.heads.zero_shot import create_zero_shot_head
from tests.helpers import ARTIFACTS, build_repo, cosine_rows, run_cli, start_server

transformers = pytest.importorskip("transformers", reason="hf:FOLDER needs transformers (pip install 'headmaster[hf]')")

TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
PROMPTS = [
    "a photo of a cat",
    "A DOG, running!",
    "an astronaut   riding a horse",
    "café au lait",
    " ".join(["a very long prompt"] * 30),
]  # the last one is truncated to the context length


def _clip_tokenizer():
    """A CLIPTokenizer made offline from open_clip's bundled BPE vocabulary and merges."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _siglip_tokenizer(folder: Path):
    """A SiglipTokenizer over a small sentencepiece model trained offline on generated lines."""
    import random

    import sentencepiece

    rng = random.Random(3)
    words = [
        "a",
        "photo",
        "of",
        "the",
        "cat",
        "dog",
        "car",
        "tree",
        "astronaut",
        "riding",
        "horse",
        "café",
        "au",
        "lait",
        "running",
        "small",
        "big",
        "red",
        "blue",
        "green",
        "picture",
        "painting",
        "sketch",
        "drawing",
        "bright",
        "dark",
        "naïve",
        "ünïcode",
    ]
    corpus = folder.parent / "siglip-corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder.parent / "siglip-sp"),
        vocab_size=150,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return transformers.SiglipTokenizer(vocab_file=str(folder.parent / "siglip-sp.model"))


def _save(folder: Path, kind: str) -> Path:
    """A random-init transformers model of `kind` and its image processor, as save_pretrained writes them."""
    import torch

    torch.manual_seed(7)
    vision = dict(TOWER, image_size=64, patch_size=16)
    if kind == "clip":
        model = transformers.CLIPModel(
            transformers.CLIPConfig(
                vision_config=vision, text_config=dict(TOWER, max_position_embeddings=77), projection_dim=32
            )
        )
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
        _clip_tokenizer().save_pretrained(folder)
    elif kind == "siglip":
        model = transformers.SiglipModel(
            transformers.SiglipConfig(
                vision_config=vision,
                text_config=dict(
                    TOWER, vocab_size=1000, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=1
                ),
            )
        )
        processor = transformers.SiglipImageProcessor(size={"height": 64, "width": 64})
        _siglip_tokenizer(folder).save_pretrained(folder)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TOWER, image_size=56, patch_size=14))
        processor = transformers.BitImageProcessor(
            size={"shortest_edge": 64},
            crop_size={"height": 56, "width": 56},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
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
    return {
        kind: (
            export_encoder(ExportOptions(model=f"hf:{folder}", pretrained=None, out=folder.parent / f"{kind}-encoder")),
            folder.parent / f"{kind}-encoder",
        )
        for kind, folder in folders.items()
    }


def _theirs(kind: str, folder: Path, photos: list[bytes]) -> np.ndarray:
    """The folder's own image processor and model, as a transformers user embeds an image."""
    import torch
    from PIL import Image

    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    pixels = processor(images=[Image.open(io.BytesIO(d)).convert("RGB") for d in photos], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        out = (
            model(pixel_values=pixels).pooler_output
            if kind == "dinov2"
            else model.get_image_features(pixel_values=pixels).pooler_output
        )
    return torch.nn.functional.normalize(out, dim=-1).numpy()


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_a_save_pretrained_folder_exports_and_matches_transformers_on_real_photos(kind, folders, exports):
    card, out = exports[kind]
    assert card.model == f"hf:{kind}" and card.family == "hf"
    assert set(card.towers) == ({"image"} if kind == "dinov2" else {"image", "text"})
    assert (card.tokenizer is not None) == (kind != "dinov2")
    assert card.context_length == {"clip": 77, "siglip": 64, "dinov2": 0}[kind]
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
    with pytest.raises(
        ExportError,
        match=r"model_type 'vit' in config\.json is not supported; supported: clip, "
        r"siglip, dinov2",
    ):
        export_encoder(ExportOptions(model=f"hf:{vit}", pretrained=None, out=tmp_path / "e"))
    untokenized = tmp_path / "untokenized"
    shutil.copytree(folders["clip"], untokenized)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (untokenized / name).unlink()
    result = run_cli("export", "encoder", "--model", f"hf:{untokenized}", "--towers", "text", "--out", tmp_path / "e")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (
        "the folder has no tokenizer (tokenizer.json, or vocab.json and merges.txt), so no text tower; save it "
        "into the folder too: tokenizer.save_pretrained(FOLDER); export --towers image"
    ) in result.stderr
    spieceless = tmp_path / "spieceless"
    shutil.copytree(folders["siglip"], spieceless)
    (spieceless / "spiece.model").unlink()
    with pytest.raises(
        ExportError,
        match=r"the SigLIP folder has no tokenizer \(spiece.model\), so no text tower; "
        r"save it into the folder too: SiglipTokenizer.save_pretrained\(FOLDER\); "
        "export --towers image",
    ):
        export_encoder(ExportOptions(model=f"hf:{spieceless}", pretrained=None, out=tmp_path / "e", towers=("text",)))
    with pytest.raises(ExportError, match=r"hf:.*/absent: no such folder"):
        export_encoder(ExportOptions(model=f"hf:{tmp_path / 'absent'}", pretrained=None, out=tmp_path / "e"))
    assert not (tmp_path / "e").exists()


@pytest.mark.server  # starts its own Triton
def test_a_served_hf_encoder_embeds_and_classifies_as_transformers_does(folders, exports, tmp_path):
    import torch
    from PIL import Image

    labels = ["a photo of a cat", "a photo of a dog", "a photo of a car", "a photo of a tree"]
    repo = build_repo(exports["clip"][1], tmp_path / "repo", heads={})
    create_zero_shot_head(repo, "thing", labels, templates=("{}",))
    server = start_server(repo, ARTIFACTS)
    try:
        photos = [d for _, d in reference_images()]
        with HeadmasterClient(server.http_url, "http", batch_size=4) as client:
            served = np.stack([e.embedding for e in client.embed(photos)])
            served_text = client.embed_text(PROMPTS)
            answers = client.classify(photos)
    finally:
        server.stop()
    assert cosine_rows(served, _theirs("clip", folders["clip"], photos)).min() >= 0.9999
    # The tokenize model serves the folder's tokenizer: Triton's text embeddings are transformers' own.
    assert cosine_rows(served_text, _their_text(folders["clip"], PROMPTS)[1]).min() >= 0.9999
    # transformers' own zero-shot: logits_per_image over the same prompts.
    processor = transformers.CLIPProcessor.from_pretrained(folders["clip"])
    model = transformers.AutoModel.from_pretrained(folders["clip"]).eval()
    inputs = processor(
        text=labels,
        images=[Image.open(io.BytesIO(d)).convert("RGB") for d in photos],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.numpy()
    theirs = [labels[i] for i in logits.argmax(axis=1)]
    ours = [max(a.heads["thing"].scores, key=a.heads["thing"].scores.get) for a in answers]
    assert ours == theirs and len(set(theirs)) > 1, (ours, theirs, logits)


def _their_text(folder: Path, prompts: list[str]) -> tuple[dict, np.ndarray]:
    """The folder's own tokenizer and model, as a transformers user embeds text."""
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**batch).pooler_output
    return batch, torch.nn.functional.normalize(out, dim=-1).numpy()


def test_the_text_tower_and_its_tokenizer_match_transformers(folders, exports):
    card, out = exports["clip"]
    assert card.tokenizer["pad_id"] == 49407 and card.tokenizer["padding"] == "max_length"
    saved = sorted(p.name for p in (out / "tokenizer").iterdir())
    assert saved == sorted(card.tokenizer["files"]) == ["tokenizer.json", "tokenizer_config.json"]
    assert card.verification["text"]["min_cosine"] >= 0.9999
    batch, theirs = _their_text(folders["clip"], PROMPTS)
    tokens = folder_tokenizer(out / "tokenizer", card.context_length, card.tokenizer["pad_id"])(PROMPTS)
    # Same ids where transformers has tokens; the rest is the pad id, up to the context length.
    mask = batch["attention_mask"].numpy().astype(bool)
    assert tokens.shape == (len(PROMPTS), 77) and mask[-1].all() and mask.shape[1] == 77
    assert (tokens[mask] == batch["input_ids"].numpy()[mask]).all()
    assert (tokens[~mask] == 49407).all()
    ours = load_runner(str(out / "text.onnx"), device="cpu")({"TOKENS": tokens}, ["EMBEDDING"])[0]
    assert cosine_rows(ours, theirs).min() >= 0.9999


def test_the_tokenizer_is_part_of_the_card_and_checked_when_built(exports, tmp_path):
    card, out = exports["clip"]
    edited = json.loads(card.to_json())
    edited["tokenizer"]["pad_id"] = 0
    with pytest.raises(CardError, match="does not match its own fields"):
        EncoderCard.from_dict(edited)
    changed = tmp_path / "encoder"
    shutil.copytree(out, changed)
    (changed / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(
        RepositoryError,
        match=r"tokenizer file tokenizer/tokenizer_config\.json is .*, not the .* its "
        r"card records; export the encoder again",
    ):
        build_repository(changed, tmp_path / "repo")


SIGLIP_PROMPTS = [
    "a photo of a cat",
    "A DOG, running!",
    "an astronaut   riding a horse",
    "Café au lait...",
    "Hello</s>world",
    "x \u2581 y",
    "",
    "Ünïcode ÇAFÉ \u2014 \u201cquoted\u201d",
    "a\tb\nc",
    " ".join(["a very long prompt"] * 30),
]


def _siglip_text(folder: Path, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """SiglipTokenizer's ids (padded to max_length 64, as SigLIP is run) and get_text_features of them
    (input_ids alone: SigLIP pools the last position and was trained without an attention mask)."""
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids).pooler_output
    return ids.numpy(), torch.nn.functional.normalize(out, dim=-1).numpy()


def test_the_siglip_text_tower_and_its_sentencepiece_tokenizer_match_transformers(folders, exports):
    card, out = exports["siglip"]
    assert type(transformers.AutoTokenizer.from_pretrained(folders["siglip"])).__name__ == "SiglipTokenizer"
    assert card.tokenizer["format"] == "sentencepiece-siglip" and card.tokenizer["pad_id"] == 1
    assert (
        sorted(p.name for p in (out / "tokenizer").iterdir())
        == sorted(card.tokenizer["files"])
        == ["spiece.model", "tokenizer_config.json"]
    )
    assert card.logit_bias is not None and card.verification["text"]["min_cosine"] >= 0.9999
    ids, theirs = _siglip_text(folders["siglip"], SIGLIP_PROMPTS)
    tokens = folder_tokenizer(out / "tokenizer", card.context_length, card.tokenizer["pad_id"], card.tokenizer)(
        SIGLIP_PROMPTS
    )
    # Every id, padding included: the casing, punctuation, whitespace, special-token and truncation cases.
    assert tokens.shape == ids.shape == (len(SIGLIP_PROMPTS), 64) and (tokens == ids).all()
    assert len(set(map(tuple, tokens[:4].tolist()))) == 4 and (tokens[-1] != 1).sum() == 63
    ours = load_runner(str(out / "text.onnx"), device="cpu")({"TOKENS": tokens}, ["EMBEDDING"])[0]
    assert cosine_rows(ours, theirs).min() >= 0.9999


@pytest.mark.server  # starts its own Triton
def test_a_served_siglip_folder_classifies_zero_shot_as_transformers_does(folders, exports, tmp_path):
    import torch
    from PIL import Image

    labels = ["a photo of a cat", "a photo of a dog", "a photo of a car", "a photo of a tree"]
    repo = build_repo(exports["siglip"][1], tmp_path / "repo", heads={})
    create_zero_shot_head(repo, "thing", labels, templates=("{}",))
    server = start_server(repo, ARTIFACTS)
    try:
        photos = [d for _, d in reference_images()]
        with HeadmasterClient(server.http_url, "http", batch_size=4) as client:
            served_text = client.embed_text(SIGLIP_PROMPTS)
            answers = client.classify(photos)
    finally:
        server.stop()
    # Triton's tokenize model runs the SigLIP port: its text embeddings are transformers' own.
    assert cosine_rows(served_text, _siglip_text(folders["siglip"], SIGLIP_PROMPTS)[1]).min() >= 0.9999
    # transformers' own zero-shot: sigmoid(logits_per_image) (scale and bias of the folder's model).
    processor = transformers.AutoImageProcessor.from_pretrained(folders["siglip"])
    model = transformers.AutoModel.from_pretrained(folders["siglip"]).eval()
    pixels = processor(images=[Image.open(io.BytesIO(d)).convert("RGB") for d in photos], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        probs = torch.sigmoid(
            model(
                input_ids=torch.from_numpy(_siglip_text(folders["siglip"], labels)[0]), pixel_values=pixels
            ).logits_per_image
        ).numpy()
    theirs = [labels[i] for i in probs.argmax(axis=1)]
    scores = [a.heads["thing"].scores for a in answers]
    ours = [max(s, key=s.get) for s in scores]
    assert ours == theirs and len(set(theirs)) > 1, (ours, theirs, probs)
    # The head scores each label as the model does: sigmoid(scale * cosine + bias), not a softmax.
    assert np.allclose([[s[label] for label in labels] for s in scores], probs, atol=1e-4)
