"""Triton python-backend model: encoded image bytes -> uint8 pixels for the image encoder.

Copied as ``model.py`` into the ``preprocess`` model of a built repository, so it imports
nothing from Headmaster: numpy and Pillow only (NVIDIA's Triton container needs just
``pip install pillow``). Headmaster imports the same functions to embed images locally, so
served and local embeddings share one implementation.

It reproduces open_clip's eval transform (``open_clip.transform.image_transform``) step by
step on the PIL image: resize (shortest / longest / squash), centre crop or pad, convert to
RGB. The float conversion and mean/std normalisation live in the exported encoder graph,
so only uint8 travels between the models (4x less than float32).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's resample codes for open_clip's interpolation names ('random' means bicubic at eval).
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "random": Image.BICUBIC}
_RESIZE_MODES = ("shortest", "longest", "squash")
# File names that folder-walking commands treat as images (decoding goes by content).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic"})


class InvalidImage(ValueError):
    """The bytes of one image cannot be turned into pixels; the message says why."""


def _looks_like_image(data: bytes) -> bool:
    signatures = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
    return data.startswith(signatures) or data[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1")


def _maybe_base64(data: bytes) -> bytes:
    """JSON requests can only carry text: accept base64 (optionally a data: URI) too."""
    if _looks_like_image(data):
        return data
    text = data.strip()
    if text.startswith(b"data:") and b"," in text:
        text = text.split(b",", 1)[1]
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return data
    return decoded if _looks_like_image(decoded) else data


def decode_image(data: bytes, max_pixels: int = 100_000_000) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, GIF, BMP, TIFF; or base64 of them)."""
    if data is None or len(data) == 0:
        raise InvalidImage("empty payload (0 bytes): expected the bytes of an encoded image")
    data = _maybe_base64(bytes(data))
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage(
            f"not an image: Pillow cannot identify the format of these {len(data)} bytes "
            f"(they start with {data[:16]!r}); send JPEG, PNG, WebP, GIF, BMP or TIFF bytes"
        ) from None
    except Exception as e:  # Pillow raises many types for malformed headers
        raise InvalidImage(f"not a readable image: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImage(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    try:
        image.load()  # decode now, so truncated or corrupt data fails here, not later
        # Phone photos store their rotation in EXIF; without this they embed sideways.
        image = ImageOps.exif_transpose(image)
    except Exception as e:
        raise InvalidImage(
            f"corrupt or truncated {image.format or 'image'} data ({len(data)} bytes): {e}"
        ) from None
    return image


def _resize(image: Image.Image, size_hw: tuple[int, int], resample: int) -> Image.Image:
    # torchvision.transforms.functional.resize on a PIL image: no-op when already that size.
    if (image.height, image.width) == tuple(size_hw):
        return image
    return image.resize((size_hw[1], size_hw[0]), resample)


def _keep_ratio_size(image: Image.Image, target_hw: tuple[int, int], longest: float) -> tuple[int, int]:
    # open_clip.transform.ResizeKeepRatio.get_params without the random parts.
    h, w = image.height, image.width
    ratio_h, ratio_w = h / target_hw[0], w / target_hw[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(h / ratio), round(w / ratio)


def _shortest_edge_size(image: Image.Image, size: int) -> tuple[int, int]:
    # torchvision's _compute_resized_output_size for a single int size.
    h, w = image.height, image.width
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


def _center_crop_or_pad(image: Image.Image, size_hw: tuple[int, int], fill: int) -> Image.Image:
    # open_clip.transform.center_crop_or_pad (torchvision's CenterCrop is the fill=0 case).
    crop_h, crop_w = size_hw
    if crop_w > image.width or crop_h > image.height:
        left = (crop_w - image.width) // 2 if crop_w > image.width else 0
        top = (crop_h - image.height) // 2 if crop_h > image.height else 0
        right = (crop_w - image.width + 1) // 2 if crop_w > image.width else 0
        bottom = (crop_h - image.height + 1) // 2 if crop_h > image.height else 0
        image = ImageOps.expand(image, border=(left, top, right, bottom), fill=_fill_for(image, fill))
        if (image.height, image.width) == (crop_h, crop_w):
            return image
    top = int(round((image.height - crop_h) / 2.0))
    left = int(round((image.width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _fill_for(image: Image.Image, fill: int):
    bands = len(image.getbands())
    return fill if bands == 1 else (fill,) * bands


def to_pixels(image: Image.Image, cfg: dict) -> np.ndarray:
    """Apply the encoder's preprocessing; returns uint8 [3, H, W] (normalisation is in the graph)."""
    size = tuple(cfg["size"])
    resample = _RESAMPLE[cfg.get("interpolation", "bicubic")]
    mode = cfg.get("resize_mode", "shortest")
    if mode == "squash":
        image = _resize(image, size, resample)
    elif mode == "shortest":
        if size[0] == size[1]:
            image = _resize(image, _shortest_edge_size(image, size[0]), resample)
        else:
            image = _resize(image, _keep_ratio_size(image, size, 0.0), Image.BICUBIC)
        image = _center_crop_or_pad(image, size, 0)
    elif mode == "longest":
        image = _resize(image, _keep_ratio_size(image, size, 1.0), resample)
        image = _center_crop_or_pad(image, size, int(cfg.get("fill_color", 0)))
    else:
        raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, not {mode!r}")
    image = image.convert(cfg.get("mode", "RGB"))
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def preprocess_bytes(data: bytes, cfg: dict) -> np.ndarray:
    return to_pixels(decode_image(data, int(cfg.get("max_pixels", 100_000_000))), cfg)


class TritonPythonModel:
    """IMAGE (BYTES [1]) -> PIXELS (UINT8 [3, H, W]); one bad image fails only its request."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.cfg = json.loads(params["preprocessing"])
        threads = int(params.get("threads", "0")) or (os.cpu_count() or 1)
        # Pillow releases the GIL while decoding and resizing: threads decode in parallel.
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def _one(self, data):
        try:
            return preprocess_bytes(data, self.cfg)
        except InvalidImage as e:
            return e

    def execute(self, requests):
        pb = self.pb
        batches = [pb.get_input_tensor_by_name(r, "IMAGE").as_numpy().reshape(-1) for r in requests]
        flat = [item for batch in batches for item in batch]
        results = iter(list(self.pool.map(self._one, flat)))
        responses = []
        for batch in batches:
            pixels = [next(results) for _ in range(len(batch))]
            bad = [(i, p) for i, p in enumerate(pixels) if isinstance(p, InvalidImage)]
            if bad:
                message = "; ".join(f"IMAGE[{i}]: {e}" for i, e in bad)
                responses.append(pb.InferenceResponse(error=pb.TritonError(message, pb.TritonError.INVALID_ARG)))
            else:
                responses.append(pb.InferenceResponse([pb.Tensor("PIXELS", np.stack(pixels))]))
        return responses

    def finalize(self):
        self.pool.shutdown(wait=False)
