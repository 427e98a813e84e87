"""One head version, as the CPU-side tools run it: eval, rescore and suggest.

A version is loaded through the same validation as anything that goes live
(``validation.check_version_dir``: its ONNX file answers with one score per label and the INFO
of its head.json, for this repository's encoder), then scored with its own ``model.onnx`` (the
file Triton serves) in onnxruntime, and its labels accepted by the server's own threshold
function. Nothing here re-implements what the server does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headmaster.errors import FingerprintMismatchError
from headmaster.export.heads import MODEL_FILE, HeadCard
from headmaster.model_repository.backends.threshold import accept, accepted_mask
from headmaster.model_repository.repository import Repository
from headmaster.model_repository.validation import check_version_dir


@dataclass(frozen=True)
class HeadVersion:
    card: HeadCard
    folder: Path  # REPO/<head>/<N>/
    live: bool = False  # the version the repository serves
    _session: list = field(default_factory=list, repr=False, compare=False)  # onnxruntime session, made once

    @classmethod
    def load(cls, repository: Repository | Path, name: str, version: int | None = None) -> "HeadVersion":
        """A version (default: the live one) of a head in a repository, validated for its encoder."""
        repository = repository if isinstance(repository, Repository) else Repository(repository)
        state = repository.head(name)
        chosen = state.chosen(version)
        folder = repository.version_dir(name, chosen)
        card = check_version_dir(folder, repository.fingerprint, repository.card.embed_dim, name=name, version=chosen)
        return cls(card, folder, chosen == state.live)

    @property
    def title(self) -> str:
        return f"{self.card.name} v{self.card.version}"

    @property
    def model(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def info(self) -> dict:
        return self.card.info()

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """float32 [n, L] in the card's label order, from the version's model.onnx on CPU."""
        import onnxruntime as ort

        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.card.embed_dim:
            raise FingerprintMismatchError(f"head {self.title} reads {self.card.embed_dim}-d embeddings, "
                                           f"not {embeddings.shape[-1]}-d")
        if not self._session:
            self._session.append(ort.InferenceSession(str(self.model), providers=["CPUExecutionProvider"]))
        return self._session[0].run(["SCORES"], {"EMBEDDING": embeddings})[0]

    def accepted_mask(self, scores: np.ndarray) -> np.ndarray:
        """[n, L] bool: which labels the server's threshold step accepts."""
        return accepted_mask(np.asarray(scores, np.float32), self.info)

    def accepted(self, scores: np.ndarray) -> list[list[str]]:
        return accept(np.asarray(scores, np.float32), self.info)
