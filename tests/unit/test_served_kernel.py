"""The served threshold model runs from its version folder alone, as Triton's python stub loads it.

Triton 2.51's stub appends the version folder and then the model folder to ``sys.path`` and imports
``<version>.model`` (python_backend's pb_stub.cc); a Triton image has no headmaster installed. So
the rule kernel (threshold) and the cache class (preprocess, the runner) must come from the copies
``copy_backend`` puts beside ``model.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from headmaster.repository.layout import BACKENDS_DIR, CACHE_FILE, KERNEL_FILE, KERNELS, RUNNER_FILE, copy_backend

# How the stub loads a version folder, with no headmaster importable; each probe prints JSON.
LOADER = """
import importlib, importlib.abc, json, sys

class NoHeadmaster(importlib.abc.MetaPathFinder):  # a Triton image: no headmaster to import
    def find_spec(self, name, path=None, target=None):
        if name == "headmaster" or name.startswith("headmaster."):
            raise ImportError(f"no {name} in this stub")
        return None

sys.meta_path.insert(0, NoHeadmaster())
sys.path += [sys.argv[1], sys.argv[2]]  # the version folder, then the model folder
model = importlib.import_module("1.model")
"""

STUB = """
info = {"version": 3, "labels": ["cat", "dog"], "thresholds": [0.5, 0.5], "multi_label": False}
print(json.dumps({
    "kernel": sys.modules["headmaster_rules"].__file__,
    "rule": model.kernel.__name__,
    "headmaster": sorted(m for m in sys.modules if m.split(".")[0] == "headmaster"),
    "accepted": model.kernel.head_results(__import__("numpy").array([[0.9, 0.1]], dtype="float32"), info)[0]["labels"],
}))
"""


def load_as_the_stub(folder, probe: str) -> dict:
    """Import ``folder``'s model.py as Triton's stub does, in a fresh interpreter, and run ``probe``."""
    run = subprocess.run(
        [sys.executable, "-c", LOADER + probe, str(folder), str(folder.parent)],
        cwd=folder.parent.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize("source", ["threshold", "student"])  # the student answers with its teacher's rule
def test_the_kernel_users_version_folders_serve_without_the_package(tmp_path, source):
    folder = tmp_path / source / "1"
    folder.mkdir(parents=True)
    copy_backend(source, folder)
    assert (folder / KERNEL_FILE).read_bytes() == KERNELS[source].read_bytes()
    assert (folder / RUNNER_FILE).is_file()
    seen = load_as_the_stub(folder, STUB)
    assert seen["kernel"] == str(folder / KERNEL_FILE)
    assert seen["rule"] == "headmaster_rules"
    assert seen["headmaster"] == []
    assert seen["accepted"] == ["cat"]


def test_other_served_models_get_no_kernel(tmp_path):
    copy_backend("preprocess", tmp_path)
    assert not (tmp_path / KERNEL_FILE).exists()


CACHE_STUB = """
store = model.cache.ContentCache(10**6)
store.put(store.key_of_bytes(b"image"), (__import__("numpy").zeros((3, 2, 2), "uint8"),))
print(json.dumps({
    "module": model.cache.__name__,
    "file": model.cache.__file__,
    "headmaster": sorted(m for m in sys.modules if m.split(".")[0] == "headmaster"),
    "held": store.bytes,
}))
"""


@pytest.mark.parametrize("source", ["preprocess", "runtime"])
def test_the_cache_users_version_folders_serve_without_the_package(tmp_path, source):
    folder = tmp_path / source / "1"
    folder.mkdir(parents=True)
    copy_backend(source, folder)
    assert (folder / CACHE_FILE).read_bytes() == (BACKENDS_DIR / "cache.py").read_bytes()
    seen = load_as_the_stub(folder, CACHE_STUB)
    assert (seen["module"], seen["file"]) == ("headmaster_cache", str(folder / CACHE_FILE))
    assert seen["headmaster"] == []
    assert seen["held"] == 3 * 2 * 2 + 256


def test_models_that_keep_no_cache_get_no_cache_file(tmp_path):
    for source in ("threshold", "tokenize"):
        folder = tmp_path / source
        folder.mkdir()
        copy_backend(source, folder)
        assert not (folder / CACHE_FILE).exists()
