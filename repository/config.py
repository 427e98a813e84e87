"""One typed description per kind of Triton model, rendered to config.pbtxt by one function.

Each kind is a frozen dataclass, validated on construction, whose ``config(flavour)``
returns the ``ModelConfig`` message in its JSON form. :func:`render` is the only place that
turns a description into config.pbtxt text: it parses that JSON into Triton's own protobuf
(``tritonclient.grpc.model_config_pb2``, so a misspelt field or a wrong type fails here,
not inside the server), checks what the protobuf cannot, and prints it with text_format.

Two flavours come from the same description:
- ``native``: the platforms of NVIDIA's Triton container (``onnxruntime_onnx``,
  ``tensorrt_plan``, ``pytorch_libtorch``) for the encoders and heads, on GPU.
- ``portable``: the same artifacts run by python-backend models (``served/runtime.py``),
  for the Triton that ships in the nvidia-pytriton wheel, which has no other backend.
Preprocessing, tokenising and thresholds are python-backend models in both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from headmaster.errors import ConfigError

FLAVOURS = ("portable", "native")
DTYPES = ("BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "BYTES")
NATIVE_PLATFORMS = {"onnx": "onnxruntime_onnx", "plan": "tensorrt_plan", "torchscript": "pytorch_libtorch"}
ARTIFACT_FILES = {"onnx": "model.onnx", "plan": "model.plan", "torchscript": "model.pt"}


def _check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ConfigError(f"flavour must be one of {', '.join(FLAVOURS)}, not {flavour!r}")


@dataclass(frozen=True)
class Tensor:
    """An input or output (``ModelInput`` / ``ModelOutput``); dims exclude the batch axis."""

    name: str
    dtype: str  # Triton dtype without TYPE_; BYTES renders as TYPE_STRING
    dims: tuple[int, ...]  # -1 for a variable axis
    optional: bool = False  # ModelInput.optional: the request (or ensemble) may leave it out

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a tensor needs a name")
        if self.dtype not in DTYPES:
            raise ConfigError(f"tensor {self.name}: dtype must be one of {DTYPES}, not {self.dtype!r}")
        if not self.dims or any(d == 0 or d < -1 for d in self.dims):
            raise ConfigError(f"tensor {self.name}: dims must be positive or -1, got {self.dims}")

    def proto(self, is_input: bool) -> dict:
        d: dict[str, object] = {
            "name": self.name,
            "data_type": "TYPE_STRING" if self.dtype == "BYTES" else f"TYPE_{self.dtype}",
            "dims": [str(x) for x in self.dims],
        }
        if is_input and self.optional:
            d["optional"] = True
        return d


@dataclass(frozen=True)
class Batching:
    """``max_batch_size`` and ``dynamic_batching`` (``ModelDynamicBatching``)."""

    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = ()  # the batcher waits for one of these sizes...
    max_queue_delay_us: int = 0  # ...at most this long before sending what it has

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        bad = [s for s in self.preferred_batch_sizes if not 1 <= s <= self.max_batch_size]
        if bad:
            raise ConfigError(f"preferred_batch_sizes {bad} are not within 1..max_batch_size={self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")

    def proto(self) -> dict:
        d: dict = {}
        if self.preferred_batch_sizes:
            d["preferred_batch_size"] = list(self.preferred_batch_sizes)
        if self.max_queue_delay_us:
            d["max_queue_delay_microseconds"] = str(self.max_queue_delay_us)
        return {"max_batch_size": self.max_batch_size, "dynamic_batching": d}


@dataclass(frozen=True)
class Instances:
    """``instance_group``: how many copies of the model run, and where."""

    count: int = 1
    gpu: bool = False  # KIND_GPU in the native flavour (count instances on every GPU)...
    python_gpu: bool = False  # ...and for python models too (the portable encoder, GPU decode)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"instance count must be >= 1, got {self.count}")

    def proto(self, flavour: str) -> list[dict]:
        kind = "KIND_GPU" if self.gpu and (flavour == "native" or self.python_gpu) else "KIND_CPU"
        return [{"count": self.count, "kind": kind}]


def _params(**values) -> dict:
    return {k: {"string_value": str(v)} for k, v in values.items()}


def warmup(inputs, batch_sizes: tuple[int, ...] = (1,)) -> list[dict]:
    """``model_warmup`` (``ModelWarmup``): Triton runs these requests on every instance while the
    model loads, so it reports ready only once onnxruntime has allocated its arena and picked its
    kernels (the first real requests otherwise pay for that: up to 2.7x the steady latency).
    Only for inputs Triton can invent: fixed dims and numbers (BYTES images and texts are warmed
    by the server's own requests, ``server/warmup.py``). Integers are zeros (a valid
    token id), floats random. Not for ensembles (Triton refuses it there)."""
    if any(t.dtype == "BYTES" or -1 in t.dims for t in inputs if not t.optional):
        return []
    entries = []
    for size in dict.fromkeys(batch_sizes):
        fill = {
            t.name: {
                "data_type": f"TYPE_{t.dtype}",
                "dims": [str(d) for d in t.dims],
                **({"random_data": True} if t.dtype.startswith("FP") else {"zero_data": True}),
            }
            for t in inputs
            if not t.optional
        }
        entries.append({"name": f"warmup_batch_{size}", "batch_size": size, "inputs": fill, "count": 1})
    return entries


def _base(name: str, batching: Batching, inputs, outputs, flavour: str, instances: Instances) -> dict:
    return {
        "name": name,
        **batching.proto(),
        "input": [t.proto(True) for t in inputs],
        "output": [t.proto(False) for t in outputs],
        "instance_group": instances.proto(flavour),
    }


class ModelDescription(Protocol):
    name: str

    def config(self, flavour: str) -> dict: ...


@dataclass(frozen=True)
class PreprocessModel:
    """Encoded image bytes -> uint8 pixels, by the encoder's own preprocessing."""

    preprocessing: dict  # the encoder card's preprocessing
    batching: Batching = Batching(64, (), 0)
    instances: Instances = Instances(1)
    threads: int = 0  # images decoded at once per instance (decode_concurrency); 0 = one per CPU core
    name: str = "preprocess"
    # Bounds on the work one image or request may cause (served/preprocess.py); 0 = its default.
    max_pixels: int = 0  # pixels decoded at full size (larger JPEGs decode at 1/2..1/8)
    max_aspect_ratio: float = 0  # longest side / shortest side
    max_request_bytes: int = 0  # encoded bytes of all the images of one request
    exact_decode: bool = False  # large JPEGs at full size (open_clip's exact pixels) instead of reduced
    decoder: str = "pillow"  # pillow | torchvision (batched; nvJPEG when the instances are on a GPU)
    # Bytes of decoded pixels kept by sha256 of an image's bytes (served/preprocess.py); 0 = none.
    # Pillow's path only: with decoder torchvision it is not rendered (that path keeps no cache).
    cache_bytes: int = 0

    def __post_init__(self) -> None:
        if min(self.threads, self.max_pixels, self.max_aspect_ratio, self.max_request_bytes) < 0:
            raise ConfigError("preprocess limits must be >= 0 (0 = the default)")
        if self.cache_bytes < 0:
            raise ConfigError(f"preprocess: cache_bytes must be >= 0, got {self.cache_bytes}")
        if self.decoder not in ("pillow", "torchvision"):
            raise ConfigError(f"decoder must be pillow or torchvision, not {self.decoder!r}", option="decoder")
        if self.instances.gpu and self.decoder != "torchvision":
            raise ConfigError(
                "preprocess runs on a GPU only with decoder torchvision (Pillow decodes on CPU)", option="decoder"
            )
        if 0 < self.max_aspect_ratio < 1:
            raise ConfigError(f"max_aspect_ratio is longest/shortest side, so >= 1, not {self.max_aspect_ratio}")

    @property
    def output(self) -> Tensor:
        return Tensor("PIXELS", "UINT8", (3, *self.preprocessing["size"]))

    def config(self, flavour: str) -> dict:
        _check_flavour(flavour)
        instances = Instances(self.instances.count, self.instances.gpu, python_gpu=self.instances.gpu)
        return {
            **_base(self.name, self.batching, [Tensor("IMAGE", "BYTES", (1,))], [self.output], flavour, instances),
            "backend": "python",
            "parameters": _params(
                preprocessing=json.dumps(self.preprocessing),
                decode_concurrency=self.threads,
                **({"decoder": self.decoder} if self.decoder != "pillow" else {}),
                **{
                    k: v
                    for k, v in (
                        ("max_pixels", self.max_pixels),
                        ("max_aspect_ratio", self.max_aspect_ratio),
                        ("max_request_bytes", self.max_request_bytes),
                        ("exact_decode", "true" if self.exact_decode else ""),
                        ("cache_bytes", self.cache_bytes if self.decoder == "pillow" else 0),
                    )
                    if v
                },
            ),
        }


@dataclass(frozen=True)
class EncoderModel:
    """An exported tower (image or text) in onnx, plan or torchscript format."""

    name: str  # image_encoder | text_encoder
    format: str  # onnx | plan | torchscript
    input: Tensor
    output: Tensor
    batching: Batching = Batching(64, (8, 16, 32), 2000)
    instances: Instances = Instances(1, gpu=True)
    graph_optimization: str = "all"  # onnxruntime level for the portable runner
    device: str = "auto"  # portable runner: auto | cpu | cuda; cpu also means KIND_CPU when native
    fingerprint: str = ""  # the encoder card's: clients check they embed with the right encoder
    # Portable runner: bytes of embeddings kept by sha256 of the input row (served/runtime.py); 0 = none.
    cache_bytes: int = 0

    def __post_init__(self) -> None:
        if self.format not in NATIVE_PLATFORMS:
            raise ConfigError(
                f"encoder {self.name}: format must be one of {sorted(NATIVE_PLATFORMS)}, not {self.format!r}"
            )
        if self.cache_bytes < 0:
            raise ConfigError(f"encoder {self.name}: cache_bytes must be >= 0, got {self.cache_bytes}")

    @property
    def artifact(self) -> str:
        return ARTIFACT_FILES[self.format]

    def config(self, flavour: str) -> dict:
        _check_flavour(flavour)
        # device="cpu" keeps the instances on KIND_CPU in the native flavour too (a Triton
        # without GPU refuses KIND_GPU); otherwise the encoders ask for a GPU there.
        instances = Instances(self.instances.count, gpu=False) if self.device == "cpu" else self.instances
        base = _base(self.name, self.batching, [self.input], [self.output], flavour, instances)
        # Batch 1 (a lone request) and the batcher's first preferred size (a loaded server).
        # Heads carry none: serve's own requests warm them, and a head version hot-loaded under
        # load with a Triton warm-up left `classify` without a version for a moment
        # (tests/scenarios/test_hot_swap.py failed with it; its first request costs little).
        base["model_warmup"] = warmup([self.input], (1, *self.batching.preferred_batch_sizes[:1]))
        identity = _params(fingerprint=self.fingerprint) if self.fingerprint else {}
        if flavour == "native":
            return {**base, "platform": NATIVE_PLATFORMS[self.format], "parameters": identity}
        if self.format == "plan":
            raise ConfigError(
                f"{self.name}: a TensorRT plan needs Triton's tensorrt_plan backend (NVIDIA's container); "
                "build the repository with --flavour native, or export --format onnx for the portable flavour"
            )
        if self.device == "cuda":
            # One instance group per GPU, and inputs left on the GPU by preprocess (DLPack) stay there.
            base["instance_group"] = Instances(self.instances.count, True, python_gpu=True).proto(flavour)
            gpu_inputs = _params(FORCE_CPU_ONLY_INPUT_TENSORS="no")
        else:
            gpu_inputs = {}
        return {
            **base,
            "backend": "python",
            "parameters": {
                **identity,
                **gpu_inputs,
                **_params(artifact=self.artifact, device=self.device, graph_optimization=self.graph_optimization),
                **(_params(cache_bytes=self.cache_bytes) if self.cache_bytes else {}),
            },
        }


@dataclass(frozen=True)
class TokenizeModel:
    """Text -> the encoder's token ids (open_clip's tokenizer for that model)."""

    model: str  # open_clip model name: picks the tokenizer
    context_length: int
    batching: Batching = Batching(64, (), 0)
    name: str = "tokenize"
    # hf:FOLDER: the card's tokenizer record; the folder's tokenizer files sit in tokenizer/ of the version.
    folder_tokenizer: dict | None = None
    max_text_bytes: int = 0  # UTF-8 bytes per text (0 = served/tokenize.py's default); longer is refused
    refuse_empty: bool = False  # a text encoder's repository: an empty text is a 400, not an embedding

    def __post_init__(self) -> None:
        if self.max_text_bytes < 0:
            raise ConfigError(
                f"max_text_bytes must be >= 0 (0 = the default), not {self.max_text_bytes}", option="max_text_bytes"
            )

    def config(self, flavour: str) -> dict:
        _check_flavour(flavour)
        own = (
            {}
            if self.folder_tokenizer is None
            else _params(
                tokenizer="folder",
                pad_id=self.folder_tokenizer["pad_id"],
                # a SigLIP spiece.model: the rest of its record (tokenize.siglip_tokenizer reads it)
                **(
                    {"spec": json.dumps(self.folder_tokenizer, sort_keys=True)}
                    if "format" in self.folder_tokenizer
                    else {}
                ),
            )
        )
        return {
            **_base(
                self.name,
                self.batching,
                [Tensor("TEXT", "BYTES", (1,))],
                [Tensor("TOKENS", "INT64", (self.context_length,))],
                flavour,
                Instances(1),
            ),
            "backend": "python",
            "parameters": {
                **_params(model=self.model, context_length=self.context_length),
                **own,
                **(_params(max_text_bytes=self.max_text_bytes) if self.max_text_bytes else {}),
                **(_params(refuse_empty="true") if self.refuse_empty else {}),
            },
        }


@dataclass(frozen=True)
class HeadModel:
    """One head: embedding -> SCORES + INFO; only the live version is loaded."""

    name: str
    embed_dim: int
    live_version: int  # version_policy: specific, so rollback is a config change, not a delete
    # Labels of the live version: SCORES is [num_labels], the fixed dim of its model.onnx,
    # which Triton's onnxruntime backend requires the config to repeat exactly. The config
    # serves one version and is re-rendered whenever the live version changes
    # (Repository.set_live), so a version with another label count gets its own dims.
    # None (-1) only where no head file is known; Repository.head_model always passes it.
    num_labels: int | None = None
    batching: Batching = Batching(64, (), 0)
    instances: Instances = Instances(1)
    # Versions loaded beside the live one: the candidate of an A/B or shadow test (repository/ab.py),
    # which must have the live version's labels (one SCORES dim serves both).
    also_serve: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.live_version in self.also_serve or any(v < 1 for v in self.also_serve):
            raise ConfigError(
                f"head {self.name}: also_serve {self.also_serve} must be versions >= 1 other than "
                f"the live one ({self.live_version})"
            )
        if self.live_version < 1:
            raise ConfigError(f"head {self.name}: live_version must be >= 1, got {self.live_version}")
        if self.num_labels is not None and self.num_labels < 1:
            raise ConfigError(f"head {self.name}: num_labels must be >= 1, got {self.num_labels}")

    @property
    def outputs(self) -> tuple[Tensor, ...]:
        return (Tensor("SCORES", "FP32", (self.num_labels or -1,)), Tensor("INFO", "BYTES", (1,)))

    def config(self, flavour: str) -> dict:
        _check_flavour(flavour)
        base = _base(
            self.name,
            self.batching,
            [Tensor("EMBEDDING", "FP32", (self.embed_dim,))],
            self.outputs,
            flavour,
            self.instances,
        )
        base["version_policy"] = {"specific": {"versions": sorted([self.live_version, *self.also_serve])}}
        if flavour == "native":
            return {**base, "platform": "onnxruntime_onnx"}
        return {**base, "backend": "python", "parameters": _params(artifact="model.onnx", device="cpu", threads=1)}


@dataclass(frozen=True)
class ThresholdModel:
    """Scores + INFO of every head -> RESULT, one JSON document per image.

    It also hands the embedding and each head's scores back out (``EMBEDDING_OUT``,
    ``SCORES_OUT_<head>``), and those copies, not the tensors the heads read, are what the
    ensembles expose. Triton's ensemble scheduler prunes the steps that produce outputs a
    request did not ask for, without checking whether another step still reads that tensor:
    with ``EMBEDDING`` both an ensemble output and the heads' input, asking ``classify`` for
    ``RESULT`` alone pruned the encoder and deadlocked. With every ensemble output made by this
    last step, no output feeds another step, so any subset of outputs can be asked for.
    """

    heads: tuple[str, ...]
    embed_dim: int
    batching: Batching = Batching(64, (), 0)
    name: str = "threshold"
    # The encoder fingerprint every RESULT names: clients learn which embedding space an answer
    # lives in without reading model configs (an API the server keeps closed).
    encoder: str = ""
    # head -> {"version", "share", "mode"} of the A/B or shadow test it runs (repository/ab.py).
    ab: dict | None = None

    @property
    def inputs(self) -> list[Tensor]:
        # Head inputs are optional so that adding or removing a head never breaks the
        # classify ensemble that is live while the two models reload one after the other.
        # IMAGE / SHA256 give an A/B test each item's key (the image's sha256); optional too.
        tensors = [Tensor("EMBEDDING", "FP32", (self.embed_dim,)), Tensor("SHA256", "BYTES", (1,), optional=True)]
        if self.ab:
            tensors.append(Tensor("IMAGE", "BYTES", (1,), optional=True))
        for head in self.heads:
            tensors += [
                Tensor(f"SCORES_{head}", "FP32", (-1,), optional=True),
                Tensor(f"INFO_{head}", "BYTES", (1,), optional=True),
            ]
            if head in (self.ab or {}):
                tensors += [
                    Tensor(f"SCORES_AB_{head}", "FP32", (-1,), optional=True),
                    Tensor(f"INFO_AB_{head}", "BYTES", (1,), optional=True),
                ]
        return tensors

    @property
    def outputs(self) -> list[Tensor]:
        return [
            Tensor("RESULT", "BYTES", (1,)),
            Tensor("EMBEDDING_OUT", "FP32", (self.embed_dim,)),
            *(Tensor(f"SCORES_OUT_{head}", "FP32", (-1,)) for head in self.heads),
        ]

    def config(self, flavour: str) -> dict:
        _check_flavour(flavour)
        return {
            **_base(self.name, self.batching, self.inputs, self.outputs, flavour, Instances(1)),
            "backend": "python",
            "parameters": _params(
                heads=json.dumps(list(self.heads)),
                encoder=self.encoder,
                **({"ab": json.dumps(self.ab, sort_keys=True)} if self.ab else {}),
            ),
        }


@dataclass(frozen=True)
class StudentModel:
    """A distilled student (training/distill.py): image bytes -> its own preprocessing -> SCORES + RESULT."""

    name: str
    num_labels: int
    batching: Batching = Batching(16, (), 0)

    def __post_init__(self) -> None:
        if self.num_labels < 1:
            raise ConfigError(f"student {self.name}: num_labels must be >= 1, got {self.num_labels}")

    def config(self, flavour: str) -> dict:
        _check_flavour(flavour)  # a python model in both flavours
        return {
            **_base(
                self.name,
                self.batching,
                [Tensor("IMAGE", "BYTES", (1,))],
                [Tensor("SCORES", "FP32", (self.num_labels,)), Tensor("RESULT", "BYTES", (1,))],
                flavour,
                Instances(1),
            ),
            "backend": "python",
        }


@dataclass(frozen=True)
class Step:
    """One ``ensemble_scheduling.step``: model tensor name -> ensemble tensor name."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    version: int = -1  # -1: the newest loaded; a number while a head serves two (an A/B test)

    def proto(self) -> dict:
        return {
            "model_name": self.model,
            "model_version": str(self.version),
            "input_map": dict(self.inputs),
            "output_map": dict(self.outputs),
        }


@dataclass(frozen=True)
class EnsembleModel:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    steps: tuple[Step, ...]
    max_batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.steps:
            raise ConfigError(f"ensemble {self.name} has no steps")
        produced = {t.name for t in self.inputs}
        for step in self.steps:
            missing = set(step.inputs.values()) - produced
            if missing:
                raise ConfigError(
                    f"ensemble {self.name}: step {step.model} reads {sorted(missing)}, which no earlier step produces"
                )
            produced |= set(step.outputs.values())
        unproduced = {t.name for t in self.outputs} - produced
        if unproduced:
            raise ConfigError(f"ensemble {self.name}: outputs {sorted(unproduced)} are produced by no step")
        # Triton prunes the producer of an output a request leaves out even when another step
        # reads it (then the request deadlocks): an ensemble output must feed no step.
        read = {tensor for step in self.steps for tensor in step.inputs.values()}
        both = sorted({t.name for t in self.outputs} & read)
        if both:
            raise ConfigError(
                f"ensemble {self.name}: outputs {both} are also read by a step; a request asking "
                "for a subset of the outputs would deadlock in Triton's ensemble scheduler"
            )

    def config(self, flavour: str) -> dict:
        _check_flavour(flavour)
        return {
            "name": self.name,
            "platform": "ensemble",
            "max_batch_size": self.max_batch_size,
            "input": [t.proto(True) for t in self.inputs],
            "output": [t.proto(False) for t in self.outputs],
            "ensemble_scheduling": {"step": [s.proto() for s in self.steps]},
        }


def to_proto(model: ModelDescription, flavour: str) -> model_config_pb2.ModelConfig:
    try:
        message = json_format.ParseDict(model.config(flavour), model_config_pb2.ModelConfig())
    except json_format.ParseError as e:
        raise ConfigError(f"model {model.name}: not a valid Triton ModelConfig: {e}") from None
    if message.name != model.name:
        raise ConfigError(f"model {model.name}: rendered name {message.name!r} differs")
    return message


def render(model: ModelDescription, flavour: str) -> str:
    """The config.pbtxt text of a model description, validated by Triton's protobuf."""
    return text_format.MessageToString(to_proto(model, flavour))


def parse(text: str) -> model_config_pb2.ModelConfig:
    """Read a config.pbtxt back into Triton's ModelConfig protobuf."""
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"not a valid config.pbtxt: {e}") from None
