"""The image encoder's cache of embeddings (served/runtime.py) and preprocess's cache of decoded
pixels (served/preprocess.py): a repeated image skips decode and the encoder, the heads still run
live, each cache stays within its bound, and their hits and misses are counted on the metrics port.

One server on a repository of its own whose caches hold exactly three embeddings and two images'
pixels.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from headmaster.client import HeadmasterClient
from headmaster.export.card import EncoderCard
from headmaster.repository.config import parse
from headmaster.served.cache import (
    CACHE_BYTES_METRIC,
    CACHE_ENTRIES_METRIC,
    CACHE_HITS_METRIC,
    CACHE_MISSES_METRIC,
    DECODED_BYTES_METRIC,
    DECODED_ENTRIES_METRIC,
    DECODED_HITS_METRIC,
    DECODED_MISSES_METRIC,
    ENTRY_OVERHEAD,
)
from headmaster.server import live
from tests.helpers import ARTIFACTS, ZERO_SHOT, build_repo, start_server, written_version
from tests.live_metrics import scrape

pytestmark = pytest.mark.portable_only("the cache lives in the portable runner (python backend)")

EMBED_DIM = 384  # the test encoder's (tests/conftest.py MODEL)
ENTRY = EMBED_DIM * 4 + ENTRY_OVERHEAD
HELD = 3  # embeddings the cache of this module's repository holds
HELD_PIXELS = 2  # images whose decoded pixels preprocess's cache holds


def pixels_entry(encoder_dir) -> int:
    """Bytes of one image's pixels in preprocess's cache: uint8 [3, H, W] of the encoder's input."""
    height, width = EncoderCard.load(encoder_dir).preprocessing["size"]
    return 3 * height * width + ENTRY_OVERHEAD


@pytest.fixture(scope="module")
def cache_served(encoder_dir, tmp_path_factory):
    repo = build_repo(
        encoder_dir,
        tmp_path_factory.mktemp("cache") / "model_repository",
        heads={"animal": ZERO_SHOT["animal"]},
        embedding_cache_mb=HELD * ENTRY / 2**20,
        decoded_cache_mb=HELD_PIXELS * pixels_entry(encoder_dir) / 2**20,
    )
    server = start_server(repo, ARTIFACTS / "embedding-cache")
    yield server, repo
    server.stop()


def cache_metrics(server) -> dict[str, float]:
    found = scrape(server.metrics_url, "headmaster_embedding_cache")
    return {name: value for (name, labels), value in found.items() if ("model", "image_encoder") in labels}


def decoded_metrics(server) -> dict[str, float]:
    found = scrape(server.metrics_url, "headmaster_decoded_cache")
    return {name: value for (name, labels), value in found.items() if ("model", "preprocess") in labels}


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_only_the_image_encoder_carries_the_bound(cache_served):
    _, repo = cache_served
    image = parse((repo / "image_encoder" / "config.pbtxt").read_text())
    assert int(image.parameters["cache_bytes"].string_value) == int(HELD * ENTRY)
    assert "cache_bytes" not in parse((repo / "text_encoder" / "config.pbtxt").read_text()).parameters


def test_preprocess_carries_its_own_bound(cache_served, encoder_dir):
    _, repo = cache_served
    preprocess = parse((repo / "preprocess" / "config.pbtxt").read_text())
    assert int(preprocess.parameters["cache_bytes"].string_value) == int(HELD_PIXELS * pixels_entry(encoder_dir))


def test_a_repeated_jpeg_skips_decode_by_its_bytes_and_embeds_the_same(cache_served):
    server, _ = cache_served
    image, same_size = jpeg(20), jpeg(21)  # two images of one size: other bytes, other pixels
    with HeadmasterClient(server.grpc_url) as client:
        before = decoded_metrics(server)
        first = client.embed([image])[0].embedding
        after_first = decoded_metrics(server)
        again = client.embed([bytes(bytearray(image))])[0].embedding  # the same bytes in another buffer
        after_again = decoded_metrics(server)
        other = client.embed([same_size])[0].embedding
        after_other = decoded_metrics(server)
    assert after_first[DECODED_MISSES_METRIC] == before.get(DECODED_MISSES_METRIC, 0) + 1
    assert after_again[DECODED_HITS_METRIC] == after_first.get(DECODED_HITS_METRIC, 0) + 1
    assert after_again[DECODED_MISSES_METRIC] == after_first[DECODED_MISSES_METRIC]
    np.testing.assert_array_equal(again, first)  # bit-identical: the pixels were the decoded ones
    assert after_other[DECODED_MISSES_METRIC] == after_again[DECODED_MISSES_METRIC] + 1
    assert after_other[DECODED_HITS_METRIC] == after_again[DECODED_HITS_METRIC]
    assert not np.allclose(other, first)


def test_a_refused_image_is_not_kept(cache_served):
    server, _ = cache_served
    with HeadmasterClient(server.grpc_url) as client:
        before = decoded_metrics(server)
        for _ in range(2):
            (refused,) = client.classify([b"these are not the bytes of an image"])
            assert not refused.ok and "not an image" in refused.error
        after = decoded_metrics(server)
    assert after[DECODED_MISSES_METRIC] == before[DECODED_MISSES_METRIC] + 2
    assert after[DECODED_HITS_METRIC] == before[DECODED_HITS_METRIC]


def test_a_repeated_image_is_answered_from_the_cache_by_its_content(cache_served):
    server, _ = cache_served
    image = jpeg(1)
    with HeadmasterClient(server.grpc_url) as client:
        before = cache_metrics(server)
        first = client.classify([image])[0]
        after_first = cache_metrics(server)
        again = client.classify([bytes(image)])[0]  # the same bytes in another buffer: content, not identity
        after_again = cache_metrics(server)
        other = client.classify([jpeg(2)])[0]
        after_other = cache_metrics(server)
    assert after_first[CACHE_MISSES_METRIC] == before.get(CACHE_MISSES_METRIC, 0) + 1
    assert after_again[CACHE_HITS_METRIC] == after_first.get(CACHE_HITS_METRIC, 0) + 1
    assert after_again[CACHE_MISSES_METRIC] == after_first[CACHE_MISSES_METRIC]
    np.testing.assert_array_equal(again.embedding, first.embedding)
    assert after_other[CACHE_MISSES_METRIC] == after_again[CACHE_MISSES_METRIC] + 1  # new bytes: the encoder runs
    assert not np.allclose(other.embedding, first.embedding)


def test_a_new_head_version_answers_a_cached_image(cache_served):
    server, repo = cache_served
    image = jpeg(3)
    with HeadmasterClient(server.grpc_url) as client:
        old = client.classify([image])[0].heads["animal"]
        card = written_version(repo, "animal", np.random.default_rng(7), ("cat", "dog", "bird"))
        live.head_published(server, "animal")
        hits = cache_metrics(server)[CACHE_HITS_METRIC]
        new = client.classify([image])[0]
    assert cache_metrics(server)[CACHE_HITS_METRIC] == hits + 1  # the embedding came from the cache...
    assert new.heads["animal"].version == card.version != old.version  # ...the answer from the new head
    assert new.heads["animal"].scores != old.scores


def test_the_cache_stays_within_its_bound_and_drops_the_least_recently_used(cache_served):
    server, _ = cache_served
    images = [jpeg(100 + i) for i in range(HELD + 2)]
    with HeadmasterClient(server.grpc_url) as client:
        for image in images:
            client.classify([image])
        metrics = cache_metrics(server)
        assert metrics[CACHE_ENTRIES_METRIC] == HELD
        assert metrics[CACHE_BYTES_METRIC] <= HELD * ENTRY
        client.classify([images[-1]])  # the newest is held
        assert cache_metrics(server)[CACHE_HITS_METRIC] == metrics[CACHE_HITS_METRIC] + 1
        client.classify([images[0]])  # the oldest was dropped: the encoder runs again
        assert cache_metrics(server)[CACHE_MISSES_METRIC] == metrics[CACHE_MISSES_METRIC] + 1


def test_the_decoded_cache_stays_within_its_bound_and_drops_the_least_recently_used(cache_served, encoder_dir):
    server, _ = cache_served
    images = [jpeg(200 + i) for i in range(HELD_PIXELS + 2)]
    with HeadmasterClient(server.grpc_url) as client:
        for image in images:
            client.classify([image])
        metrics = decoded_metrics(server)
        assert metrics[DECODED_ENTRIES_METRIC] == HELD_PIXELS
        assert metrics[DECODED_BYTES_METRIC] <= HELD_PIXELS * pixels_entry(encoder_dir)
        client.classify([images[-1]])  # the newest is held
        assert decoded_metrics(server)[DECODED_HITS_METRIC] == metrics[DECODED_HITS_METRIC] + 1
        client.classify([images[0]])  # the oldest was dropped: decoded again
        assert decoded_metrics(server)[DECODED_MISSES_METRIC] == metrics[DECODED_MISSES_METRIC] + 1
