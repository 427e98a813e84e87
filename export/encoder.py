"""Export open_clip image and text towers to ONNX, TorchScript or TensorRT plans.

Each tower becomes one graph with a dynamic batch axis that returns L2-normalised float32
embeddings. The image graph takes uint8 pixels and does the float conversion and mean/std
normalisation itself, so the server ships 1 byte per pixel channel to the GPU, not 4.

Nothing is written unless the export matches PyTorch on real images and prompts
(cosine >= 0.9999 for fp32, >= 0.999 for fp16); the folder appears complete or not at all.
int8 (ONNX, image tower; the text tower stays fp32) is the fp32 export quantized by
onnxruntime and promoted only through ``export/quantize.py``'s gate (cosine >= 0.98 to fp32 on
every held-out image).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import importlib.metadata
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headmaster.errors import ExportError, UnsupportedHereError
from headmaster.export import hf_folder, onnx_file, quantize, sentence_folder
from headmaster.export.card import EncoderCard, TowerFile
from headmaster.export.encoders import LoadedEncoder, load
from headmaster.export.reference import reference_images, reference_prompts, reference_texts
from headmaster.served.preprocess import preprocess_bytes
from headmaster.served.runtime import load_runner
from headmaster.served.tokenize import TOKENIZER_DIR, folder_tokenizer

LOG = logging.getLogger(__name__)

FORMATS = ("onnx", "plan", "torchscript")
PRECISIONS = ("fp32", "fp16", "int8")
# int8: the image tower against the fp32 tower on held-out images (export/quantize.py).
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": quantize.MIN_COSINE}
EXTENSIONS = {"onnx": ".onnx", "plan": ".plan", "torchscript": ".pt"}
OPSET = 17


@dataclass(frozen=True)
class ExportOptions:
    model: str  # open_clip model name, e.g. ViT-B-32
    pretrained: str | None  # open_clip tag, checkpoint path, or None for random weights
    out: Path
    precision: str = "fp32"
    format: str = "onnx"
    seed: int = 0  # only for pretrained=None: the random weights are reproducible
    towers: tuple[str, ...] = ("image", "text")
    max_batch_size: int = 64  # TensorRT profile upper bound
    opt_batch_size: int = 16  # TensorRT profile optimum
    check_images: Path | None = None  # extra real images for the export check
    calibration: Path | None = None  # int8: the user's images to calibrate on (default: reference_images())
    quantization: quantize.QuantizeSettings = quantize.QuantizeSettings()  # int8: how (tests make bad ones)
    image_size: int | None = None  # timm backbones: square input size other than their pretrained config's
    # onnx:FILE: its preprocessing and embedding tensor (export/onnx_file.py); None reads FILE's sidecar only
    onnx: onnx_file.OnnxDescription | dict | None = None
    key_map: str | None = None  # a checkpoint saved by another codebase: named map or JSON rules (checkpoints.py)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ExportError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}", option="format")
        if self.precision not in PRECISIONS:
            raise ExportError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}", option="precision"
            )
        if self.precision == "int8" and self.format != "onnx":
            raise ExportError("precision int8 is an onnxruntime (CPU) graph: use --format onnx", option="precision")
        if self.calibration is not None and self.precision != "int8":
            raise ExportError("calibration images only serve --precision int8", option="calibration")
        if self.calibration is not None:
            quantize.calibration_images(self.calibration)  # too few images: refused before any work
        unknown = set(self.towers) - {"image", "text"}
        if unknown or not self.towers:
            raise ExportError(f"towers must be a non-empty subset of image, text; got {self.towers}")
        if not 1 <= self.opt_batch_size <= self.max_batch_size:
            raise ExportError("need 1 <= opt_batch_size <= max_batch_size")
        if self.model.startswith(hf_folder.PREFIX) and (self.image_size or self.pretrained):
            raise ExportError(
                "an hf:FOLDER encoder takes its weights and size from the folder: drop --pretrained and --image-size",
                option="pretrained",
            )
        if self.model.startswith(sentence_folder.PREFIX) and (self.image_size or self.pretrained or self.key_map):
            raise ExportError(
                "an st:FOLDER text encoder takes its weights from the folder: drop --pretrained, "
                "--key-map and --image-size",
                option="pretrained",
            )
        if self.model.startswith(onnx_file.PREFIX) and self.format != "onnx":
            raise ExportError("an onnx:FILE encoder is served as ONNX: use --format onnx", option="format")
        if self.model.startswith(onnx_file.PREFIX) and self.precision == "fp16":
            raise ExportError(
                "an onnx:FILE encoder exports as fp32 or int8 (the graph is yours: convert the file "
                "to fp16 first if you want fp16)",
                option="precision",
            )


def _torch():
    import torch

    return torch


def _image_tower(encoder: LoadedEncoder, dtype):
    torch = _torch()
    p = encoder.preprocessing
    assert p is not None, "a text-only encoder has no image tower"

    class ImageTower(torch.nn.Module):
        """uint8 pixels [N, 3, H, W] -> L2-normalised embedding [N, D] (float32)."""

        def __init__(self, visual):
            super().__init__()
            self.visual = visual
            self.register_buffer("mean", torch.tensor(p.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(p.std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, pixels):
            # Same arithmetic as torchvision's ToTensor + Normalize in open_clip's transform.
            x = (pixels.float().div(255.0) - self.mean) / self.std
            features = self.visual(x.to(dtype))
            return torch.nn.functional.normalize(features.float(), dim=-1)

    return _unfused(ImageTower(copy.deepcopy(encoder.visual).to(dtype)).eval())


def _unfused(module):
    # timm's attention layers choose F.scaled_dot_product_attention at construction
    # (``fused_attn``); the explicit path computes the same attention in traceable ops.
    for layer in module.modules():
        if isinstance(getattr(layer, "fused_attn", None), bool):
            layer.fused_attn = False
    return module


def _text_tower(encoder: LoadedEncoder, dtype):
    torch = _torch()
    if encoder.text is not None:  # hf:FOLDER: the folder model's own get_text_features

        class FolderTextTower(torch.nn.Module):
            """token ids [N, context] -> L2-normalised embedding [N, D] (float32)."""

            def __init__(self, text):
                super().__init__()
                self.text = text

            def forward(self, tokens):
                return torch.nn.functional.normalize(self.text(tokens).float(), dim=-1)

        return FolderTextTower(copy.deepcopy(encoder.text).to(dtype)).eval()
    model = copy.deepcopy(encoder.model)
    model.visual = torch.nn.Identity()  # keep only what encode_text uses

    class TextTower(torch.nn.Module):
        """token ids [N, context] -> L2-normalised embedding [N, D] (float32)."""

        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, tokens):
            return torch.nn.functional.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    return TextTower(model.to(dtype)).eval()


def _tower_spec(encoder: LoadedEncoder, tower: str, fmt: str, precision: str) -> TowerFile:
    # Triton's PyTorch backend names tensors <name>__<index>; the others take any name.
    suffix = "__0" if fmt == "torchscript" else ""
    optimization = "extended" if (precision == "fp16" and fmt == "onnx") else "all"
    if tower == "image":
        assert encoder.preprocessing is not None
        return TowerFile(
            f"image{EXTENSIONS[fmt]}",
            fmt,
            f"PIXELS{suffix}",
            "UINT8",
            (3, *encoder.preprocessing.size),
            f"EMBEDDING{suffix}",
            optimization,
        )
    return TowerFile(
        f"text{EXTENSIONS[fmt]}",
        fmt,
        f"TOKENS{suffix}",
        "INT64",
        (encoder.context_length,),
        f"EMBEDDING{suffix}",
        optimization,
    )


def _example(spec: TowerFile, batch: int = 2):
    torch = _torch()
    if spec.input_dtype == "UINT8":
        return torch.randint(0, 256, (batch, *spec.input_dims), dtype=torch.uint8)
    return torch.randint(1, 1000, (batch, *spec.input_dims), dtype=torch.int64)


@contextlib.contextmanager
def _exportable():
    """No autograd, and no fused multi-head-attention fast path: it has no ONNX symbolic
    and would bake one code path into the TorchScript trace. timm's attention layers likewise
    take their explicit softmax(QK^T)V path instead of F.scaled_dot_product_attention while
    tracing (``_unfused``), which exports as plain MatMul/Softmax on every opset and runtime."""
    torch = _torch()
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        # The exporters warn about tracing details that do not apply to these towers.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _export_onnx(module, spec: TowerFile, path: Path) -> None:
    import onnx

    torch = _torch()
    with _exportable():
        torch.onnx.export(
            module,
            (_example(spec),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[spec.input_name],
            output_names=[spec.output_name],
            dynamic_axes={spec.input_name: {0: "batch"}, spec.output_name: {0: "batch"}},
        )
    onnx.checker.check_model(str(path))


def _export_torchscript(module, spec: TowerFile, path: Path) -> None:
    torch = _torch()
    with _exportable():
        traced = torch.jit.trace(module, (_example(spec),), check_trace=False)
    traced.save(str(path))


def _require_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise UnsupportedHereError(
            "--format plan builds a TensorRT engine, which needs the `tensorrt` Python package and an "
            f"NVIDIA GPU; `import tensorrt` failed here ({e}). Export --format onnx on this machine, or "
            "run this command on the GPU host with the TensorRT version of your Triton container "
            "(24.10 ships TensorRT 10.5): an engine only runs on the TensorRT version and GPU it was built on"
        ) from None
    return tensorrt


def _build_plan(onnx_path: Path, spec: TowerFile, path: Path, options: ExportOptions) -> None:
    trt = _require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if options.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    dims = tuple(spec.input_dims)
    profile.set_shape(spec.input_name, (1, *dims), (options.opt_batch_size, *dims), (options.max_batch_size, *dims))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    path.write_bytes(bytes(engine))


class _PlanRunner:
    """Runs a TensorRT engine on CUDA tensors, for the export check only."""

    def __init__(self, path: Path):
        import tensorrt as trt

        self.torch = _torch()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()

    def __call__(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        torch = self.torch
        ((name, array),) = inputs.items()
        x = torch.from_numpy(array).cuda()
        self.context.set_input_shape(name, tuple(x.shape))
        self.context.set_tensor_address(name, x.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(outputs[0])), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(outputs[0], out.data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return [out.cpu().numpy()]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _check_inputs(
    encoder: LoadedEncoder, tower: str, options: ExportOptions, folder: Path
) -> tuple[list[str], np.ndarray]:
    if tower == "image":
        assert encoder.preprocessing is not None
        images = reference_images(options.check_images)
        cfg = encoder.preprocessing.as_dict()
        return [name for name, _ in images], np.stack([preprocess_bytes(data, cfg) for _, data in images])
    prompts = reference_prompts()
    if encoder.preprocessing is None:  # a text encoder: also real sentences, long ones truncated
        prompts = prompts + reference_texts()
    if encoder.tokenizer is not None:  # hf:FOLDER, st:FOLDER: its saved tokenizer, as the tokenize model serves it
        tokens = folder_tokenizer(
            folder / TOKENIZER_DIR, encoder.context_length, encoder.tokenizer["pad_id"], encoder.tokenizer
        )
        return prompts, tokens(prompts)
    import open_clip

    tokens = open_clip.get_tokenizer(encoder.name)(prompts, context_length=encoder.context_length)
    return prompts, tokens.numpy().astype(np.int64)


def _verify(
    encoder: LoadedEncoder, tower: str, spec: TowerFile, path: Path, options: ExportOptions, precision: str
) -> dict:
    """Exported artifact vs the fp32 PyTorch model on the same real inputs."""
    torch = _torch()
    names, batch = _check_inputs(encoder, tower, options, path.parent)
    reference_module = (_image_tower if tower == "image" else _text_tower)(encoder, torch.float32)
    with torch.no_grad():
        reference = reference_module(torch.from_numpy(batch)).numpy()
    runner = (
        _PlanRunner(path)
        if spec.format == "plan"
        else load_runner(str(path), device="auto", optimization=spec.graph_optimization)
    )
    exported = runner({spec.input_name: batch}, [spec.output_name])[0]
    cosines = _cosines(exported, reference)
    worst = int(np.argmin(cosines))
    minimum = MIN_COSINE[precision]
    result = {
        "inputs": len(names),
        "min_cosine": float(cosines[worst]),
        "worst_input": names[worst],
        "required": minimum,
        "max_norm_error": float(np.abs(np.linalg.norm(exported, axis=1) - 1).max()),
    }
    if not cosines[worst] >= minimum:
        raise ExportError(
            f"the exported {tower} tower ({spec.format}, {precision}) does not match PyTorch: "
            f"cosine {cosines[worst]:.6f} < {minimum} on {names[worst]!r}; nothing was written"
        )
    LOG.info("%s tower: min cosine vs PyTorch %.7f over %d inputs", tower, cosines[worst], len(names))
    return result


def _tool_versions() -> dict:
    versions = {}
    for dist in ("torch", "open_clip_torch", "timm", "onnx", "onnxruntime", "headmaster", "tensorrt"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _quantize_image_tower(
    name: str, preprocessing: dict, spec: TowerFile, fp32_path: Path, path: Path, options: ExportOptions
) -> dict:
    """int8 from the verified fp32 tower, promoted only through the gate; the card's record. Every
    kind of encoder (open_clip, timm, onnx:FILE, hf:FOLDER) goes through this one gate."""
    op_types = options.quantization.op_types
    if op_types and not quantize.weight_nodes(fp32_path, op_types):
        # A convolutional network has no MatMul/Gemm with weights: its "int8" graph would be fp32 renamed.
        raise ExportError(
            f"{name} has no {'/'.join(op_types)} node with weights to quantize (int8 "
            "here quantizes a transformer's weight MatMuls; a convolutional network has none): "
            "export it as fp32 or fp16",
            option="precision",
        )
    calibration = quantize.calibration_images(options.calibration)
    how = quantize.quantize_image_tower(
        fp32_path, path, spec.input_name, quantize.pixels(calibration, preprocessing), options.quantization
    )
    figures = quantize.promotion_gate(
        fp32_path, path, spec.input_name, spec.output_name, quantize.gate_images(calibration), preprocessing
    )
    quantize.require_passed(figures, ExportError, f"{name} int8")
    return {
        "quantization": {
            **how,
            "calibration": "reference_images()" if options.calibration is None else str(options.calibration),
        },
        "gate": figures,
    }


def _export_tower(encoder: LoadedEncoder, tower: str, folder: Path, options: ExportOptions) -> tuple[TowerFile, dict]:
    torch = _torch()
    # int8 starts from the fp32 graph (the text tower stays fp32).
    precision = "fp32" if options.precision == "int8" else options.precision
    dtype = torch.float16 if precision == "fp16" else torch.float32
    spec = _tower_spec(encoder, tower, options.format, precision)
    module = (_image_tower if tower == "image" else _text_tower)(encoder, dtype)
    path = folder / spec.file
    if options.precision == "int8" and tower == "image":
        assert encoder.preprocessing is not None
        fp32_path = folder / f"{tower}.fp32.onnx"
        _export_onnx(module, spec, fp32_path)
        check = _verify(encoder, tower, spec, fp32_path, options, precision)
        int8 = _quantize_image_tower(encoder.name, encoder.preprocessing.as_dict(), spec, fp32_path, path, options)
        fp32_path.unlink()
        return spec, {**check, "precision": "int8", **int8}
    if options.format == "torchscript":
        _export_torchscript(module, spec, path)
    elif options.format == "onnx":
        _export_onnx(module, spec, path)
    else:
        onnx_path = folder / f"{tower}.for-plan.onnx"
        _export_onnx(module, spec, onnx_path)
        _build_plan(onnx_path, spec, path, options)
        onnx_path.unlink()
    return spec, {**_verify(encoder, tower, spec, path, options, precision), "precision": precision}


def _refuse_foreign_folder(out: Path) -> None:
    """An export only ever replaces a previous export (or an empty folder)."""
    if out.exists() and any(out.iterdir()) and not (out / "card.json").exists():
        raise ExportError(f"{out} exists and is not an encoder export; choose an empty or new folder", option="out")


def _place(staging: Path, out: Path) -> None:
    """Move a finished export into place; only ever replaces a previous export (checked again: the
    folder may have changed during the export)."""
    if out.exists():
        _refuse_foreign_folder(out)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def _require_tokenizer(name: str) -> None:
    """A text tower is only useful with its tokenizer (the export check and the served
    ``tokenize`` model both need it): refuse before exporting if it cannot load here."""
    import open_clip

    try:
        open_clip.get_tokenizer(name)
    except Exception as e:
        raise ExportError(
            f"the text tower of {name} needs its tokenizer, which does not load here ({type(e).__name__}: {e}); "
            "SigLIP's is a Hugging Face tokenizer (pip install transformers, and its files from the hub or a local "
            "cache). Export the image tower alone with --towers image (trained heads; no zero-shot)",
            option="towers",
        ) from None


def _staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
    return staging


def _export_onnx_file(options: ExportOptions) -> EncoderCard:
    """``onnx:FILE``: the user's graph rewritten into an image tower, checked against onnxruntime
    on the original file (export/onnx_file.py), int8 through the same gate as any tower."""
    path = Path(options.model[len(onnx_file.PREFIX) :]).expanduser()
    description = options.onnx
    if not isinstance(description, onnx_file.OnnxDescription):
        description = onnx_file.OnnxDescription.from_sources(path, None, dict(description or {}))
    if options.towers == ("text",):
        raise ExportError(f"{options.model} is an image encoder: it has no text tower", option="towers")
    encoder = onnx_file.open_file(path, description)
    images = reference_images(options.check_images)
    preprocessing = encoder.card_preprocessing()
    batch = np.stack([preprocess_bytes(data, preprocessing) for _, data in images])
    reference = onnx_file.reference_embeddings(encoder, batch)  # refuses a wrong rank / pooling in one line
    spec = TowerFile("image.onnx", "onnx", onnx_file.INPUT, "UINT8", (3, *encoder.size), onnx_file.OUTPUT)
    out = Path(options.out)
    staging = _staging(out)
    try:
        import onnx

        tower = staging / spec.file
        onnx.save(onnx_file.rewrite(encoder), str(tower))
        exported = load_runner(str(tower), device="auto")({spec.input_name: batch}, [spec.output_name])[0]
        cosines = _cosines(exported, reference)
        worst = int(np.argmin(cosines))
        check = {
            "inputs": len(images),
            "min_cosine": float(cosines[worst]),
            "worst_input": images[worst][0],
            "required": MIN_COSINE["fp32"],
            "reference": "onnxruntime on the original file",
            "max_norm_error": float(np.abs(np.linalg.norm(exported, axis=1) - 1).max()),
            "precision": "fp32",
        }
        if not cosines[worst] >= MIN_COSINE["fp32"]:
            raise ExportError(
                f"the rewritten graph of {options.model} does not match onnxruntime on the original "
                f"file: cosine {cosines[worst]:.6f} < {MIN_COSINE['fp32']} on {images[worst][0]!r}; "
                "nothing was written"
            )
        LOG.info("%s: min cosine vs the original file %.7f over %d images", options.model, cosines[worst], len(images))
        if options.precision == "int8":
            fp32_path = staging / "image.fp32.onnx"
            tower.rename(fp32_path)
            int8 = _quantize_image_tower(options.model, preprocessing, spec, fp32_path, tower, options)
            fp32_path.unlink()
            check = {**check, "precision": "int8", **int8}
        card = EncoderCard(
            model=encoder.name,
            pretrained=str(path.resolve()),
            weights_sha256=encoder.file_sha256,
            preprocessing=preprocessing,
            embed_dim=int(exported.shape[1]),
            context_length=0,
            logit_scale=0.0,
            precision=options.precision,
            format="onnx",
            towers={"image": spec},
            verification={"image": check},
            tools=_tool_versions(),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            family="onnx",
            pooling=encoder.description.pool,
        )
        card.save(staging)
        _place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def export_encoder(options: ExportOptions) -> EncoderCard:
    """Export, verify, and write ``card.json`` + one file per tower into ``options.out``."""
    if options.model.startswith(onnx_file.PREFIX):
        return _export_onnx_file(options)
    if options.format == "plan":
        _require_tensorrt()  # fail before minutes of loading and exporting
    hf = options.model.startswith(hf_folder.PREFIX)
    st = options.model.startswith(sentence_folder.PREFIX)
    if st and (options.precision != "fp32" or options.format != "onnx" or "text" not in options.towers):
        raise ExportError(
            f"{options.model} is a text encoder: export it as --format onnx --precision fp32 (its only tower is text)",
            option="model",
        )
    if "text" in options.towers and not options.model.startswith("timm:") and not hf and not st:
        _require_tokenizer(options.model)  # before minutes of loading
    _refuse_foreign_folder(Path(options.out))  # before minutes of loading and exporting
    if st:
        encoder = sentence_folder.load(options.model)
    else:
        encoder = (
            hf_folder.load(options.model, options.towers)
            if hf
            else load(options.model, options.pretrained, options.seed, options.image_size, options.key_map)
        )
    towers_wanted = [
        t
        for t in options.towers
        if (t == "image" and encoder.preprocessing is not None) or (t == "text" and encoder.has_text)
    ]
    if options.towers == ("text",) and not encoder.has_text:
        raise ExportError(f"{options.model} is an image-only backbone: it has no text tower", option="towers")
    if "text" in options.towers and not encoder.has_text and not hf:
        LOG.info("%s is image-only: exporting its image tower (no text tower, so no zero-shot heads)", options.model)
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
    try:
        towers, checks = {}, {}
        if encoder.tokenizer_files and "text" in towers_wanted:  # before the text tower's check, which reads them
            (staging / TOKENIZER_DIR).mkdir()
            for name, data in encoder.tokenizer_files.items():
                (staging / TOKENIZER_DIR / name).write_bytes(data)
        for tower in towers_wanted:
            towers[tower], checks[tower] = _export_tower(encoder, tower, staging, options)
        card = EncoderCard(
            model=encoder.name,
            pretrained=encoder.pretrained,
            weights_sha256=encoder.weights_sha256,
            preprocessing=encoder.preprocessing.as_dict() if encoder.preprocessing else {},
            embed_dim=encoder.embed_dim,
            context_length=encoder.context_length,
            logit_scale=encoder.logit_scale,
            precision=options.precision,
            format=options.format,
            towers=towers,
            verification=checks,
            tools=_tool_versions(),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            seed=encoder.seed,
            family=encoder.family,
            pooling=encoder.pooling,
            logit_bias=encoder.logit_bias,
            checkpoint=encoder.checkpoint,
            tokenizer=encoder.tokenizer if "text" in towers_wanted else None,
        )
        card.save(staging)
        _place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card
