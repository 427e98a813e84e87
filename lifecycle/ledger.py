"""The ledger of a head: every decision about its versions, one JSON line each, never edited.

``REPO/.headmaster/ledger/NAME.jsonl`` beside the repository's other state (the server record,
the A/B tests): what `headmaster improve` decided (a candidate accepted or refused by the gate,
with the data snapshot's hash, the metrics and the reasons), and what the A/B operations did
with it (a test started, a candidate promoted or aborted). `headmaster history NAME` prints it.
Lines are appended with one ``write`` on a file opened for appending, so two writers never
interleave inside a line; a torn last line (a crash mid-write) is skipped on reading.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
from pathlib import Path

from headmaster.export.heads import check_head_name
from headmaster.repository.layout import STATE_DIR

LOG = logging.getLogger(__name__)
LEDGER_DIR = "ledger"


def path(repo: Path, head: str) -> Path:
    return Path(repo) / STATE_DIR / LEDGER_DIR / f"{check_head_name(head)}.jsonl"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container without a passwd entry
        return "unknown"


def append(repo: Path, head: str, decision: str, **fields) -> dict:
    """Record one decision (``accepted``, ``refused``, ``unchanged``, ``error``, ``canary``,
    ``shadow``, ``promoted``, ``aborted``, ...) with whatever it rests on; returns the entry."""
    entry = {
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "head": head,
        "decision": decision,
        "by": fields.pop("by", None) or _user(),
        **fields,
    }
    target = path(repo, head)
    target.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=False, default=str) + "\n").encode()
    fd = os.open(target, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line: never glue this one to it
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def read(repo: Path, head: str) -> list[dict]:
    """Every entry, oldest first (none for a head that has no ledger yet)."""
    target = path(repo, head)
    if not target.is_file():
        return []
    entries = []
    for number, line in enumerate(target.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            LOG.warning("%s line %d is not JSON (a write cut short?): skipped", target, number)
    return entries
