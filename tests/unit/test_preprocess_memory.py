"""Bounded work per image (issue 10): limits checked from the header, peak memory measured.

Peak memory is measured honestly: preprocessing runs in a fresh subprocess, which reads its
resident set (VmRSS) once idle with the payload already in memory, resets the high-water mark
(/proc/self/clear_refs) and reads VmHWM after. Before the fix, a 10 KB 1x3000 PNG cost +637 MB
and a 16-megapixel JPEG +128 MB (EXIF transpose copied every image).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from headmaster.served import preprocess
from headmaster.served.preprocess import (
    MAX_ASPECT_RATIO,
    MAX_PIXELS,
    InvalidImage,
    decode_image,
    limits_from_parameters,
    preprocess_bytes,
)

CLIP = {"size": [224, 224], "resize_mode": "shortest", "interpolation": "bicubic"}
BUDGET = 150e6  # bytes above idle per image in flight
PHOTO = Image.fromarray(skimage.data.astronaut())


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def strip(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.resize(skimage.data.astronaut(), (height, width, 3)).astype(np.uint8))


# ------------------------------------------------------------------ limits, from the header


@pytest.mark.parametrize("width", [3000, 6000, 99_999])
def test_extreme_aspect_ratios_are_refused_naming_the_limit(width):
    data = encode(strip(width, 1), "PNG")
    assert len(data) < 200_000
    with pytest.raises(
        InvalidImage,
        match=rf"image is {width}x1: aspect ratio {width}\.00:1 is over the limit "
        r"of 32:1 \(max_aspect_ratio\); crop or pad it nearer to square",
    ):
        preprocess_bytes(data, CLIP)


def test_aspect_ratio_at_the_limit_is_served_and_the_limit_is_configurable():
    assert preprocess_bytes(encode(strip(32 * 20, 20), "PNG"), CLIP).shape == (3, 224, 224)
    with pytest.raises(InvalidImage, match=r"over the limit of 4:1 \(max_aspect_ratio\)"):
        preprocess_bytes(encode(strip(100, 20), "PNG"), {**CLIP, "max_aspect_ratio": 4})


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    data = encode(PHOTO.resize((1200, 1000)), "PNG")
    with pytest.raises(
        InvalidImage,
        match=r"image is 1200x1000 = 1200000 pixels, over the limit of 1000000 "
        r"\(max_pixels\); send an image of at most 1000000 pixels",
    ):
        preprocess_bytes(data, {**CLIP, "max_pixels": 1_000_000})
    assert preprocess_bytes(data, {**CLIP, "max_pixels": 1_200_000}).shape == (3, 224, 224)


def test_default_limits():
    assert (MAX_PIXELS, MAX_ASPECT_RATIO) == (16_000_000, 32.0)
    assert preprocess_bytes(encode(PHOTO.resize((4000, 4000)), "JPEG"), CLIP).shape == (3, 224, 224)


def test_large_jpegs_decode_at_reduced_size_within_two_levels_of_the_full_size_path():
    """A JPEG over max_pixels decodes at 1/2..1/8 size (libjpeg DCT scaling), never below 4x the
    encoder's input side; its pixels stay within 2 levels of 255 (mean under 0.25) of a
    full-size decode: libjpeg's scaled IDCT averages 2x2 blocks where the full path's bicubic
    filter would, the only difference is rounding."""
    data = encode(PHOTO.resize((2400, 1800), Image.BICUBIC), "JPEG", quality=90)
    drafted = decode_image(data, max_pixels=1_500_000, draft_side=4 * 224)
    assert drafted.size == (1200, 900)
    reduced = preprocess_bytes(data, {**CLIP, "max_pixels": 1_500_000}).astype(int)
    full = preprocess_bytes(data, CLIP).astype(int)
    assert np.abs(reduced - full).max() <= 2 and np.abs(reduced - full).mean() < 0.25
    # Within max_pixels: decoded at full size, as before.
    assert decode_image(data, max_pixels=2400 * 1800, draft_side=4 * 224).size == (2400, 1800)


# Real photos upscaled to phone-camera sizes.
PHONE_SIZES = {
    (4032, 3024): 2,
    (3024, 4032): 2,
    (4000, 3000): 2,
    (8000, 6000): 4,
    (2400, 1800): 2,
    (4001, 2999): 1,
    (2401, 1800): 1,
}  # odd sides: full size (a scaled pixel must cover whole ones)


@pytest.mark.parametrize("size", PHONE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_every_large_jpeg_decodes_at_reduced_size_within_three_levels_of_the_exact_path(name, size):
    """By default (issue 12) a JPEG whose sides the scale divides and whose shortest side is at
    least 8x the encoder's input decodes at 1/2..1/8 size, never below 4x: several times less
    decode time for a phone photo. Resize targets come from the full size."""
    data = encode(Image.fromarray(getattr(skimage.data, name)()).resize(size, Image.LANCZOS), "JPEG", quality=90)
    scale = PHONE_SIZES[size]
    assert decode_image(data, draft_side=4 * 224, reduce=True).size == (size[0] // scale, size[1] // scale)
    reduced = preprocess_bytes(data, CLIP).astype(int)
    exact = preprocess_bytes(data, {**CLIP, "exact_decode": True}).astype(int)
    assert np.abs(reduced - exact).max() <= 3 and np.abs(reduced - exact).mean() < 0.25
    if scale == 1:
        assert np.array_equal(reduced, exact)


def test_reduced_decode_keeps_the_exact_path_for_jpegs_under_8x_the_input_and_for_other_formats():
    small = encode(PHOTO.resize((1700, 1200)), "JPEG")  # 1/2 would be 600 < 4 x 224: full size
    assert decode_image(small, draft_side=4 * 224, reduce=True).size == (1700, 1200)
    assert np.array_equal(preprocess_bytes(small, CLIP), preprocess_bytes(small, {**CLIP, "exact_decode": True}))
    png = encode(PHOTO.resize((2000, 2000)), "PNG")
    assert decode_image(png, draft_side=4 * 224, reduce=True).size == (2000, 2000)


def test_a_rotated_large_jpeg_keeps_its_upright_geometry_when_reduced():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(PHOTO.resize((4000, 3000), Image.BICUBIC), "JPEG", quality=90, exif=exif.tobytes())
    assert decode_image(data, draft_side=4 * 224, reduce=True).size == (1500, 2000)  # upright
    reduced = preprocess_bytes(data, {**CLIP, "resize_mode": "longest", "fill_color": 0}).astype(int)
    exact = preprocess_bytes(data, {**CLIP, "resize_mode": "longest", "exact_decode": True}).astype(int)
    assert np.abs(reduced - exact).max() <= 3 and np.abs(reduced - exact).mean() < 0.25


def test_jpegs_too_large_even_at_reduced_size_are_refused():
    data = encode(PHOTO.resize((2400, 1800)), "JPEG")
    # 1/4 size would be 600x450, under the 4 x 224 floor: only 1/2 is allowed, still too many pixels.
    with pytest.raises(InvalidImage, match=r"over the limit of 500000 even decoded at 1/2 size \(max_pixels\)"):
        preprocess_bytes(data, {**CLIP, "max_pixels": 500_000})
    with pytest.raises(InvalidImage, match=r"over the limit of 100000 \(max_pixels\)"):
        decode_image(data, max_pixels=100_000)  # no draft_side: never reduced


def test_progressive_jpegs_are_refused_when_their_coefficients_overflow_the_budget():
    data = encode(PHOTO.resize((2000, 2000)), "JPEG", progressive=True, subsampling=0)
    with pytest.raises(
        InvalidImage,
        match=r"progressive JPEG of 2000x2000 needs about \d+ MiB to decode, over "
        r"the budget of \d+ MiB \(8 bytes x max_pixels 4000000\)",
    ):
        preprocess_bytes(data, {**CLIP, "max_pixels": 4_000_000, "exact_decode": True})
    assert preprocess_bytes(data, {**CLIP, "max_pixels": 6_000_000, "exact_decode": True}).shape == (3, 224, 224)
    # Decoded at 1/2 size (1000x1000 >= 4 x 224), the output buffer is a quarter: within budget.
    assert preprocess_bytes(data, {**CLIP, "max_pixels": 4_000_000}).shape == (3, 224, 224)


def test_pillow_resize_box_is_not_bit_exact_so_the_crop_stays_after_the_resize():
    """Resizing only the crop's source box (resize(box=...)) reads the same filter taps, but
    Pillow passes the box as float32, so some output pixels move by 1 level: the served
    pixels must equal open_clip's exactly, so we resize then crop, and max_aspect_ratio
    bounds the resized image instead (at most 224 x 7168 pixels for a 224 input at 32:1)."""
    image = Image.fromarray(skimage.data.chelsea())  # 451x300 -> 336x224, crop 224x224 at left 56
    full = np.asarray(image.resize((336, 224), Image.BICUBIC).crop((56, 0, 280, 224))).astype(int)
    scale = 451 / 336
    boxed = np.asarray(image.resize((224, 224), Image.BICUBIC, box=(56 * scale, 0, 280 * scale, 300))).astype(int)
    assert np.abs(full - boxed).max() == 1 and 0 < (full != boxed).mean() < 0.001


def test_limits_come_from_model_parameters():
    defaults = limits_from_parameters({})
    assert defaults["max_pixels"] == MAX_PIXELS and defaults["max_aspect_ratio"] == MAX_ASPECT_RATIO
    assert defaults["decode_concurrency"] >= 1
    assert limits_from_parameters({"threads": "3"})["decode_concurrency"] == 3  # the older parameter
    given = limits_from_parameters(
        {
            "max_pixels": "1000",
            "max_aspect_ratio": "4.5",
            "decode_concurrency": "2",
            "threads": "8",
            "max_request_bytes": "4096",
        }
    )
    assert given == {
        "max_pixels": 1000,
        "max_aspect_ratio": 4.5,
        "decode_concurrency": 2,
        "max_request_bytes": 4096,
        "exact_decode": False,
        "decoder": "pillow",
    }
    assert limits_from_parameters({"decoder": "torchvision"})["decoder"] == "torchvision"
    # One decode thread per core this process may use (a container's cpuset), not per host core.
    assert defaults["decode_concurrency"] == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="decoder must be one of pillow, torchvision"):
        limits_from_parameters({"decoder": "nvjpeg"})
    assert limits_from_parameters({"exact_decode": "true"})["exact_decode"] is True
    assert limits_from_parameters({}, {"exact_decode": True})["exact_decode"] is True
    assert defaults["max_request_bytes"] == 64 * 1024 * 1024
    with pytest.raises(ValueError, match="must be positive"):
        limits_from_parameters({"max_aspect_ratio": "0.5"})


# ------------------------------------------------------------------ peak memory, measured

MEASURE = textwrap.dedent("""
    import io, json, sys, time
    import numpy as np
    from PIL import Image
    from headmaster.served import preprocess

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    paths, cfg, mode = sys.argv[1:-2], json.loads(sys.argv[-2]), sys.argv[-1]
    payloads = [open(p, "rb").read() for p in paths]
    warm = io.BytesIO(); Image.new("RGB", (600, 400)).save(warm, "JPEG")
    if mode == "model":  # the model itself, with its thread pool, behind a stand-in of pb_utils
        from tests.unit.test_preprocess_memory import FakeRequest, fake_pb_utils, model_args
        sys.modules["triton_python_backend_utils"] = fake_pb_utils()
        model = preprocess.TritonPythonModel()
        model.initialize(model_args(cfg))
        model.execute([FakeRequest([warm.getvalue()] * 4)])
        run = lambda: model.execute([FakeRequest(payloads)])[0]
    else:
        preprocess.preprocess_bytes(warm.getvalue(), cfg)
        def run():
            try:
                return preprocess.preprocess_bytes(payloads[0], cfg)
            except preprocess.InvalidImage as e:
                return e
    idle = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    started = time.perf_counter()
    result = run()
    peak = status("VmHWM:") - idle
    error = getattr(result, "error", None) or (result if isinstance(result, Exception) else None)
    print(json.dumps({"peak": peak, "seconds": time.perf_counter() - started,
                      "error": str(error) if error is not None else None}))
""")


def measure(paths: list[Path], cfg=CLIP, mode="one") -> dict:
    # A fresh interpreter (the same one), run from the repository root so `tests` imports.
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, paths), json.dumps(cfg), mode],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


SIDE = 4000  # 4000 x 4000 = MAX_PIXELS


def _images():
    big = PHOTO.resize((SIDE, SIDE), Image.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6
    grey16 = (np.asarray(big.convert("L")).astype(">u2") * 257).tobytes()
    return {
        "1x3000.png": lambda: encode(strip(3000, 1), "PNG"),
        "1x6000.png": lambda: encode(strip(6000, 1), "PNG"),
        "1x99999.png": lambda: encode(strip(99_999, 1), "PNG"),
        "limit.png": lambda: encode(big, "PNG", compress_level=1),
        "limit.jpg": lambda: encode(big, "JPEG", quality=85),
        "limit-exif-rotated.jpg": lambda: encode(big, "JPEG", quality=85, exif=exif.tobytes()),
        "limit-cmyk.jpg": lambda: encode(big.convert("CMYK"), "JPEG", quality=85),
        "limit-rgba.png": lambda: encode(big.convert("RGBA"), "PNG", compress_level=1),
        "limit-16bit.pgm": lambda: f"P5 {SIDE} {SIDE} 65535\n".encode() + grey16,
        "limit-32to1.png": lambda: encode(PHOTO.resize((22_624, 707)), "PNG", compress_level=1),
        "limit-progressive.jpg": lambda: encode(big, "JPEG", quality=85, progressive=True),
        "48mp-drafted.jpg": lambda: encode(PHOTO.resize((8000, 6000), Image.BILINEAR), "JPEG", quality=85),
    }


@pytest.fixture(scope="module")
def large_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("large-images")
    paths = {}
    for name, make in _images().items():
        paths[name] = folder / name
        paths[name].write_bytes(make())
    return paths


REFUSED = {
    "1x3000.png": "aspect ratio 3000.00:1",
    "1x6000.png": "aspect ratio 6000.00:1",
    "1x99999.png": "aspect ratio 99999.00:1",
}


@pytest.mark.parametrize(
    "name",
    [
        "1x3000.png",
        "1x6000.png",
        "1x99999.png",
        "limit.png",
        "limit.jpg",
        "limit-exif-rotated.jpg",
        "limit-cmyk.jpg",
        "limit-rgba.png",
        "limit-16bit.pgm",
        "limit-32to1.png",
        "limit-progressive.jpg",
        "48mp-drafted.jpg",
    ],
)
def test_peak_memory_of_one_image_is_under_150_mb(large_files, name):
    result = measure([large_files[name]])
    if name in REFUSED:
        assert REFUSED[name] in (result["error"] or "")
    else:
        assert result["error"] is None
    assert result["peak"] < BUDGET, f"{name}: +{result['peak'] / 1e6:.0f} MB"


def test_eight_large_images_through_the_model_stay_within_the_decode_concurrency(large_files):
    names = ["limit.png", "limit.jpg", "limit-exif-rotated.jpg", "limit-cmyk.jpg"] * 2
    result = measure([large_files[n] for n in names], {**CLIP, "decode_concurrency": 2}, mode="model")
    assert result["error"] is None
    assert result["peak"] < 2 * BUDGET, f"+{result['peak'] / 1e6:.0f} MB"


# ------------------------------------------------------------------ a stand-in for Triton's pb_utils


class FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class FakeRequest:
    def __init__(self, items: list[bytes]):
        self.image = FakeTensor("IMAGE", np.array([[i] for i in items], dtype=object))


def fake_pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")

    class TritonError(Exception):
        INVALID_ARG = 3

        def __init__(self, message, code=None):
            super().__init__(message)
            self.code = code

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error = output_tensors, error

    pb.Tensor, pb.TritonError, pb.InferenceResponse = FakeTensor, TritonError, InferenceResponse
    pb.get_input_tensor_by_name = lambda request, name: request.image
    return pb


LIMITS = ("max_pixels", "max_aspect_ratio", "decode_concurrency")


def model_args(cfg: dict) -> dict:
    """The model config Triton passes to initialize: limits as parameters (string values)."""
    params = {
        "preprocessing": json.dumps({k: v for k, v in cfg.items() if k not in LIMITS}),
        **{k: str(cfg[k]) for k in LIMITS if k in cfg},
    }
    return {"model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in params.items()}})}


def test_the_model_answers_each_request_and_bounds_its_decode_threads(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    model = preprocess.TritonPythonModel()
    model.initialize(model_args({**CLIP, "decode_concurrency": 2, "max_aspect_ratio": 8}))
    try:
        assert model.pool._max_workers == 2 and model.cfg["max_aspect_ratio"] == 8
        good, wide = encode(PHOTO, "JPEG"), encode(strip(90, 10), "PNG")
        ok, bad = model.execute([FakeRequest([good, good]), FakeRequest([good, wide])])
        assert ok.error is None and ok.output_tensors[0].as_numpy().shape == (2, 3, 224, 224)
        assert bad.error.code == 3 and str(bad.error).startswith("IMAGE[1]: image is 90x10: aspect ratio 9.00:1")
    finally:
        model.finalize()
