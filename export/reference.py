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
        found += [(f"skimage/{name}", (data / name).read_bytes()) for name in SKIMAGE_PHOTOS
                  if (data / name).is_file()]
    if extra is not None:
        files = sorted(p for p in Path(extra).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ExportError(f"{extra} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})", option="check_images")
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
