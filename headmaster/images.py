"""Which files are images: what folder-walking commands (classify, train-head, eval) pick up.

Decoding goes by content (the preprocess model identifies the format from the bytes); the
suffixes only decide which files of a folder are sent at all.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic"})


def collect_images(paths: list[Path], suffixes=IMAGE_SUFFIXES) -> list[Path]:
    """Files named explicitly, plus the image files (``suffixes``) found under named folders."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        else:
            files.append(path)  # sent as-is: a missing or broken file gets its own error line
    return files
