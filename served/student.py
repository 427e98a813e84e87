"""Triton python-backend model: a distilled student (``headmaster distill``), image bytes -> SCORES + RESULT.

A student is a small timm network trained to reproduce one head's scores (encoder + head) from
the image alone; it is served as its own model, beside the encoder and the heads, with its own
preprocessing (timm's data config: resize the shorter side to size / crop_pct, centre crop,
normalise). It answers like the head it learned from: RESULT is one JSON per image with the
labels its teacher's thresholds accept. Copied as ``model.py`` next to ``model.onnx`` and
``student.json``, with the rule kernel beside it (``headmaster_rules.py``, as threshold's); needs
numpy, Pillow and onnxruntime. A bad image gets its request refused (INVALID_ARG) without failing
the batch.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

# The teacher's threshold rule is the served threshold model's own kernel (rules/threshold.py),
# copied beside this model.py as threshold's is (see the import in served/threshold.py for why).
try:
    import headmaster_rules as kernel  # the copy beside model.py, in Triton
except ImportError:
    from headmaster.rules import threshold as kernel  # imported as part of the package

STUDENT_FILE = "student.json"


def preprocess(data: bytes, config: dict) -> np.ndarray:
    """Encoded image -> float32 [3, H, W], as timm's eval transform does it."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (config["size"] * 2, config["size"] * 2))  # JPEGs decode at a reduced scale when large
    image = image.convert("RGB")
    size = config["size"]
    scale = int(size / config["crop_pct"])
    w, h = image.size
    if w <= h:
        new = (scale, max(1, round(h * scale / w)))
    else:
        new = (max(1, round(w * scale / h)), scale)
    resample = Image.Resampling.BICUBIC if config["interpolation"] == "bicubic" else Image.Resampling.BILINEAR
    image = image.resize(new, resample)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, np.float32) / 255.0
    pixels = (pixels - np.asarray(config["mean"], np.float32)) / np.asarray(config["std"], np.float32)
    return pixels.transpose(2, 0, 1)


def accepted(scores: np.ndarray, labels: list[str], thresholds: list[float], multi_label: bool) -> list[list[str]]:
    """The teacher head's labels for each row: the kernel's rule (a flat head, no OOD: distill
    refuses other tasks)."""
    return kernel.accept(scores, {"labels": labels, "thresholds": thresholds, "multi_label": multi_label})


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        folder = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(folder, STUDENT_FILE)) as f:
            self.card = json.load(f)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"]
        )

    def _answer(self, request):
        pb = self.pb
        images = pb.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        pixels = []
        for i, data in enumerate(images):
            try:
                pixels.append(preprocess(bytes(data), self.card["preprocessing"]))
            except Exception as e:
                return pb.InferenceResponse(
                    error=pb.TritonError(f"IMAGE[{i}]: cannot decode: {e}", pb.TritonError.INVALID_ARG)
                )
        scores = self.session.run(["SCORES"], {"PIXELS": np.stack(pixels)})[0].astype(np.float32)
        card = self.card
        labels = accepted(scores, card["labels"], card["thresholds"], card["multi_label"])
        docs = [
            json.dumps(
                {
                    "student": card["name"],
                    "teacher": card["teacher"],
                    "labels": accepted_labels,
                    "scores": dict(zip(card["labels"], map(float, row))),
                },
                separators=(",", ":"),
            )
            for accepted_labels, row in zip(labels, scores)
        ]
        return pb.InferenceResponse(
            [pb.Tensor("SCORES", scores), pb.Tensor("RESULT", np.array([[d] for d in docs], dtype=object))]
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._answer(request))
            except Exception as e:  # one malformed request must not fail the others
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(f"{type(e).__name__}: {e}")))
        return responses
