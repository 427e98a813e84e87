"""The served `classify` ensemble on unusual image modes and on images past the limits."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

from tests.helpers import assert_image_refused, cosine_rows


def image_input(module, items: list[bytes]):
    tensor = module.InferInput("IMAGE", [len(items), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[i] for i in items], dtype=object))
    return tensor


def embed(url: str, items: list[bytes]) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    try:
        return client.infer("classify", [image_input(grpcclient, items)]).as_numpy("EMBEDDING")
    finally:
        client.close()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_16bit_png_embeds_like_its_8bit_picture_not_like_white(server, photos):
    """Issue 9.3: a 16-bit PNG answered 200 with the embedding of an all-white image."""
    grey = np.asarray(Image.open(io.BytesIO(photos["camera.png"])).convert("L"))
    eight_bit = encode(Image.fromarray(grey), "PNG")
    sixteen_bit = encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
    white = encode(Image.new("L", grey.shape[::-1], 255), "PNG")
    e8, e16, ewhite = embed(server.grpc_url, [eight_bit, sixteen_bit, white])
    np.testing.assert_allclose(e16, e8, atol=1e-5)
    assert cosine_rows(e16[None], ewhite[None])[0] < 0.99


@pytest.mark.parametrize(
    "module, status", [(grpcclient, "StatusCode.INVALID_ARGUMENT"), (httpclient, "400")], ids=["grpc", "http"]
)
@pytest.mark.parametrize(
    "case, message",
    [
        ("1x6000 strip", r"image is 6000x1: aspect ratio 6000\.00:1 is over the limit of 32:1 \(max_aspect_ratio\)"),
        ("float TIFF", r"image mode F \(32-bit floating point pixels\) has no standard range"),
    ],
)
def test_images_past_the_limits_are_a_400_naming_the_limit(server, jpeg_photos, case, message, module, status):
    data = {
        "1x6000 strip": lambda: encode(Image.new("RGB", (6000, 1), (90, 120, 200)), "PNG"),
        "float TIFF": lambda: encode(Image.new("F", (64, 48), 0.5), "TIFF"),
    }[case]()
    assert_image_refused(server, module, data, status, message)
    # The server still answers ordinary images.
    assert embed(server.grpc_url, [next(iter(jpeg_photos.values()))]).shape[0] == 1


def test_a_jpeg_over_the_pixel_limit_is_decoded_at_reduced_size_and_answered(server, photos):
    photo = Image.open(io.BytesIO(photos["astronaut.png"])).convert("RGB")
    huge = encode(photo.resize((6000, 4500), Image.BICUBIC), "JPEG", quality=90)  # 27 MP > 16 MP
    modest = encode(photo.resize((3000, 2250), Image.BICUBIC), "JPEG", quality=90)  # the same picture, 6.75 MP
    e_huge, e_modest = embed(server.grpc_url, [huge, modest])
    assert cosine_rows(e_huge[None], e_modest[None])[0] > 0.995
