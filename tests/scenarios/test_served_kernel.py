"""The served threshold model imports the rule kernel from its own version folder, in a real Triton.

Triton 2.51's python stub puts the version folder on ``sys.path`` (python_backend's pb_stub.cc), so
``copy_backend`` copies the kernel there as ``headmaster_rules.py``. Here the stub could also import
the installed package (this venv's), so the test asks the running model which one it took.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from headmaster.repository.layout import KERNEL_FILE, RUNNER_FILE, copy_backend
from headmaster.server.triton import ServerOptions, TritonServer
from tests.helpers import free_port

PROBE = """

class TritonPythonModel:  # the test's: which rule kernel the served threshold model's code imported
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils

    def execute(self, requests):
        where = json.dumps({"module": kernel.__name__, "file": kernel.__file__})
        out = np.array([where.encode()], dtype=object)
        return [self.pb.InferenceResponse([self.pb.Tensor("WHERE", out)]) for _ in requests]
"""
CONFIG = """name: "probe"
backend: "python"
max_batch_size: 0
input [{ name: "X", data_type: TYPE_INT32, dims: [ 1 ] }]
output [{ name: "WHERE", data_type: TYPE_STRING, dims: [ 1 ] }]
"""


@pytest.mark.server
def test_the_served_threshold_model_runs_the_kernel_copied_beside_it(tmp_path):
    import tritonclient.http as http

    folder = tmp_path / "repo" / "probe" / "1"
    folder.mkdir(parents=True)
    copy_backend("threshold", folder)
    runner = folder / RUNNER_FILE
    runner.write_text(runner.read_text() + PROBE)
    (folder.parent / "config.pbtxt").write_text(CONFIG)
    options = ServerOptions(
        repository=tmp_path / "repo",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        restricted_apis=(),
        write_record=False,
    )
    with TritonServer(options, log_path=tmp_path / "triton.log") as server:
        client = http.InferenceServerClient(server.http_url.replace("http://", ""))
        x = http.InferInput("X", [1], "INT32")
        x.set_data_from_numpy(np.array([0], np.int32))
        where = json.loads(client.infer("probe", [x]).as_numpy("WHERE")[0])
    assert where["module"] == "headmaster_rules"
    assert Path(where["file"]).resolve() == (folder / KERNEL_FILE).resolve()
