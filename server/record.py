"""The record a running server leaves in its repository, so commands that change the
repository find it, and the key that opens its control API.

``headmaster serve`` closes Triton's model-repository, logging, trace-setting and shared-memory
APIs with a secret header (Triton's ``--http-restricted-api`` / ``--grpc-restricted-protocol``): nobody
who merely reaches the ports can load, unload or upload models. The secret, the addresses and
the process ids go into ``REPO/.headmaster/server.json``, readable by its owner only; the
commands that change the repository (``train-head``, ``zero-shot``, ``rollback``, ``heads
import/remove``) read it and make their change live with no flag. A record whose server is
gone (killed, machine restarted) is stale and ignored.

Operators who run commands from elsewhere give the key through ``HEADMASTER_API_KEY``.
"""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_DIR = ".headmaster"  # inside the repository; Triton never loads it (explicit model control)
RECORD_FILE = "server.json"
KEY_HEADER = "headmaster-api-key"  # the header Triton checks on the restricted APIs
KEY_ENV = "HEADMASTER_API_KEY"
# What `serve` closes by default: changing the server (loads, unloads, uploads), its log and trace
# settings, and shared memory (registering a region makes the server map any /dev/shm name or CUDA
# handle it is given, and read inputs from / write outputs into it). Reading a model's configuration
# changes nothing and stays open, like metadata and statistics: perf_analyzer, Model Analyzer and
# tritonclient's get_model_config read it first, and perf_analyzer cannot send a key over gRPC.
RESTRICTED_APIS = ("model-repository", "logging", "trace", "shared-memory")


def new_key() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ServerRecord:
    """Where a running server answers, and what its control API needs."""

    repository: str  # absolute path of the repository it serves
    pid: int  # tritonserver
    owner_pid: int  # the process that started it (`headmaster serve`, a test, the quickstart)
    http_url: str  # host:port
    grpc_url: str
    metrics_url: str
    api_key: str | None  # None when the control API is open
    started: str  # ISO-8601

    def is_alive(self) -> bool:
        """The process exists and its HTTP endpoint answers."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone else's process: it exists
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/live", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False


def record_path(repo: Path) -> Path:
    return Path(repo) / STATE_DIR / RECORD_FILE


def write_record(repo: Path, record: ServerRecord) -> Path:
    """Write the record readable by its owner only (it holds the key), atomically."""
    path = record_path(repo)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path.parent, 0o700)  # the server log may sit beside it; nothing here is for other users
    tmp = path.with_name(f".{RECORD_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(record), f, indent=2)
    os.replace(tmp, path)
    return path


def read_record(repo: Path) -> ServerRecord | None:
    path = record_path(repo)
    try:
        return ServerRecord(**json.loads(path.read_text()))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, TypeError, PermissionError):
        return None  # damaged, or another user's: treated as no server


def remove_record(repo: Path, pid: int) -> None:
    """Remove the record if it is this server's (another server may have replaced it)."""
    record = read_record(repo)
    if record is not None and record.pid == pid:
        record_path(repo).unlink(missing_ok=True)


def running_server(repo: Path) -> ServerRecord | None:
    """The live server recorded in ``repo``, or None; a stale record is removed."""
    record = read_record(repo)
    if record is None:
        return None
    if Path(record.repository) != Path(repo).resolve():
        return None  # a record copied along with the repository (cp -r, a clone): not this one's server
    if record.is_alive():
        return record
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        record_path(repo).unlink(missing_ok=True)  # its process is gone for good
    except PermissionError:
        pass
    return None
