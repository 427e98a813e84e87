"""Hot swaps while clients send requests: no request fails, and every answer is consistent.

A dedicated server on a copy of the session repository; 8 client threads classify real
photos without pause while head versions (trained and written), new heads and removed heads
go live one after another through explicit model control.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from headmaster.export.heads import HeadCard, HeadWeights
from headmaster.lifecycle import operations as lifecycle
from headmaster.repository.repo import Repository
from headmaster.rules.threshold import accept
from headmaster.server import live
from headmaster.training.heads.train_head import TrainOptions, train_head
from headmaster.training.heads.trainer import TrainConfig
from tests.helpers import ARTIFACTS, Clients, clone_repo, start_server, subset, written_version

CLIENTS = 8


@pytest.fixture
def live_server(repo, tmp_path):
    copy = clone_repo(repo, tmp_path / "repo")
    server = start_server(copy, ARTIFACTS / "hot-swap")
    yield server, copy
    server.stop()


def test_ten_versions_go_live_under_load_without_a_failed_request(
    live_server, jpeg_photos, digits_dir, embedding_cache, tmp_path
):
    server, repo = live_server
    images = list(jpeg_photos.values())[:4]
    head = "animal"
    published: dict[int, tuple[HeadWeights, dict]] = {}

    def record(version: int) -> None:
        folder = repo / head / str(version)
        published[version] = (HeadWeights.from_onnx(folder / "model.onnx"), HeadCard.load(folder).info())

    record(1)
    rng = np.random.default_rng(0)
    data = subset(
        digits_dir, tmp_path / "digits", {"0": 25, "1": 25, "2": 25}, rename={"0": "cat", "1": "dog", "2": "bird"}
    )
    with Clients(server.grpc_url, images, n=CLIENTS, settle_s=2.0) as load:
        for i in range(10):
            if i % 2 == 0:  # trained from labelled images
                card = train_head(
                    TrainOptions(
                        name=head,
                        repo=repo,
                        data=data,
                        cache_dir=embedding_cache,
                        config=TrainConfig(seed=i, epochs=40),
                    )
                ).card
            else:  # written: other label sets too (the score width changes)
                card = written_version(repo, head, rng, ("cat", "dog", "bird", f"thing{i}")[: 3 + i % 4 // 2])
            record(card.version)
            live.head_published(server, head)
    assert load.failures == []
    assert set(published) == set(range(1, 12))
    seen = {}
    for _, _, result in load.answers:
        answer = result.heads[head]
        weights, info = published[answer.version]  # KeyError: a version that never existed
        expected = weights.scores(result.embedding[None, :])[0]
        np.testing.assert_allclose([answer.scores[label] for label in info["labels"]], expected, atol=1e-4)
        assert list(answer.labels) == accept(expected[None, :], info)[0]
        assert set(answer.scores) == set(info["labels"])
        seen[answer.version] = seen.get(answer.version, 0) + 1
    assert len(seen) >= 6, f"too few versions observed under load: {seen}"
    assert max(seen) == 11  # the last one went live
    assert len(load.answers) > 100


def test_heads_come_and_go_under_load_without_a_failed_request(live_server, jpeg_photos):
    server, repo = live_server
    images = list(jpeg_photos.values())[:2]
    rng = np.random.default_rng(1)
    with Clients(server.grpc_url, images, n=CLIENTS, settle_s=2.0) as load:
        added_at = time.monotonic()
        written_version(repo, "newcomer", rng, ("yes", "no"))
        live.head_published(server, "newcomer")
        loaded_at = time.monotonic()
        time.sleep(2.0)
        removed_at = time.monotonic()
        change = lifecycle.remove(repo, "animal")  # finds the server in the repository's record
        gone_at = time.monotonic()
    assert change.server == server.http_url
    assert load.failures == []
    # Whether a request meets the gap is luck; whether there was one is in Triton's log: an ensemble
    # made invalid by a reload (threshold without the head while classify still named it) is
    # unserved until it reloads too. The CI run of 2026-12-07 lost 2 requests to that gap.
    invalid = [line for line in server.log_text().splitlines() if "Invalid argument" in line]
    assert invalid == []
    # By when each request was sent and answered: a request sent after a load call returned
    # must see the new set of heads (on a busy machine a request can take seconds).
    before = [r for _, answered, r in load.answers if answered < added_at]
    between = [r for sent, answered, r in load.answers if sent > loaded_at and answered < removed_at]
    after = [r for sent, _, r in load.answers if sent > gone_at]
    assert before and between and after
    assert all(set(r.heads) == {"animal", "has_cat"} for r in before)
    assert all(set(r.heads) == {"animal", "has_cat", "newcomer"} for r in between)
    assert all(set(r.heads) == {"has_cat", "newcomer"} for r in after)
    assert Repository(repo).head_names() == ["has_cat", "newcomer"]
