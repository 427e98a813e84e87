"""The encoder's embedding cache alone (served/runtime.py, with served/cache.py's class): keys by
content, LRU within a byte bound, only the missing rows run; and how the bound is configured and
rendered."""

from __future__ import annotations

import numpy as np
import pytest

from headmaster.errors import ConfigError
from headmaster.repository.config import EncoderModel, Tensor, to_proto
from headmaster.repository.repo import BuildOptions
from headmaster.served.cache import ENTRY_OVERHEAD, ContentCache
from headmaster.served.runtime import run_cached


class Doubler:
    """A runner that records the rows it was asked to run."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        (rows,) = inputs.values()
        self.calls.append(len(rows))
        return [rows.reshape(len(rows), -1)[:, :4].astype(np.float32) * 2]


def pixels(*seeds: int) -> np.ndarray:
    return np.stack([np.random.default_rng(s).integers(0, 256, (3, 8, 8), dtype=np.uint8) for s in seeds])


def test_only_rows_the_cache_lacks_run_and_answers_are_the_same():
    runner, cache = Doubler(), ContentCache(10**6)
    first, hits, misses = run_cached(runner, cache, {"PIXELS": pixels(1, 2)}, ["EMBEDDING"])
    assert (hits, misses, runner.calls) == (0, 2, [2])
    again, hits, misses = run_cached(runner, cache, {"PIXELS": pixels(2, 3, 1)}, ["EMBEDDING"])
    assert (hits, misses, runner.calls) == (2, 1, [2, 1])  # only seed 3 ran
    np.testing.assert_array_equal(again[0][0], first[0][1])
    np.testing.assert_array_equal(again[0][2], first[0][0])
    np.testing.assert_array_equal(again[0], Doubler()({"PIXELS": pixels(2, 3, 1)}, ["EMBEDDING"])[0])


def test_the_key_is_the_content():
    a = pixels(1)[0]
    assert ContentCache.key(a) == ContentCache.key(a.copy())
    b = a.copy()
    b[0, 0, 0] ^= 1  # one bit of one pixel
    assert ContentCache.key(a) != ContentCache.key(b)


def test_least_recently_used_leave_first_and_the_bound_holds():
    entry = 4 * 4 + ENTRY_OVERHEAD
    cache, runner = ContentCache(2 * entry), Doubler()
    for seed in (1, 2):
        run_cached(runner, cache, {"PIXELS": pixels(seed)}, ["EMBEDDING"])
    run_cached(runner, cache, {"PIXELS": pixels(1)}, ["EMBEDDING"])  # 1 is now the most recent
    run_cached(runner, cache, {"PIXELS": pixels(3)}, ["EMBEDDING"])  # 2 leaves
    assert len(cache.entries) == 2 and cache.bytes == 2 * entry
    assert cache.get(ContentCache.key(pixels(2)[0])) is None
    assert cache.get(ContentCache.key(pixels(1)[0])) is not None


def test_the_bound_is_configured_in_megabytes_and_rendered_only_when_set():
    with pytest.raises(ConfigError, match="embedding_cache_mb must be >= 0"):
        BuildOptions(embedding_cache_mb=-1)
    encoder = EncoderModel(
        "image_encoder", "onnx", Tensor("PIXELS", "UINT8", (3, 8, 8)), Tensor("E", "FP32", (4,)), cache_bytes=1234
    )
    assert to_proto(encoder, "portable").parameters["cache_bytes"].string_value == "1234"
    assert "cache_bytes" not in to_proto(encoder, "native").parameters
    with pytest.raises(ConfigError, match="cache_bytes must be >= 0"):
        EncoderModel(
            "image_encoder", "onnx", Tensor("PIXELS", "UINT8", (3, 8, 8)), Tensor("E", "FP32", (4,)), cache_bytes=-1
        )
