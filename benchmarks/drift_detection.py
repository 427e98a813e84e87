"""Does `headmaster drift` catch drift, and keep quiet otherwise? Items until detection, false alarms.

A digits head (scikit-learn's 1,797 handwritten digits, 1,000 trained on with a reference set,
the rest the pool windows are drawn from) is judged by ``training/evaluation/drift.detect``
against its own training embeddings, as `headmaster drift` does by default. Windows of growing
size n, one seeded draw each:

- outside: 30% of the window are photos (random crops of the photos shipped in scikit-image and
  scikit-learn), 70% pool digits;
- vanished: pool digits with no 0 (one class of ten disappears);
- dark: pool digits with their pixels scaled to 40% (a camera at night);

and the false-alarm rate: 20 windows of in-distribution pool digits at the largest n. The
encoder is open_clip's ViT-S-32 with random weights (no model hub here): it separates by pixels,
not meaning, so a pretrained encoder's figures would differ.

    python benchmarks/drift_detection.py [--sizes 30 60 120 240] [--null-windows 20] [--record]

Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TRAIN = 1000
OUTSIDE_SHARE = 0.3
DARK = 0.4


def write_images(root: Path, rng: np.random.Generator) -> tuple[list[Path], list[int], list[Path], list[Path]]:
    """Digits as PNG (train/ in class folders, pool/), the pool darkened, and photo crops."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from headmaster.export.reference import held_out_images, reference_images

    digits = load_digits()
    order = rng.permutation(len(digits.images))
    pool, pool_labels, dark = [], [], []
    for rank, i in enumerate(order):
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        label = int(digits.target[i])
        if rank < TRAIN:
            folder = root / "train" / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").save(folder / f"{i:04d}.png")
            continue
        (root / "pool").mkdir(exist_ok=True)
        (root / "dark").mkdir(exist_ok=True)
        Image.fromarray(pixels, "L").save(root / "pool" / f"{i:04d}.png")
        Image.fromarray((pixels * DARK).astype(np.uint8), "L").save(root / "dark" / f"{i:04d}.png")
        pool.append(root / "pool" / f"{i:04d}.png")
        dark.append(root / "dark" / f"{i:04d}.png")
        pool_labels.append(label)
    (root / "outside").mkdir()
    photos = [
        Image.open(__import__("io").BytesIO(data)).convert("RGB")
        for _, data in reference_images() + held_out_images(faces=0, digits=0)
    ]
    outside = []
    for k in range(150):  # random crops: more outside images than the 27 photos
        photo = photos[k % len(photos)]
        w, h = photo.size
        side = int(min(w, h) * rng.uniform(0.4, 0.9))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        path = root / "outside" / f"{k:03d}.png"
        photo.crop((x, y, x + side, y + side)).save(path)
        outside.append(path)
    return pool, pool_labels, dark, outside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[30, 60, 120, 240])
    parser.add_argument("--null-windows", type=int, default=20)
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from headmaster.export.encoder import ExportOptions, export_encoder
    from headmaster.repository.build import build_repository
    from headmaster.repository.head_version import HeadVersion
    from headmaster.repository.repo import Repository
    from headmaster.training.embeddings import EmbeddingCache, LocalEmbedder, embed_files
    from headmaster.training.evaluation import drift
    from headmaster.training.heads.train_head import TrainOptions, train_head

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool, pool_labels, dark, outside = write_images(root / "images", rng)
        export_encoder(ExportOptions(model="ViT-S-32", pretrained=None, out=root / "encoder", seed=0))
        build_repository(root / "encoder", root / "repo")
        cache = root / "cache"
        train_head(
            TrainOptions(name="digit", repo=root / "repo", data=root / "images" / "train", cache_dir=cache, ood="flag")
        )
        repository = Repository(root / "repo")
        head = HeadVersion.load(repository, "digit")

        def embed(paths: list[Path]) -> np.ndarray:
            hashes, vectors, _ = embed_files(
                paths, LocalEmbedder(repository), EmbeddingCache(cache, repository.fingerprint)
            )
            return np.stack([vectors[h] for h in hashes])

        pool_x, dark_x, outside_x = embed(pool), embed(dark), embed(outside)
        labels = np.array(pool_labels)
        reference = drift.version_window(head)

        def verdict(x: np.ndarray, seed: int) -> list[str]:
            window = drift.Window("current", "benchmark", x.astype(np.float32))
            report = drift.detect(head, reference, window, min_items=1, seed=seed)
            return [c.name for c in report.checks if c.drift]

        def draw(candidates: np.ndarray, n: int, seed: int) -> np.ndarray:
            return np.random.default_rng(seed).choice(candidates, n, replace=False)

        rows = []
        everyone, no_zero = np.arange(len(pool_x)), np.flatnonzero(labels != 0)
        for n in args.sizes:
            k = int(round(n * OUTSIDE_SHARE))
            mixed = np.concatenate([pool_x[draw(everyone, n - k, n)], outside_x[draw(np.arange(len(outside_x)), k, n)]])
            rows.append(
                (
                    n,
                    verdict(mixed, n),
                    verdict(pool_x[draw(no_zero, n, n + 1)], n),
                    verdict(dark_x[draw(everyone, n, n + 2)], n),
                )
            )
        big = max(args.sizes)
        alarms = [verdict(pool_x[draw(everyone, big, 1000 + w)], 1000 + w) for w in range(args.null_windows)]
    minutes = (time.perf_counter() - started) / 60

    def first(column: int) -> str:
        found = [row[0] for row in rows if row[column]]
        return str(found[0]) if found else f"not by {big}"

    table = ["| window n | 30% photos | class 0 gone | darkened to 40% |", "|---|---|---|---|"]
    table += [f"| {n} | {', '.join(a) or '-'} | {', '.join(b) or '-'} | {', '.join(c) or '-'} |" for n, a, b, c in rows]
    false = sum(bool(a) for a in alarms)
    checks = sorted({c for a in alarms for c in a})
    summary = (
        f"First n detected: photos {first(1)}, class gone {first(2)}, dark {first(3)}. False alarms: "
        f"{false} of {args.null_windows} in-distribution windows of {big} ({', '.join(checks) or 'none'}). "
        f"{minutes:.1f} min."
    )
    print("\n".join(table) + "\n\n" + summary)
    if args.record:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(
                f"\n### {datetime.date.today()}: drift detection on digits, random-weight ViT-S-32 ({machine}; "
                "`benchmarks/drift_detection.py`; checks that found drift per window)\n\n"
                + "\n".join(table)
                + "\n\n"
                + summary
                + "\n"
            )


if __name__ == "__main__":
    main()
