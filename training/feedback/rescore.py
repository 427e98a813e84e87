"""Rescore: run a head version over every stored embedding, on CPU, and record its labels.

No encoder, no GPU, no Triton: the head's own ``model.onnx`` (the file Triton serves) runs
in onnxruntime (:class:`HeadVersion`) over the store in fixed-size batches, and its thresholds are applied by the
very function the server's threshold step uses. Memory stays at a few batches whatever the
store's size; the labels of one run land in the store all at once, or not at all.

Only items embedded by the encoder the head was trained on are scored. Items of any other
encoder are refused and counted (``headmaster reembed`` brings them over).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from headmaster.errors import FingerprintMismatchError
from headmaster.repository.head_version import HeadVersion
from headmaster.store.base import Store, label_table

LOG = logging.getLogger(__name__)


@dataclass
class RescoreResult:
    head: str
    version: int
    rows: int
    seconds: float
    label_counts: dict[str, int]
    refused: dict[str, int] = field(default_factory=dict)  # foreign fingerprint -> items left unscored


def rescore(
    store: Store, head: HeadVersion, batch_size: int = 65536, progress: Callable[[int, int], None] | None = None
) -> RescoreResult:
    """progress(done, total) is called after each batch."""
    import numpy as np

    card = head.card
    fingerprints = store.fingerprints()
    # Items stored under other encoders must not meet this one's heads.
    refused = {fp: n for fp, n in fingerprints.items() if fp != card.encoder_fingerprint}
    if card.encoder_fingerprint not in fingerprints:
        stored = ", ".join(f"{fp} ({n} items)" for fp, n in fingerprints.items()) or "nothing"
        raise FingerprintMismatchError(
            f"head {card.name} v{card.version} reads embeddings of encoder {card.encoder_fingerprint}, but the store "
            f"{store.location} holds none of those (it holds {stored}). Re-embed the store with that encoder "
            "(`headmaster reembed`) or rescore with a head trained on the stored encoder."
        )
    for fp, n in refused.items():
        LOG.warning(
            "refused %d items embedded with encoder %s (head %s needs %s)", n, fp, card.name, card.encoder_fingerprint
        )
    counts = np.zeros(len(card.labels), np.int64)
    total, done = fingerprints[card.encoder_fingerprint], [0]
    started = time.perf_counter()

    def batches():
        for hashes, matrix in store.iter_embeddings(card.encoder_fingerprint, batch_size):
            if matrix.shape[1] != card.embed_dim:
                raise FingerprintMismatchError(
                    f"stored embeddings have {matrix.shape[1]} dimensions, head "
                    f"{card.name} v{card.version} reads {card.embed_dim}"
                )
            scores = head.scores(matrix)
            accepted = head.accepted_mask(scores, matrix)  # an abstaining head labels no outlier
            counts[:] += accepted.sum(axis=0)
            done[0] += len(matrix)
            if progress:
                progress(done[0], total)
            yield label_table(hashes, card.encoder_fingerprint, card.version, scores, card.labels, accepted, "rescore")

    rows = store.add_labels(card.name, batches())
    return RescoreResult(
        card.name, card.version, rows, time.perf_counter() - started, dict(zip(card.labels, map(int, counts))), refused
    )
