"""Review tasks through a real Label Studio server and back (opt-in: Label Studio is not a dependency).

Label Studio pulls in Django and dozens of pins that clash with this project's, so it lives in
a venv of its own: ``python3 -m venv LS && LS/bin/pip install label-studio``, then
``HEADMASTER_LABEL_STUDIO=LS/bin/label-studio pytest tests/scenarios/test_label_studio.py``.
Without that variable the test is skipped, saying so. The server runs on loopback with a data
folder in tmp; tasks made by ``write_tasks`` are imported through its API (predictions
included), an annotator's answers are posted through its API, and its own JSON export is read
back by ``correct --label-studio``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from headmaster.model_repository.head_version import HeadVersion
from headmaster.training.feedback.rescore import rescore
from headmaster.training.feedback.review import parse_mix, select, write_tasks
from tests.helpers import free_port, run_cli
from tests.scenarios.test_improve import HEAD, LABELS, loop  # noqa: F401 (loop: the fixture)

LABEL_STUDIO = os.environ.get("HEADMASTER_LABEL_STUDIO")
TOKEN = "0123456789abcdef0123456789abcdef01234567"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not LABEL_STUDIO, reason="set HEADMASTER_LABEL_STUDIO to a label-studio executable (its own venv) to run")]


class LabelStudio:
    def __init__(self, url: str):
        self.url = url

    def call(self, method: str, path: str, body=None):
        request = urllib.request.Request(self.url + path, method=method, data=None if body is None else
                                         json.dumps(body).encode(),
                                         headers={"Authorization": f"Token {TOKEN}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")


@pytest.fixture
def label_studio(tmp_path):
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(tmp_path / "ls-data"), "LABEL_STUDIO_USERNAME":
           "ann@example.com", "LABEL_STUDIO_PASSWORD": "not-a-secret-1", "LABEL_STUDIO_USER_TOKEN": TOKEN,
           "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true"}
    log = open(tmp_path / "label-studio.log", "w")
    process = subprocess.Popen([LABEL_STUDIO, "start", "--no-browser", "--host", f"http://127.0.0.1:{port}",
                                "--internal-host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    server = LabelStudio(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 300
    while True:
        try:
            server.call("GET", "/api/projects")
            break
        except urllib.error.HTTPError as e:
            if e.code != 401:
                raise
            # Label Studio 1.2x turns legacy tokens off for a new organization; the token the
            # environment gave its user works once they are on (its own Django shell, same data).
            subprocess.run([LABEL_STUDIO, "shell"], env=env, check=True, timeout=300, capture_output=True, input=(
                "from organizations.models import Organization\n"
                "for o in Organization.objects.all():\n"
                "    o.jwt.legacy_api_tokens_enabled = True\n"
                "    o.jwt.save()\n"), text=True)
        except (urllib.error.URLError, ConnectionError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"Label Studio did not answer: {(tmp_path / 'label-studio.log').read_text()[-3000:]}")
            time.sleep(2)
    yield server
    process.terminate()
    process.wait(timeout=60)
    log.close()


def test_tasks_go_to_a_real_label_studio_and_its_export_comes_back_as_corrections(loop, label_studio, tmp_path):  # noqa: F811
    repository, world, store, _ = loop
    hashes, x, truth = world.draw(10)
    store.add_embeddings(hashes, [f"/photos/{h[:8]}.png" for h in hashes], repository.fingerprint, x)
    live = HeadVersion.load(repository.path, HEAD)
    rescore(store, live)
    items = select(store, live, 6, parse_mix("margin=1"), repository.path)
    tasks_path, config_path = write_tasks(items, tmp_path / "tasks.json", live.card.labels, False)

    project = label_studio.call("POST", "/api/projects", {"title": "critter review",
                                                          "label_config": config_path.read_text()})
    label_studio.call("POST", f"/api/projects/{project['id']}/import", json.loads(tasks_path.read_text()))
    tasks = label_studio.call("GET", f"/api/tasks?project={project['id']}&page_size=100")
    tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
    assert len(tasks) == 6
    right = dict(zip(hashes, truth))
    for task in tasks[:4]:  # the annotator answers four with the truth
        label_studio.call("POST", f"/api/tasks/{task['id']}/annotations", {"result": [
            {"from_name": "label", "to_name": "image", "type": "choices",
             "value": {"choices": [right[task["data"]["sha256"]]]}}]})
    export = label_studio.call("GET", f"/api/projects/{project['id']}/export?exportType=JSON")
    predictions = [p for t in export for p in t.get("predictions", [])]
    assert {p["model_version"] for p in predictions} == {f"{HEAD} v1"}
    export_path = tmp_path / "export.json"
    export_path.write_text(json.dumps(export))
    result = run_cli("correct", "--label-studio", export_path, "--store", store.path, "--repo", repository.path)
    assert result.returncode == 0 and "4 corrections stored" in result.stderr, result.stderr
    stored = store.corrections(HEAD)
    answered = [t["data"]["sha256"] for t in tasks[:4]]
    assert all(stored[sha].labels == (right[sha],) for sha in answered)
    assert {stored[sha].by for sha in answered} == {"ann@example.com"}
    assert all(json.loads(stored[sha].note)["tool"] == "label-studio" for sha in answered)
    assert np.all([json.loads(stored[sha].note)["corrects"]["version"] == 1 for sha in answered])
    assert set(LABELS) >= {stored[sha].labels[0] for sha in answered}
    assert Path(tasks_path).is_file()
