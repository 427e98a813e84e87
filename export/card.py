"""The encoder card: what an exported encoder is, and the fingerprint of its embedding space.

Every head version and every stored embedding records the fingerprint of the encoder it
was made with; anything that meets a different fingerprint refuses to run.

The fingerprint hashes what decides the embedding space: the architecture, the weights
(sha256 of the state dict, so a tag and a local copy of the same checkpoint agree), the
preprocessing and the embedding size. Precision, file format and tool versions are
recorded on the card but not hashed: an fp16 TensorRT plan of the same weights gives the
same embeddings to within the export check (cosine >= 0.999), so heads carry over.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from headmaster.errors import CardError, FingerprintMismatchError

CARD_FILE = "card.json"
CARD_SCHEMA = 1


def fingerprint_of(
    model: str,
    weights_sha256: str,
    preprocessing: dict,
    embed_dim: int,
    pooling: str | None = None,
    tokenizer: dict | None = None,
) -> str:
    identity = {
        "model": model,
        "weights_sha256": weights_sha256,
        "preprocessing": preprocessing,
        "embed_dim": embed_dim,
    }
    if pooling is not None:  # timm backbones; open_clip cards keep the fingerprints they had
        identity["pooling"] = pooling
    if tokenizer is not None:  # an hf:FOLDER's own tokenizer decides what its text embeddings are
        identity["tokenizer"] = tokenizer
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class TowerFile:
    """One exported tower: which file, and its tensor contract."""

    file: str  # relative to the card's folder
    format: str  # onnx | plan | torchscript
    input_name: str
    input_dtype: str  # Triton dtype: UINT8 for image pixels, INT64 for text tokens
    input_dims: tuple[int, ...]  # without the batch axis
    output_name: str  # L2-normalised embedding, FP32 [embed_dim]
    graph_optimization: str = "all"  # onnxruntime level the runtime must use (fp16: extended)


@dataclass(frozen=True)
class EncoderCard:
    model: str  # open_clip model name, or timm:<name> for an image-only timm backbone
    pretrained: str | None  # tag, checkpoint path, or None (random weights from `seed`)
    weights_sha256: str
    preprocessing: dict  # headmaster.export.encoders.Preprocessing.as_dict()
    embed_dim: int
    context_length: int  # text tokens per prompt
    logit_scale: float  # exp(logit_scale) of the model: zero-shot heads scale cosines by it
    precision: str  # fp32 | fp16 | int8 (int8: the image tower; verification["image"]["gate"] holds its figures)
    format: str  # onnx | plan | torchscript
    towers: dict[str, TowerFile]  # "image", "text"
    verification: dict  # what the export check measured
    tools: dict  # versions of torch, open_clip, onnx, onnxruntime, headmaster
    created: str  # ISO-8601 UTC
    seed: int | None = None
    schema: int = CARD_SCHEMA
    fingerprint: str = field(default="")
    family: str = "clip"  # headmaster.export.encoders.FAMILIES
    pooling: str | None = None  # timm backbones: cls | mean | head-less (hashed into the fingerprint)
    logit_bias: float | None = None  # SigLIP: zero-shot scores are sigmoid(logit_scale * cosine + logit_bias)
    # A local checkpoint: its file's sha256, the key map that renamed its tensors, how many loaded.
    # Not hashed: weights_sha256 already covers the weights it gave, whatever their names in the file.
    checkpoint: dict | None = None
    # hf:FOLDER text towers: the folder's own tokenizer, saved under tokenizer/ beside the towers
    # (kind, sha256 of each file, context_length, padding, pad_id; hashed into the fingerprint).
    # None: open_clip's tokenizer for `model`.
    tokenizer: dict | None = None

    def __post_init__(self) -> None:
        expected = fingerprint_of(
            self.model, self.weights_sha256, self.preprocessing, self.embed_dim, self.pooling, self.tokenizer
        )
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", expected)
        elif self.fingerprint != expected:
            raise CardError(
                f"card fingerprint {self.fingerprint} does not match its own fields ({expected}): "
                "the card was edited by hand; export the encoder again"
            )

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint.split(":", 1)[-1][:12]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, folder: Path) -> Path:
        path = Path(folder) / CARD_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, d: dict) -> EncoderCard:
        d = dict(d)
        if d.get("schema") != CARD_SCHEMA:
            raise CardError(f"encoder card schema {d.get('schema')!r} is not supported (expected {CARD_SCHEMA})")
        d["towers"] = {k: TowerFile(**{**v, "input_dims": tuple(v["input_dims"])}) for k, v in d["towers"].items()}
        try:
            return cls(**d)
        except TypeError as e:
            raise CardError(f"malformed encoder card: {e}") from None

    @classmethod
    def load(cls, folder_or_file: Path) -> EncoderCard:
        path = Path(folder_or_file)
        path = path / CARD_FILE if path.is_dir() else path
        if not path.is_file():
            raise CardError(f"no encoder card at {path}: export one with `headmaster export encoder --out DIR`")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise CardError(f"encoder card {path} is not valid JSON: {e}") from None


def require_same_encoder(expected: str, found: str, what: str) -> None:
    """Refuse, loudly, anything made with another encoder than the one in use."""
    if expected != found:
        raise FingerprintMismatchError(
            f"{what} was made with encoder {found.split(':')[-1][:12]}, but this repository serves "
            f"encoder {expected.split(':')[-1][:12]}. Embeddings of different encoders live in "
            "different spaces: retrain or re-create it against the served encoder "
            f"(full fingerprints: {found} vs {expected})"
        )
