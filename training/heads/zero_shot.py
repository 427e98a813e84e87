"""Zero-shot heads: label prompts embedded by the encoder's own text tower.

A zero-shot head is a linear layer whose rows are the (template-averaged, normalised)
text embeddings of its labels, scaled by the encoder's logit scale, then a softmax: exactly
CLIP's zero-shot classifier, in the same ONNX format as a trained head, so the two swap
freely and a trained head can later replace it under the same name.

SigLIP encoders (a card with ``logit_bias``) were trained with a sigmoid per image-text
pair: their head is multi-label, each label scored sigmoid(logit_scale * cosine + logit_bias)
on its own, so one prompt answers yes/no as the model intends. Image-only backbones (timm)
have no text tower: zero-shot is refused; train a head instead.

A text encoder (a sentence-transformers folder: no image tower) serves ``classify`` of TEXT, so
its zero-shot head scores a text against the labels' descriptions, embedded by the same
encoder: cosines in one text space. Such a card has no logit scale (the model has none); the
head takes ``SENTENCE_LOGIT_SCALE`` (or the one given) and records which, and where it came
from, in the head card. The default template is then ``{}``: the description as written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headmaster.errors import DataError, ExportError, UnsupportedHereError
from headmaster.export.heads import HeadCard, HeadWeights, check_head_name
from headmaster.lifecycle import operations as lifecycle
from headmaster.repository.layout import encoder_artifact, version_dir
from headmaster.repository.repo import Repository

LOG = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of {}.",)
TEXT_TEMPLATES = ("{}",)  # a text encoder: the label's description as written, against texts
# A sentence encoder has no logit scale of its own. 20 is the scale (1 / temperature 0.05) of
# sentence-transformers' MultipleNegativesRankingLoss, the in-batch contrastive loss that
# all-MiniLM-L6-v2 (and most sentence-transformers models) were trained with: softmax(20 * cosine)
# is the distribution that model was taught over candidate texts. It changes no top label, only
# how peaked the scores are; pass another with --logit-scale (e.g. 50 or 100 for E5 / BGE,
# trained at temperature 0.02 / 0.01).
SENTENCE_LOGIT_SCALE = 20.0
SENTENCE_SCALE_FROM = (
    "sentence-transformers' contrastive training scale (MultipleNegativesRankingLoss, "
    "1 / temperature 0.05): the encoder has no logit scale of its own"
)


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


def check_text_tower(repo: Repository) -> None:
    """Refuse zero-shot on an encoder without a text tower, saying what to do instead."""
    if repo.card.model.startswith(("timm:", "onnx:")) or (repo.card.model.startswith("hf:") and not repo.has_text):
        raise ExportError(
            f"{repo.card.model} is an image-only backbone ({repo.card.family}): it has no text tower, "
            "so no zero-shot heads; train a head on labelled images (`headmaster train-head`), or "
            "build a repository from a CLIP / SigLIP encoder for zero-shot",
            option="model",
        )
    if not repo.has_text:
        raise ExportError(f"{repo.path} has no text tower: export the encoder with both towers for zero-shot heads")


def embed_texts(repo: Repository, texts: list[str]) -> np.ndarray:
    """Text embeddings from the repository's own text tower, run locally on CPU."""
    from headmaster.served.runtime import load_runner
    from headmaster.served.tokenize import TOKENIZER_DIR, folder_tokenizer

    check_text_tower(repo)
    spec = repo.card.towers["text"]
    if spec.format == "plan":
        raise UnsupportedHereError(
            "the text tower is a TensorRT plan, which this machine cannot run; "
            "export an onnx copy of the same encoder for zero-shot heads"
        )
    if repo.card.tokenizer is not None:  # hf:FOLDER: the folder's own tokenizer, as the tokenize model serves it
        tokens = folder_tokenizer(
            version_dir(repo.path, "tokenize", 1) / TOKENIZER_DIR,
            repo.card.context_length,
            repo.card.tokenizer["pad_id"],
            repo.card.tokenizer,
        )(texts)
    else:
        import open_clip

        tokens = open_clip.get_tokenizer(repo.card.model)(texts, context_length=repo.card.context_length).numpy()
    runner = load_runner(
        str(encoder_artifact(repo.path, "text", spec.format)), device="cpu", optimization=spec.graph_optimization
    )
    return runner({spec.input_name: tokens.astype(np.int64)}, [spec.output_name])[0]


def text_only(repo: Repository) -> bool:
    """An encoder with a text tower and no image one: its zero-shot heads score texts."""
    return "image" not in repo.card.towers and repo.has_text


def default_templates(repo: Repository) -> tuple[str, ...]:
    return TEXT_TEMPLATES if text_only(repo) else DEFAULT_TEMPLATES


def logit_scale_of(repo: Repository, given: float | None = None) -> tuple[float, str]:
    """The scale zero-shot cosines are multiplied by, and where it came from (for the head card)."""
    check_text_tower(repo)
    if given is not None:
        if not np.isfinite(given) or given <= 0:
            raise DataError(
                f"--logit-scale {given}: the scale must be a positive number (cosines are "
                "multiplied by it before the softmax)",
                option="logit-scale",
            )
        return float(given), "given (--logit-scale)"
    if repo.card.logit_scale > 0:
        return float(repo.card.logit_scale), "the encoder's own (exp of its logit_scale, on its card)"
    if text_only(repo):
        return SENTENCE_LOGIT_SCALE, SENTENCE_SCALE_FROM
    raise DataError(
        f"{repo.card.model} has no logit scale on its card (0): every zero-shot score would be the "
        "same; give one with --logit-scale (CLIP's is 100)",
        option="logit-scale",
    )


def zero_shot_weights(
    repo: Repository, labels: list[Label], templates: tuple[str, ...], logit_scale: float | None = None
) -> HeadWeights:
    for template in templates:
        if "{}" not in template:
            raise DataError(f"template {template!r} has no '{{}}' where the label goes")
    scale, _ = logit_scale_of(repo, logit_scale)
    prompts = [t.format(label.prompt) for label in labels for t in templates]
    embeddings = embed_texts(repo, prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return classifier(embeddings, scale, repo.card.logit_bias)


def classifier(text_embeddings: np.ndarray, logit_scale: float, logit_bias: float | None) -> HeadWeights:
    """CLIP: softmax over scale * cosines. SigLIP (a bias): sigmoid(scale * cosine + bias) per label."""
    weight = (logit_scale * np.asarray(text_embeddings)).astype(np.float32)
    if logit_bias is None:
        return HeadWeights(((weight, np.zeros(len(weight), np.float32)),), multi_label=False)
    return HeadWeights(((weight, np.full(len(weight), logit_bias, np.float32)),), multi_label=True)


def create_zero_shot_head(
    repo_path: Path,
    name: str,
    labels: list[str],
    templates: tuple[str, ...] | None = None,
    thresholds: dict[str, float] | None = None,
    replace_trained: bool = False,
    server: str | None = None,
    logit_scale: float | None = None,
) -> HeadCard:
    """Publish the next version of head ``name`` as a zero-shot classifier over ``labels``, and
    make it live on ``server`` (default: the server recorded in the repository, if one runs).

    ``templates`` None: ``a photo of {}.`` for an image encoder, ``{}`` for a text encoder.
    ``logit_scale`` None: the encoder's own (``SENTENCE_LOGIT_SCALE`` for a sentence encoder).

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
                f"`headmaster rollback {name}`, or pass --replace-trained"
            )
    parsed = [Label.parse(text) for text in labels]
    sigmoid = repo.card.logit_bias is not None
    if len(parsed) < (1 if sigmoid else 2):
        raise DataError(
            "a zero-shot head needs two labels or more; for a yes/no question give a "
            "positive and a negative prompt, e.g. --label 'cat=a photo containing a cat' "
            "--label 'no cat=a photo with no cat'"
        )
    thresholds = dict(thresholds or {})
    unknown = set(thresholds) - {label.name for label in parsed}
    if unknown:
        raise DataError(f"thresholds name labels that are not in this head: {sorted(unknown)}", option="threshold")
    templates = tuple(templates) if templates else default_templates(repo)
    scale, scale_from = logit_scale_of(repo, logit_scale)
    weights = zero_shot_weights(repo, parsed, templates, scale)
    return lifecycle.publish(
        repo_path,
        lifecycle.HeadDraft(
            weights,
            HeadCard(
                name=name,
                version=1,
                labels=tuple(label.name for label in parsed),
                # A sigmoid head accepts a label whose own probability reaches its threshold (default 0.5).
                thresholds=tuple(float(thresholds.get(label.name, 0.5 if sigmoid else 0.0)) for label in parsed),
                multi_label=weights.multi_label,
                encoder_fingerprint=repo.fingerprint,
                embed_dim=repo.card.embed_dim,
                kind="zero-shot",
                details={
                    "prompts": {label.name: label.prompt for label in parsed},
                    "templates": list(templates),
                    "scoring": "sigmoid(scale * cosine + bias)" if sigmoid else "softmax(scale * cosine)",
                    "logit_scale": scale,
                    "logit_scale_from": scale_from,
                    "logit_bias": repo.card.logit_bias,
                    "scores": "texts against the labels' descriptions"
                    if text_only(repo)
                    else "images against the labels' prompts",
                },
            ),
        ),
        server=server,
    ).card
