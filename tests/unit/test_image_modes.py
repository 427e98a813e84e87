"""Every image mode Pillow opens gives the pixels of the same picture in 8 bits (issue 9.3).

Corpus: real photos from scikit-image saved in each mode (PNG, TIFF, JPEG, GIF, PGM, APNG).
Expected pixels: the same picture as an ordinary 8-bit PNG (RGB, RGBA, L) run through the same
preprocessing. Lossless modes must match exactly. Where the mode itself is lossy (JPEG, or an
8-bit colour space such as YCbCr / LAB / HSV that cannot hold every RGB value), the expected
picture is Pillow's own 8-bit RGB rendering of the decoded file, matched exactly, and that
rendering is checked to be the original photo within the colour space's rounding.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import skimage.data
import tifffile
from PIL import Image, ImageCms

from headmaster.served.preprocess import InvalidImage, decode_image, preprocess_bytes, to_8bit

CLIP = {"size": [224, 224], "resize_mode": "shortest", "interpolation": "bicubic"}
SIGLIP = {"size": [256, 256], "resize_mode": "squash", "interpolation": "bicubic"}
PHOTO = skimage.data.astronaut()  # 512x512 RGB
GREY = skimage.data.camera()  # 512x512 L
# A real alpha channel: the coffee photo's brightness, cut to the astronaut's size.
ALPHA = np.asarray(Image.fromarray(skimage.data.coffee()).convert("L").resize((512, 512)))
RNG = np.random.default_rng(0)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA) written by hand: Pillow cannot write them."""
    array = array if array.ndim == 3 else array[..., None]
    height, width, channels = array.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def widen(array: np.ndarray) -> np.ndarray:
    """8-bit values as 16-bit: the value in the high byte, noise in the low byte (the 8-bit
    rendering of a 16-bit value is its high byte, as Pillow renders 16-bit RGB PNGs)."""
    return array.astype(np.uint16) * 256 + RNG.integers(0, 256, array.shape, dtype=np.uint16)


def pixels(data: bytes, cfg=CLIP) -> np.ndarray:
    return preprocess_bytes(data, cfg)


RGB_PNG = encode(Image.fromarray(PHOTO), "PNG")
RGBA_PNG = encode(Image.fromarray(np.dstack([PHOTO, ALPHA])), "PNG")
GREY_PNG = encode(Image.fromarray(GREY), "PNG")
LA_PNG = encode(Image.fromarray(np.dstack([GREY, ALPHA]), "LA"), "PNG")


def pgm16(grey: np.ndarray) -> bytes:
    height, width = grey.shape
    return f"P5 {width} {height} 65535\n".encode() + grey.astype(">u2").tobytes()


# name: (bytes in that mode, the same picture as an 8-bit PNG, the mode Pillow opens it in)
LOSSLESS = {
    "16-bit grey PNG": (png16(widen(GREY)), GREY_PNG, "I;16"),
    "16-bit grey PNG (Pillow-written)": (
        encode(Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"),
        GREY_PNG,
        "I;16",
    ),
    "16-bit grey+alpha PNG": (png16(widen(np.dstack([GREY, ALPHA]))), LA_PNG, "RGBA"),
    "16-bit RGB PNG": (png16(widen(PHOTO)), RGB_PNG, "RGB"),
    "16-bit RGBA PNG": (png16(widen(np.dstack([PHOTO, ALPHA]))), RGBA_PNG, "RGBA"),
    "16-bit grey TIFF": (tiff(widen(GREY)), GREY_PNG, "I;16"),
    "16-bit grey TIFF big-endian": (tiff(widen(GREY), byteorder=">"), GREY_PNG, "I;16B"),
    "16-bit RGB TIFF": (tiff(widen(PHOTO), photometric="rgb"), RGB_PNG, "RGB"),
    "16-bit RGBA TIFF": (
        tiff(widen(np.dstack([PHOTO, ALPHA])), photometric="rgb", extrasamples=["unassalpha"]),
        RGBA_PNG,
        "RGBA",
    ),
    "16-bit PGM (mode I)": (pgm16(widen(GREY)), GREY_PNG, "I"),
    "LA PNG": (LA_PNG, encode(Image.fromarray(np.dstack([GREY, ALPHA]), "LA").convert("RGBA"), "PNG"), "LA"),
    "CMYK TIFF": (encode(Image.fromarray(PHOTO).convert("CMYK"), "TIFF"), RGB_PNG, "CMYK"),
    "16-bit CMYK TIFF": (
        tiff(widen(np.dstack([255 - PHOTO, np.zeros_like(GREY)])), photometric="separated"),
        RGB_PNG,
        "CMYK",
    ),
    "1-bit PNG": (
        encode(Image.fromarray(GREY > 128), "PNG"),
        encode(Image.fromarray((GREY > 128) * np.uint8(255)), "PNG"),
        "1",
    ),
    "1-bit TIFF": (
        encode(Image.fromarray(GREY > 100), "TIFF", compression="group4"),
        encode(Image.fromarray((GREY > 100) * np.uint8(255)), "PNG"),
        "1",
    ),
}


def palette_photo() -> Image.Image:
    return Image.fromarray(PHOTO).quantize(64)


def with_transparency(image: Image.Image, index: int) -> Image.Image:
    image = image.copy()
    image.info["transparency"] = index
    return image


def pa_image() -> Image.Image:
    """PA: a palette photo plus a real alpha channel."""
    p = palette_photo()
    pa = p.convert("PA")
    pa.putalpha(Image.fromarray(ALPHA))
    return pa


P_TRANSPARENT = with_transparency(palette_photo(), 3)
LOSSLESS.update(
    {
        "P with transparency PNG": (encode(P_TRANSPARENT, "PNG"), encode(P_TRANSPARENT.convert("RGBA"), "PNG"), "P"),
        "P with transparency GIF": (
            encode(palette_photo(), "GIF", transparency=3),
            encode(P_TRANSPARENT.convert("RGBA"), "PNG"),
            "P",
        ),
        "PA TIFF": (encode(pa_image(), "TIFF"), encode(pa_image().convert("RGBA"), "PNG"), "PA"),
    }
)


@pytest.mark.parametrize("cfg", [CLIP, SIGLIP], ids=["shortest", "squash"])
@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_modes_give_the_pixels_of_the_8bit_picture(name, cfg):
    data, eight_bit, opened_as = LOSSLESS[name]
    assert Image.open(io.BytesIO(data)).mode == opened_as  # the mode this case is about
    np.testing.assert_array_equal(pixels(data, cfg), pixels(eight_bit, cfg))


def test_16bit_grey_is_not_white_the_reported_defect():
    """Issue 9.3: Pillow's own I;16 -> L conversion clips at 255, a 16-bit photo turned white."""
    ours = pixels(LOSSLESS["16-bit grey PNG (Pillow-written)"][0])
    assert ours.mean() == pytest.approx(pixels(GREY_PNG).mean())
    assert (ours == 255).mean() < 0.05


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_every_16bit_grey_layout_keeps_its_high_byte(mode):
    values = widen(GREY)
    layout = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}[mode]
    image = Image.frombytes(mode, (512, 512), values.astype(layout).tobytes())
    np.testing.assert_array_equal(np.asarray(to_8bit(image)), GREY)


def test_premultiplied_modes_are_unpremultiplied_first():
    la = Image.fromarray(np.dstack([GREY, ALPHA]), "LA")
    assert np.array_equal(np.asarray(to_8bit(la.convert("La"))), np.asarray(la.convert("La").convert("LA")))
    rgba = Image.fromarray(np.dstack([PHOTO, ALPHA]))
    assert to_8bit(rgba.convert("RGBa")).mode == "RGBA"


def srgb_lab():
    return ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")


# name: (bytes, mode opened, the mean difference from the original photo that the colour space
# itself causes, in levels of 255: 8-bit YCbCr / LAB round their values, JPEG compresses)
LOSSY = {
    "CMYK JPEG": (encode(Image.fromarray(PHOTO).convert("CMYK"), "JPEG", quality=95), "CMYK", 3.0),
    "YCbCr TIFF": (encode(Image.fromarray(PHOTO).convert("YCbCr"), "TIFF"), "YCbCr", 1.5),
    "LAB TIFF": (encode(ImageCms.applyTransform(Image.fromarray(PHOTO), srgb_lab()), "TIFF"), "LAB", 1.0),
}


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_colour_spaces_are_converted_to_rgb_before_resizing(name):
    data, opened_as, mean_error = LOSSY[name]
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == opened_as
    rendering = decoded.convert("RGB")  # Pillow's 8-bit RGB rendering of the decoded file
    # ... is the photo, up to the colour space's own rounding (not inverted, not shifted):
    assert np.abs(np.asarray(rendering).astype(int) - PHOTO).mean() < mean_error
    np.testing.assert_array_equal(pixels(data), pixels(encode(rendering, "PNG")))


def test_hsv_images_are_converted_to_rgb_before_resizing():
    hsv = Image.fromarray(PHOTO).convert("HSV")  # no file format stores HSV: an in-memory image
    rendering = hsv.convert("RGB")
    assert np.abs(np.asarray(rendering).astype(int) - PHOTO).mean() < 1.0
    assert to_8bit(hsv).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(to_8bit(hsv)), np.asarray(rendering))


def frames(images: list[Image.Image], fmt: str, **options) -> bytes:
    return encode(images[0], fmt, save_all=True, append_images=images[1:], **options)


OTHERS = [
    Image.fromarray(skimage.data.coffee()[:400, :512]).resize((512, 512)),
    Image.fromarray(skimage.data.chelsea()).resize((512, 512)),
]


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "PNG"], ids=["GIF", "multi-page TIFF", "APNG"])
def test_multi_frame_images_give_their_first_frame(fmt):
    first = palette_photo() if fmt == "GIF" else Image.fromarray(PHOTO)
    rest = [o.quantize(64) if fmt == "GIF" else o for o in OTHERS]
    data = frames([first, *rest], fmt)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    np.testing.assert_array_equal(pixels(data), pixels(encode(first, "PNG")))


# EXIF orientation -> the operation that makes the stored pixels upright; stored = its inverse.
UPRIGHT = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
INVERSE = {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_gives_the_upright_picture(orientation):
    upright = Image.fromarray(skimage.data.chelsea())  # 451x300: not square, rotations show
    method = UPRIGHT[orientation]
    stored = upright if method is None else upright.transpose(INVERSE.get(method, method))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif.tobytes())
    assert decode_image(data).size == upright.size
    np.testing.assert_array_equal(pixels(data), pixels(encode(upright, "PNG")))
    np.testing.assert_array_equal(pixels(data, SIGLIP), pixels(encode(upright, "PNG"), SIGLIP))


@pytest.mark.parametrize(
    "data, message",
    [
        (tiff(GREY.astype(np.float32) / 255), r"image mode F \(32-bit floating point pixels\) has no standard range"),
        (tiff(GREY.astype(np.int16) * 100), r"image mode I \(16-bit signed integer pixels"),
        (tiff(GREY.astype(np.uint32) * 16843009), r"image mode I \(32-bit unsigned integer pixels"),
        (tiff(GREY.astype(np.int32)), r"image mode I \(32-bit signed integer pixels"),
    ],
    ids=["float TIFF", "signed 16-bit TIFF", "32-bit TIFF", "signed 32-bit TIFF"],
)
def test_modes_without_a_standard_range_are_refused_saying_what_to_send(data, message):
    with pytest.raises(InvalidImage, match=message) as caught:
        pixels(data)
    assert "send an 8-bit or 16-bit unsigned image" in str(caught.value)
