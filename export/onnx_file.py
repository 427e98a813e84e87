"""Bring your own encoder as an ONNX file: ``--model onnx:FILE``.

The user's graph takes float pixels in its own layout (NCHW or NHWC, RGB or BGR, scaled and
normalised its own way) and gives, somewhere inside it, the tensor that is the embedding: a
graph output, or an inner tensor such as a classifier's pooled features. The export turns it
into an ordinary Headmaster image tower: ``PIXELS`` uint8 [N, 3, H, W] RGB in (what the served
``preprocess`` model sends, unchanged), ``EMBEDDING`` float32 [N, D] L2-normalised out. The
float conversion, channel order, scale, mean/std and layout become ONNX ops in front of the
graph; the named tensor becomes the output (``onnx.utils.Extractor`` keeps only what computes
it), pooled if asked (global average over the spatial axes, or a token sequence's first token
or mean), then L2-normalised.

The description is checked against the file before anything is written: the input's shape
(size, channels on the described axis, a batch axis Triton can batch), the tensor's name and
its rank after pooling; each mismatch is one line naming what disagrees and the flag to change.
The parity check runs onnxruntime on the original file (the named tensor exposed as an extra
output, nothing else changed) with the preprocessing done in numpy, against the rewritten graph
on the same uint8 pixels. The fingerprint covers the file's bytes and the description.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from headmaster.errors import ExportError
from headmaster.export.encoders import Preprocessing

LOG = logging.getLogger(__name__)

PREFIX = "onnx:"
LAYOUTS = ("NCHW", "NHWC")
CHANNELS = ("RGB", "BGR")
POOLS = ("none", "avg", "cls", "mean")  # avg: spatial mean of [N,C,H,W] / [N,H,W,C]; cls / mean: of [N,T,D]
SIDECAR_SUFFIXES = (".yaml", ".yml", ".json")  # model.onnx -> model.yaml, read when no --onnx-config is given
INPUT, OUTPUT = "PIXELS", "EMBEDDING"


@dataclass(frozen=True)
class OnnxDescription:
    """What the ONNX file expects and which of its tensors is the embedding (CLI flags and/or a
    YAML / JSON file next to it, same keys). Every field but ``embedding`` is part of the card's
    preprocessing, hence of the fingerprint."""

    embedding: str  # name of the tensor that is the embedding: a graph output or an inner tensor
    mean: tuple[float, float, float]  # subtracted after scaling, in the model's channel order
    std: tuple[float, float, float]
    size: tuple[int, int] | None = None  # (height, width); None: the input's static spatial dims
    resize_mode: str = "shortest"  # shortest (resize + centre crop), longest (+ pad), squash
    crop_pct: float = 1.0  # shortest: resize to size / crop_pct, then centre-crop size (timm's 0.875)
    interpolation: str = "bilinear"  # bilinear | bicubic (Pillow, antialiased)
    scale: float = 1 / 255  # pixels 0..255 are multiplied by it first (1.0: the model takes 0..255)
    channels: str = "RGB"  # RGB | BGR: the order the model's input expects
    layout: str = "NCHW"  # NCHW | NHWC
    pool: str = "none"  # none | avg | cls | mean
    # pool avg: where the feature map keeps its channels; None: as the input (a graph that takes
    # NHWC usually computes NHWC, but one that transposes first computes NCHW)
    feature_layout: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("layout", LAYOUTS),
            ("channels", CHANNELS),
            ("pool", POOLS),
            ("feature_layout", LAYOUTS),
        ):
            if getattr(self, name) not in allowed and (name != "feature_layout" or self.feature_layout is not None):
                raise ExportError(
                    f"onnx description: {name} must be one of {', '.join(allowed)}, not "
                    f"{getattr(self, name)!r} (--{name})",
                    option=name,
                )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ExportError(
                    f"onnx description: {name} needs 3 values (one per channel), not {list(value)} (--{name})",
                    option=name,
                )
        if min(self.std) <= 0 or self.scale <= 0:
            raise ExportError(
                f"onnx description: std and scale must be > 0, not std={list(self.std)} "
                f"scale={self.scale} (--std, --scale)",
                option="std",
            )

    def preprocessing(self, size: tuple[int, int]) -> Preprocessing:
        """What the served ``preprocess`` model does: resize, crop, RGB uint8 [3, H, W]."""
        return Preprocessing(
            size=size,
            resize_mode=self.resize_mode,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            convert_first=True,
        )

    @classmethod
    def from_sources(cls, path: Path, config: Path | None, overrides: dict) -> OnnxDescription:
        """The sidecar file (``config``, else FILE's stem + .yaml/.yml/.json when present),
        then the CLI's ``overrides`` (None values ignored) on top."""
        values: dict = {}
        if config is None:
            config = next((path.with_suffix(s) for s in SIDECAR_SUFFIXES if path.with_suffix(s).is_file()), None)
        if config is not None:
            values = _read_config(Path(config))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ExportError(
                f"onnx description {config}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}",
                option="onnx_config",
            )
        missing = [k for k in ("embedding", "mean", "std") if k not in values]
        if missing:
            raise ExportError(
                f"onnx:{path.name} needs {', '.join(missing)} in its description: "
                f"{', '.join('--' + k for k in missing)}, or keys of {path.with_suffix('.yaml').name} "
                "next to it",
                option=missing[0],
            )
        for key in ("mean", "std", "size"):
            if values.get(key) is not None:
                value = values[key]
                if isinstance(value, str):  # "224x224", "0.5,0.5,0.5"
                    value = value.lower().replace("x", " ").replace(",", " ").split()
                value = [value] if isinstance(value, (int, float)) else list(value)
                value = value * (2 if key == "size" else 3) if len(value) == 1 else value
                try:
                    values[key] = tuple(int(v) if key == "size" else float(v) for v in value)
                except (TypeError, ValueError):
                    raise ExportError(
                        f"onnx description: {key} {values[key]!r} is not {'HxW' if key == 'size' else 'three numbers'}",
                        option=key,
                    ) from None
        try:
            return cls(**values)
        except TypeError as e:
            raise ExportError(f"onnx description: {e}", option="onnx_config") from None

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"onnx description file {path} does not exist (--onnx-config)", option="onnx_config")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            import yaml

            data = yaml.safe_load(path.read_text())
    except Exception as e:
        raise ExportError(
            f"onnx description file {path} is not valid {path.suffix[1:].upper()}: {str(e).splitlines()[0]}",
            option="onnx_config",
        ) from None
    if not isinstance(data, dict):
        raise ExportError(f"onnx description file {path} must hold a mapping of keys to values", option="onnx_config")
    return {k.replace("-", "_"): v for k, v in data.items()}


@dataclass(frozen=True)
class OnnxEncoder:
    """A checked ONNX file and its description, ready to rewrite."""

    path: Path
    model: object  # onnx.ModelProto, as loaded
    description: OnnxDescription
    input_name: str
    input_elem_type: int  # onnx TensorProto type of the input (float, float16, ...)
    size: tuple[int, int]
    file_sha256: str

    @property
    def name(self) -> str:
        return PREFIX + self.path.name

    @property
    def preprocessing(self) -> Preprocessing:
        return self.description.preprocessing(self.size)

    def card_preprocessing(self) -> dict:
        """The served preprocessing plus what the graph itself does (hashed into the fingerprint)."""
        d = self.description
        graph = {
            "scale": d.scale,
            "channels": d.channels,
            "layout": d.layout,
            "input": self.input_name,
            "embedding": d.embedding,
        }
        if d.pool == "avg":
            graph["feature_layout"] = d.feature_layout or d.layout
        return {**self.preprocessing.as_dict(), **graph}


def _dims(value_info) -> list:
    return [
        d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in value_info.type.tensor_type.shape.dim
    ]


def open_file(path: Path, description: OnnxDescription) -> OnnxEncoder:
    """Load the file and check the description against its input; refuse in one line."""
    import onnx

    flag = f"--model onnx:{path}"
    if not path.is_file():
        raise ExportError(f"{flag}: no such file", option="model")
    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception as e:
        raise ExportError(
            f"{flag}: not a readable ONNX file ({type(e).__name__}: {str(e).splitlines()[0]})", option="model"
        ) from None
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(
            f"{flag}: an image encoder takes one input, this graph takes {len(inputs)} "
            f"({', '.join(i.name for i in inputs)})",
            option="model",
        )
    graph_input = inputs[0]
    dims = _dims(graph_input)
    shown = f"input {graph_input.name!r} is [{', '.join(map(str, dims))}]"
    if len(dims) != 4:
        raise ExportError(f"{flag}: {shown}, not an image batch of rank 4 (N, C, H, W or N, H, W, C)", option="model")
    channel_axis, spatial = (1, (2, 3)) if description.layout == "NCHW" else (3, (1, 2))
    if isinstance(dims[channel_axis], int) and dims[channel_axis] != 3:
        other = "NHWC" if description.layout == "NCHW" else "NCHW"
        raise ExportError(
            f"{flag}: {shown}: with --layout {description.layout} its channel axis {channel_axis} "
            f"has {dims[channel_axis]}, not 3 channels (is it {other}? --layout {other})",
            option="layout",
        )
    static = tuple(dims[a] for a in spatial)
    size = description.size
    if size is None:
        if not all(isinstance(s, int) for s in static):
            raise ExportError(
                f"{flag}: {shown}: its height and width are not fixed, so give them with --input-size",
                option="input_size",
            )
        size = static
    for axis, want, have in zip(("height", "width"), size, static):
        if isinstance(have, int) and have != want:
            raise ExportError(
                f"{flag}: {shown}, so its {axis} is {have}, but --input-size says "
                f"{size[0]}x{size[1]} (height x width); the model takes {static[0]}x{static[1]}",
                option="input_size",
            )
    if isinstance(dims[0], int) and dims[0] > 0:
        raise ExportError(
            f"{flag}: {shown}: its batch axis is fixed to {dims[0]}, and Triton batches requests; "
            "export the ONNX with a dynamic batch axis (torch.onnx.export(..., dynamic_axes="
            f"{{{graph_input.name!r}: {{0: 'batch'}}}}))",
            option="model",
        )
    produced = {o for node in model.graph.node for o in node.output} | {o.name for o in model.graph.output}
    if description.embedding not in produced:
        outputs = ", ".join(o.name for o in model.graph.output)
        close = difflib.get_close_matches(description.embedding, sorted(produced), n=3, cutoff=0.5)
        raise ExportError(
            f"{flag}: no tensor named {description.embedding!r} (--embedding); graph outputs: "
            f"{outputs}{'; similar tensors: ' + ', '.join(close) if close else ''}",
            option="embedding",
        )
    if {INPUT, OUTPUT} & (produced | {graph_input.name}):
        raise ExportError(
            f"{flag}: the graph already has a tensor named {INPUT} or {OUTPUT}, the names the "
            "rewritten tower gives its input and output; rename it in the file",
            option="model",
        )
    return OnnxEncoder(
        path=path,
        model=model,
        description=replace(description, size=tuple(size)),
        input_name=graph_input.name,
        input_elem_type=graph_input.type.tensor_type.elem_type,
        size=tuple(size),
        file_sha256=hashlib.sha256(data).hexdigest(),
    )


def _exposed(encoder: OnnxEncoder):
    """The user's graph unchanged but for the embedding tensor added to its outputs."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(encoder.model)
    if encoder.description.embedding not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(encoder.description.embedding))
    return model


def model_input(encoder: OnnxEncoder, pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB [N, 3, H, W] -> the float input the original file expects, in numpy."""
    import onnx

    d = encoder.description
    x = pixels.astype(np.float32)
    if d.channels == "BGR":
        x = x[:, ::-1]
    x = (x * np.float32(d.scale) - np.asarray(d.mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(
        d.std, np.float32
    ).reshape(1, 3, 1, 1)
    if d.layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x.astype(onnx.helper.tensor_dtype_to_np_dtype(encoder.input_elem_type)))


def _pool_axes(encoder: OnnxEncoder, rank: int) -> list[int] | int | None:
    """The axes the description pools over for a tensor of this rank; refuses a mismatch."""
    d = encoder.description
    wanted = {"none": 2, "avg": 4, "cls": 3, "mean": 3}[d.pool]
    if rank == wanted:
        return {
            "none": None,
            "avg": [2, 3] if (d.feature_layout or d.layout) == "NCHW" else [1, 2],
            "cls": 0,
            "mean": [1],
        }[d.pool]
    hint = {2: "--pool none", 3: "--pool cls or --pool mean (a token sequence)", 4: "--pool avg (a feature map)"}.get(
        rank, "another --embedding tensor"
    )
    raise ExportError(
        f"--model onnx:{encoder.path.name}: tensor {d.embedding!r} has rank {rank}, but --pool "
        f"{d.pool} needs rank {wanted} ({'[batch, D]' if wanted == 2 else 'before pooling'}); "
        f"use {hint}",
        option="pool",
    )


def reference_embeddings(encoder: OnnxEncoder, pixels: np.ndarray) -> np.ndarray:
    """onnxruntime on the original file: the named tensor, pooled and L2-normalised in numpy."""
    import onnxruntime as ort

    name = encoder.description.embedding
    try:
        session = ort.InferenceSession(_exposed(encoder).SerializeToString(), providers=["CPUExecutionProvider"])
        raw = session.run([name], {encoder.input_name: model_input(encoder, pixels)})[0]
    except Exception as e:
        raise ExportError(
            f"--model onnx:{encoder.path.name}: onnxruntime could not run the file on the described "
            f"input ({encoder.description.layout}, {encoder.size[0]}x{encoder.size[1]}): "
            f"{str(e).strip().splitlines()[0][:300]}",
            option="input_size",
        ) from None
    if not np.issubdtype(raw.dtype, np.floating):
        raise ExportError(
            f"--model onnx:{encoder.path.name}: tensor {name!r} is {raw.dtype}, not floating point: "
            "not an embedding (--embedding)",
            option="embedding",
        )
    axes = _pool_axes(encoder, raw.ndim)
    raw = raw.astype(np.float32)
    if encoder.description.pool == "cls":
        raw = raw[:, 0]
    elif axes is not None:
        raw = raw.mean(axis=tuple(axes))
    return raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)


def _reduce(op: str, data: str, axes: list[int], out: str, opset: int, since: int):
    """A Reduce* node for any opset: axes became an input (ReduceSum at 13, the others at 18)."""
    import onnx
    from onnx import helper

    if opset >= since:
        axes_name = f"{out}/axes"
        return (
            [helper.make_node(op, [data, axes_name], [out], keepdims=0 if op != "ReduceL2" else 1)],
            [onnx.numpy_helper.from_array(np.asarray(axes, np.int64), axes_name)],
        )
    return [helper.make_node(op, [data], [out], axes=axes, keepdims=0 if op != "ReduceL2" else 1)], []


def rewrite(encoder: OnnxEncoder):
    """The Headmaster image tower: PIXELS uint8 [N,3,H,W] -> EMBEDDING float32 [N,D], L2-normalised."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = encoder.description
    extractor = onnx.utils.Extractor(_exposed(encoder))
    model = extractor.extract_model([encoder.input_name], [d.embedding])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    graph = model.graph
    p = "headmaster/"
    nodes, constants = [], []

    def const(name, array):
        constants.append(numpy_helper.from_array(np.asarray(array), p + "const/" + name))
        return p + "const/" + name

    x = p + "float"
    nodes.append(helper.make_node("Cast", [INPUT], [x], to=TensorProto.FLOAT))
    if d.channels == "BGR":
        nodes.append(
            helper.make_node("Gather", [x, const("bgr", np.asarray([2, 1, 0], np.int64))], [p + "bgr"], axis=1)
        )
        x = p + "bgr"
    nodes.append(helper.make_node("Mul", [x, const("scale", np.float32(d.scale))], [p + "scaled"]))
    nodes.append(
        helper.make_node(
            "Sub", [p + "scaled", const("mean", np.asarray(d.mean, np.float32).reshape(1, 3, 1, 1))], [p + "centred"]
        )
    )
    x = p + "normalised"
    nodes.append(
        helper.make_node("Div", [p + "centred", const("std", np.asarray(d.std, np.float32).reshape(1, 3, 1, 1))], [x])
    )
    if d.layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [x], [p + "nhwc"], perm=[0, 2, 3, 1]))
        x = p + "nhwc"
    nodes.append(
        helper.make_node("Cast", [x], [encoder.input_name], to=encoder.input_elem_type)
        if encoder.input_elem_type != TensorProto.FLOAT
        else helper.make_node("Identity", [x], [encoder.input_name])
    )

    tail, y = [], d.embedding
    tail.append(helper.make_node("Cast", [y], [p + "embedding"], to=TensorProto.FLOAT))
    y = p + "embedding"
    if d.pool == "cls":
        tail.append(helper.make_node("Gather", [y, const("first", np.int64(0))], [p + "pooled"], axis=1))
        y = p + "pooled"
    elif d.pool in ("avg", "mean"):
        axes = _pool_axes(encoder, 4 if d.pool == "avg" else 3)
        reduce, inits = _reduce("ReduceMean", y, axes, p + "pooled", opset, 18)
        tail += reduce
        constants.extend(inits)
        y = p + "pooled"
    reduce, inits = _reduce("ReduceL2", y, [-1], p + "norm", opset, 18)
    tail += reduce
    constants.extend(inits)
    tail.append(helper.make_node("Max", [p + "norm", const("eps", np.float32(1e-12))], [p + "safe_norm"]))
    tail.append(helper.make_node("Div", [y, p + "safe_norm"], [OUTPUT]))

    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body + tail)
    graph.initializer.extend(constants)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", 3, *encoder.size]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", None]))
    # Shapes inferred for the original input no longer hold for every tensor; onnxruntime infers again.
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return model
