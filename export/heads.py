"""Heads as tiny ONNX models: embedding -> scores, plus the version's own metadata.

A head version is self-contained: its graph computes the scores *and* emits ``INFO``, a
JSON constant with the version number, label names, thresholds and whether the head is
multi-label. The ensemble's threshold step applies exactly the thresholds that came out
with the scores, so no hot swap can pair new weights with old labels (see
``rules/threshold.py``). ``head.json`` beside ``model.onnx`` holds the
full record: encoder fingerprint, how the head was made, metrics.

The same file runs in Triton (onnxruntime backend, or the python backend in the portable
flavour) and on CPU with onnxruntime for rescoring stored embeddings.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from headmaster.errors import CardError, ExportError, InvalidNameError

HEAD_FILE = "head.json"
MODEL_FILE = "model.onnx"
HEAD_SCHEMA = 1
ACTIVATIONS = ("", "identity", "ordinal")
OPSET = 17
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Names the repository uses for its own models; a head may not take them.
RESERVED_NAMES = {
    "preprocess",
    "image_encoder",
    "text_encoder",
    "tokenize",
    "threshold",
    "classify",
    "classify_embedding",
    "embed",
    "embed_text",
}


def check_head_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise InvalidNameError(
            f"head name {name!r} is not allowed: use lowercase letters, digits and '_', starting "
            "with a letter (it names a Triton model and the ensemble's SCORES_<name> output)",
            option="name",
        )
    if name in RESERVED_NAMES:
        raise InvalidNameError(
            f"head name {name!r} is reserved for the repository's own models: {sorted(RESERVED_NAMES)}", option="name"
        )
    return name


@dataclass(frozen=True)
class HeadWeights:
    """A linear head (one layer) or an MLP (Linear -> ReLU -> ... -> Linear)."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (weight [out, in], bias [out]) per layer
    multi_label: bool  # sigmoid per label; otherwise softmax over the labels
    # How the last layer becomes SCORES: "" (sigmoid or softmax by multi_label), "identity" (a
    # regression value) or "ordinal" (K-1 cumulative logits -> sigmoid -> K class probabilities).
    activation: str = ""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ExportError("a head needs at least one layer")
        if self.activation not in ACTIVATIONS:
            raise ExportError(f"head activation must be one of {ACTIVATIONS}, not {self.activation!r}")
        for i, (w, b) in enumerate(self.layers):
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise ExportError(f"layer {i}: weight {w.shape} and bias {b.shape} do not fit")
            if i and w.shape[1] != self.layers[i - 1][0].shape[0]:
                raise ExportError(
                    f"layer {i} takes {w.shape[1]} inputs, layer {i - 1} gives {self.layers[i - 1][0].shape[0]}"
                )

    @property
    def embed_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    @property
    def num_labels(self) -> int:
        out = int(self.layers[-1][0].shape[0])
        return out + 1 if self.activation == "ordinal" else out  # K-1 cut points give K classes

    @classmethod
    def from_onnx(cls, path: Path) -> HeadWeights:
        """Read the layers back from a head's model.onnx (w0, b0, w1, b1, ...)."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        layers = []
        while f"w{len(layers)}" in init:
            layers.append((init[f"w{len(layers)}"], init[f"b{len(layers)}"]))
        ops = {node.op_type for node in model.graph.node}
        maker = next((node.op_type for node in model.graph.node if "SCORES" in node.output), "")
        activation = {"Identity": "identity", "Sub": "ordinal"}.get(maker, "")
        multi_label = "Sigmoid" in ops and activation == ""
        return cls(tuple(layers), multi_label, activation)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """The numpy reference the ONNX graph must match."""
        x = np.asarray(embeddings, dtype=np.float64)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.astype(np.float64).T + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        if self.activation == "identity":
            return x.astype(np.float32)
        if self.activation == "ordinal":
            above = 1.0 / (1.0 + np.exp(-x))  # P(class > k)
            ones, zeros = np.ones((len(x), 1)), np.zeros((len(x), 1))
            return (np.hstack([ones, above]) - np.hstack([above, zeros])).astype(np.float32)
        if self.multi_label:
            return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
        x = np.exp(x - x.max(axis=1, keepdims=True))
        return (x / x.sum(axis=1, keepdims=True)).astype(np.float32)


def check_ood(name: str, ood: dict) -> None:
    """The ``ood`` entry of a head card, refused with what is wrong."""
    from headmaster.rules.threshold import OOD_POLICIES

    missing = {"k", "threshold", "policy", "references", "sha256"} - set(ood)
    if missing:
        raise ExportError(f"head {name}: ood lacks {sorted(missing)}", option="ood")
    if ood["policy"] not in OOD_POLICIES:
        raise ExportError(
            f"head {name}: ood policy must be one of {', '.join(OOD_POLICIES)}, not {ood['policy']!r}", option="ood"
        )
    if not (isinstance(ood["k"], int) and 1 <= ood["k"] <= ood["references"]):
        raise ExportError(
            f"head {name}: ood k must be an integer in [1, references={ood['references']}], not {ood['k']!r}",
            option="ood",
        )
    if not 0.0 <= float(ood["threshold"]) <= 2.0:
        raise ExportError(
            f"head {name}: ood threshold is a cosine distance in [0, 2], not {ood['threshold']!r}", option="ood"
        )
    search = ood.get("search")
    if search is not None and not (
        isinstance(search, dict)
        and search.get("kind") == "ivf"
        and all(isinstance(search.get(f), int) and search[f] >= 1 for f in ("lists", "probe"))
        and isinstance(search.get("seed", 0), int)
    ):
        raise ExportError(
            f"head {name}: ood search must be absent (exact) or {{kind: ivf, lists >= 1, probe >= 1, "
            f"seed}}, not {search!r}",
            option="ood",
        )
    named = ood.get("index_sha256")
    if named is not None and not (
        search is not None and isinstance(named, str) and re.fullmatch(r"[0-9a-f]{64}", named)
    ):
        raise ExportError(
            f"head {name}: ood index_sha256 goes with an ivf search and is 64 hex digits, not {named!r}", option="ood"
        )


def check_task(card: HeadCard) -> None:
    """A card's task and what it needs, refused with what is wrong."""
    from headmaster.rules.threshold import TASKS

    name, task = card.name, card.task
    if task not in TASKS:
        raise ExportError(f"head {name}: task must be one of {', '.join(TASKS)}, not {task!r}", option="task")
    if (card.parents is not None) != (task == "hierarchy"):
        raise ExportError(f"head {name}: a taxonomy (parents) goes with task hierarchy, and only then", option="task")
    if (card.value_range is not None) != (task == "regression"):
        raise ExportError(f"head {name}: a value range goes with task regression, and only then", option="task")
    if task == "hierarchy":
        if not card.multi_label:
            raise ExportError(f"head {name}: a hierarchy head scores every node with a sigmoid (multi_label)")
        unknown = sorted({*card.parents, *card.parents.values()} - set(card.labels))
        if unknown:
            raise ExportError(
                f"head {name}: the taxonomy names {unknown}, which are not labels of the head", option="taxonomy"
            )
        for label in card.parents:
            seen, node = {label}, label
            while node in card.parents:
                node = card.parents[node]
                if node in seen:
                    raise ExportError(f"head {name}: the taxonomy has a cycle through {label!r}", option="taxonomy")
                seen.add(node)
    if task == "regression":
        if len(card.labels) != 1 or card.multi_label:
            raise ExportError(
                f"head {name}: a regression head has one output (its label names the value), not {list(card.labels)}"
            )
        low, high = card.value_range
        if not low < high:
            raise ExportError(
                f"head {name}: the value range must be [low, high] with low < high, not {card.value_range}"
            )
    if task == "ordinal" and (card.multi_label or len(card.labels) < 2):
        raise ExportError(f"head {name}: an ordinal head has two ordered classes or more, one per image")


@dataclass(frozen=True)
class HeadCard:
    """Everything about one head version; ``head.json`` in the version folder."""

    name: str
    version: int
    labels: tuple[str, ...]
    thresholds: tuple[float, ...]  # per label; see threshold.accept for how they apply
    multi_label: bool
    encoder_fingerprint: str  # the encoder whose embeddings this head reads
    embed_dim: int
    kind: str  # zero-shot | linear | mlp
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    details: dict = field(default_factory=dict)  # prompts, training data hash, metrics, ...
    schema: int = HEAD_SCHEMA
    # Out of distribution (None: the version has no reference set and never says "ood"):
    # k, threshold (cosine distance to the k-th nearest reference), policy (abstain | flag),
    # references (rows of ood.npy) and sha256 (threshold.references_sha256 of them).
    # search: absent for an exact search, else threshold.ivf_search's record (large sets);
    # index_sha256: the sha256 of the IVF index stored beside them (ood.faiss; absent in
    # versions published before it was stored, whose index is built when first used).
    ood: dict | None = None
    # What the head answers (see threshold.TASKS): labels (flat, yesterday's heads), hierarchy
    # (a path in ``parents``: child -> parent), regression (a value in ``value_range``) or
    # ordinal (one of ``labels``, in their order, lowest first).
    task: str = "labels"
    parents: dict | None = None  # hierarchy: child label -> parent label
    value_range: tuple[float, float] | None = None  # regression: the training targets' [min, max]

    def __post_init__(self) -> None:
        check_head_name(self.name)
        if len(self.labels) < 1 or len(set(self.labels)) != len(self.labels):
            raise ExportError(f"head {self.name}: labels must be distinct and at least one, got {self.labels}")
        check_task(self)
        if not self.multi_label and len(self.labels) < 2 and self.task != "regression":
            raise ExportError(
                f"head {self.name}: a single-label head needs two labels or more (a binary "
                "head is a positive and a negative label)"
            )
        if len(self.thresholds) != len(self.labels):
            raise ExportError(f"head {self.name}: {len(self.thresholds)} thresholds for {len(self.labels)} labels")
        if not all(0.0 <= t <= 1.0 for t in self.thresholds):
            raise ExportError(f"head {self.name}: thresholds must lie in [0, 1], got {self.thresholds}")
        if self.version < 1:
            raise ExportError(f"head {self.name}: versions start at 1, got {self.version}")
        if self.ood is not None:
            check_ood(self.name, self.ood)

    def info(self) -> dict:
        """What travels with every answer of this version (the INFO output)."""
        info = {
            "head": self.name,
            "version": self.version,
            "labels": list(self.labels),
            "thresholds": [float(t) for t in self.thresholds],
            "multi_label": self.multi_label,
        }
        if self.ood is not None:  # versions without a reference set keep yesterday's INFO
            info["ood"] = dict(self.ood)
        if self.task != "labels":  # flat heads keep yesterday's INFO too
            info["task"] = self.task
            if self.parents is not None:
                info["parents"] = dict(self.parents)
            if self.value_range is not None:
                info["range"] = [float(v) for v in self.value_range]
        return info

    def save(self, folder: Path) -> Path:
        path = Path(folder) / HEAD_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> HeadCard:
        path = Path(folder) / HEAD_FILE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise CardError(f"{folder} has no {HEAD_FILE}: not a head version") from None
        except json.JSONDecodeError as e:
            raise CardError(f"{path} is not valid JSON: {e}") from None
        if d.get("schema") != HEAD_SCHEMA:
            raise CardError(f"{path}: head schema {d.get('schema')!r} is not supported (expected {HEAD_SCHEMA})")
        d["labels"], d["thresholds"] = tuple(d["labels"]), tuple(d["thresholds"])
        if d.get("value_range") is not None:
            d["value_range"] = tuple(d["value_range"])
        return cls(**d)


def head_onnx(weights: HeadWeights, card: HeadCard):
    """EMBEDDING [N, D] -> SCORES [N, L] (float32) and INFO [N, 1] (the version's JSON)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if weights.embed_dim != card.embed_dim or weights.num_labels != len(card.labels):
        raise ExportError(
            f"head {card.name}: weights map {weights.embed_dim} -> {weights.num_labels}, "
            f"but the card says {card.embed_dim} -> {len(card.labels)} labels"
        )
    nodes, inits, x = [], [], "EMBEDDING"
    for i, (w, b) in enumerate(weights.layers):
        inits += [
            numpy_helper.from_array(np.asarray(w, np.float32), f"w{i}"),
            numpy_helper.from_array(np.asarray(b, np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"z{i}"], transB=1))
        x = f"z{i}"
        if i < len(weights.layers) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    # INFO: one JSON string per batch row, expanded to the batch size of this call.
    info = np.array([[json.dumps(card.info(), separators=(",", ":"))]], dtype=object)
    inits += [numpy_helper.from_array(info, "info"), numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes += [
        helper.make_node("Shape", ["EMBEDDING"], ["batch"], start=0, end=1),
        helper.make_node("Concat", ["batch", "one"], ["info_shape"], axis=0),
        helper.make_node("Expand", ["info", "info_shape"], ["INFO"]),
    ]
    if weights.activation == "identity":
        nodes.append(helper.make_node("Identity", [x], ["SCORES"]))
    elif weights.activation == "ordinal":
        # P(class = k) = P(class > k-1) - P(class > k), with P(> -1) = 1 and P(> K-1) = 0.
        nodes += [
            helper.make_node("Sigmoid", [x], ["above"]),
            helper.make_node(
                "ConstantOfShape", ["info_shape"], ["ones"], value=numpy_helper.from_array(np.array([1.0], np.float32))
            ),
            helper.make_node(
                "ConstantOfShape", ["info_shape"], ["zeros"], value=numpy_helper.from_array(np.array([0.0], np.float32))
            ),
            helper.make_node("Concat", ["ones", "above"], ["upper"], axis=1),
            helper.make_node("Concat", ["above", "zeros"], ["lower"], axis=1),
            helper.make_node("Sub", ["upper", "lower"], ["SCORES"]),
        ]
    else:
        nodes.append(
            helper.make_node("Sigmoid", [x], ["SCORES"])
            if weights.multi_label
            else helper.make_node("Softmax", [x], ["SCORES"], axis=1)
        )
    graph = helper.make_graph(
        nodes,
        f"head_{card.name}_v{card.version}",
        [helper.make_tensor_value_info("EMBEDDING", TensorProto.FLOAT, ["batch", weights.embed_dim])],
        [
            helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, ["batch", weights.num_labels]),
            helper.make_tensor_value_info("INFO", TensorProto.STRING, ["batch", 1]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="headmaster")
    model.ir_version = 8  # readable by the onnxruntime in Triton 24.10 (1.19)
    model.doc_string = json.dumps(card.info())
    onnx.checker.check_model(model)
    return model


def write_head(
    folder: Path,
    weights: HeadWeights,
    card: HeadCard,
    check_embeddings: np.ndarray | None = None,
    references: np.ndarray | None = None,
    ood_index: bytes | None = None,
) -> None:
    """Write model.onnx + head.json (+ ood.npy, the reference set a card with ``ood`` names,
    and ood.faiss, the serialized IVF index ``ood_index`` a card with ``ood.index_sha256`` names),
    then load the ONNX file back and compare it with the numpy reference on
    ``check_embeddings`` (random unit vectors when none are given)."""
    import onnx
    import onnxruntime as ort

    from headmaster.rules.threshold import OOD_FILE, OOD_INDEX_FILE, index_sha256, references_sha256

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (card.ood is None) != (references is None):
        raise ExportError(f"head {card.name}: a reference set goes with a card that describes it (ood), and only then")
    if references is not None:
        if (
            references.shape != (card.ood["references"], card.embed_dim)
            or references_sha256(references) != card.ood["sha256"]
        ):
            raise ExportError(f"head {card.name}: the reference set is not the one its card describes")
        np.save(folder / OOD_FILE, references, allow_pickle=False)
    named = (card.ood or {}).get("index_sha256")
    if (named is None) != (ood_index is None) or (ood_index is not None and index_sha256(ood_index) != named):
        raise ExportError(
            f"head {card.name}: a faiss index ({OOD_INDEX_FILE}) goes with a card whose ood "
            "entry names its sha256 (index_sha256), and only that index"
        )
    if ood_index is not None:
        (folder / OOD_INDEX_FILE).write_bytes(ood_index)
    onnx.save(head_onnx(weights, card), str(folder / MODEL_FILE))
    card.save(folder)
    if check_embeddings is None:
        rng = np.random.default_rng(0)
        check_embeddings = rng.normal(size=(64, weights.embed_dim)).astype(np.float32)
        check_embeddings /= np.linalg.norm(check_embeddings, axis=1, keepdims=True)
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    scores, info = session.run(["SCORES", "INFO"], {"EMBEDDING": np.asarray(check_embeddings, np.float32)})
    error = float(np.abs(scores - weights.scores(check_embeddings)).max())
    if error > 1e-4 or json.loads(info[0, 0]) != card.info():
        raise ExportError(
            f"head {card.name} v{card.version}: the ONNX file disagrees with the trained "
            f"weights (max score error {error:.2e}); nothing was published"
        )
