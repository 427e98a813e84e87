"""Live metrics of the heads on Triton's metrics port, read from the session's real server.

After classifying real photos (and a batch of embeddings), the counters must have risen by
exactly what the answers say: items per head and version, accepted labels, abstentions, and
the top-score buckets (cumulative, Prometheus's histogram layout); the names are the ones the
alert rules and the dashboard in deploy/ query.
"""

from __future__ import annotations

import numpy as np

from headmaster.client import HeadmasterClient
from headmaster.served.threshold import TOP_SCORE_BUCKETS
from tests.live_metrics import increase, scrape


def expected_increase(results) -> dict:
    """The counters' rise, computed here from the answers with this test's own arithmetic."""
    out: dict = {}

    def add(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        out[key] = out.get(key, 0.0) + 1.0

    for result in results:
        for head, answer in result.heads.items():
            base = {"head": head, "version": str(answer.version)}
            add("headmaster_items_total", **base)
            for label in answer.labels:
                add("headmaster_answers_total", **base, label=label)
            if not answer.labels:
                add("headmaster_abstentions_total", **base)
            top = max(answer.scores.values())
            for bound in [*TOP_SCORE_BUCKETS, float("inf")]:
                if top <= bound:
                    add("headmaster_top_score_bucket", **base, le="+Inf" if bound == float("inf") else str(bound))
    return out


def test_counters_rise_by_what_the_answers_say(server, photos):
    before = scrape(server.metrics_url)
    with HeadmasterClient(server.grpc_url, batch_size=3) as client:
        results = client.classify(list(photos.values()))
        rng = np.random.default_rng(5)
        vectors = rng.normal(size=(40, results[0].embedding.shape[0])).astype(np.float32)
        hashes = [f"{i:064x}" for i in range(len(vectors))]
        results += client.classify_embeddings(
            vectors / np.linalg.norm(vectors, axis=1, keepdims=True), [None] * len(vectors), hashes
        )
    assert all(r.ok for r in results)
    got = increase(before, scrape(server.metrics_url))
    want = expected_increase(results)
    assert got == want
    # The session's heads answer with labels, abstain sometimes (has_cat's threshold) and spread
    # over several buckets: the counters were exercised, not only present.
    names = {name for name, _ in got}
    assert {"headmaster_items_total", "headmaster_answers_total", "headmaster_top_score_bucket"} <= names
    assert got[
        ("headmaster_items_total", (("head", "animal"), ("version", str(results[0].heads["animal"].version))))
    ] == len(results)
