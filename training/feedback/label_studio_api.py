"""Review tasks to a Label Studio server and its annotations back, over its REST API.

The files of :mod:`review` carried by hand (``tasks.json`` imported, the JSON export read
back) become two calls: :func:`push` creates a project with :func:`review.label_config` and
imports the tasks with their predictions (``score``, ``model_version``); :func:`pull` reads
every task's annotations and turns them into the rows :func:`review.read_label_studio` gives
for an export file, with the annotator's email from the organization's member list.

The key comes from the caller (the command line reads ``LABEL_STUDIO_API_KEY``): a legacy
token (``Authorization: Token KEY``, once the organization allows legacy tokens) or a
Personal Access Token (a JWT refresh token), exchanged at ``/api/token/refresh/`` for a
short-lived access token sent as ``Authorization: Bearer`` and renewed once when refused.

Plain ``urllib``: the handful of documented endpoints used here does not need
``label-studio-sdk``, which would add some twenty packages (opencv-python, nltk, black,
datamodel-code-generator, ...) to the environment.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headmaster.errors import LabelingToolError
from headmaster.training.feedback.review import ReviewItem, label_config, rows_from_tasks, to_label_studio

log = logging.getLogger(__name__)
KEY_ENV = "LABEL_STUDIO_API_KEY"  # where the command line takes the key from (never an option)
PAGE_SIZE = 100  # tasks per request when reading a project back
IMPORT_BATCH = 500  # tasks per import request


def _is_jwt(key: str) -> bool:
    return key.count(".") == 2 and key.startswith("eyJ")


class LabelStudio:
    """A Label Studio server at ``url`` (``http://host:port``), spoken to with ``key``."""

    def __init__(self, url: str, key: str | None, timeout: float = 60.0):
        if not key:
            raise LabelingToolError(
                f"no Label Studio API key: set {KEY_ENV} to a Personal Access Token or legacy token "
                "(Label Studio: Account & Settings)"
            )
        if "://" not in url:
            url = "http://" + url
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self._access: str | None = None  # a PAT's current access token

    # -- transport ------------------------------------------------------------------------------
    def _authorization(self, renew: bool = False) -> str:
        if not _is_jwt(self.key):
            return f"Token {self.key}"
        if self._access is None or renew:
            answer = self._send("POST", "/api/token/refresh/", {"refresh": self.key}, authorization=None)
            self._access = str(answer["access"])
        return f"Bearer {self._access}"

    def _send(self, method: str, path: str, body: Any = None, authorization: str | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if authorization:
            headers["Authorization"] = authorization
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as e:
            detail = _detail(e)
            if e.code in (401, 403):
                raise _Refused(
                    f"Label Studio at {self.url} refused the API key ({KEY_ENV}): HTTP {e.code} ({detail.rstrip('.')}). "
                    "Use a Personal Access Token, or a legacy token with legacy tokens enabled for the "
                    "organization (Organization > Access Token Settings)"
                ) from None
            raise _HTTPStatus(e.code, f"Label Studio at {self.url}: {method} {path}: HTTP {e.code} {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise LabelingToolError(
                f"cannot reach Label Studio at {self.url}: {reason} (is it running? `label-studio start`)"
            ) from None
        return json.loads(text) if text else None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One API request with the key; a PAT's expired access token is renewed once."""
        try:
            return self._send(method, path, body, self._authorization())
        except _Refused:
            if not _is_jwt(self.key):
                raise
            return self._send(method, path, body, self._authorization(renew=True))

    # -- what the loop needs ----------------------------------------------------------------------
    def whoami(self) -> dict:
        return self.call("GET", "/api/current-user/whoami")

    def project(self, project: int) -> dict:
        try:
            return self.call("GET", f"/api/projects/{int(project)}")
        except _HTTPStatus as e:
            if e.status == 404:
                raise LabelingToolError(
                    f"Label Studio at {self.url} has no project {project} (or this key cannot see it)"
                ) from None
            raise

    def create_project(self, title: str, config: str) -> int:
        answer = self.call("POST", "/api/projects", {"title": title, "label_config": config})
        return int(answer["id"])

    def import_tasks(self, project: int, tasks: Sequence[dict]) -> int:
        done = 0
        for start in range(0, len(tasks), IMPORT_BATCH):
            answer = self.call(
                "POST", f"/api/projects/{int(project)}/import", list(tasks[start : start + IMPORT_BATCH])
            )
            done += int(answer.get("task_count", 0))
        return done

    def tasks(self, project: int) -> list[dict]:
        """Every task of the project, with its annotations (cancelled ones included)."""
        self.project(project)
        tasks: list[dict] = []
        page = 1
        while True:
            query = urllib.parse.urlencode(
                {"project": int(project), "fields": "all", "page": page, "page_size": PAGE_SIZE}
            )
            try:
                answer = self.call("GET", f"/api/tasks?{query}")
            except _HTTPStatus as e:
                if e.status == 404:  # past the last page
                    break
                raise
            batch = answer.get("tasks") or []
            tasks.extend(batch)
            if not batch or len(tasks) >= int(answer.get("total", 0)):
                break
            page += 1
        return tasks

    def users(self) -> dict[int, str]:
        """User id -> email (or username) for the organization's members."""
        answer = self.call("GET", "/api/users")
        members = answer.get("results", []) if isinstance(answer, dict) else answer  # a list in 1.23
        return {int(u["id"]): str(u.get("email") or u.get("username") or u["id"]) for u in members}


class _Refused(LabelingToolError):
    """HTTP 401/403: the key (or a PAT's access token) was not accepted."""


class _HTTPStatus(LabelingToolError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"{}")
    except (ValueError, OSError):
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    errors = body.get("validation_errors") if isinstance(body, dict) else None
    return ": ".join(str(x) for x in (detail, errors) if x)


def push(
    client: LabelStudio,
    items: Sequence[ReviewItem],
    labels: Sequence[str],
    multi_label: bool,
    title: str,
    project: int | None = None,
    prefix: str | None = None,
    root: Path | None = None,
) -> tuple[int, int]:
    """Import the review items as tasks with the version's predictions; a new project (titled
    ``title``, labelled with :func:`review.label_config`) unless ``project`` names one. Returns
    (project id, tasks imported)."""
    if project is None:
        project = client.create_project(title, label_config(labels, multi_label))
    else:
        client.project(project)
    count = client.import_tasks(project, to_label_studio(items, prefix, root)) if items else 0
    log.info("%d tasks imported into Label Studio project %d at %s", count, project, client.url)
    return project, count


def pull(client: LabelStudio, project: int, head: str | None = None) -> tuple[list[dict], list[str]]:
    """The project's annotations as correction rows (those :func:`review.read_label_studio` gives
    for an export of it), and what was skipped; the annotator is named by email."""
    tasks = client.tasks(project)
    users = client.users()
    for task in tasks:
        for annotation in task.get("annotations") or []:
            who = annotation.get("completed_by")
            if isinstance(who, int):
                annotation["completed_by"] = {"id": who, "email": users.get(who, f"label-studio user {who}")}
    return rows_from_tasks(tasks, head)
