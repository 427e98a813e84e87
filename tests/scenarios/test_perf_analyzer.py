"""Any Triton client can drive `classify`: here Triton's own perf_analyzer, with real JPEGs."""

from __future__ import annotations

import os

import pytest

from headmaster.model_repository import perf_analyzer


def test_perf_analyzer_drives_classify_with_real_jpegs(server, jpeg_photos, tmp_path):
    reason = perf_analyzer.unavailable_reason()
    if reason:
        # CI installs what perf_analyzer needs (.ci/run); a skip there would hide a breakage.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    data = perf_analyzer.write_image_input(list(jpeg_photos.values()), tmp_path / "input.json")
    # The session server's model-config API is closed: perf_analyzer needs the key, over HTTP.
    result = perf_analyzer.run("classify", server.http_url, data, batch_size=2, concurrency=2, measurement_ms=1500,
                               api_key=server.api_key)
    assert result.throughput > 0
    assert 0 < result.p50_ms <= result.p99_ms
