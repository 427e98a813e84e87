"""Helpers that several test modules share (test modules never import from each other).

The PostgreSQL server: the DSN in HEADMASTER_TEST_POSTGRES (a ``postgresql://`` URL) when set,
else a throwaway server started from Debian's binaries (/usr/lib/postgresql/NN/bin) in a temp
folder, listening on a unix socket only, as the ``postgres`` user when the tests run as root
(the server refuses root). Each test gets a schema of its own. No binaries: the postgres cases
are skipped, or fail when CI is set. A module that needs it imports the fixtures
(``from tests.helpers import postgres_schema, postgres_url, pgvector_available``); pytest then
makes one fixture per module, so the server itself is started once per session and shared.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import pytest

PG_ENV = "HEADMASTER_TEST_POSTGRES"
CLI = [sys.executable, "-m", "headmaster.cli"]


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """The `headmaster` command in a subprocess, as a user runs it."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the PostgreSQL store must be tested)")
    pytest.skip(reason)


class _Server:
    """One throwaway PostgreSQL server per test session, however many modules use it."""

    url: str | None = None
    users = 0
    stop = None


def _start_postgres() -> str:
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'headmaster[postgres]')")
    bin_dir = _pg_bin()
    if bin_dir is None or not (bin_dir / "initdb").is_file():
        _unavailable(f"no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (Debian: postgresql) and no {PG_ENV}")
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="headmaster-pg-")  # directly in /tmp: pytest's tmp is private to root
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            _unavailable("running as root and runuser is missing: the PostgreSQL server cannot run as root")
        try:
            shutil.chown(root, "postgres", "postgres")
        except LookupError:
            _unavailable("running as root and there is no `postgres` user: the PostgreSQL server cannot run as root")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), free_port()
    started = False

    def stop():
        if started:
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
                           check=False, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)

    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--locale=C", "--no-sync"], check=True, capture_output=True, timeout=60)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", data, "-l", os.path.join(root, "server.log"), "-w",
                        "-o", f"-p {port} -k {root} -c listen_addresses='' -c fsync=off -c full_page_writes=off",
                        "start"], check=True, capture_output=True, timeout=60)
        started = True
    except subprocess.CalledProcessError as e:
        log = Path(root, "server.log")
        message = f"could not start PostgreSQL: {e.stderr.decode(errors='replace')}" \
                  f"{log.read_text() if log.is_file() else ''}"
        stop()
        pytest.fail(message)
    _Server.stop = stop
    return f"postgresql://postgres@/postgres?{urlencode({'host': root, 'port': port})}"


@pytest.fixture(scope="session")
def postgres_url():
    """The base URL of a PostgreSQL server for the whole session."""
    if os.environ.get(PG_ENV):
        yield os.environ[PG_ENV]
        return
    if _Server.url is None:
        _Server.url = _start_postgres()
    _Server.users += 1
    try:
        yield _Server.url
    finally:
        _Server.users -= 1
        if _Server.users == 0 and _Server.stop is not None:
            _Server.stop()
            _Server.url = _Server.stop = None


@pytest.fixture(scope="session")
def pgvector_available(postgres_url) -> bool:
    """Whether the server has pgvector; if so it is created once in ``public``, which every
    test schema's search_path includes (an extension lives in exactly one schema)."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone() is None:
            return False
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector SCHEMA public")
        return True


def with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in [parts.query, urlencode({"options": f"-csearch_path={schema},public"})] if q)
    return urlunsplit(parts._replace(query=query))


@pytest.fixture
def postgres_schema(postgres_url, pgvector_available):
    """A DSN whose tables land in a fresh schema, dropped afterwards."""
    import psycopg

    schema = f"headmaster_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield with_schema(postgres_url, schema)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
