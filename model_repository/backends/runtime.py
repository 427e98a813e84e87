"""Triton python-backend model that runs an exported artifact: ONNX (onnxruntime) or TorchScript.

The *portable* repository flavour uses it where NVIDIA's container would use the native
``onnxruntime_onnx`` / ``pytorch_libtorch`` backends, so the very same files are served by
the Triton that ships in the nvidia-pytriton wheel. Copied as ``model.py`` next to the
artifact; self-contained on purpose.

Dynamic batching hands ``execute`` several requests at once: their inputs are concatenated,
run in one call and split back, one response per request.
"""

from __future__ import annotations

import json
import os

import numpy as np


class OnnxRunner:
    def __init__(self, path: str, device: str, threads: int, optimization: str):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # fp16 graphs crash onnxruntime's CPU layout optimisations (level 99, seen with
        # onnxruntime 1.32): the exporter records 'extended' for them.
        options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        }[optimization]
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            wanted.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise RuntimeError(f"device=cuda asked, but onnxruntime offers only {available}")
        self.session = ort.InferenceSession(path, options, providers=wanted)

    def __call__(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.session.run(outputs, inputs)


class TorchScriptRunner:
    def __init__(self, path: str, device: str, threads: int, optimization: str):
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if device == "cuda" and not use_cuda:
            raise RuntimeError("device=cuda asked, but torch sees no CUDA device")
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.module = torch.jit.load(path, map_location=self.device).eval()

    def __call__(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(a).to(self.device) for a in inputs.values()]
            result = self.module(*args)
        result = result if isinstance(result, (tuple, list)) else (result,)
        return [r.float().cpu().numpy() if r.is_floating_point() else r.cpu().numpy() for r in result]


RUNNERS = {".onnx": OnnxRunner, ".pt": TorchScriptRunner}


def load_runner(path: str, device: str = "auto", threads: int = 0, optimization: str = "all"):
    extension = os.path.splitext(path)[1]
    if extension not in RUNNERS:
        raise ValueError(f"no runner for {path}: expected one of {sorted(RUNNERS)}")
    return RUNNERS[extension](path, device, threads, optimization)


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.runner = load_runner(
            os.path.join(version_dir, params["artifact"]),
            device=params.get("device", "auto"),
            threads=int(params.get("threads", "0")),
            optimization=params.get("graph_optimization", "all"),
        )
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests):
        pb = self.pb
        per_request = [
            {name: pb.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs}
            for r in requests
        ]
        sizes = [len(next(iter(inputs.values()))) for inputs in per_request]
        batch = {name: np.concatenate([inputs[name] for inputs in per_request]) for name in self.inputs}
        try:
            results = self.runner(batch, self.outputs)
        except Exception as e:  # a failed batch answers every request with the reason
            error = pb.TritonError(f"{type(e).__name__}: {e}")
            return [pb.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [pb.Tensor(name, np.ascontiguousarray(result[start:start + size]))
                       for name, result in zip(self.outputs, results)]
            responses.append(pb.InferenceResponse(tensors))
            start += size
        return responses
