"""Real inputs for the export check: photos that ship inside installed packages.

scikit-learn (a dependency) carries two JPEG photos; scikit-image, when installed, adds
more photos and odd modes (greyscale, RGBA, palette). Users can add their own folder.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

from headmaster.errors import ExportError
from headmaster.images import IMAGE_SUFFIXES

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "logo.png")


def reference_images(extra: Path | None = None) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) of real photos: scikit-learn's, scikit-image's, and `extra`'s."""
    folder = importlib.resources.files("sklearn.datasets") / "images"
    found = [(f"sklearn/{name}", (folder / name).read_bytes()) for name in ("china.jpg", "flower.jpg")]
    if importlib.util.find_spec("skimage") is not None:
        data = importlib.resources.files("skimage.data")
        found += [(f"skimage/{name}", (data / name).read_bytes()) for name in SKIMAGE_PHOTOS if (data / name).is_file()]
    if extra is not None:
        files = sorted(p for p in Path(extra).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ExportError(
                f"{extra} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})", option="check_images"
            )
        found += [(str(p), p.read_bytes()) for p in files[:64]]
    return found


def reference_prompts() -> list[str]:
    return [
        "a photo of a cat",
        "a photo of a dog sleeping on a sofa",
        "a red flower in a garden",
        "an old temple in China",
        "a cup of coffee on a table",
        "a rocket on the launch pad",
        "",
        "a very long prompt " + "with many repeated words " * 20,
    ]


def reference_texts() -> list[str]:
    """Real prose for a text encoder's export check: the docstrings of a few standard-library
    modules (the longest run past a 256-token context, so truncation is checked too), and text
    with accents, CJK characters and emoji."""
    import argparse
    import csv
    import json
    import textwrap

    docs = [(m.__doc__ or "").strip() for m in (json, csv, argparse, textwrap)]
    return [d for d in docs if d] + [
        "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \u2014 na\u00efve r\u00e9sum\u00e9",
        "\u6771\u4eac\u90fd\u306e\u5929\u6c17 \U0001f600 weather in Tokyo",
    ]


# scikit-image's other photos: never used for calibration, so an int8 tower is judged on
# images its quantization ranges were not fitted to (export/quantize.py's promotion gate).
SKIMAGE_HELD_OUT = (
    "brick.png",
    "cell.png",
    "clock_motion.png",
    "coins.png",
    "color.png",
    "grass.png",
    "gravel.png",
    "horse.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "phantom.png",
    "retina.jpg",
    "text.png",
    "chessboard_RGB.png",
)


def _png(pixels) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def held_out_images(faces: int = 100, digits: int = 100) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) of real images that are not `reference_images()`: scikit-learn's
    handwritten digits (every 18th of 1,797, 8x8 greys) and, with scikit-image installed, its
    other photos and the first `faces` of its LFW faces (25x25 greys)."""
    from sklearn.datasets import load_digits

    found = []
    if importlib.util.find_spec("skimage") is not None:
        data = importlib.resources.files("skimage.data")
        found += [
            (f"skimage/{name}", (data / name).read_bytes()) for name in SKIMAGE_HELD_OUT if (data / name).is_file()
        ]
        if faces and (data / "lfw_subset.npy").is_file():
            import numpy as np

            with (data / "lfw_subset.npy").open("rb") as f:
                lfw = np.load(f)
            found += [
                (f"skimage/lfw_subset[{i}]", _png((face * 255).clip(0, 255))) for i, face in enumerate(lfw[:faces])
            ]
    images = load_digits().images
    found += [(f"sklearn/digits[{i}]", _png(images[i] * 255 / 16)) for i in range(0, len(images), 18)[:digits]]
    return found
