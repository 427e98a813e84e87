"""Run Triton's perf_analyzer (shipped in the tritonclient 2.51 wheel) against a served model.

perf_analyzer needs two shared libraries the wheel does not bring: libb64 (Debian package
``libb64-0d``) and libcudart.so.12 (the ``nvidia-cuda-runtime-cu12`` wheel; no GPU is used).

Real image bytes reach a BYTES input through ``--input-data``: each entry's ``b64`` is the
*serialized* BYTES tensor (4-byte little-endian length, then the bytes), not the raw file.
"""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from headmaster.errors import ToolError
from headmaster.server.record import KEY_HEADER


@dataclass(frozen=True)
class PerfResult:
    throughput: float  # inferences (batch items) per second, as perf_analyzer counts them
    p50_ms: float
    p99_ms: float
    command: list[str]


def binary() -> Path:
    found = Path(sys.executable).parent / "perf_analyzer"
    return found if found.exists() else Path(shutil.which("perf_analyzer") or found)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec and spec.submodule_search_locations:
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def unavailable_reason() -> str | None:
    """Why perf_analyzer cannot run here, or None if it can."""
    if not binary().exists():
        return "perf_analyzer is not installed (it ships in the tritonclient[all]==2.51 wheel)"
    probe = subprocess.run(["ldd", str(binary())], capture_output=True, text=True, env=environment())
    missing = [line.split()[0] for line in probe.stdout.splitlines() if "not found" in line]
    if missing:
        return (
            f"perf_analyzer is missing {', '.join(missing)}: install Debian's libb64-0d and "
            "pip's nvidia-cuda-runtime-cu12"
        )
    return None


def write_image_input(images: list[bytes], path: Path, input_name: str = "IMAGE") -> Path:
    """perf_analyzer --input-data file cycling through ``images`` (one per batch item)."""
    entries = [
        {input_name: {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode(), "shape": [1]}}
        for data in images
    ]
    Path(path).write_text(json.dumps({"data": entries}))
    return Path(path)


def run(
    model: str,
    url: str,
    input_data: Path,
    *,
    protocol: str = "http",
    batch_size: int = 1,
    concurrency: int = 1,
    measurement_ms: int = 5000,
    timeout_s: float = 600,
    api_key: str | None = None,
    request_count: int | None = None,
) -> PerfResult:
    """perf_analyzer on ``model`` at ``url`` over ``protocol`` (http or grpc), one measurement.

    It reads the model's config before it measures; ``headmaster serve`` leaves that API open, so
    no key is needed. ``api_key`` is for a server that closes it, over HTTP only: perf_analyzer
    ignores its ``-H`` headers for gRPC."""
    if api_key and protocol != "http":
        raise ToolError(
            "perf_analyzer sends headers over HTTP only; measure a server with a closed control API over HTTP",
            option="protocol",
        )
    reason = unavailable_reason()
    if reason:
        raise ToolError(reason)
    report = Path(input_data).with_suffix(".csv")
    command = [
        str(binary()),
        "-m",
        model,
        "-u",
        url,
        "-i",
        protocol,
        "-b",
        str(batch_size),
        "--concurrency-range",
        str(concurrency),
        "--input-data",
        str(input_data),
        "-f",
        str(report),
    ]
    if request_count:
        command += ["--request-count", str(request_count)]
    else:
        command += [
            "--measurement-interval",
            str(measurement_ms),
            "--measurement-mode",
            "time_windows",
            "--stability-percentage",
            "25",
            "--max-trials",
            "6",
        ]
    if api_key:
        command += ["-H", f"{KEY_HEADER}:{api_key}"]
    done = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=timeout_s)
    if done.returncode != 0:
        raise ToolError(f"perf_analyzer failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    with open(report) as f:
        row = next(csv.DictReader(f))
    return PerfResult(
        float(row["Inferences/Second"]), float(row["p50 latency"]) / 1000, float(row["p99 latency"]) / 1000, command
    )
