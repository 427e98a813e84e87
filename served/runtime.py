"""Triton python-backend model that runs an exported artifact: ONNX (onnxruntime) or TorchScript.

The *portable* repository flavour uses it where NVIDIA's container would use the native
``onnxruntime_onnx`` / ``pytorch_libtorch`` backends, so the very same files are served by
the Triton that ships in the nvidia-pytriton wheel. Copied as ``model.py`` next to the
artifact; self-contained on purpose.

Dynamic batching hands ``execute`` several requests at once: their inputs are concatenated,
run in one call and split back, one response per request.

On a GPU (``device`` cuda, instances ``KIND_GPU``), inputs that an earlier model left on the
GPU (the torchvision decoder in preprocess) arrive as GPU tensors (``FORCE_CPU_ONLY_INPUT_TENSORS``
"no") and reach the encoder through DLPack without a host round trip: TorchScript takes them
as torch tensors, onnxruntime's CUDA provider through I/O binding.
"""

from __future__ import annotations

import json
import os

import numpy as np

# The cache class is shared with preprocess (served/cache.py). layout.copy_backend copies it beside
# this model.py as ``headmaster_cache.py``, imported from there in Triton (why a copy, and why that
# name: the rule kernel's import at the top of served/threshold.py); imported as part of the
# package (tests, benchmarks), the package's.
try:
    import headmaster_cache as cache  # the copy beside model.py, in Triton
except ImportError:
    from headmaster.served import cache


def _cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def session_options(ort, threads: int, optimization: str, spinning: bool = False):
    """The onnxruntime session options every runner uses (``spinning``: only for the benchmark
    that measured why it is off)."""
    options = ort.SessionOptions()
    # Chosen, and said here rather than left to defaults: one model runs one batch at a time
    # (sequential, one inter-op thread); intra-op threads: 0 = one per physical core for an
    # encoder (it is the work), 1 for a head (tiny matrices; more threads only contend). The
    # CPU arena stays on: it keeps the activation buffers of the largest batch seen and reuses
    # them (off, every batch allocates again); with warm-up at load, that size is reached
    # before the server says ready, not under the first client's requests.
    options.intra_op_num_threads = threads
    # The intra-op threads sleep between operators instead of spinning: on CPU the encoder
    # shares its cores with preprocess's decode threads, the heads and Triton itself, and a
    # spinning thread burns the time they need. benchmarks/encoder_ceiling.py measured the
    # encoder alone (fp32 ViT-B/32, batch 8, 2 threads) on the shared 2-core machine at 7.7
    # img/s without spinning against 5.7 with it at load ~13, and 37.3 against 33.3 at load
    # ~2: no worse when quiet (benchmarks/RESULTS.md, 2026-12-07).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = True
    # fp16 graphs crash onnxruntime's CPU layout optimisations (level 99, seen with
    # onnxruntime 1.32): the exporter records 'extended' for them.
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[optimization]
    return options


class OnnxRunner:
    def __init__(self, path: str, device: str, threads: int, optimization: str):
        import onnxruntime as ort

        self.ort = ort

        options = session_options(ort, threads, optimization)
        available = ort.get_available_providers()
        wanted: list = ["CPUExecutionProvider"]
        self.cuda = device in ("auto", "cuda") or device.startswith("cuda:")
        self.cuda = self.cuda and "CUDAExecutionProvider" in available
        if self.cuda:
            self.device_id = _cuda_index(device)
            wanted.insert(0, ("CUDAExecutionProvider", {"device_id": self.device_id}))
        elif device.startswith("cuda"):
            raise RuntimeError(f"device={device} asked, but onnxruntime offers only {available}")
        self.session = ort.InferenceSession(path, options, providers=wanted)

    def __call__(self, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        if not any(hasattr(v, "__dlpack__") and not isinstance(v, np.ndarray) for v in inputs.values()):
            return self.session.run(outputs, inputs)
        # torch tensors (from DLPack): bound where they lie, no copy to the host first.
        binding = self.session.io_binding()
        for name, tensor in inputs.items():
            tensor = tensor.contiguous()
            on_gpu = tensor.device.type == "cuda"
            binding.bind_input(
                name,
                "cuda" if on_gpu else "cpu",
                tensor.device.index or 0 if on_gpu else 0,
                _NUMPY_OF[str(tensor.dtype)],
                list(tensor.shape),
                tensor.data_ptr(),
            )
        for name in outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


_NUMPY_OF = {
    "torch.uint8": np.uint8,
    "torch.float32": np.float32,
    "torch.float16": np.float16,
    "torch.int64": np.int64,
    "torch.int32": np.int32,
}


class TorchScriptRunner:
    def __init__(self, path: str, device: str, threads: int, optimization: str):
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        use_cuda = (device in ("auto", "cuda") or device.startswith("cuda:")) and torch.cuda.is_available()
        if device.startswith("cuda") and not use_cuda:
            raise RuntimeError(f"device={device} asked, but torch sees no CUDA device")
        self.device = torch.device(f"cuda:{_cuda_index(device)}" if use_cuda else "cpu")
        self.module = torch.jit.load(path, map_location=self.device).eval()

    def __call__(self, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            args = [
                (a if isinstance(a, torch.Tensor) else torch.from_numpy(a)).to(self.device) for a in inputs.values()
            ]
            result = self.module(*args)
        result = result if isinstance(result, (tuple, list)) else (result,)
        return [r.float().cpu().numpy() if r.is_floating_point() else r.cpu().numpy() for r in result]


RUNNERS = {".onnx": OnnxRunner, ".pt": TorchScriptRunner}


def load_runner(path: str, device: str = "auto", threads: int = 0, optimization: str = "all"):
    extension = os.path.splitext(path)[1]
    if extension not in RUNNERS:
        raise ValueError(f"no runner for {path}: expected one of {sorted(RUNNERS)}")
    return RUNNERS[extension](path, device, threads, optimization)


def _concatenate(parts: list):
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    import torch

    device = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.cat([p if isinstance(p, torch.Tensor) else torch.from_numpy(p).to(device) for p in parts])


# -- the embedding cache -------------------------------------------------------------------
# Repeated images cost what new ones do unless the encoder remembers them. Each row of the
# encoder's input (the pixels preprocess made from one image, by this encoder's own
# preprocessing) is keyed by the sha256 of its bytes: content, never a name, so an answer is only
# ever the one computed for exactly these pixels. The cache lives in the model instance, so an
# encoder that is reloaded (a new export, int8 promotion) starts empty and never answers with
# the old tower; what follows the encoder (heads, thresholds) always runs live, so a head's new
# version answers even for a cached image. Bounded in bytes (least recently used first out).
# Series: headmaster_embedding_cache_* (cache.EMBEDDING_PREFIX).


def run_cached(runner, store: cache.ContentCache, batch: dict, outputs: list[str]) -> tuple[list[np.ndarray], int, int]:
    """The runner's outputs for ``batch`` (one input), running only the rows the cache lacks;
    returns the outputs, the hits and the misses."""
    ((name, rows),) = batch.items()

    def run(missing: list[int]) -> list[tuple[np.ndarray, ...]]:
        computed = runner({name: rows[missing] if len(missing) < len(rows) else rows}, outputs)
        return [tuple(result[j] for result in computed) for j in range(len(missing))]

    found, made = store.lookup([store.key(row) for row in rows], run)
    results = [np.stack([f[k] for f in found]) for k in range(len(outputs))]
    return results, len(rows) - made, made


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        device = params.get("device", "auto")
        if args.get("model_instance_kind") == "GPU":  # Triton placed this instance on one GPU
            device = f"cuda:{args['model_instance_device_id']}"
        self.runner = load_runner(
            os.path.join(version_dir, params["artifact"]),
            device=device,
            threads=int(params.get("threads", "0")),
            optimization=params.get("graph_optimization", "all"),
        )
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        # One input only (an image tower): the key is that row's bytes.
        cache_bytes = int(params.get("cache_bytes", "0") or 0) if len(self.inputs) == 1 else 0
        self.cache, self.cache_metrics = cache.open_cache(
            pb_utils, config, cache_bytes, cache.EMBEDDING_PREFIX, "embeddings"
        )

    def _input(self, request, name):
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor.is_cpu():
            return tensor.as_numpy()
        import torch.utils.dlpack

        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())  # stays on its GPU

    def execute(self, requests):
        pb = self.pb
        per_request = [{name: self._input(r, name) for name in self.inputs} for r in requests]
        sizes = [len(next(iter(inputs.values()))) for inputs in per_request]
        batch = {name: _concatenate([inputs[name] for inputs in per_request]) for name in self.inputs}
        try:
            if self.cache is not None and all(isinstance(v, np.ndarray) for v in batch.values()):
                results, hits, misses = run_cached(self.runner, self.cache, batch, self.outputs)
                if self.cache_metrics is not None:
                    self.cache_metrics.record(hits, misses, self.cache)
            else:  # no cache, or inputs left on a GPU (hashing them would copy them to the host)
                results = self.runner(batch, self.outputs)
        except Exception as e:  # a failed batch answers every request with the reason
            error = pb.TritonError(f"{type(e).__name__}: {e}")
            return [pb.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb.Tensor(name, np.ascontiguousarray(result[start : start + size]))
                for name, result in zip(self.outputs, results)
            ]
            responses.append(pb.InferenceResponse(tensors))
            start += size
        return responses
