"""Triton python-backend model: encoded image bytes -> uint8 pixels for the image encoder.

Copied as ``model.py`` into the ``preprocess`` model of a built repository, so it imports
nothing from Headmaster but the cache class copied beside it: numpy and Pillow only (NVIDIA's
Triton container needs just ``pip install pillow``). Headmaster imports the same functions to
embed images locally, so served and local embeddings share one implementation. Served, it keeps
the pixels of the images it decoded by the sha256 of their bytes (``cache_bytes``), so a
repeated image is not decoded again.

It reproduces open_clip's eval transform (``open_clip.transform.image_transform``) step by
step on the PIL image: resize (shortest / longest / squash), centre crop or pad, convert to
RGB; with ``crop_pct`` below 1 (timm backbones), timm's eval transform
(``timm.data.transforms_imagenet_eval``): convert to RGB first (``convert_first``, as timm's
loaders do), resize to floor(size / crop_pct), then centre crop. The float conversion and mean/std normalisation live in the exported encoder graph,
so only uint8 travels between the models (4x less than float32).

Every image mode Pillow opens is first mapped to its 8-bit rendering (``to_8bit``: 16-bit
greys keep their high byte, colour spaces become RGB, float pixels are refused), and the work
one image may cause is bounded from its header (``MAX_PIXELS``, ``MAX_ASPECT_RATIO``; large
JPEGs decode at reduced size), so one image in flight costs under ~150 MB.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The content cache class shared with the encoder runner (served/cache.py): layout.copy_backend
# copies it beside this model.py as ``headmaster_cache.py`` (why a copy, and why that name: the
# rule kernel's import at the top of served/threshold.py); imported as part of the package, the
# package's.
try:
    import headmaster_cache as cache  # the copy beside model.py, in Triton
except ImportError:
    from headmaster.served import cache

# PIL's resample codes for open_clip's interpolation names ('random' means bicubic at eval).
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "random": Image.BICUBIC}
_RESIZE_MODES = ("shortest", "longest", "squash")


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


# Limits on the work one image may cause; each is also a parameter of the preprocess model's
# config (TritonPythonModel.initialize), and a key of the preprocessing dict for local use.
# Peak memory of one image is about 8 bytes per decoded pixel (Pillow keeps RGB, RGBA, CMYK
# as 4 bytes a pixel, and a mode conversion or an EXIF rotation holds a second copy for a
# moment), so 16 million pixels stay under ~150 MB: a 4000x4000 or 4618x3464 photo.
MAX_PIXELS = 16_000_000
# Longest side over shortest side. Beyond it a centre crop shows a sliver of the picture.
MAX_ASPECT_RATIO = 32.0
# Images decoded at once by one model instance (its thread pool); 0 = one per CPU core.
# Peak memory of the instance is about DECODE_CONCURRENCY x 150 MB in the worst case.
DECODE_CONCURRENCY = 0
# Encoded bytes one request may carry (all its images together). Triton 2.51 reads any body
# size itself (it has no request-size option): this keeps oversize requests from being decoded.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
_BYTES_PER_PIXEL = 8  # the budget of one image: max_pixels x 8 bytes
# A large JPEG decodes at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling: 2-4x less preprocessing time
# for a phone photo), but never below this many times the encoder's input side, so the bicubic
# resize after it still shrinks by 4x or more and the pixels stay within 3 levels of 255 of the
# full-size path (mean under 0.25; tests/unit/test_preprocess_memory.py). ``exact_decode``
# turns it off, except for a JPEG over max_pixels, which is reduced to fit or refused.
_DRAFT_MARGIN = 4
# Who decodes: Pillow (exact, CPU threads), or torchvision in batches (nvJPEG on a GPU: TorchDecoder).
DECODERS = ("pillow", "torchvision")


def _refuse_size(width: int, height: int, max_pixels: int, what: str = "") -> InvalidImage:
    return InvalidImage(
        f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        f"{what} (max_pixels); send an image of at most {max_pixels} pixels, e.g. resized so its "
        f"longest side is under {int((max_pixels * max(width, height) / min(width, height)) ** 0.5)}"
    )


def _check_geometry(
    image: Image.Image, max_pixels: int, max_aspect_ratio: float, draft_side: int, reduce: bool
) -> None:
    """Refuse (or, for JPEG, plan a reduced decode of) an image by its header, before decoding.

    ``reduce``: decode a JPEG at the smallest DCT scale that keeps its shortest side >=
    ``draft_side``; otherwise only as far as ``max_pixels`` requires.
    """
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise InvalidImage(
            f"image is {width}x{height}: aspect ratio {ratio:.2f}:1 is over the limit of "
            f"{max_aspect_ratio:g}:1 (max_aspect_ratio); crop or pad it nearer to square"
        )
    pixels = width * height
    if image.format == "JPEG" and len(image.tile) == 1:
        # Progressive (and multi-scan) JPEGs keep every DCT coefficient of the full-size image
        # while decoding, 2 bytes each, whatever the output scale.
        coefficients = 0
        if image.info.get("progressive"):
            h_max = max(h for _, h, _, _ in image.layer)
            v_max = max(v for _, _, v, _ in image.layer)
            coefficients = sum(2 * pixels * h * v // (h_max * v_max) for _, h, v, _ in image.layer)
        scale = 1
        # Beyond max_pixels any scale that fits; otherwise only one that divides both sides, so
        # that every scaled pixel covers whole source pixels (odd sides decode at full size).
        while (
            scale < 8
            and min(width, height) // (scale * 2) >= draft_side > 0
            and (pixels > max_pixels or (reduce and width % (scale * 2) == 0 and height % (scale * 2) == 0))
        ):
            scale *= 2
            pixels = -(-width // scale) * -(-height // scale)
        if pixels <= max_pixels and coefficients + 4 * pixels > _BYTES_PER_PIXEL * max_pixels:
            raise InvalidImage(
                f"progressive JPEG of {width}x{height} needs about {(coefficients + 4 * pixels) >> 20} MiB to "
                f"decode, over the budget of {_BYTES_PER_PIXEL * max_pixels >> 20} MiB (8 bytes x max_pixels "
                f"{max_pixels}); send a baseline JPEG or a smaller image"
            )
        if scale > 1 and pixels <= max_pixels:
            image.draft(image.mode, (width // scale, height // scale))
            return
        if pixels > max_pixels:
            raise _refuse_size(width, height, max_pixels, f" even decoded at 1/{scale} size" if scale > 1 else "")
    elif pixels > max_pixels:
        raise _refuse_size(width, height, max_pixels)


def decode_image(
    data: bytes,
    max_pixels: int = MAX_PIXELS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    draft_side: int = 0,
    reduce: bool = False,
) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, GIF, BMP, TIFF; or base64 of them).

    Returns the first frame, upright (EXIF orientation applied), in one of the 8-bit modes
    open_clip's transform handles: RGB, RGBA, L, LA or P (see ``to_8bit``). Limits are checked
    from the header, before decoding. ``draft_side`` > 0 lets a JPEG over ``max_pixels`` (any
    JPEG, with ``reduce``) decode at reduced size, down to that shortest side.
    """
    return _decode(data, max_pixels, max_aspect_ratio, draft_side, reduce)[0]


def _decode(
    data: bytes, max_pixels: int, max_aspect_ratio: float, draft_side: int, reduce: bool
) -> tuple[Image.Image, tuple[int, int]]:
    """``decode_image``, and the upright size of the full image (before any reduced decode)."""
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
    except Image.DecompressionBombError as e:
        raise InvalidImage(f"image is too large: {e}; the limit is {max_pixels} pixels (max_pixels)") from None
    except Exception as e:  # Pillow raises many types for malformed headers
        raise InvalidImage(f"not a readable image: {type(e).__name__}: {e}") from None
    full_size = image.size
    _check_geometry(image, max_pixels, max_aspect_ratio, draft_side, reduce)
    decoded_size = image.size
    try:
        image.load()  # decode now (the first frame), so truncated or corrupt data fails here, not later
    except Exception as e:
        raise InvalidImage(f"corrupt or truncated {image.format or 'image'} data ({len(data)} bytes): {e}") from None
    image = to_8bit(image)
    try:
        # Phone photos store their rotation in EXIF; without this they embed sideways.
        # In place: no copy when there is nothing to rotate.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as e:
        raise InvalidImage(f"unreadable EXIF orientation in {image.format or 'image'} data: {e}") from None
    upright = full_size if image.size == decoded_size else full_size[::-1]
    return image, upright


# Modes kept as decoded: open_clip's own transform handles them (the parity tests).
_OPEN_CLIP_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P"})
# 16-bit greys: keep the high byte of each value (as Pillow does for 16-bit RGB(A) PNG and
# TIFF, and libpng's strip_16), via Pillow's raw unpackers, without a 32-bit copy.
_HIGH_BYTE = {
    "I;16": "L;16",
    "I;16L": "L;16",
    "I;16B": "L;16B",
    "I;16N": "L;16" if sys.byteorder == "little" else "L;16B",
}


def _sample_format(image: Image.Image) -> tuple[int, int]:
    tags = getattr(image, "tag_v2", None) or {}
    bits = tags.get(258, (0,))
    fmt = tags.get(339, (1,))
    first = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
    return int(first(bits) or 0), int(first(fmt) or 1)


def _high_byte(image: Image.Image, rows: int = 64) -> Image.Image:
    """A 16-bit grey (I;16*, or I holding 0..65535) as L, band by band: no full-size temporaries."""
    out = Image.new("L", image.size)
    for top in range(0, image.height, rows):
        band = image.crop((0, top, image.width, min(image.height, top + rows)))
        if band.mode == "I":
            band = band.convert("I;16")  # values were checked to be within 0..65535
        out.paste(Image.frombytes("L", band.size, band.tobytes(), "raw", _HIGH_BYTE[band.mode]), (0, top))
    return out


def to_8bit(image: Image.Image) -> Image.Image:
    """The 8-bit rendering of a decoded image, in a mode open_clip's transform handles.

    Pillow's own conversions of 16-bit greys to L clip at 255 (a photo turns white) and some
    modes cannot be resized or converted to RGB at all, so every other mode is mapped here,
    before any resizing. Float and signed or 32-bit integer pixels have no standard range:
    those are refused.
    """
    mode = image.mode
    if mode in _OPEN_CLIP_MODES:
        if mode == "P" and "transparency" in image.info:
            return image.convert("RGBA")  # what Pillow itself asks for; then as any RGBA image
        return image
    if mode in _HIGH_BYTE:
        return _high_byte(image)
    if mode == "I":
        bits, sample_format = _sample_format(image)
        low, high = image.getextrema()
        if sample_format != 1 or bits > 16 or low < 0 or high > 65535:
            kind = {2: "signed integer", 3: "floating point"}.get(sample_format, "unsigned integer")
            raise InvalidImage(
                f"image mode I ({bits or 32}-bit {kind} pixels, values {low}..{high}) has no standard range "
                "to map to 8 bits; send an 8-bit or 16-bit unsigned image (PNG, TIFF or JPEG)"
            )
        # Pillow keeps 16-bit PGM / PPM and JPEG 2000 greys as mode I, values 0..65535.
        return _high_byte(image)
    if mode == "F":
        raise InvalidImage(
            "image mode F (32-bit floating point pixels) has no standard range to map to 8 bits; "
            "send an 8-bit or 16-bit unsigned image (PNG, TIFF or JPEG)"
        )
    if mode == "1":
        return image.convert("L")  # 0 / 255; resized like any grey image, not nearest-neighbour
    if mode in ("PA", "RGBa"):
        return image.convert("RGBA")
    if mode == "La":
        return image.convert("LA")
    try:
        return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX: Pillow's 8-bit colour conversions
    except (ValueError, OSError) as e:
        raise InvalidImage(
            f"image mode {mode} cannot be converted to RGB ({e}); send an RGB or greyscale image"
        ) from None


def _resize(
    image: Image.Image, size_hw: tuple[int, int], resample: int, full_size: tuple[int, int] | None = None
) -> Image.Image:
    # torchvision.transforms.functional.resize on a PIL image: no-op when already that size.
    if (image.height, image.width) == tuple(size_hw):
        return image
    box = None
    if full_size and full_size != image.size:
        # A reduced JPEG decode: pixel i covers source pixels [i*s, (i+1)*s). Over max_pixels an
        # odd side is rounded up, its last pixel half outside the picture: resize exactly the part
        # that maps onto the full image.
        scale = round(full_size[0] / image.width)
        box = (0, 0, full_size[0] / scale, full_size[1] / scale)
    return image.resize((size_hw[1], size_hw[0]), resample, box=box)


def _keep_ratio_size(w: int, h: int, target_hw: tuple[int, int], longest: float) -> tuple[int, int]:
    # open_clip.transform.ResizeKeepRatio.get_params without the random parts.
    ratio_h, ratio_w = h / target_hw[0], w / target_hw[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(h / ratio), round(w / ratio)


def _shortest_edge_size(w: int, h: int, size: int) -> tuple[int, int]:
    # torchvision's _compute_resized_output_size for a single int size.
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


def _center_crop_or_pad(image: Image.Image, size_hw: tuple[int, int], fill: int, floor: bool = False) -> Image.Image:
    # open_clip.transform.center_crop_or_pad (torchvision's CenterCrop is the fill=0 case);
    # ``floor``: Hugging Face image processors' centre crop, which rounds the offsets down.
    crop_h, crop_w = size_hw
    if crop_w > image.width or crop_h > image.height:
        left = (crop_w - image.width) // 2 if crop_w > image.width else 0
        top = (crop_h - image.height) // 2 if crop_h > image.height else 0
        right = (crop_w - image.width + 1) // 2 if crop_w > image.width else 0
        bottom = (crop_h - image.height + 1) // 2 if crop_h > image.height else 0
        image = ImageOps.expand(image, border=(left, top, right, bottom), fill=_fill_for(image, fill))
        if (image.height, image.width) == (crop_h, crop_w):
            return image
    if floor:
        top, left = (image.height - crop_h) // 2, (image.width - crop_w) // 2
    else:
        top = int(round((image.height - crop_h) / 2.0))
        left = int(round((image.width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _fill_for(image: Image.Image, fill: int):
    bands = len(image.getbands())
    return fill if bands == 1 else (fill,) * bands


def to_pixels(image: Image.Image, cfg: dict, full_size: tuple[int, int] | None = None) -> np.ndarray:
    """Apply the encoder's preprocessing; returns uint8 [3, H, W] (normalisation is in the graph).

    ``full_size``: (width, height) of the upright image before a reduced decode. Resize targets
    and the source box come from it, so the result has the full-size path's geometry.
    """
    w, h = full_size or image.size
    size = tuple(cfg["size"])
    resample = _RESAMPLE[cfg.get("interpolation", "bicubic")]
    mode = cfg.get("resize_mode", "shortest")
    if cfg.get("convert_first"):
        # timm's loaders convert to RGB on reading, before the transform; open_clip after resizing.
        image = image.convert(cfg.get("mode", "RGB"))
    if mode == "squash":
        image = _resize(image, size, resample, full_size)
    elif mode == "shortest" and float(cfg.get("crop_pct", 1.0)) != 1.0:
        crop_pct = float(cfg["crop_pct"])
        scaled = tuple(int(np.floor(x / crop_pct)) for x in size)
        # timm: torchvision's shortest-edge Resize for a square size, ResizeKeepRatio otherwise.
        target = _shortest_edge_size(w, h, scaled[0]) if scaled[0] == scaled[1] else _keep_ratio_size(w, h, scaled, 0.0)
        image = _center_crop_or_pad(_resize(image, target, resample, full_size), size, 0, bool(cfg.get("crop_floor")))
    elif mode == "shortest":
        # Resize then crop, as open_clip does. Resizing only the crop's source box
        # (resize(box=...)) would skip the long side's pixels, but Pillow passes the box as
        # float32, which moves filter taps by a rounding error and changes ~0.01% of pixels
        # by 1 level; instead max_aspect_ratio bounds the resized image (224 x 7168 at 32:1).
        if size[0] == size[1]:
            image = _resize(image, _shortest_edge_size(w, h, size[0]), resample, full_size)
        else:
            image = _resize(image, _keep_ratio_size(w, h, size, 0.0), Image.BICUBIC, full_size)
        image = _center_crop_or_pad(image, size, 0, bool(cfg.get("crop_floor")))
    elif mode == "longest":
        image = _resize(image, _keep_ratio_size(w, h, size, 1.0), resample, full_size)
        image = _center_crop_or_pad(image, size, int(cfg.get("fill_color", 0)))
    else:
        raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, not {mode!r}")
    image = image.convert(cfg.get("mode", "RGB"))
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def preprocess_bytes(data: bytes, cfg: dict) -> np.ndarray:
    """Encoded bytes -> uint8 [3, H, W]; limits from ``cfg`` (``max_pixels``, ``max_aspect_ratio``)."""
    draft_side = _DRAFT_MARGIN * max(cfg["size"])
    image, full_size = _decode(
        data,
        int(cfg.get("max_pixels") or MAX_PIXELS),
        float(cfg.get("max_aspect_ratio") or MAX_ASPECT_RATIO),
        draft_side,
        reduce=not cfg.get("exact_decode", False),
    )
    return to_pixels(image, cfg, full_size)


class TorchDecoder:
    """JPEGs decoded in batches by torchvision (nvJPEG when ``device`` is a GPU) and resized there.

    For a GPU encoder: one CPU thread decodes ~500-900 photos a second, nvJPEG on an H100
    ~10,000 (ENVIRONMENT.md), and the pixels stay on the GPU for the encoder (DLPack). The
    header is still read by Pillow first, so every limit applies as on the Pillow path; what
    this path does not handle goes to the Pillow path instead: other formats, JPEGs over
    max_pixels (reduced there), the 'longest' resize mode and images smaller than the crop.
    Resizing is torch's antialiased bicubic, not Pillow's: pixels differ by a few levels (the
    parity test bounds it), so this path is opt-in (``decoder`` torchvision).
    """

    def __init__(self, cfg: dict, device: str):
        import torch
        import torchvision.io

        self.torch, self.io, self.cfg = torch, torchvision.io, cfg
        self.device = torch.device(device)
        self.size = tuple(cfg["size"])
        self.mode = cfg.get("resize_mode", "shortest")
        self.interpolation = "bicubic" if cfg.get("interpolation", "bicubic") in ("bicubic", "random") else "bilinear"

    def _fits(self, data: bytes) -> tuple[int, int] | None:
        """The upright (width, height) of a JPEG this path can take, else None (Pillow's path)."""
        if self.mode not in ("shortest", "squash") or not data.startswith(b"\xff\xd8\xff"):
            return None
        if float(self.cfg.get("crop_pct", 1.0)) != 1.0:  # timm's resize-then-crop: Pillow's exact path
            return None
        try:
            image = Image.open(io.BytesIO(data))
            _check_geometry(image, int(self.cfg["max_pixels"]), float(self.cfg["max_aspect_ratio"]), 0, False)
            if image.mode not in ("RGB", "L"):  # CMYK and YCCK JPEGs: Pillow's conversions
                return None
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF says: turn by 90 degrees
                width, height = height, width
        except Exception:
            return None  # Pillow's path gives the exact reason
        return (width, height) if min(width, height) >= min(self.size) else None

    def _pixels(self, decoded, width: int, height: int):
        torch = self.torch
        if self.mode == "squash":
            target = self.size
        elif self.size[0] == self.size[1]:
            target = _shortest_edge_size(width, height, self.size[0])
        else:
            target = _keep_ratio_size(width, height, self.size, 0.0)
        x = torch.nn.functional.interpolate(
            decoded[None].float(), size=target, mode=self.interpolation, antialias=True, align_corners=False
        )[0]
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        if self.cfg.get("crop_floor"):  # Hugging Face's centre crop (see _center_crop_or_pad)
            top, left = (x.shape[1] - self.size[0]) // 2, (x.shape[2] - self.size[1]) // 2
        else:
            top = int(round((x.shape[1] - self.size[0]) / 2.0))
            left = int(round((x.shape[2] - self.size[1]) / 2.0))
        return x[:, top : top + self.size[0], left : left + self.size[1]]

    def __call__(self, items: list[bytes], pillow) -> list:
        """uint8 [3, H, W] tensors on ``device`` (or the exception of an image that failed);
        ``pillow(data)`` is the Pillow path, for what this one does not take."""
        torch = self.torch
        datas = [_maybe_base64(bytes(item)) if item is not None and len(item) else b"" for item in items]
        sizes = [self._fits(d) for d in datas]
        jpegs = [i for i, size in enumerate(sizes) if size]
        out: list = [None] * len(items)
        if jpegs:
            tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpegs]
            try:
                decoded = self.io.decode_jpeg(
                    tensors, mode=self.io.ImageReadMode.RGB, device=self.device, apply_exif_orientation=True
                )
            except Exception:  # one bad image spoils the batch call: find it one by one
                decoded = []
                for tensor in tensors:
                    try:
                        decoded.append(
                            self.io.decode_jpeg(
                                tensor, mode=self.io.ImageReadMode.RGB, device=self.device, apply_exif_orientation=True
                            )
                        )
                    except Exception:
                        decoded.append(None)
            for i, image in zip(jpegs, decoded):
                if image is not None:
                    out[i] = self._pixels(image, *sizes[i])
        for i, result in enumerate(out):
            if result is None:
                pixels = pillow(items[i])
                out[i] = pixels if isinstance(pixels, Exception) else torch.from_numpy(pixels).to(self.device)
        return out


def _usable_cores() -> int:
    """The cores this process may run on (a container's cpuset, taskset), not the host's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def limits_from_parameters(params: dict, preprocessing: dict | None = None) -> dict:
    """The optional limit parameters of the model config (string values; absent or "" = default).

    ``max_pixels``: most pixels decoded at full size (JPEGs over it decode at 1/2 to 1/8 size
    when that fits); ``max_aspect_ratio``: longest over shortest side; ``decode_concurrency``:
    images decoded at once by this instance (0 = one per CPU core; the older ``threads``
    parameter is read when it is absent); ``exact_decode``: "true" decodes every JPEG within
    max_pixels at full size (open_clip's exact pixels, slower for large photos). A limit absent
    from ``params`` is taken from the ``preprocessing`` dict when it has one, else the default.
    """
    preprocessing = preprocessing or {}

    def number(name, cast, default):
        value = str(params.get(name, "")).strip()
        return cast(value) if value else default

    concurrency = number("decode_concurrency", int, number("threads", int, DECODE_CONCURRENCY))
    limits = {
        "max_pixels": number("max_pixels", int, int(preprocessing.get("max_pixels") or MAX_PIXELS)),
        "max_aspect_ratio": number(
            "max_aspect_ratio", float, float(preprocessing.get("max_aspect_ratio") or MAX_ASPECT_RATIO)
        ),
        "decode_concurrency": concurrency or _usable_cores(),
        "max_request_bytes": number("max_request_bytes", int, MAX_REQUEST_BYTES),
        "exact_decode": str(params.get("exact_decode", preprocessing.get("exact_decode", ""))).strip().lower()
        in ("1", "true", "yes"),
        "decoder": str(params.get("decoder", "") or "pillow"),
    }
    if limits["decoder"] not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {limits['decoder']!r}")
    if (
        limits["max_pixels"] < 1
        or limits["max_aspect_ratio"] < 1
        or limits["decode_concurrency"] < 1
        or limits["max_request_bytes"] < 1
    ):
        raise ValueError(f"preprocess limits must be positive (aspect ratio >= 1), not {limits}")
    return limits


class TritonPythonModel:
    """IMAGE (BYTES [1]) -> PIXELS (UINT8 [3, H, W]); one bad image fails only its request."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        preprocessing = json.loads(params["preprocessing"])
        self.cfg = {**preprocessing, **limits_from_parameters(params, preprocessing)}
        # Pillow releases the GIL while decoding and resizing: threads decode in parallel, each
        # holding at most one image (~150 MB at the default limits) at a time.
        self.pool = ThreadPoolExecutor(max_workers=self.cfg["decode_concurrency"], thread_name_prefix="decode")
        self.decoder = None
        if self.cfg["decoder"] == "torchvision":
            on_gpu = args.get("model_instance_kind") == "GPU"
            self.decoder = TorchDecoder(self.cfg, f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu")
        # Decoded pixels by the sha256 of the image's bytes exactly as received (content, never a
        # name; base64 of the same image is other bytes, so another entry): a repeated image skips
        # decode and resize. Pillow's path only (the torchvision decoder's pixels stay on the GPU,
        # where hashing and keeping them would cost a copy). The cache lives in this model
        # instance: a preprocess that is reloaded or rebuilt (other preprocessing, other limits)
        # starts empty, so pixels are only ever those this very code and config made. Refusals
        # and failures are never kept: such bytes are decoded (and refused) again every time.
        cache_bytes = int(params.get("cache_bytes", "0") or 0) if self.decoder is None else 0
        self.cache, self.cache_metrics = cache.open_cache(pb_utils, config, cache_bytes, cache.DECODED_PREFIX, "pixels")

    def _one(self, data):
        try:
            return preprocess_bytes(data, self.cfg)
        except Exception as e:  # InvalidImage, or a decoder failing in a way nobody foresaw: this image only
            return e

    def _pillow(self, items: list) -> list:
        """The pixels of each item (or the exception it raised), decoded by the thread pool; with
        a cache, only the items it does not hold are decoded."""
        if self.cache is None:
            return list(self.pool.map(self._one, items))

        def decode(missing: list[int]) -> list:  # refusals and failures stay exceptions: not kept
            made = self.pool.map(self._one, [items[i] for i in missing])
            return [(p,) if isinstance(p, np.ndarray) else p for p in made]

        found, made = self.cache.lookup([self.cache.key_of_bytes(item) for item in items], decode)
        if self.cache_metrics is not None:
            self.cache_metrics.record(len(items) - made, made, self.cache)
        return [entry[0] if isinstance(entry, tuple) else entry for entry in found]

    def execute(self, requests):
        pb = self.pb
        batches = [pb.get_input_tensor_by_name(r, "IMAGE").as_numpy().reshape(-1) for r in requests]
        limit = self.cfg["max_request_bytes"]
        sizes = [sum(len(item) for item in batch) for batch in batches]
        # An oversize request is refused whole before anything in it is decoded.
        flat = [item for batch, size in zip(batches, sizes) if size <= limit for item in batch]
        if self.decoder is None:
            results = iter(self._pillow(flat))
        else:
            results = iter(self.decoder(flat, self._one))
        responses = []
        for batch, size in zip(batches, sizes):
            if size > limit:
                responses.append(
                    pb.InferenceResponse(
                        error=pb.TritonError(
                            f"the request carries {size} bytes of images, over the limit of {limit} (max_request_bytes); "
                            "send fewer or smaller images per request",
                            pb.TritonError.INVALID_ARG,
                        )
                    )
                )
                continue
            pixels = [next(results) for _ in range(len(batch))]
            bad = [(i, p) for i, p in enumerate(pixels) if isinstance(p, InvalidImage)]
            broken = [
                (i, p) for i, p in enumerate(pixels) if isinstance(p, Exception) and not isinstance(p, InvalidImage)
            ]
            if bad:
                message = "; ".join(f"IMAGE[{i}]: {e}" for i, e in bad)
                responses.append(pb.InferenceResponse(error=pb.TritonError(message, pb.TritonError.INVALID_ARG)))
            elif broken:
                message = "; ".join(f"IMAGE[{i}]: could not be decoded: {type(e).__name__}: {e}" for i, e in broken)
                responses.append(pb.InferenceResponse(error=pb.TritonError(message)))
            elif self.decoder is None:
                responses.append(pb.InferenceResponse([pb.Tensor("PIXELS", np.stack(pixels))]))
            else:  # a torch tensor, on the GPU when there is one: handed on without a copy
                import torch.utils.dlpack

                stacked = self.decoder.torch.stack(pixels)
                responses.append(
                    pb.InferenceResponse([pb.Tensor.from_dlpack("PIXELS", torch.utils.dlpack.to_dlpack(stacked))])
                )
        return responses

    def finalize(self):
        self.pool.shutdown(wait=False)
