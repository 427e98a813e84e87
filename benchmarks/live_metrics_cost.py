"""What the heads' live metrics cost per request, inside the bundled Triton's python backend.

The threshold step calls ``LiveMetrics.record`` once per head per request; every metric call is
a message from the python stub to the Triton process. This runs the same code
(``served/threshold.py``, copied as a model with a timing ``execute``, its rule kernel beside it) in a
real bundled Triton and measures, per request of n items (one head of 10 labels, scores
random, a third of the items flagged OOD): the time of ``record`` (the metric calls included)
and of ``metric_counts`` alone (the Python that sums them), medians over the repeats.

    python benchmarks/live_metrics_cost.py [--repeats 50] [--record]

Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCHES = (1, 8, 64, 256)
TIMED_MODEL = """

class TritonPythonModel:  # the benchmark's: times the threshold step's metric code
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.metrics = LiveMetrics(pb_utils)
        self.labels = [f"label{i}" for i in range(10)]
        self.rng = np.random.default_rng(0)

    def execute(self, requests):
        import time

        out = []
        for request in requests:
            n = int(self.pb.get_input_tensor_by_name(request, "N").as_numpy().reshape(-1)[0])
            scores = self.rng.dirichlet(np.ones(10) * 0.3, size=n)
            results = [{"version": 1, "labels": [self.labels[int(r.argmax())]] if r.max() > 0.5 else [],
                        "scores": dict(zip(self.labels, map(float, r))), "ood": i % 3 == 0}
                       for i, r in enumerate(scores)]
            t0 = time.perf_counter()
            metric_counts("bench", "labels", results)
            t1 = time.perf_counter()
            self.metrics.record("bench", {"version": 1}, results)
            t2 = time.perf_counter()
            calls = len(metric_counts("bench", "labels", results))
            out.append(self.pb.InferenceResponse([self.pb.Tensor("T", np.array([t1 - t0, t2 - t1, calls], np.float64))]))
        return out
"""
CONFIG = """name: "bench"
backend: "python"
max_batch_size: 0
input [{ name: "N", data_type: TYPE_INT32, dims: [ 1 ] }]
output [{ name: "T", data_type: TYPE_FP64, dims: [ 3 ] }]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import tritonclient.http as http

    from headmaster.repository.layout import KERNEL_FILE, KERNELS
    from headmaster.served import threshold as served_threshold
    from headmaster.server.triton import ServerOptions, TritonServer, free_port

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        (repo / "bench" / "1").mkdir(parents=True)
        (repo / "bench" / "config.pbtxt").write_text(CONFIG)
        (repo / "bench" / "1" / "model.py").write_text(Path(served_threshold.__file__).read_text() + TIMED_MODEL)
        shutil.copyfile(KERNELS["threshold"], repo / "bench" / "1" / KERNEL_FILE)
        options = ServerOptions(
            repository=repo,
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            restricted_apis=(),
            write_record=False,
        )
        rows = []
        with TritonServer(options, log_path=Path(tmp) / "triton.log") as server:
            client = http.InferenceServerClient(server.http_url.replace("http://", ""))
            for n in BATCHES:
                times = []
                for _ in range(args.repeats):
                    tensor = http.InferInput("N", [1], "INT32")
                    tensor.set_data_from_numpy(np.array([n], np.int32))
                    times.append(client.infer("bench", [tensor]).as_numpy("T"))
                times = np.array(times)
                python_us, record_us = np.median(times[:, 0]) * 1e6, np.median(times[:, 1]) * 1e6
                calls = np.median(times[:, 2])
                rows.append((n, calls, python_us, record_us, record_us / n))
    table = [
        "| items per request | metric calls | metric_counts (us) | record, calls included (us) | per item (us) |",
        "|---|---|---|---|---|",
    ]
    table += [f"| {n} | {calls:.0f} | {py:.0f} | {rec:.0f} | {per:.1f} |" for n, calls, py, rec, per in rows]
    print("\n".join(table))
    if args.record:
        machine = (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(
                f"\n### {datetime.date.today()}: live metrics per request, bundled Triton 2.51 python backend "
                f"({machine}; `benchmarks/live_metrics_cost.py`, median of {args.repeats})\n\n"
                + "\n".join(table)
                + "\n"
            )


if __name__ == "__main__":
    main()
