"""Typed results of the ``classify`` and ``embed`` ensembles."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class HeadResult:
    """One head's answer for one image."""

    name: str
    version: int  # the head version that produced these scores and applied its thresholds
    labels: tuple[str, ...]  # accepted labels (may be empty)
    scores: dict[str, float]  # every label's score
    # A version with an out-of-distribution reference set: whether the image lies beyond its
    # threshold, and its cosine distance to the k-th nearest training embedding (else None).
    ood: bool | None = None
    ood_distance: float | None = None
    # By the head's task (None for flat label heads): a regression head's value; an ordinal
    # head's class (also its one label) and expected rank (0 = its first class). A hierarchy
    # head's labels are its path, root first.
    value: float | None = None
    ordinal_class: str | None = None
    expected: float | None = None
    # While the head runs an A/B or shadow test: {"mode", "arm" (which version answered: live |
    # candidate), "agree", "other": the other version's {"version", "labels", "scores"}}.
    ab: dict | None = None

    def as_dict(self) -> dict:
        d = {"version": self.version, "labels": list(self.labels), "scores": self.scores}
        if self.ood is not None:
            d.update(ood=self.ood, ood_distance=self.ood_distance)
        for key, value in (("value", self.value), ("class", self.ordinal_class), ("expected", self.expected)):
            if value is not None:
                d[key] = value
        if self.ab is not None:
            d["ab"] = self.ab
        return d

    @property
    def top(self) -> tuple[str, float]:
        label = max(self.scores, key=self.scores.__getitem__)
        return label, self.scores[label]


@dataclass(frozen=True)
class Classification:
    """What ``classify`` returns for an image that was processed."""

    source: str | None  # the path or name the caller gave
    sha256: str  # of the image bytes: the item's identity in stores and datasets
    embedding: np.ndarray  # float32 [D], L2-normalised
    heads: dict[str, HeadResult] = field(default_factory=dict)
    encoder: str | None = None  # fingerprint of the encoder whose embedding space this answer is in
    ok = True

    @classmethod
    def from_result(
        cls, source: str | None, sha256: str, embedding: np.ndarray, result_json: bytes | str
    ) -> Classification:
        doc = json.loads(result_json)
        heads = {
            name: HeadResult(
                name,
                int(h["version"]),
                tuple(h["labels"]),
                dict(h["scores"]),
                h.get("ood"),
                h.get("ood_distance"),
                h.get("value"),
                h.get("class"),
                h.get("expected"),
                h.get("ab"),
            )
            for name, h in doc.get("heads", {}).items()
        }
        return cls(source, sha256, np.asarray(embedding, dtype=np.float32), heads, doc.get("encoder"))

    def to_dict(self, with_embedding: bool = False) -> dict:
        d = {
            "source": self.source,
            "sha256": self.sha256,
            "ok": True,
            "encoder": self.encoder,
            "heads": {n: h.as_dict() for n, h in self.heads.items()},
        }
        if with_embedding:
            d["embedding"] = self.embedding.tolist()
        return d


@dataclass(frozen=True)
class Embedding:
    """What ``embed`` returns for an image that was processed."""

    source: str | None
    sha256: str
    embedding: np.ndarray  # float32 [D], L2-normalised
    ok = True


@dataclass(frozen=True)
class Failure:
    """An image the server (or the client, reading it) could not process; the others still were."""

    source: str | None
    error: str
    sha256: str | None = None  # None when the file could not even be read
    ok = False

    def to_dict(self, with_embedding: bool = False) -> dict:
        return {"source": self.source, "sha256": self.sha256, "ok": False, "error": self.error}
