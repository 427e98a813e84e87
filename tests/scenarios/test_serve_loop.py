"""The serve loop driven in this process (lifecycle/serving.py), on a real Triton.

The CLI tests (test_cli.py, test_serve_operations.py) run `headmaster serve` as a user does; these
call :class:`ServeLoop` directly and act from inside its reporter, so no subprocess sits between
the test and what the loop does: a SIGTERM to this very process, a crash, a restart.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from headmaster.lifecycle.serving import LogReporter, ServeLoop, ServeOptions
from headmaster.repository.repo import Repository
from headmaster.server.record import record_path, running_server
from tests.helpers import clone_repo, free_port

pytestmark = pytest.mark.portable_only("the loop runs the bundled Triton (python backend only)")


def options(repo: Path, **kwargs) -> ServeOptions:
    return ServeOptions(repo=repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), **kwargs)


def group_of(pid: int) -> set[int]:
    """tritonserver and its python stubs: the process group it leads."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pid:
                    found.add(int(entry.name))
            except ProcessLookupError:
                pass
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def outliving(pids: set[int], grace_s: float = 10.0) -> list[int]:
    """Those of ``pids`` still running after ``grace_s``: the stubs are SIGKILLed as the loop
    stops, and on a busy machine the kernel can take a moment to finish them."""
    deadline = time.monotonic() + grace_s
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class Recording(LogReporter):
    """Writes down what the loop said; ``on_ready`` / ``on_said`` act from inside the loop."""

    def __init__(self, on_ready=None, on_said=None):
        self.said: list[str] = []
        self.on_ready, self.on_said = on_ready, on_said

    def say(self, text: str, tone: str = "", rest: str = "") -> None:
        super().say(text, tone, rest)
        self.said.append(text + rest)
        if self.on_said:
            self.on_said(text + rest)

    def ready(self, loop: ServeLoop) -> None:
        super().ready(loop)
        if self.on_ready:
            self.on_ready(loop)

    def printed(self) -> str:
        return "\n".join(self.said)


@pytest.mark.pure  # this process's signal handlers and an empty tmp_path
def test_sigint_and_sigterm_are_stop_requests_only_while_the_loop_runs(tmp_path):
    loop = ServeLoop(options(tmp_path))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with loop._stop_on_signals():
        assert not loop.stop_requested
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, a stop request
        assert loop.stop_requested
    assert {s: signal.getsignal(s) for s in before} == before
    # Off the main thread Python lets no one handle signals: the caller stops the loop itself.
    elsewhere = ServeLoop(options(tmp_path))
    worker = threading.Thread(target=lambda: elsewhere._stop_on_signals().__enter__())
    worker.start()
    worker.join()
    assert {s: signal.getsignal(s) for s in before} == before


def test_the_repository_is_repaired_before_anything_starts(tiny_repo, tmp_path):
    broken = clone_repo(tiny_repo, tmp_path / "repo")  # nothing is served: the tiny encoder's
    (broken / "classify" / "config.pbtxt").write_text("name: 'classify'\nmax_batch_size: lots\n")
    reporter = Recording()
    loop = ServeLoop(options(broken), reporter)
    loop.prepare()
    assert "the repository does not describe a servable state: " in reporter.printed()
    assert "classify/config.pbtxt: not a valid config.pbtxt" in reporter.printed()
    assert any(line.startswith("  repaired: ") for line in reporter.said), reporter.printed()
    assert "max_batch_size: lots" not in (broken / "classify" / "config.pbtxt").read_text()
    assert loop.server_options.load_models == tuple(Repository(broken).model_names())
    assert loop.server.pid is None and running_server(broken) is None  # prepared, not started


@pytest.mark.server
def test_sigterm_stops_the_loop_cleanly_and_leaves_nothing_behind(repo, tmp_path):
    copy = clone_repo(repo, tmp_path / "repo")
    seen = {}
    handler_before = signal.getsignal(signal.SIGTERM)

    def ready(loop):
        seen["group"] = group_of(loop.server.pid)
        seen["record"] = running_server(copy)
        os.kill(os.getpid(), signal.SIGTERM)  # to this process: the loop's handler takes it

    reporter = Recording(on_ready=ready)
    code = ServeLoop(options(copy), reporter).run()
    assert code == 0, reporter.printed()
    assert len(seen["group"]) >= 8, seen  # tritonserver + a python stub per model
    assert seen["record"] is not None and seen["record"].pid in seen["group"]
    assert "stopping: refusing new requests, finishing those in flight, unloading models..." in reporter.said
    assert not outliving(seen["group"]), "processes outlived the loop"
    assert not record_path(copy).exists()
    assert signal.getsignal(signal.SIGTERM) is handler_before  # put back


@pytest.mark.server
@pytest.mark.slow  # two starts of Triton: ~20 s on 2 cores
def test_a_crash_restarts_with_the_same_ports_and_key_and_one_too_many_ends_the_loop(repo, tmp_path):
    copy = clone_repo(repo, tmp_path / "repo")
    servers = []

    def crash(loop):
        servers.append((loop.server.pid, loop.server.http_url, loop.server.grpc_url, loop.server.api_key))
        seen = group_of(loop.server.pid)
        servers[-1] += (seen,)
        os.kill(loop.server.pid, signal.SIGKILL)  # what a crash looks like from outside

    def said(line):
        if line.startswith("Triton is ready again"):
            crash(loop)

    reporter = Recording(on_ready=crash, on_said=said)
    loop = ServeLoop(options(copy, restarts=1), reporter)
    code = loop.run()
    assert code not in (0, None), reporter.printed()  # killed: tritonserver's exit code is -9
    assert len(servers) == 2, reporter.printed()
    (first, *first_addresses, first_group), (second, *second_addresses, second_group) = servers
    assert first != second and first_addresses == second_addresses  # same ports, same key
    printed = reporter.printed()
    assert "Triton exited unexpectedly (killed by SIGKILL)" in printed
    assert "restarting Triton (1 of at most 1 in 10 minutes)..." in printed
    assert "not restarting: 2 crashes within 10 minutes (--restarts 1)" in printed
    assert not outliving(first_group | second_group), "processes outlived the loop"
    assert not record_path(copy).exists()
