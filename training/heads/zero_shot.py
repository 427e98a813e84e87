"""Zero-shot heads: label prompts embedded by the encoder's own text tower.

A zero-shot head is a linear layer whose rows are the (template-averaged, normalised)
text embeddings of its labels, scaled by the encoder's logit scale, then a softmax: exactly
CLIP's zero-shot classifier, in the same ONNX format as a trained head, so the two swap
freely and a trained head can later replace it under the same name.

SigLIP encoders (a card with ``logit_bias``) were trained with a sigmoid per image-text
pair: their head is multi-label, each label scored sigmoid(logit_scale * cosine + logit_bias)
on its own, so one prompt answers yes/no as the model intends. Image-only backbones (timm)
have no text tower: zero-shot is refused; train a head instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headmaster.errors import DataError, ExportError, UnsupportedHereError
from headmaster.export.heads import HeadCard, HeadWeights, check_head_name
from headmaster.model_repository import lifecycle
from headmaster.model_repository.layout import encoder_artifact, version_dir
from headmaster.model_repository.repository import Repository

LOG = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of {}.",)


@dataclass(frozen=True)
class Label:
    name: str  # what results call it
    prompt: str  # what the text tower reads (through each template)

    @classmethod
    def parse(cls, text: str) -> Label:
        """'a cat' names and prompts alike; 'cat=a photo containing a cat' names it 'cat'."""
        name, sep, prompt = text.partition("=")
        name, prompt = (name.strip(), prompt.strip()) if sep else (text.strip(), text.strip())
        if not name or not prompt:
            raise DataError(f"label {text!r} is empty; use 'text' or 'name=prompt text'")
        return cls(name, prompt)


def embed_texts(repo: Repository, texts: list[str]) -> np.ndarray:
    """Text embeddings from the repository's own text tower, run locally on CPU."""
    from headmaster.model_repository.backends.runtime import load_runner
    from headmaster.model_repository.backends.tokenize import TOKENIZER_DIR, folder_tokenizer

    if repo.card.model.startswith(("timm:", "onnx:")) or (repo.card.model.startswith("hf:") and not repo.has_text):
        raise ExportError(f"{repo.card.model} is an image-only backbone ({repo.card.family}): it has no text tower, "
                          "so no zero-shot heads; train a head on labelled images (`headmaster train-head`), or "
                          "build a repository from a CLIP / SigLIP encoder for zero-shot", option="model")
    if not repo.has_text:
        raise ExportError(f"{repo.path} has no text tower: export the encoder with both towers for zero-shot heads")
    spec = repo.card.towers["text"]
    if spec.format == "plan":
        raise UnsupportedHereError("the text tower is a TensorRT plan, which this machine cannot run; "
                              "export an onnx copy of the same encoder for zero-shot heads")
    if repo.card.tokenizer is not None:  # hf:FOLDER: the folder's own tokenizer, as the tokenize model serves it
        tokens = folder_tokenizer(version_dir(repo.path, "tokenize", 1) / TOKENIZER_DIR, repo.card.context_length,
                                  repo.card.tokenizer["pad_id"], repo.card.tokenizer)(texts)
    else:
        import open_clip

        tokens = open_clip.get_tokenizer(repo.card.model)(texts, context_length=repo.card.context_length).numpy()
    runner = load_runner(str(encoder_artifact(repo.path, "text", spec.format)),
                         device="cpu", optimization=spec.graph_optimization)
    return runner({spec.input_name: tokens.astype(np.int64)}, [spec.output_name])[0]


def zero_shot_weights(repo: Repository, labels: list[Label], templates: tuple[str, ...]) -> HeadWeights:
    for template in templates:
        if "{}" not in template:
            raise DataError(f"template {template!r} has no '{{}}' where the label goes")
    prompts = [t.format(label.prompt) for label in labels for t in templates]
    embeddings = embed_texts(repo, prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return classifier(embeddings, repo.card.logit_scale, repo.card.logit_bias)


def classifier(text_embeddings: np.ndarray, logit_scale: float, logit_bias: float | None) -> HeadWeights:
    """CLIP: softmax over scale * cosines. SigLIP (a bias): sigmoid(scale * cosine + bias) per label."""
    weight = (logit_scale * np.asarray(text_embeddings)).astype(np.float32)
    if logit_bias is None:
        return HeadWeights(((weight, np.zeros(len(weight), np.float32)),), multi_label=False)
    return HeadWeights(((weight, np.full(len(weight), logit_bias, np.float32)),), multi_label=True)


def create_zero_shot_head(repo_path: Path, name: str, labels: list[str], templates: tuple[str, ...] = DEFAULT_TEMPLATES,
                          thresholds: dict[str, float] | None = None, replace_trained: bool = False,
                          server: str | None = None) -> HeadCard:
    """Publish the next version of head ``name`` as a zero-shot classifier over ``labels``, and
    make it live on ``server`` (default: the server recorded in the repository, if one runs).

    A trained head takes priority over a zero-shot one for the same name: replacing a live
    trained version with prompts is refused unless ``replace_trained``."""
    check_head_name(name)
    repo = Repository(repo_path)
    if name in repo.head_names() and not replace_trained:
        live = repo.head(name)
        if live.card.kind != "zero-shot":
            raise DataError(
                f"head {name} serves v{live.live}, a trained ({live.card.kind}) head; trained heads take priority "
                "over zero-shot ones for the same dimension. Pick another name, roll back with "
                f"`headmaster rollback {name}`, or pass --replace-trained")
    parsed = [Label.parse(text) for text in labels]
    sigmoid = repo.card.logit_bias is not None
    if len(parsed) < (1 if sigmoid else 2):
        raise DataError("a zero-shot head needs two labels or more; for a yes/no question give a "
                              "positive and a negative prompt, e.g. --label 'cat=a photo containing a cat' "
                              "--label 'no cat=a photo with no cat'")
    thresholds = dict(thresholds or {})
    unknown = set(thresholds) - {label.name for label in parsed}
    if unknown:
        raise DataError(f"thresholds name labels that are not in this head: {sorted(unknown)}", option="threshold")
    weights = zero_shot_weights(repo, parsed, tuple(templates))
    return lifecycle.publish(repo_path, weights, lambda version: HeadCard(
        name=name, version=version, labels=tuple(label.name for label in parsed),
        # A sigmoid head accepts a label whose own probability reaches its threshold (default 0.5).
        thresholds=tuple(float(thresholds.get(label.name, 0.5 if sigmoid else 0.0)) for label in parsed),
        multi_label=weights.multi_label, encoder_fingerprint=repo.fingerprint, embed_dim=repo.card.embed_dim,
        kind="zero-shot", details={"prompts": {label.name: label.prompt for label in parsed},
                                   "templates": list(templates),
                                   "scoring": "sigmoid(scale * cosine + bias)" if sigmoid else "softmax(scale * cosine)",
                                   "logit_scale": repo.card.logit_scale, "logit_bias": repo.card.logit_bias}),
        server=server).card
