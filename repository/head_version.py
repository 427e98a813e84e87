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
from headmaster.repository.repo import Repository
from headmaster.repository.validation import check_version_dir
from headmaster.rules.threshold import accept, accepted_mask, head_results, knn_distance, load_index, ood_rule


@dataclass(frozen=True)
class HeadVersion:
    card: HeadCard
    folder: Path  # REPO/<head>/<N>/
    live: bool = False  # the version the repository serves
    _session: list = field(default_factory=list, repr=False, compare=False)  # onnxruntime session, made once
    _index: list = field(default_factory=list, repr=False, compare=False)  # its kNN index, made once

    @classmethod
    def load(cls, repository: Repository | Path, name: str, version: int | None = None) -> HeadVersion:
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
            raise FingerprintMismatchError(
                f"head {self.title} reads {self.card.embed_dim}-d embeddings, not {embeddings.shape[-1]}-d"
            )
        if not self._session:
            self._session.append(ort.InferenceSession(str(self.model), providers=["CPUExecutionProvider"]))
        return self._session[0].run(["SCORES"], {"EMBEDDING": embeddings})[0]

    @property
    def has_ood(self) -> bool:
        return self.card.ood is not None

    def ood_distances(self, embeddings: np.ndarray) -> np.ndarray | None:
        """[n] cosine distance to the k-th nearest training embedding (None: no reference set),
        searched as the server's threshold step does."""
        if not self.has_ood:
            return None
        if not self._index:
            # The stored IVF index when the version has one (the server reads the same file).
            self._index.append(load_index(str(self.folder), self.card.ood))
        return knn_distance(self._index[0], embeddings, int(self.card.ood["k"]))

    def out_of_distribution(self, embeddings: np.ndarray) -> np.ndarray | None:
        """[n] bool by the server's rule, or None for a version without a reference set."""
        distances = self.ood_distances(embeddings)
        return None if distances is None else ood_rule(distances, self.card.ood)

    def accepted_mask(self, scores: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """[n, L] bool: which labels the server's threshold step accepts (with ``embeddings``,
        an abstaining version accepts nothing for images out of its distribution)."""
        flags = None if embeddings is None else self.out_of_distribution(embeddings)
        return accepted_mask(np.asarray(scores, np.float32), self.info, flags)

    def accepted(self, scores: np.ndarray, embeddings: np.ndarray | None = None) -> list[list[str]]:
        flags = None if embeddings is None else self.out_of_distribution(embeddings)
        return accept(np.asarray(scores, np.float32), self.info, flags)

    def results(self, embeddings: np.ndarray) -> list[dict]:
        """What the server's threshold step answers for each embedding under this version: the
        per-head JSON of RESULT (labels, scores; value / class / path by the head's task; ood)."""
        embeddings = np.asarray(embeddings, np.float32)
        return head_results(self.scores(embeddings), self.info, self.ood_distances(embeddings))
