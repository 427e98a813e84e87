"""The served threshold model imports the rule kernel from its own version folder, in a real Triton;
preprocess and the runner the cache class likewise.

Triton 2.51's python stub puts the version folder on ``sys.path`` (python_backend's pb_stub.cc), so
``copy_backend`` copies the kernel there as ``headmaster_rules.py`` and the cache class as
``headmaster_cache.py``. Here the stub could also import the installed package (this venv's), so the
test asks each running model which one it took.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from headmaster.repository.layout import CACHE_FILE, KERNEL_FILE, RUNNER_FILE, copy_backend
from headmaster.server.triton import ServerOptions, TritonServer
from tests.helpers import free_port

PROBE = """

class TritonPythonModel:  # the test's: which module (MODULE) the served model's code imported
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils

    def execute(self, requests):
        where = json.dumps({"module": MODULE.__name__, "file": MODULE.__file__})
        out = np.array([where.encode()], dtype=object)
        return [self.pb.InferenceResponse([self.pb.Tensor("WHERE", out)]) for _ in requests]
"""
CONFIG = """name: "NAME"
backend: "python"
max_batch_size: 0
input [{ name: "X", data_type: TYPE_INT32, dims: [ 1 ] }]
output [{ name: "WHERE", data_type: TYPE_STRING, dims: [ 1 ] }]
"""
# Served source -> the module name it imports its copy as, the file, and the copy's module name.
PROBES = {
    "threshold": ("kernel", KERNEL_FILE, "headmaster_rules"),
    "preprocess": ("cache", CACHE_FILE, "headmaster_cache"),
    "runtime": ("cache", CACHE_FILE, "headmaster_cache"),
}


@pytest.mark.server
def test_the_served_models_run_the_modules_copied_beside_them(tmp_path):
    import tritonclient.http as http

    for source, (name, _, _) in PROBES.items():
        folder = tmp_path / "repo" / f"probe_{source}" / "1"
        folder.mkdir(parents=True)
        copy_backend(source, folder)
        runner = folder / RUNNER_FILE
        runner.write_text(runner.read_text() + PROBE.replace("MODULE", name))
        (folder.parent / "config.pbtxt").write_text(CONFIG.replace("NAME", f"probe_{source}"))
    options = ServerOptions(
        repository=tmp_path / "repo",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        restricted_apis=(),
        write_record=False,
    )
    seen = {}
    with TritonServer(options, log_path=tmp_path / "triton.log") as server:
        client = http.InferenceServerClient(server.http_url.replace("http://", ""))
        x = http.InferInput("X", [1], "INT32")
        x.set_data_from_numpy(np.array([0], np.int32))
        for source in PROBES:
            seen[source] = json.loads(client.infer(f"probe_{source}", [x]).as_numpy("WHERE")[0])
    for source, (_, file, module) in PROBES.items():
        folder = tmp_path / "repo" / f"probe_{source}" / "1"
        assert seen[source]["module"] == module
        assert Path(seen[source]["file"]).resolve() == (folder / file).resolve()
