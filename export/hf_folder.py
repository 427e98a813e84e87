"""Bring your own encoder as a Hugging Face folder: ``--model hf:FOLDER``.

FOLDER is what ``save_pretrained`` writes for a transformers ``CLIPModel``, ``SiglipModel`` or
``Dinov2Model`` (``config.json`` + weights), with the image processor saved next to it
(``preprocessor_config.json``): a fine-tuned model kept offline. It loads with transformers
(``local_files_only``: nothing is fetched), its preprocessing is read from the processor's
config (resize, centre crop, resampling, mean/std), and it becomes a ``LoadedEncoder`` that the
ordinary export path turns into an image tower checked against PyTorch, with a card and a
fingerprint over its weights and preprocessing.

The embedding is the model's own: ``get_image_features`` for CLIP and SigLIP (the projected,
pooled image embedding), ``pooler_output`` for DINOv2 (its final layer-normed class token).

A CLIP folder saved with its tokenizer (``tokenizer.save_pretrained(FOLDER)``) also gets its text
tower: ``get_text_features`` of token ids padded to the model's context length with the
tokenizer's pad id (CLIP's text transformer is causal and pools the end-of-text position, so
padding changes nothing), and the tokenizer's files are saved in the export's ``tokenizer/``, named
with their sha256 on the card (and in the fingerprint), and served by the ``tokenize`` model with
the ``tokenizers`` library. A SigLIP folder saved with its ``SiglipTokenizer`` gets its text tower
too: its ``spiece.model`` is saved and hashed the same way and served by a port of that class
(``tokenize.siglip_tokenizer``: transformers runs SigLIP's text cleaning in Python, so no
``tokenizer.json`` reproduces it), padded to the context length (64) as SigLIP was trained, and
embedded from ``input_ids`` alone (no attention mask, as big_vision and open_clip run it: the model
pools the last position). A folder without a tokenizer exports the image tower only, and the
export says why in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from headmaster.errors import ExportError
from headmaster.export.encoders import LoadedEncoder, Preprocessing, weights_sha256

LOG = logging.getLogger(__name__)

PREFIX = "hf:"
# model_type in config.json -> transformers class, and what the card records as its pooling.
MODEL_TYPES = {"clip": ("CLIPModel", None), "siglip": ("SiglipModel", None), "dinov2": ("Dinov2Model", "cls")}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes in preprocessor_config.json


def read_folder_json(path: Path, what: str, prefix: str = PREFIX):
    """A JSON file of a model folder (``prefix``: how ``--model`` named it), or a one-line refusal
    saying it is missing (``what``: what it should hold) or not JSON."""
    if not path.is_file():
        raise ExportError(f"--model {prefix}{path.parent}: no {path.name} ({what})", option="model")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(
            f"--model {prefix}{path.parent}: {path.name} is not valid JSON: {e}", option="model"
        ) from None


def preprocessing_of(folder: Path) -> Preprocessing:
    """The image processor's eval transform (``preprocessor_config.json``) as the served one, or a
    one-line refusal naming the setting the served preprocessing cannot reproduce."""
    cfg = read_folder_json(
        folder / "preprocessor_config.json",
        "save the image processor into the folder too: processor.save_pretrained(FOLDER)",
    )
    where = f"--model hf:{folder}: preprocessor_config.json"
    resample = _RESAMPLE.get(cfg.get("resample", 3))
    if resample is None:
        raise ExportError(
            f"{where}: resample {cfg.get('resample')!r} is not served (2 bilinear or 3 bicubic)", option="model"
        )
    if cfg.get("do_rescale", True) and not math.isclose(cfg.get("rescale_factor", 1 / 255), 1 / 255):
        raise ExportError(f"{where}: rescale_factor {cfg['rescale_factor']} is not served (1/255 only)", option="model")
    normalize = cfg.get("do_normalize", True)
    mean = tuple(float(m) for m in cfg.get("image_mean", (0, 0, 0))) if normalize else (0.0, 0.0, 0.0)
    std = tuple(float(s) for s in cfg.get("image_std", (1, 1, 1))) if normalize else (1.0, 1.0, 1.0)
    size, crop = cfg.get("size") or {}, cfg.get("crop_size") if cfg.get("do_center_crop") else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if "shortest_edge" in size:
        side = int(size["shortest_edge"])
        crop = crop or {"height": side, "width": side}
        target = (int(crop["height"]), int(crop["width"]))
        if target[0] != target[1] or target[0] > side:
            raise ExportError(
                f"{where}: a {target[0]}x{target[1]} centre crop of a {side}-pixel shortest edge is not "
                "served (a square crop no larger than the edge)",
                option="model",
            )
        crop_pct = target[0] / side
        if math.floor(target[0] / crop_pct) != side:
            raise ExportError(
                f"{where}: shortest_edge {side} with crop {target[0]} is not reproducible", option="model"
            )
        return Preprocessing(
            size=target,
            resize_mode="shortest",
            interpolation=resample,
            mean=mean,
            std=std,
            crop_pct=crop_pct,
            convert_first=True,
            crop_floor=True,
        )
    if "height" in size and "width" in size and not crop:
        return Preprocessing(
            size=(int(size["height"]), int(size["width"])),
            resize_mode="squash",
            interpolation=resample,
            mean=mean,
            std=std,
            convert_first=True,
        )
    raise ExportError(
        f"{where}: size {size} with crop_size {crop} is not served (shortest_edge with an optional "
        "centre crop, or height and width without one)",
        option="model",
    )


def _visual(model, model_type: str):
    """The module that maps normalised pixels to the model's own image embedding."""
    import torch

    class Visual(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixels):
            if model_type == "dinov2":
                return self.inner(pixel_values=pixels).pooler_output
            out = self.inner.get_image_features(pixel_values=pixels)
            return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5: an output object

    return Visual(model).eval()


def _text(model):
    """The module that maps token ids to the model's own (unnormalised) text embedding."""
    import torch

    class Text(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens):
            out = self.inner.get_text_features(input_ids=tokens)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    return Text(model).eval()


# What a folder's tokenizer is saved with; tokenizer.json is what the tokenize model runs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def no_text_reason(name: str, folder: Path, model_type: str) -> str | None:
    """Why the folder's text tower cannot be exported (one line), or None when it can."""
    if model_type == "dinov2":
        return f"{name} is an image-only DINOv2 model: it has no text tower"
    if model_type == "siglip":
        if not (folder / "spiece.model").is_file():
            return (
                f"{name}: the SigLIP folder has no tokenizer (spiece.model), so no text tower; save it into the "
                "folder too: SiglipTokenizer.save_pretrained(FOLDER)"
            )
        return None
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        return (
            f"{name}: the folder has no tokenizer (tokenizer.json, or vocab.json and merges.txt), so no text "
            "tower; save it into the folder too: tokenizer.save_pretrained(FOLDER)"
        )
    return None


def _tokenizer(name: str, folder: Path, config: dict) -> tuple[dict, dict[str, bytes]]:
    """The folder's tokenizer: the card's record of it and its files (tokenizer.json made by
    transformers from vocab.json/merges.txt when the folder has no fast tokenizer file)."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ExportError(
            f"--model {name}: transformers could not load the folder's tokenizer: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0]}",
            option="model",
        ) from None
    text_config = config.get("text_config") or {}
    if type(tokenizer).__name__ == "SiglipTokenizer":
        return _siglip_tokenizer(tokenizer, folder, text_config)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"--model {name}: its tokenizer ({type(tokenizer).__name__}) has no tokenizers backend "
            "(tokenizer.json) to serve; save a fast tokenizer into the folder",
            option="model",
        )
    files = {f: (folder / f).read_bytes() for f in TOKENIZER_FILES if (folder / f).is_file()}
    files.setdefault("tokenizer.json", backend.to_str().encode())
    context_length = int(text_config.get("max_position_embeddings", 77))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    record = {
        "kind": type(tokenizer).__name__,
        "files": {f: hashlib.sha256(b).hexdigest() for f, b in files.items()},
        "context_length": context_length,
        "padding": "max_length",
        "pad_id": int(pad_id),
        "pooling": "end-of-text position",
    }
    return record, files


def _siglip_tokenizer(tokenizer, folder: Path, text_config: dict) -> tuple[dict, dict[str, bytes]]:
    """A SigLIP folder's SiglipTokenizer: its spiece.model, and what tokenize.siglip_tokenizer needs
    to reproduce the class (lower-casing, unk token, end-of-sequence and pad ids, special tokens)."""
    from headmaster.served.tokenize import SIGLIP

    files = {f: (folder / f).read_bytes() for f in ("spiece.model", "tokenizer_config.json") if (folder / f).is_file()}
    special = {t: int(i) for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)}
    record = {
        "kind": type(tokenizer).__name__,
        "format": SIGLIP,
        "files": {f: hashlib.sha256(b).hexdigest() for f, b in files.items()},
        "context_length": int(text_config.get("max_position_embeddings", 64)),
        "padding": "max_length",
        "pad_id": int(tokenizer.pad_token_id),
        "eos_id": int(tokenizer.eos_token_id),
        "unk_token": str(tokenizer.unk_token),
        "lowercase": bool(getattr(tokenizer, "do_lower_case", True)),
        "special_tokens": special,
        "pooling": "last position, no attention mask",
    }
    return record, files


def load(name: str, towers: tuple[str, ...]) -> LoadedEncoder:
    """``hf:FOLDER`` as a LoadedEncoder: the image tower, and the text tower with its tokenizer
    when ``towers`` names it and the folder has one (see ``no_text_reason``)."""
    folder = Path(name[len(PREFIX) :]).expanduser()
    if not folder.is_dir():
        raise ExportError(
            f"--model {name}: no such folder (a save_pretrained folder of a transformers CLIP, SigLIP or DINOv2 model)",
            option="model",
        )
    config = read_folder_json(folder / "config.json", "not a save_pretrained folder")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ExportError(
            f"--model {name}: model_type {model_type!r} in config.json is not supported; supported: "
            f"{', '.join(MODEL_TYPES)}",
            option="model",
        )
    preprocessing = preprocessing_of(folder)
    text_wanted = "text" in towers
    reason = no_text_reason(name, folder, model_type) if text_wanted else None
    if reason and "image" not in towers:
        raise ExportError(f"{reason}; export --towers image", option="towers")
    if reason:
        (LOG.info if model_type == "dinov2" else LOG.warning)("%s; exporting the image tower only", reason)
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ExportError(
            f"--model {name} needs transformers: pip install 'headmaster[hf]' ({e})", option="model"
        ) from None
    class_name, pooling = MODEL_TYPES[model_type]
    try:
        # eager attention: plain MatMul/Softmax in the ONNX graph, as the other towers export.
        model = (
            getattr(transformers, class_name)
            .from_pretrained(str(folder), local_files_only=True, attn_implementation="eager", dtype=torch.float32)
            .eval()
        )
    except Exception as e:
        raise ExportError(
            f"--model {name}: transformers could not load the folder as {class_name}: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0]}",
            option="model",
        ) from None
    text = tokenizer = files = None
    if text_wanted and reason is None:
        tokenizer, files = _tokenizer(name, folder, config)
        text = _text(model)
    visual = _visual(model, model_type)
    with torch.no_grad():
        embed_dim = int(visual(torch.zeros(1, 3, *preprocessing.size)).shape[-1])
    scale = getattr(model, "logit_scale", None)
    bias = getattr(model, "logit_bias", None)
    return LoadedEncoder(
        model=model,
        name=f"{PREFIX}{folder.name}",
        pretrained=str(folder.resolve()),
        weights_sha256=weights_sha256(model),
        preprocessing=preprocessing,
        embed_dim=embed_dim,
        context_length=tokenizer["context_length"] if tokenizer else 0,
        logit_scale=float(scale.exp().item()) if scale is not None else 0.0,
        seed=None,
        family="hf",
        pooling=pooling,
        logit_bias=float(bias.item()) if bias is not None else None,
        visual=visual,
        text=text,
        tokenizer=tokenizer,
        tokenizer_files=files,
    )
