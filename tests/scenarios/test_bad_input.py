"""One bad image fails its own request with INVALID_ARGUMENT / 400; nothing else breaks."""

from __future__ import annotations

import asyncio
import importlib.resources

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from headmaster.client import Classification, Failure, HeadmasterClient, InvalidInputError
from tests.helpers import assert_image_refused


def truncated_png() -> bytes:
    data = (importlib.resources.files("skimage.data") / "chelsea.png").read_bytes()
    return data[: len(data) // 2]


BAD = {
    "corrupt bytes": (b"\xff\xd8\xff\xe0garbage" * 10, "corrupt|not a readable image|cannot identify"),
    "empty payload": (b"", r"empty payload \(0 bytes\)"),
    "text file": (b"name,label\nfoo.jpg,cat\n", "not an image: Pillow cannot identify the format"),
    "truncated png": (truncated_png(), "corrupt or truncated PNG data"),
}


def image_input(module, items: list[bytes]):
    tensor = module.InferInput("IMAGE", [len(items), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[i] for i in items], dtype=object))
    return tensor


@pytest.mark.parametrize(
    "module, status", [(grpcclient, "StatusCode.INVALID_ARGUMENT"), (httpclient, "400")], ids=["grpc", "http"]
)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_image_is_an_invalid_argument_saying_why(server, case, module, status):
    data, message = BAD[case]
    assert_image_refused(server, module, data, status, message)


def preprocess_counts(url: str) -> tuple[int, int]:
    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("preprocess", as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
    finally:
        client.close()


def test_bad_requests_in_a_dynamic_batch_do_not_fail_their_neighbours(server, jpeg_photos):
    """24 concurrent requests, 8 of them bad: the 16 good ones all answer correctly, in
    batches that Triton's dynamic batcher formed from good and bad requests together."""
    good = list(jpeg_photos.values())
    payloads = [BAD[sorted(BAD)[i % 4]][0] if i % 3 == 0 else good[i % len(good)] for i in range(24)]

    async def send_all():
        client = grpcaio.InferenceServerClient(server.grpc_url)
        try:

            async def one(data):
                try:
                    result = await client.infer("classify", [image_input(grpcaio, [data])])
                    return result.as_numpy("EMBEDDING")[0]
                except InferenceServerException as e:
                    return e

            return await asyncio.gather(*(one(p) for p in payloads))
        finally:
            await client.close()

    inferences_before, executions_before = preprocess_counts(server.grpc_url)
    answers = asyncio.run(send_all())
    inferences_after, executions_after = preprocess_counts(server.grpc_url)

    with HeadmasterClient(server.grpc_url) as client:
        expected = {data: client.embed([data])[0].embedding for data in set(good)}
    for i, (payload, answer) in enumerate(zip(payloads, answers)):
        if i % 3 == 0:
            assert isinstance(answer, InferenceServerException) and answer.status() == "StatusCode.INVALID_ARGUMENT"
        else:
            assert isinstance(answer, np.ndarray), f"request {i} failed: {answer}"
            np.testing.assert_allclose(answer, expected[payload], atol=1e-5)
    # The batcher merged requests: fewer executions than requests reached preprocess.
    assert inferences_after - inferences_before >= 24
    assert executions_after - executions_before < 24


def test_the_client_isolates_bad_images_inside_its_own_batches(server, jpeg_photos):
    good = list(jpeg_photos.values())[:4]
    images = [good[0], BAD["text file"][0], good[1], good[2], BAD["truncated png"][0], good[3]]
    with HeadmasterClient(server.grpc_url, batch_size=3) as client:
        results = client.classify(images)
        with pytest.raises(InvalidInputError, match="empty payload"):
            client.classify_one(b"")
    assert [type(r) for r in results] == [
        Classification,
        Failure,
        Classification,
        Classification,
        Failure,
        Classification,
    ]
    assert "Pillow cannot identify" in results[1].error
    assert "truncated PNG" in results[4].error


def test_server_is_still_ready_after_bad_input(server, jpeg_photos):
    with HeadmasterClient(server.grpc_url) as client:
        assert client.is_ready()
        assert client.classify([next(iter(jpeg_photos.values()))])[0].ok
