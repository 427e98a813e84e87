"""Preprocess's cache of decoded pixels (served/preprocess.py, with served/cache.py's class): keyed
by the image's bytes, a hit is the very pixels a decode gives, refusals are never kept, LRU within
a byte bound; and how the bound is configured and rendered.

The model's Pillow path (``TritonPythonModel._pillow``) is driven directly: what Triton adds
around it (the request, the metrics) is tested in tests/scenarios/test_embedding_cache.py.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from headmaster.errors import ConfigError
from headmaster.repository.config import Batching, Instances, PreprocessModel, to_proto
from headmaster.repository.repo import BuildOptions
from headmaster.served.cache import ENTRY_OVERHEAD, ContentCache
from headmaster.served.preprocess import InvalidImage, TritonPythonModel, limits_from_parameters, preprocess_bytes

PREPROCESSING = {"size": [32, 32], "resize_mode": "shortest", "interpolation": "bicubic"}
ENTRY = 3 * 32 * 32 + ENTRY_OVERHEAD  # one image's pixels in the cache


def jpeg(seed: int, size: tuple[int, int] = (48, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class Model(TritonPythonModel):
    """Preprocess's model as ``initialize`` leaves it on Pillow's path, counting what it decodes."""

    def __init__(self, cache_bytes: int):
        self.cfg = {**PREPROCESSING, **limits_from_parameters({"decode_concurrency": "2"}, PREPROCESSING)}
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.decoder = None
        self.cache = ContentCache(cache_bytes) if cache_bytes else None
        self.cache_metrics = None
        self.decoded: list[bytes] = []

    def _one(self, data):
        self.decoded.append(data)
        return super()._one(data)


def test_a_repeated_image_is_not_decoded_and_its_pixels_are_the_decoded_ones():
    model, image = Model(10**6), jpeg(1)
    first = model._pillow([image])
    again = model._pillow([bytes(bytearray(image)), image])  # the same bytes, other objects: by content
    assert model.decoded == [image]
    assert (model.cache.hits, model.cache.misses) == (2, 1)
    expected = preprocess_bytes(image, model.cfg)
    for pixels in (*first, *again):
        assert pixels.dtype == np.uint8 and pixels.shape == (3, 32, 32)
        np.testing.assert_array_equal(pixels, expected)


def test_another_image_of_the_same_size_is_another_entry():
    model = Model(10**6)
    a, b = jpeg(1), jpeg(2)
    model._pillow([a])
    (pixels_b,) = model._pillow([b])
    assert model.decoded == [a, b] and len(model.cache.entries) == 2
    np.testing.assert_array_equal(pixels_b, preprocess_bytes(b, model.cfg))
    assert not np.array_equal(pixels_b, preprocess_bytes(a, model.cfg))
    (pixels_a,) = model._pillow([a])
    np.testing.assert_array_equal(pixels_a, preprocess_bytes(a, model.cfg))


def test_refusals_and_failures_are_never_kept():
    model = Model(10**6)
    truncated = jpeg(3)[:200]
    for _ in range(2):
        refused = model._pillow([b"not an image", truncated, b""])
        assert all(isinstance(r, InvalidImage) for r in refused)
    assert len(model.decoded) == 6  # decoded (and refused) again, every time
    assert len(model.cache.entries) == 0 and model.cache.bytes == 0


def test_least_recently_used_leave_first_and_the_bound_holds():
    model = Model(2 * ENTRY)
    images = [jpeg(seed) for seed in (10, 11, 12)]
    model._pillow(images[:2])
    model._pillow(images[:1])  # 10 is now the most recent
    model._pillow(images[2:])  # 11 leaves
    assert len(model.cache.entries) == 2 and model.cache.bytes == 2 * ENTRY <= model.cache.max_bytes
    model.decoded.clear()
    model._pillow([images[0], images[2], images[1]])
    assert model.decoded == [images[1]]


def test_without_a_cache_every_image_is_decoded():
    model, image = Model(0), jpeg(1)
    model._pillow([image, image])
    model._pillow([image])
    assert len(model.decoded) == 3 and model.cache is None


def test_the_bound_is_configured_in_megabytes_and_rendered_for_pillow_only():
    with pytest.raises(ConfigError, match="decoded_cache_mb must be >= 0"):
        BuildOptions(decoded_cache_mb=-1)
    options = BuildOptions(decoded_cache_mb=1.5)
    assert BuildOptions.from_dict(asdict(options)).decoded_cache_mb == 1.5
    # A manifest from before the cache: its preprocess keeps none, so its config renders without one.
    old = {k: v for k, v in asdict(options).items() if k != "decoded_cache_mb"}
    assert BuildOptions.from_dict(old).decoded_cache_mb == 0
    assert BuildOptions().decoded_cache_mb == 32
    model = PreprocessModel(PREPROCESSING, cache_bytes=1234)
    for flavour in ("portable", "native"):  # preprocess is a python-backend model in both
        assert to_proto(model, flavour).parameters["cache_bytes"].string_value == "1234"
    assert "cache_bytes" not in to_proto(PreprocessModel(PREPROCESSING), "portable").parameters
    torch = PreprocessModel(PREPROCESSING, Batching(64, (), 0), Instances(1), decoder="torchvision", cache_bytes=1234)
    assert "cache_bytes" not in to_proto(torch, "portable").parameters  # that path keeps no cache
    with pytest.raises(ConfigError, match="cache_bytes must be >= 0"):
        PreprocessModel(PREPROCESSING, cache_bytes=-1)


def test_the_build_options_reach_the_preprocess_config():
    from headmaster.repository import topology
    from tests.unit.test_topology import make_card

    card = make_card()
    assert by_name(topology.static_models(card, BuildOptions()))["preprocess"].cache_bytes == 32 * 2**20
    preprocess = by_name(topology.static_models(card, BuildOptions(decoded_cache_mb=2)))["preprocess"]
    assert preprocess.cache_bytes == 2 * 2**20
    assert by_name(topology.static_models(card, BuildOptions(decoded_cache_mb=0)))["preprocess"].cache_bytes == 0
    before = {k: v for k, v in asdict(BuildOptions()).items() if k != "decoded_cache_mb"}  # an older manifest
    preprocess = by_name(topology.static_models(card, BuildOptions.from_dict(before)))["preprocess"]
    assert "cache_bytes" not in to_proto(preprocess, "portable").parameters  # rendered as it was built


def by_name(models) -> dict:
    return {m.name: m for m in models}
