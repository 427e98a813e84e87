"""The torchvision decoder served by the real Triton (issue 12): on a GPU it is nvJPEG with the
pixels handed to the encoder by DLPack; here the same model runs on CPU tensors, so the DLPack
hand-over between two python-backend models is real and only CUDA is missing."""

from __future__ import annotations

import numpy as np
import pytest

from headmaster.client import HeadmasterClient
from tests.helpers import ARTIFACTS, build_repo, cosine_rows, start_server


@pytest.fixture(scope="module")
def torchvision_server(encoder_dir, tmp_path_factory):
    repo = build_repo(
        encoder_dir,
        tmp_path_factory.mktemp("torchvision") / "model_repository",
        decoder="torchvision",
        max_queue_delay_us=20000,
        preferred_batch_sizes=(4, 8),
    )
    server = start_server(repo, ARTIFACTS)
    yield server
    server.stop()


def test_torchvision_decoded_embeddings_match_the_pillow_path(server, torchvision_server, jpeg_photos):
    images = list(jpeg_photos.values())
    with (
        HeadmasterClient(server.grpc_url, batch_size=4) as pillow,
        HeadmasterClient(torchvision_server.grpc_url, batch_size=4) as torchvision,
    ):
        expected = pillow.classify(images)
        served = torchvision.classify(images)
    assert all(r.ok for r in served)
    cosines = cosine_rows(np.stack([r.embedding for r in expected]), np.stack([r.embedding for r in served]))
    assert cosines.min() >= 0.999, cosines


def test_a_bad_image_fails_alone_on_the_torchvision_path(torchvision_server, jpeg_photos):
    good = jpeg_photos["chelsea.jpg"]
    with HeadmasterClient(torchvision_server.grpc_url, batch_size=3) as client:
        results = client.classify([good, good[: len(good) // 2], b"text, not an image"])
    assert [r.ok for r in results] == [True, False, False]
    assert "corrupt or truncated JPEG" in results[1].error and "not an image" in results[2].error
