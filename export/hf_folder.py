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
Text towers are not exported from a folder: the served ``tokenize`` model runs open_clip's
tokenizers, not a folder's own, so the image tower is exported alone, and the export says so.
"""

from __future__ import annotations

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


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ExportError(f"--model hf:{path.parent}: no {path.name} ({what})", option="model")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"--model hf:{path.parent}: {path.name} is not valid JSON: {e}", option="model") from None


def preprocessing_of(folder: Path) -> Preprocessing:
    """The image processor's eval transform (``preprocessor_config.json``) as the served one, or a
    one-line refusal naming the setting the served preprocessing cannot reproduce."""
    cfg = _read_json(folder / "preprocessor_config.json",
                     "save the image processor into the folder too: processor.save_pretrained(FOLDER)")
    where = f"--model hf:{folder}: preprocessor_config.json"
    resample = _RESAMPLE.get(cfg.get("resample", 3))
    if resample is None:
        raise ExportError(f"{where}: resample {cfg.get('resample')!r} is not served (2 bilinear or 3 bicubic)",
                          option="model")
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
            raise ExportError(f"{where}: a {target[0]}x{target[1]} centre crop of a {side}-pixel shortest edge is not "
                              "served (a square crop no larger than the edge)", option="model")
        crop_pct = target[0] / side
        if math.floor(target[0] / crop_pct) != side:
            raise ExportError(f"{where}: shortest_edge {side} with crop {target[0]} is not reproducible", option="model")
        return Preprocessing(size=target, resize_mode="shortest", interpolation=resample, mean=mean, std=std,
                             crop_pct=crop_pct, convert_first=True, crop_floor=True)
    if "height" in size and "width" in size and not crop:
        return Preprocessing(size=(int(size["height"]), int(size["width"])), resize_mode="squash",
                             interpolation=resample, mean=mean, std=std, convert_first=True)
    raise ExportError(f"{where}: size {size} with crop_size {crop} is not served (shortest_edge with an optional "
                      "centre crop, or height and width without one)", option="model")


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


def load(name: str, text_wanted: bool) -> LoadedEncoder:
    """``hf:FOLDER`` as a LoadedEncoder (image tower; see the module docstring for text)."""
    folder = Path(name[len(PREFIX):]).expanduser()
    if not folder.is_dir():
        raise ExportError(f"--model {name}: no such folder (a save_pretrained folder of a transformers "
                          "CLIP, SigLIP or DINOv2 model)", option="model")
    config = _read_json(folder / "config.json", "not a save_pretrained folder")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ExportError(f"--model {name}: model_type {model_type!r} in config.json is not supported; supported: "
                          f"{', '.join(MODEL_TYPES)}", option="model")
    preprocessing = preprocessing_of(folder)
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ExportError(f"--model {name} needs transformers: pip install 'headmaster[hf]' ({e})",
                          option="model") from None
    class_name, pooling = MODEL_TYPES[model_type]
    try:
        # eager attention: plain MatMul/Softmax in the ONNX graph, as the other towers export.
        model = getattr(transformers, class_name).from_pretrained(
            str(folder), local_files_only=True, attn_implementation="eager", dtype=torch.float32).eval()
    except Exception as e:
        raise ExportError(f"--model {name}: transformers could not load the folder as {class_name}: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0]}", option="model") from None
    if text_wanted and model_type != "dinov2":
        LOG.warning("%s: exporting the image tower only: a folder's own tokenizer is not served (the tokenize "
                    "model runs open_clip's), so no text tower and no zero-shot heads; train heads on images", name)
    visual = _visual(model, model_type)
    with torch.no_grad():
        embed_dim = int(visual(torch.zeros(1, 3, *preprocessing.size)).shape[-1])
    scale = getattr(model, "logit_scale", None)
    bias = getattr(model, "logit_bias", None)
    return LoadedEncoder(model=model, name=f"{PREFIX}{folder.name}", pretrained=str(folder.resolve()),
                         weights_sha256=weights_sha256(model), preprocessing=preprocessing, embed_dim=embed_dim,
                         context_length=0, logit_scale=float(scale.exp().item()) if scale is not None else 0.0,
                         seed=None, family="hf", pooling=pooling,
                         logit_bias=float(bias.item()) if bias is not None else None, visual=visual)
