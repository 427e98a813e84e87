"""int8 image towers for CPUs, and the gate that keeps them from being silently worse.

``quantize_image_tower`` turns an exported fp32 image tower (ONNX) into a QDQ graph with
onnxruntime's own tools: ``quant_pre_process``, then ``quantize_static`` with int8 weights per
output channel, uint8 activations calibrated (min/max) on real images that went through the
server's own preprocessing (``preprocess_bytes``). Only the MatMul/Gemm nodes that multiply
by a weight are quantized: the attention projections, the MLPs and the final projection,
where a ViT spends its time. Everything else stays float: the uint8 -> float input
normalisation, the patch Conv, LayerNorm, Softmax, GELU (Erf), the attention's activation
x activation products (Q.K^T, attention.V) and the L2 normalisation.

``promotion_gate`` judges an int8 tower against the fp32 one on held-out real images
(``reference.held_out_images``, never the calibration ones): the cosine of every image's
embedding to its fp32 embedding (mean and minimum; the minimum must reach ``MIN_COSINE``),
and, for every head given, the share of images whose accepted labels are unchanged (each
head must reach ``MIN_AGREEMENT``). ``require_passed`` turns a failed gate into an error that
names the figures. The export runs it (no heads there yet), and so does ``repo build`` when a
repository served by an fp32 tower of the same fingerprint switches to int8 (with its heads).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from headmaster.errors import ExportError
from headmaster.export.reference import held_out_images, reference_images
from headmaster.images import IMAGE_SUFFIXES
from headmaster.served.preprocess import preprocess_bytes
from headmaster.served.runtime import load_runner

LOG = logging.getLogger(__name__)

MIN_COSINE = 0.98  # every held-out image: cosine(int8 embedding, fp32 embedding)
MIN_AGREEMENT = 0.99  # every head: share of held-out images with unchanged accepted labels
QUANTIZED_OPS = ("MatMul", "Gemm")
BATCH = 16  # images per onnxruntime call in the gate


@dataclass(frozen=True)
class QuantizeSettings:
    """How the tower is quantized. The defaults are the product; the others exist so a test
    can make a deliberately bad int8 tower and see the gate refuse it."""

    op_types: tuple[str, ...] | None = QUANTIZED_OPS  # None: every op onnxruntime can quantize
    weights_only: bool = True  # MatMul with a constant B only (not Q.K^T, attention.V)
    per_channel: bool = True
    calibrate_method: str = "MinMax"  # onnxruntime CalibrationMethod name

    def describe(self) -> dict:
        return {
            "format": "QDQ",
            "weights": "int8, per channel" if self.per_channel else "int8, per tensor",
            "activations": "uint8",
            "op_types": list(self.op_types) if self.op_types else "all",
            "matmul_const_b_only": self.weights_only,
            "float_matmul_outputs": self.weights_only,
            "calibration_method": self.calibrate_method,
        }


class ScoringHead(Protocol):
    """What the gate needs of a head version (repository.head_version.HeadVersion has it)."""

    title: str

    def scores(self, embeddings: np.ndarray) -> np.ndarray: ...

    def accepted_mask(self, scores: np.ndarray) -> np.ndarray: ...


def pixels(images: list[tuple[str, bytes]], preprocessing: dict) -> np.ndarray:
    """uint8 [N, 3, H, W], exactly as the server's preprocess model makes them."""
    return np.stack([preprocess_bytes(data, preprocessing) for _, data in images])


MAX_CALIBRATION = 256
# Min/max calibration takes each activation's range from these images alone: from fewer
# distinct images than the built-in set (8 photos), the ranges miss what most images produce.
MIN_CALIBRATION = 8


def calibration_images(folder: Path | None = None) -> list[tuple[str, bytes]]:
    """The photos that ship with scikit-learn / scikit-image, or (up to 256 of) the user's own,
    of which at least ``MIN_CALIBRATION`` distinct ones."""
    if folder is None:
        return reference_images()
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})", option="calibration")
    images = [(str(p), p.read_bytes()) for p in files[:MAX_CALIBRATION]]
    distinct = len({data for _, data in images})
    if distinct < MIN_CALIBRATION:
        raise ExportError(
            f"{folder} holds {distinct} distinct image(s); int8 calibration needs at least "
            f"{MIN_CALIBRATION} like the ones you will serve (activation ranges from fewer miss "
            "most images); add images, or leave --calibration out to use the built-in photos",
            option="calibration",
        )
    return images


def gate_images(calibration: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Held-out images: the fixed held-out set, plus the reference photos when the user
    calibrated on their own images; never an image that was calibrated on."""
    used = {data for _, data in calibration}
    candidates = held_out_images() + reference_images()
    seen, found = set(), []
    for name, data in candidates:
        if data not in used and data not in seen:
            seen.add(data)
            found.append((name, data))
    return found


def _activation_matmuls(path: Path) -> list[str]:
    """MatMul/Gemm nodes with no constant operand (Q.K^T, attention.V): kept float."""
    import onnx

    graph = onnx.load(str(path)).graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for node in graph.node if node.op_type == "Constant" for o in node.output}
    return [
        node.name
        for node in graph.node
        if node.op_type in QUANTIZED_OPS and not any(i in constants for i in node.input)
    ]


def weight_nodes(path: Path, op_types: tuple[str, ...]) -> list[str]:
    """Nodes of ``op_types`` that multiply by a constant (a weight): what int8 would quantize."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for node in graph.node if node.op_type == "Constant" for o in node.output}
    return [node.name for node in graph.node if node.op_type in op_types and any(i in constants for i in node.input)]


def quantize_image_tower(
    fp32_path: Path,
    out_path: Path,
    input_name: str,
    calibration: np.ndarray,
    settings: QuantizeSettings = QuantizeSettings(),
) -> dict:
    """Write the int8 (QDQ) version of the ONNX image tower at ``fp32_path`` to ``out_path``;
    ``calibration`` is uint8 pixels [N, 3, H, W]. Returns what was done, for the card."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """Preprocessed pixels, one image a step."""

        def __init__(self):
            self.items = iter([{input_name: calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.items, None)

    if len(calibration) == 0:
        raise ValueError("no calibration images")
    with tempfile.TemporaryDirectory(prefix="headmaster-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # onnxruntime's symbolic shape inference asserts on the exported ViT's Reshape nodes
        # (onnxruntime 1.32); ONNX's own shape inference and the graph optimisation still run.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        exclude = _activation_matmuls(prepared) if settings.weights_only else []
        quantize_static(
            str(prepared),
            str(out_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(settings.op_types) if settings.op_types else None,
            calibrate_method=CalibrationMethod[settings.calibrate_method],
            nodes_to_exclude=exclude,
            # Weight MatMuls only; their outputs stay float (int32 accumulators dequantized),
            # which halved the cosine error and ran ~14% faster than re-quantizing them.
            # (MatMulConstBOnly is not honoured by the QDQ quantizer in onnxruntime 1.32, hence
            # nodes_to_exclude for Q.K^T and attention.V.)
            extra_options={
                "MatMulConstBOnly": settings.weights_only,
                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS) if settings.weights_only else [],
            },
        )
    import onnx

    graph = onnx.load(str(out_path), load_external_data=False).graph
    quantized = sum(
        1
        for node in graph.node
        if node.op_type == "DequantizeLinear" and any(node.input[0] == init.name for init in graph.initializer)
    )
    return {
        **settings.describe(),
        "calibration_images": int(len(calibration)),
        "quantized_weights": quantized,
        "float_activation_matmuls": len(exclude),
    }


def _embed(runner, input_name: str, output_name: str, batch: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [runner({input_name: batch[i : i + BATCH]}, [output_name])[0] for i in range(0, len(batch), BATCH)]
    )


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def promotion_gate(
    fp32_path: Path,
    int8_path: Path,
    input_name: str,
    output_name: str,
    images: list[tuple[str, bytes]],
    preprocessing: dict,
    heads: list[ScoringHead] = (),
) -> dict:
    """Measure an int8 tower against its fp32 tower on held-out ``images``; the figures, with
    ``passed`` and ``failures`` (empty when it passed). Raises nothing: see require_passed."""
    batch = pixels(images, preprocessing)
    names = [name for name, _ in images]
    reference = _embed(load_runner(str(fp32_path), device="cpu"), input_name, output_name, batch)
    quantized = _embed(load_runner(str(int8_path), device="cpu"), input_name, output_name, batch)
    cosines = _cosines(quantized, reference)
    worst = int(np.argmin(cosines))
    figures = {
        "images": len(names),
        "mean_cosine": float(cosines.mean()),
        "min_cosine": float(cosines[worst]),
        "worst_image": names[worst],
        "required_min_cosine": MIN_COSINE,
        "required_label_agreement": MIN_AGREEMENT,
        "heads": {},
    }
    failures = []
    if not cosines[worst] >= MIN_COSINE:
        failures.append(
            f"min cosine to fp32 {cosines[worst]:.4f} < {MIN_COSINE} (on {names[worst]}; "
            f"mean {cosines.mean():.4f} over {len(names)} held-out images)"
        )
    for head in heads:
        before = head.accepted_mask(head.scores(reference))
        after = head.accepted_mask(head.scores(quantized))
        same = np.all(before == after, axis=1)
        changed = [names[i] for i in np.flatnonzero(~same)]
        figures["heads"][head.title] = {
            "label_agreement": float(same.mean()),
            "changed": len(changed),
            "changed_examples": changed[:5],
        }
        if not same.mean() >= MIN_AGREEMENT:
            failures.append(
                f"head {head.title}: accepted labels unchanged on {same.mean():.2%} of images "
                f"< {MIN_AGREEMENT:.0%} ({len(changed)} of {len(names)} changed, e.g. {changed[:3]})"
            )
    figures["passed"] = not failures
    figures["failures"] = failures
    LOG.info(
        "int8 gate: cosine mean %.5f min %.5f over %d images; heads %s; %s",
        cosines.mean(),
        cosines[worst],
        len(names),
        {k: v["label_agreement"] for k, v in figures["heads"].items()},
        "passed" if not failures else "FAILED",
    )
    return figures


def require_passed(figures: dict, error: type[Exception], what: str) -> None:
    """Raise ``error`` naming every figure that failed the gate."""
    if not figures["passed"]:
        raise error(
            f"{what}: the int8 image tower fails the promotion gate, so it is refused and nothing "
            f"was written: {'; '.join(figures['failures'])}. Calibrate on more images like yours "
            "(--calibration DIR), or stay with fp32"
        )
