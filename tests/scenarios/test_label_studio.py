"""Review tasks through a real Label Studio server and its annotations back.

A module fixture starts label-studio (1.23.2, from its own venv that `make setup` makes in
.tools/label-studio: its pins clash with ours) on a free loopback port with its data under the
test's tmp folder, as a fresh install would run: one admin user made by `label-studio start
--username --password --user-token`, legacy tokens allowed for the organization
(`--enable-legacy-api-token`), and a Personal Access Token (a JWT) made through its API. The
review batch goes in through `headmaster suggest --label-studio-url`; a person's annotations are
made through Label Studio's own API (``POST /api/tasks/ID/annotations/``, as its labelling
page does); they come back through `headmaster correct --label-studio-url` and, as files,
through Label Studio's two JSON exports read by `correct --label-studio`'s reader.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from headmaster.repository.head_version import HeadVersion
from headmaster.training.feedback.label_studio_api import LabelStudio, pull
from headmaster.training.feedback.rescore import rescore
from headmaster.training.feedback.review import read_label_studio, sent_items
from tests.helpers import CLI, free_port
from tests.scenarios.test_improve import HEAD, LABELS, loop  # noqa: F401 (loop: the fixture)

pytestmark = pytest.mark.slow  # the server starts in ~35 s on 2 cores (its database migrations)

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("LABEL_STUDIO_BIN", ROOT / ".tools" / "label-studio" / "bin" / "label-studio"))
ADMIN, PASSWORD, TOKEN = "reviewer@example.com", "not-a-secret-1", "headmaster-test-token-0123456789"


class Server:
    def __init__(self, url: str, token: str, pat: str, log: Path):
        self.url, self.token, self.pat, self.log = url, token, pat, log
        self.process: subprocess.Popen | None = None
        self.started = 0.0

    def api(self, method: str, path: str, body=None, key: str | None = None):
        """Label Studio's REST API as a person's browser or script uses it (the legacy token)."""
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Token {key or self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def label_studio_process(tmp_path_factory):
    """label-studio started (not yet waited for: it migrates its database for ~35 s while the
    test's own fixtures build); stopped with its process group at the end of the module."""
    if not BINARY.is_file():
        pytest.fail(
            f"no Label Studio server at {BINARY}: `make setup` installs it (or just "
            "`make .tools/label-studio/bin/label-studio`: label-studio from PyPI in a venv of its own)",
            pytrace=False,
        )
    data = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),  # its SQLite database, media and exports
        "HOME": str(data),
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",  # closed: nobody signs up on their own
        "SENTRY_DSN": "",
    }
    log = data / "server.log"
    argv = [str(BINARY), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    argv += ["--data-dir", str(data), "--username", ADMIN, "--password", PASSWORD, "--user-token", TOKEN]
    argv += ["--enable-legacy-api-token"]  # the org accepts `Token KEY` (a new org refuses it by default)
    with open(log, "w") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: everything it starts goes with it
        )
    server = Server(f"http://127.0.0.1:{port}", TOKEN, "", log)
    server.process, server.started = process, time.monotonic()
    try:
        yield server
    finally:
        pgid = process.pid
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
            pytest.fail("label-studio left processes behind after SIGTERM", pytrace=False)


@pytest.fixture
def label_studio(label_studio_process):
    """The server, up, with a Personal Access Token made through its API (once)."""
    server, process = label_studio_process, label_studio_process.process
    while not server.pat:
        if process.poll() is not None:
            pytest.fail(
                f"label-studio exited with {process.returncode}:\n{server.log.read_text()[-3000:]}", pytrace=False
            )
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as response:
                if response.status == 200:
                    print(f"label-studio up {time.monotonic() - server.started:.1f} s after its start")
                    server.pat = server.api("POST", "/api/token/", {})["token"]  # as its UI makes one
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - server.started > 240:
            pytest.fail(f"label-studio not up after 240 s:\n{server.log.read_text()[-3000:]}", pytrace=False)
        time.sleep(0.5)
    return server


def headmaster(*args, key: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LABEL_STUDIO_API_KEY"}
    if key is not None:
        env["LABEL_STUDIO_API_KEY"] = key
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def choice(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def test_review_tasks_go_to_label_studio_and_its_annotations_come_back_with_who_when_and_what(
    label_studio_process,
    loop,  # noqa: F811
    label_studio,
    tmp_path,
):
    repository, world, store, _ = loop
    hashes, x, _ = world.draw(10)  # served traffic, labelled by the live v1
    store.add_embeddings(hashes, [f"/photos/{h[:8]}.png" for h in hashes], repository.fingerprint, x)
    rescore(store, HeadVersion.load(repository.path, HEAD, 1))
    common = ("--store", store.path, "--repo", repository.path)

    # A wrong key or no server: refused before anything is recorded as sent.
    result = headmaster(
        "suggest", HEAD, "--mix", "margin=1", "--n", "6", *common, "--label-studio-url", label_studio.url, key="wrong"
    )
    assert result.returncode == 1 and "refused the API key (LABEL_STUDIO_API_KEY): HTTP 401" in result.stderr
    result = headmaster(
        "suggest",
        HEAD,
        "--mix",
        "margin=1",
        *common,
        "--label-studio-url",
        label_studio.url,
        "--label-studio-project",
        999,
        key=label_studio.pat,
    )
    assert result.returncode == 1 and "has no project 999" in result.stderr
    assert sent_items(repository.path, HEAD) == {}

    # Out: a new project with the head's labelling config, the batch as tasks with predictions (the PAT).
    result = headmaster(
        "suggest",
        HEAD,
        "--mix",
        "margin=1",
        "--n",
        "6",
        *common,
        "--label-studio-url",
        label_studio.url,
        key=label_studio.pat,
    )
    assert result.returncode == 0, result.stderr
    found = re.search(r"6 tasks imported into Label Studio project (\d+)", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    project = int(found.group(1))
    assert len(sent_items(repository.path, HEAD)) == 6
    config = label_studio.api("GET", f"/api/projects/{project}")["label_config"]
    assert all(f'value="{label}"' in config for label in LABELS)
    tasks = label_studio.api("GET", f"/api/tasks?project={project}&fields=all")["tasks"]
    assert len(tasks) == 6
    live = {r["sha256"]: r for r in store.labels(HEAD, 1).to_pylist()}
    for task in tasks:
        (prediction,) = task["predictions"]
        stored = live[task["data"]["sha256"]]
        assert prediction["model_version"] == f"{HEAD} v1"
        assert prediction["score"] == pytest.approx(max(stored["scores"]), abs=1e-6)
        # No label above its threshold: no preselected choice (an empty result), the score still there.
        assert [c for r in prediction["result"] for c in r["value"]["choices"]] == list(stored["labels"])

    # A person labels in Label Studio: agrees, corrects, corrects, skips; two tasks left alone.
    tasks.sort(key=lambda t: (not t["data"]["prediction"], t["id"]))  # the one agreed with has a prediction
    assert tasks[0]["data"]["prediction"], "no task of the batch came with a label to agree with"
    made = {}
    for number, task in enumerate(tasks[:4]):
        predicted = task["data"]["prediction"]
        answer = predicted[0] if number == 0 else next(label for label in LABELS if label not in predicted)
        body = {"result": [], "was_cancelled": True} if number == 3 else {"result": choice(answer)}
        made[task["id"]] = (label_studio.api("POST", f"/api/tasks/{task['id']}/annotations/", body), answer)

    # Back over the API (the legacy token this time): three corrections, three tasks skipped.
    result = headmaster(
        "correct", "--label-studio-url", label_studio.url, "--project", project, *common, key=label_studio.token
    )
    assert result.returncode == 0, result.stderr
    assert "3 corrections stored" in result.stderr and result.stderr.count("skipped") == 3
    corrections = store.corrections(HEAD)
    for number, task in enumerate(tasks):
        sha = task["data"]["sha256"]
        if number >= 3:
            assert sha not in corrections
            continue
        annotation, answer = made[task["id"]]
        correction = corrections[sha]
        assert correction.labels == (answer,)
        assert correction.by == ADMIN
        assert correction.at == pull_time(annotation["created_at"])
        note = json.loads(correction.note)
        assert note["tool"] == "label-studio" and note["task"] == task["id"]
        assert note["annotation"] == annotation["id"]
        assert note["corrects"] == {
            "labels": task["data"]["prediction"],
            "score": task["data"]["score"],
            "version": 1,
        }
        assert note["agrees"] is (number == 0)

    # Label Studio's own JSON exports, read as `correct --label-studio FILE` reads them: the same
    # corrections. Its plain export names the annotator by user id; with completed_by expanded, by email.
    over_api, skipped = pull(LabelStudio(label_studio.url, label_studio.token), project)
    assert len(over_api) == 3 and len(skipped) == 3
    plain = tmp_path / "export.json"
    plain.write_text(json.dumps(label_studio.api("GET", f"/api/projects/{project}/export?exportType=JSON")))
    from_file, skipped_file = read_label_studio(plain)
    user = label_studio.api("GET", "/api/current-user/whoami")["id"]
    assert from_file == [{**row, "by": f"label-studio user {user}"} for row in over_api]
    # Its export leaves out tasks nobody opened; the skipped (cancelled) one is in it.
    assert skipped_file == [f"task {tasks[3]['id']}: no annotation"] and skipped_file[0] in skipped
    snapshot = label_studio.api(
        "POST",
        f"/api/projects/{project}/exports",
        {"serialization_options": {"annotations__completed_by": {"only_id": False}}},
    )
    assert snapshot["status"] == "completed", snapshot
    expanded = tmp_path / "export-expanded.json"
    expanded.write_text(
        json.dumps(
            label_studio.api("GET", f"/api/projects/{project}/exports/{snapshot['id']}/download?exportType=JSON")
        )
    )
    assert read_label_studio(expanded) == (over_api, skipped)  # this one keeps every task

    # The next batch goes to the same project; the items sent are never sent again.
    result = headmaster(
        "suggest",
        HEAD,
        "--mix",
        "margin=1",
        "--n",
        "2",
        *common,
        "--label-studio-url",
        label_studio.url,
        "--label-studio-project",
        project,
        key=label_studio.pat,
    )
    assert result.returncode == 0, result.stderr
    tasks_now = label_studio.api("GET", f"/api/tasks?project={project}&fields=all")["tasks"]
    assert len(tasks_now) == 8 and len({t["data"]["sha256"] for t in tasks_now}) == 8


def pull_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_a_wrong_key_no_server_or_no_project_is_a_clear_error(label_studio, tmp_path):
    store = tmp_path / "store"
    args = ("correct", "--label-studio-url", label_studio.url, "--project")
    result = headmaster(*args, 1, "--store", store, key="not-a-token")
    assert result.returncode == 1
    assert "refused the API key (LABEL_STUDIO_API_KEY): HTTP 401" in result.stderr
    result = headmaster(*args, 1, "--store", store, key=label_studio.pat[:-4] + "AAAA")  # a PAT, tampered with
    assert result.returncode == 1 and "refused the API key" in result.stderr
    result = headmaster(*args, 999, "--store", store, key=label_studio.pat)
    assert result.returncode == 1 and f"Label Studio at {label_studio.url} has no project 999" in result.stderr
    result = headmaster(*args, 1, "--store", store, key=None)
    assert result.returncode == 1 and "no Label Studio API key: set LABEL_STUDIO_API_KEY" in result.stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    result = headmaster("correct", "--label-studio-url", nobody, "--project", 1, "--store", store, key="x")
    assert result.returncode == 1 and f"cannot reach Label Studio at {nobody}" in result.stderr
    assert not store.exists()
    # The key is never an option on the command line.
    result = headmaster("correct", "--help", key=None)
    assert "--label-studio-url" in result.stdout and "--api-key" not in result.stdout and "--key" not in result.stdout
