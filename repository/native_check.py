"""Check each model's config.pbtxt against the model file it serves, as Triton's backends do.

Triton's native backends compare a config with the model file only when they load it, in
the server: a head whose config says ``SCORES [-1]`` while its ``model.onnx`` says
``[batch, 3]`` is refused by the onnxruntime backend, and the ``classify`` ensemble with it.
This module makes the same comparisons without a server, so ``consistency.check`` and
``headmaster repo check`` name the problem before anything is served.

What is compared, per platform:

- ``onnxruntime_onnx``: what ``ModelInstanceState::ValidateInputs`` / ``ValidateOutputs``
  (src/onnxruntime.cc) and ``CompareDimsSupported`` (src/onnxruntime_utils.cc) of
  triton-inference-server/onnxruntime_backend r24.10 (Triton 2.51) check: the number of
  inputs (optional ones not counted), every config name is a model input (or overridable
  initializer) / output, the data types are equal, no optional input when
  ``max_batch_size > 0``, and the dims: with ``max_batch_size > 0`` the model's first dim
  must be dynamic (-1) and the config's dims follow it; an input's dims must equal the
  model's where the model's dim is fixed, an output's dims must equal the model's exactly
  (-1 only where the model's dim is dynamic); a scalar (rank 0) model tensor takes only 1s.
  ``reshape`` replaces ``dims`` where given, as in the backend.
- ``pytorch_libtorch``: what src/libtorch.cc (pytorch_backend r24.10) checks from the
  TorchScript file: ``forward``'s arguments (besides ``self``) are all tensors (or one
  ``Dict``), as many as the config's inputs; inputs are named after those arguments or
  ``NAME__N``; outputs ``NAME__N`` with N below the number of tensors ``forward`` returns;
  the data types are ones the backend maps to torch types. Shapes cannot be checked:
  TorchScript records no tensor shapes, the backend compares none either, and a wrong dim
  only shows when a request runs.
- ``tensorrt_plan``: not checked here; reading an engine needs TensorRT and the GPU it was
  built for.
- python-backend models: their version folder has ``model.py``; the portable runner of an
  encoder or head (an ``artifact`` parameter) gets the same comparison as its native
  counterpart, since both flavours come from one description and read the same file.
- ensembles: every step names a model of the repository and tensors its config has.

Each problem is one line: ``<model> v<version>: <what>``.
"""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from headmaster.errors import ConfigError
from headmaster.repository.layout import config_path, version_dir

# onnxruntime's tensor types -> Triton config data types (onnxruntime_utils.cc
# ConvertFromOnnxDataType / ModelConfigDataTypeToOnnxDataType); types absent here
# (bfloat16, complex, float8, ...) are refused by the backend.
ONNX_TO_TRITON = {
    "float": "TYPE_FP32",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "uint16": "TYPE_UINT16",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "string": "TYPE_STRING",
    "bool": "TYPE_BOOL",
    "float16": "TYPE_FP16",
    "double": "TYPE_FP64",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
}
# Config data types the PyTorch backend maps to a torch dtype (libtorch_utils.cc), plus strings.
TORCH_TYPES = {
    "TYPE_BOOL",
    "TYPE_UINT8",
    "TYPE_INT8",
    "TYPE_INT16",
    "TYPE_INT32",
    "TYPE_INT64",
    "TYPE_FP16",
    "TYPE_FP32",
    "TYPE_FP64",
    "TYPE_STRING",
}


def _dtype(value: int) -> str:
    return mc.DataType.Name(value)


def _shape(dims) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def _config_dims(tensor) -> list[int]:
    return list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)


# -- ONNX ----------------------------------------------------------------------------------
def _ort_tensor(arg) -> tuple[str | None, list[int]]:
    """(Triton data type or None, dims as the backend sees them: -1 where not fixed)."""
    kind = arg.type
    dtype = ONNX_TO_TRITON.get(kind[len("tensor(") : -1]) if kind.startswith("tensor(") else None
    return dtype, [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]


def onnx_signature(path: Path) -> tuple[dict, dict, dict]:
    """(inputs, overridable initializers, outputs) of an ONNX file: name -> (dtype, dims).

    Read through an onnxruntime session, like the backend's: onnxruntime's own shape
    inference fixes dims that the file leaves symbolic (an exported encoder declares
    ``[batch, EMBEDDING_dim_1]`` and onnxruntime reports ``[-1, 384]``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return (
        {a.name: _ort_tensor(a) for a in session.get_inputs()},
        {a.name: _ort_tensor(a) for a in session.get_overridable_initializers()},
        {a.name: _ort_tensor(a) for a in session.get_outputs()},
    )


def _compare_dims(model_dims: list[int], dims: list[int], max_batch_size: int, exact: bool) -> str | None:
    """CompareDimsSupported, returning the backend's reason or None."""
    if not model_dims:  # a scalar model tensor: the config may only say 1s
        return (
            None
            if all(d == 1 for d in dims)
            else f"the model's tensor is a scalar, so the config may only give 1s, not {_shape(dims)}"
        )
    if max_batch_size > 0:
        if model_dims[0] != -1:
            return (
                f"max_batch_size > 0 needs the model's first dim dynamic (-1), but the model has {_shape(model_dims)}"
            )
        dims = [-1, *dims]
    same = len(model_dims) == len(dims) and all(m == d for m, d in zip(model_dims, dims) if exact or m != -1)
    if same:
        return None
    batch = " (batch dim + config dims)" if max_batch_size > 0 else ""
    return f"config shape {_shape(dims)}{batch} but the model has {_shape(model_dims)}"


def onnx_problems(config: mc.ModelConfig, path: Path) -> list[str]:
    """The config against an ONNX file, as onnxruntime_backend r24.10 compares them at load."""
    try:
        inputs, overridable, outputs = onnx_signature(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the problem to report
        return [f"{path.name} is not a readable ONNX file: {type(e).__name__}: {e}"]
    problems = []
    expected = sum(1 for t in config.input if not t.optional)
    if len(inputs) != expected:
        problems.append(
            f"config expects {expected} inputs, {path.name} provides {len(inputs)} "
            f"({', '.join(sorted(inputs)) or 'none'})"
        )
    known_inputs = {**inputs, **overridable}
    for kind, tensors, known, exact in (
        ("input", config.input, known_inputs, False),
        ("output", config.output, outputs, True),
    ):
        for t in tensors:
            where = f"{kind} '{t.name}'"
            if kind == "input" and t.optional and config.max_batch_size != 0:
                problems.append(f"{where}: optional inputs are not supported when max_batch_size > 0")
            if t.name not in known:
                problems.append(
                    f"{where} is not in {path.name}, whose {kind}s are {', '.join(sorted(known)) or 'none'}"
                )
                continue
            model_type, model_dims = known[t.name]
            if model_type is None:
                problems.append(f"{where}: {path.name} gives a type the onnxruntime backend does not support")
                continue
            if _dtype(t.data_type) != model_type:
                problems.append(f"{where}: config data type {_dtype(t.data_type)} but {path.name} has {model_type}")
            reason = _compare_dims(model_dims, _config_dims(t), config.max_batch_size, exact)
            if reason:
                problems.append(f"{where}: {reason}")
    return problems


# -- TorchScript -------------------------------------------------------------------------
def torchscript_signature(path: Path) -> tuple[list[tuple[str, str]], int]:
    """([(argument name, type kind)] of forward besides self, number of tensors it returns)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch.jit is deprecated, and still what the backend loads
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    schema = module.forward.schema
    arguments = [(a.name, a.type.kind()) for a in schema.arguments]
    if arguments and arguments[0][1] == "ClassType":
        arguments = arguments[1:]
    returns = schema.returns[0].type if schema.returns else None
    count = len(returns.elements()) if returns is not None and returns.kind() == "TupleType" else 1
    return arguments, count


def _named_index(name: str) -> int | None:
    head, sep, index = name.partition("__")
    return int(index) if sep and index.isdigit() else None


def torchscript_problems(config: mc.ModelConfig, path: Path) -> list[str]:
    """The config against a TorchScript file, as pytorch_backend r24.10 compares them at load.
    Shapes are not compared: TorchScript keeps none (neither does the backend)."""
    try:
        arguments, returned = torchscript_signature(path)
    except Exception as e:  # noqa: BLE001
        return [f"{path.name} is not a loadable TorchScript file: {type(e).__name__}: {e}"]
    problems = []
    names = [n for n, _ in arguments]
    kinds = [k for _, k in arguments]
    is_dict = len(arguments) == 1 and kinds[0] == "DictType"
    if not is_dict:
        bad = [f"{n} ({k})" for n, k in arguments if k not in ("TensorType", "ListType")]
        if bad:
            problems.append(
                f"forward takes {', '.join(bad)}; the PyTorch backend takes tensors or one Dict(str, Tensor)"
            )
        expected = sum(1 for t in config.input if not t.optional)
        if len(arguments) != expected:
            problems.append(
                f"config expects {expected} inputs, forward in {path.name} takes {len(arguments)} "
                f"({', '.join(names) or 'none'})"
            )
        config_names = [t.name for t in config.input]
        if not all(n in names for n in config_names):
            indices = [_named_index(n) for n in config_names]
            if all(i is not None for i in indices):
                out_of_range = [n for n, i in zip(config_names, indices) if i >= len(arguments)]
                if out_of_range or len(set(indices)) != len(indices):
                    problems.append(
                        f"inputs {', '.join(config_names)}: NAME__N indices must be distinct and below "
                        f"forward's {len(arguments)} arguments ({', '.join(names)})"
                    )
            # else: neither argument names nor NAME__N: the backend feeds inputs in config order.
    for t in [*config.input, *config.output]:
        if _dtype(t.data_type) not in TORCH_TYPES:
            problems.append(f"'{t.name}': data type {_dtype(t.data_type)} has no torch type in the PyTorch backend")
    output_names = [t.name for t in config.output]
    indices = [_named_index(n) for n in output_names]
    if all(i is not None for i in indices):
        bad = [n for n, i in zip(output_names, indices) if i >= returned]
        if bad or len(set(indices)) != len(indices):
            problems.append(
                f"outputs {', '.join(output_names)}: NAME__N indices must be distinct and below the "
                f"{returned} tensor(s) forward returns"
            )
    elif len(output_names) > returned:  # config order decides which tensor each output is
        problems.append(f"config has {len(output_names)} outputs in config order, forward returns {returned}")
    return problems


# -- repository ----------------------------------------------------------------------------
def served_versions(config: mc.ModelConfig, folder: Path) -> list[int]:
    """The version folders Triton loads under the config's version_policy."""
    on_disk = (
        sorted(int(p.name) for p in Path(folder).iterdir() if p.is_dir() and p.name.isdigit())
        if Path(folder).is_dir()
        else []
    )
    policy = config.version_policy
    if policy.HasField("specific"):
        return [v for v in on_disk if v in set(policy.specific.versions)]
    if policy.HasField("all"):
        return on_disk
    latest = policy.latest.num_versions if policy.HasField("latest") else 1
    return on_disk[-latest:] if latest else []


def _artifact_check(config: mc.ModelConfig, file: Path) -> list[str]:
    if not file.is_file():
        return [f"{file.name} is missing"]
    if file.suffix == ".onnx":
        return onnx_problems(config, file)
    if file.suffix == ".pt":
        return torchscript_problems(config, file)
    return []  # a TensorRT plan: needs TensorRT to read


NATIVE_FILES = {"onnxruntime_onnx": "model.onnx", "pytorch_libtorch": "model.pt", "tensorrt_plan": "model.plan"}


def version_problems(config: mc.ModelConfig, version_dir: Path) -> list[str]:
    """One model version against its config (whatever the version policy says)."""
    version_dir = Path(version_dir)
    if config.platform in NATIVE_FILES:
        return _artifact_check(config, version_dir / (config.default_model_filename or NATIVE_FILES[config.platform]))
    if config.backend == "python":
        problems = [] if (version_dir / "model.py").is_file() else ["model.py is missing (python backend)"]
        artifact = config.parameters["artifact"].string_value if "artifact" in config.parameters else ""
        return problems + (_artifact_check(config, version_dir / artifact) if artifact else [])
    return []


def _ensemble_problems(config: mc.ModelConfig, configs: dict[str, mc.ModelConfig]) -> list[str]:
    problems = []
    for step in config.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"step {step.model_name} is not a model of this repository")
            continue
        for kind, mapping, tensors in (
            ("input", step.input_map, model.input),
            ("output", step.output_map, model.output),
        ):
            missing = sorted(set(mapping) - {t.name for t in tensors})
            if missing:
                problems.append(f"step {step.model_name}: {kind}s {', '.join(missing)} are not in its config")
    return problems


def check_repository(repository) -> list[str]:
    """Every served model and version of a repository (a ``Repository`` or its path) against
    its files; one line per problem, empty when Triton's backends would accept them all."""
    from headmaster.repository.config import parse
    from headmaster.repository.repo import Repository

    repository = repository if isinstance(repository, Repository) else Repository(Path(repository))
    configs: dict[str, mc.ModelConfig] = {}
    problems = []
    for name in repository.model_names():
        path = config_path(repository.path, name)
        try:
            configs[name] = parse(path.read_text())
        except (OSError, ConfigError) as e:
            problems.append(f"{name}: {path} cannot be read: {e}")
    for name, config in configs.items():
        if config.platform == "ensemble":
            problems += [f"{name}: {p}" for p in _ensemble_problems(config, configs)]
            continue
        served = served_versions(config, repository.path / name)
        if not served:
            problems.append(f"{name}: its version policy selects no version folder on disk")
        for version in served:
            problems += [
                f"{name} v{version}: {p}" for p in version_problems(config, version_dir(repository.path, name, version))
            ]
    return problems
