"""benchmarks/gpu_check.sh, the GPU path in one script: checked here as far as a machine without
a GPU allows: its syntax, and its CPU fallback end to end (export, build, serve, measure)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import MODEL

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def test_the_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.server
@pytest.mark.slow
def test_its_cpu_fallback_exports_builds_serves_and_measures(tmp_path):
    env = {**os.environ, "MODEL": MODEL, "MEASURE_MS": "1500", "WORK": str(tmp_path / "work"), "BUDGET_S": "400"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu"], capture_output=True, text=True, env=env, timeout=450)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "plan: skipped: no GPU" in out
    for what in ("classify from JPEG", "image_encoder alone"):  # perf_analyzer's figure, or the client's
        row = re.search(rf"\| {what}[^|]*\| ([\d,.]+) \| - \| no target", out)
        assert row and float(row[1].replace(",", "")) > 0, out
    assert not (tmp_path / "work" / "model_repository" / ".headmaster" / "server.json").exists()  # serve stopped
