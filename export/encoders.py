"""The one registry of encoders: open_clip's models, each with the preprocessing it needs.

open_clip already keeps the architectures (``model_configs/*.json``) and the pretrained
weights with their own preprocessing (mean, std, interpolation, resize mode). This module
answers from that registry instead of re-typing any of it, and adds what Headmaster needs:
where the weights come from, and a hash of them for the encoder fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from headmaster.errors import ExportError

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

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ExportError(f"preprocessing.resize_mode must be shortest, longest or squash, not {self.resize_mode!r}")
        if self.interpolation not in ("bicubic", "bilinear", "random"):
            raise ExportError(f"preprocessing.interpolation must be bicubic or bilinear, not {self.interpolation!r}")
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ExportError(f"preprocessing.size must be (height, width) > 0, not {self.size!r}")

    @classmethod
    def from_open_clip(cls, cfg: dict) -> "Preprocessing":
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
    def from_dict(cls, d: dict) -> "Preprocessing":
        d = dict(d)
        for key in ("size", "mean", "std"):
            d[key] = tuple(d[key])
        return cls(**d)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoadedEncoder:
    """An open_clip model ready to export, with what the card records about it."""

    model: object  # open_clip CLIP / CustomTextCLIP, eval mode, fp32
    name: str
    pretrained: str | None  # tag, local path, hf-hub:..., or None for random weights
    weights_sha256: str
    preprocessing: Preprocessing
    embed_dim: int
    context_length: int
    logit_scale: float  # exp(logit_scale): zero-shot heads multiply cosines by it
    seed: int | None  # the seed of random weights (pretrained=None), to reproduce them


def list_encoders() -> list[str]:
    import open_clip

    return open_clip.list_models()


def pretrained_tags(name: str) -> list[str]:
    import open_clip

    return open_clip.list_pretrained_tags_by_model(name)


def check_name(name: str, pretrained: str | None) -> None:
    """Refuse unknown models and tags before anything heavy runs."""
    models = list_encoders()
    if name not in models and not name.startswith(("hf-hub:", "local-dir:")):
        close = [m for m in models if m.lower().startswith(name.lower()[:5])][:8]
        raise ExportError(
            f"unknown open_clip model {name!r}; some known ones: {', '.join(close or models[:8])} "
            "(all: headmaster export list)"
        )
    if pretrained is None or name.startswith(("hf-hub:", "local-dir:")):
        return
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


def load(name: str, pretrained: str | None, seed: int = 0) -> LoadedEncoder:
    """Create the model through open_clip (the factory), fp32, eval mode."""
    import open_clip
    import torch

    check_name(name, pretrained)
    source = str(Path(pretrained).expanduser()) if pretrained and Path(pretrained).expanduser().exists() else pretrained
    if source is None:
        torch.manual_seed(seed)  # random weights, reproducible: same seed, same fingerprint
    try:
        model = open_clip.create_model(name, pretrained=source, precision="fp32", device="cpu",
                                       require_pretrained=source is not None)
    except Exception as e:
        where = "no pretrained weights" if source is None else f"weights {source!r}"
        raise ExportError(f"open_clip could not create {name} with {where}: {type(e).__name__}: {e}") from e
    model.eval()
    cfg = open_clip.get_model_preprocess_cfg(model)
    tokenizer = open_clip.get_tokenizer(name)
    text_cfg = open_clip.get_model_config(name) or {}
    context_length = int(getattr(tokenizer, "context_length", 0) or text_cfg.get("text_cfg", {}).get("context_length", 77))
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
    )
