"""`headmaster serve` as a library: a repository served by tritonserver until asked to stop.

:class:`ServeLoop` does, in order, what the command does:

1. :meth:`~ServeLoop.prepare`: refuse a repository another server already serves; check it and
   repair what does not describe a servable state (a working copy of S3 is never repaired: a
   replica does not write to the bucket, and many start at once); build the server's options,
   loading exactly the models the repository names.
2. :meth:`~ServeLoop.run`: SIGINT and SIGTERM (when run in the main thread) become a stop request;
   start, warm the ensembles, tell the reporter it is ready; then, every quarter second until a
   stop is requested, heal dead stubs and adopt dropped-in versions (the :class:`Supervisor`), and
   restart a tritonserver that died (with the same ports and key, on the model list the repository
   names now, pulled again from S3 first) at most ``restarts`` times in 10 minutes; finally stop it
   (drain, unload, no process or shared memory left) and return its exit code.

What happens on the way reaches the operator through a :class:`Reporter` (log lines by default,
:class:`LogReporter`; the CLI prints them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from headmaster.errors import RepositoryError, ServerError
from headmaster.lifecycle.supervisor import Supervisor
from headmaster.repository import consistency, s3
from headmaster.repository.repo import Repository
from headmaster.repository.topology import text_only
from headmaster.server.record import RESTRICTED_APIS, STATE_DIR, running_server
from headmaster.server.tracing import trace_args
from headmaster.server.triton import ServerOptions, TritonServer
from headmaster.server.warmup import warm_up

LOG = logging.getLogger(__name__)
CRASH_WINDOW_S = 600.0  # `restarts` counts the crashes within this many seconds
TICK_S = 0.25  # how often the loop looks at the server


@dataclass(frozen=True)
class ServeOptions:
    """What `headmaster serve` was asked; see its --help for each option."""

    repo: Path  # a repository folder, or the working copy of an S3 repository (s3.location_of)
    host: str = "127.0.0.1"  # 0.0.0.0 serves every network the machine is on
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control_mode: str = "explicit"  # explicit, poll or none
    poll_interval_s: int = 2  # between repository scans in poll mode
    log_verbose: int = 0  # Triton's --log-verbose
    log_file: Path | None = None  # None: REPO/.headmaster/triton.log (triton-PORT.log from S3)
    startup_timeout_s: float = 300.0
    api_key: str | None = None  # the control API's key; None: a random one, kept across restarts
    open_control_api: bool = False  # leave the restricted APIs open to anyone who reaches the ports
    watch: bool = True  # adopt head versions copied into the repository by hand
    tritonserver: Path | None = None  # another tritonserver binary (None: the bundled one)
    backend_directory: Path | None = None  # its --backend-directory
    triton_args: tuple[str, ...] = ()  # passed to tritonserver as they are
    trace_url: str | None = None  # an OTLP/HTTP collector: turns tracing on
    trace_rate: int = 1  # with trace_url: one request in this many
    restarts: int = 3  # crashes restarted within CRASH_WINDOW_S; 0: the first one ends the loop


class Reporter(Protocol):
    """How the loop tells the operator what happens (:class:`LogReporter` logs; the CLI prints)."""

    def say(self, text: str, tone: str = "", rest: str = "") -> None:
        """One event: ``text`` (stressed in ``tone``: ok, warn or bad; plain when "") then ``rest``."""

    def phase(self, text: str) -> contextlib.AbstractContextManager:
        """A step that takes a while (starting, warming up), as a context around it."""

    def ready(self, loop: ServeLoop) -> None:
        """The server answers, the first time: where to reach it."""


class LogReporter:
    """The loop's events as log lines (``headmaster.lifecycle.serving``)."""

    def say(self, text: str, tone: str = "", rest: str = "") -> None:
        level = {"warn": logging.WARNING, "bad": logging.ERROR}.get(tone, logging.INFO)
        LOG.log(level, "%s%s", text, rest)

    def phase(self, text: str) -> contextlib.AbstractContextManager:
        LOG.info("%s", text)
        return contextlib.nullcontext()

    def ready(self, loop: ServeLoop) -> None:
        LOG.info("Triton is ready serving %s at http://%s", loop.shown, loop.server.http_url)


class ServeLoop:
    """One `headmaster serve`: :meth:`run` serves until :meth:`request_stop` (or SIGINT/SIGTERM)."""

    def __init__(self, options: ServeOptions, reporter: Reporter | None = None):
        self.options = options
        self.reporter: Reporter = reporter or LogReporter()
        self.repo = Path(options.repo)
        self.location = s3.location_of(self.repo)  # the working copy's bucket, or None
        self.shown = str(self.location) if self.location else str(self.repo)  # how messages name it
        self.repository: Repository | None = None
        self.server_options: ServerOptions | None = None
        self._server: TritonServer | None = None
        self.crashes: list[float] = []  # monotonic times of the crashes within the window
        # A plain flag, not an Event: a signal handler may run while the main thread holds an
        # Event's lock. The loop reads it every tick.
        self.stop_requested = False

    @property
    def server(self) -> TritonServer:
        if self._server is None:
            raise ServerError("the serve loop is not prepared: call prepare() or run() first")
        return self._server

    def request_stop(self, *_signal_args) -> None:
        """Stop at the next tick: drain, unload, exit (a signal handler, or any thread)."""
        self.stop_requested = True

    # -- before the server starts ---------------------------------------------------------
    def prepare(self) -> None:
        """Check (and, for a local folder, repair) the repository and build the server's options;
        refuses a repository another live server already serves. Starts nothing."""
        o = self.options
        tracing = trace_args(o.trace_url, o.trace_rate) if o.trace_url else ()  # a bad URL before anything
        if self.location is None:
            running = running_server(self.repo)
            if running is not None:
                raise ServerError(
                    f"{self.repo} is already served by tritonserver pid {running.pid} at {running.http_url}; "
                    "stop it first (two servers on one repository would disagree about its heads)"
                )
        self.repository = self._consistent_repository()
        note = self.repository.text_note()
        if note:
            self.reporter.say(note)
        # The checks opened every ONNX file in onnxruntime (~450 MB for a ViT-B-32 repository);
        # glibc keeps what they freed unless asked, and this process then watches the server for days.
        _give_freed_memory_back()
        # From S3, Triton reads the bucket itself (AWS_* from this environment); the working copy only
        # told us what to load. No record is written: the replicas of a bucket are many, on many
        # machines, and head commands name them with --server (their key from HEADMASTER_API_KEY).
        self.server_options = ServerOptions(
            repository=self.location.triton_path() if self.location else self.repo,
            host=o.host,
            http_port=o.http_port,
            grpc_port=o.grpc_port,
            metrics_port=o.metrics_port,
            model_control_mode=o.model_control_mode,
            poll_interval_s=o.poll_interval_s,
            load_models=tuple(self.repository.model_names()),
            log_verbose=o.log_verbose,
            api_key=o.api_key,
            restricted_apis=() if o.open_control_api else RESTRICTED_APIS,
            extra_args=tuple(o.triton_args) + tracing,
            binary=o.tritonserver,
            backend_directory=o.backend_directory,
        )
        default_log = self.repo / STATE_DIR / (f"triton-{o.http_port}.log" if self.location else "triton.log")
        self._server = TritonServer(self.server_options, log_path=o.log_file or default_log)

    def _consistent_repository(self) -> Repository:
        repository = Repository(self.repo)
        try:
            consistency.check(self.repo)
        except RepositoryError as e:
            if self.location is not None:  # a replica never writes to the bucket: many start at once
                raise RepositoryError(
                    f"{self.location} does not describe a servable state: {e}; fix it with "
                    f"`headmaster repo repair --repo {self.location}`",
                    option="repo",
                ) from None
            self.reporter.say("the repository does not describe a servable state:", "warn", f" {e}")
            for action in consistency.repair(self.repo):
                self.reporter.say(f"  repaired: {action}")
            consistency.check(self.repo)
            repository = Repository(self.repo)
        return repository

    # -- serving ----------------------------------------------------------------------------
    def run(self) -> int | None:
        """Prepare (unless done), start, watch until a stop is requested or the server died once
        too often, stop; returns tritonserver's exit code (0: a clean stop)."""
        if self._server is None:
            self.prepare()
        with self._stop_on_signals():
            try:
                with self.reporter.phase(f"starting Triton on {self.shown} (log: {self.server.log_path})..."):
                    self.server.start(timeout_s=self.options.startup_timeout_s)
                with self.reporter.phase("warming the ensembles..."):  # encoders and heads warmed as they loaded
                    self._warm_up()
                self.reporter.ready(self)
                self._watch()
                if self.stop_requested:
                    self.reporter.say("stopping: refusing new requests, finishing those in flight, unloading models...")
            finally:
                code = self.server.stop()
        return code

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM request a stop while the loop runs (Python lets only the main thread
        handle signals: elsewhere the caller stops the loop with :meth:`request_stop`)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _warm_up(self) -> None:
        assert self.repository is not None and self.server_options is not None
        warm_up(
            self.server.http_url,
            self.server_options.load_models,
            self.repository.student_names(),
            text_only=text_only(self.repository.card),
        )

    def _supervisor(self) -> Supervisor:
        return Supervisor(self.server, self.repo, say=self.reporter.say)

    def _watch(self) -> None:
        supervisor = self._supervisor()
        while not self.stop_requested:
            if not self.server.is_alive():
                if not self._restart():
                    return
                supervisor = self._supervisor()
                continue
            if self.options.model_control_mode == "explicit":  # Triton refuses load and unload in the others
                # Versions dropped into a bucket are not watched: S3 writes go through head commands.
                if self.options.watch and self.location is None:
                    supervisor.tick()
                else:
                    supervisor.heal_stubs()
            time.sleep(TICK_S)

    def _restart(self) -> bool:
        """After tritonserver died: start it again, unless it died too often (False)."""
        assert self.server_options is not None
        server, restarts = self.server, self.options.restarts
        self.reporter.say(
            "Triton exited unexpectedly", "bad", f" ({server.exit_description()}):\n{server.failure_summary()}"
        )
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW_S] + [now]
        if len(self.crashes) > restarts:
            if restarts:
                self.reporter.say(
                    "not restarting:", "bad", f" {len(self.crashes)} crashes within 10 minutes (--restarts {restarts})"
                )
            return False
        # Same key and ports: clients and the repository's commands carry on once it is back.
        server.stop(drain=False, failed=True)  # reaps the stubs, frees their shared memory
        # What the repository names now: a head removed (or added) since the first start would
        # otherwise be asked for by name, and Triton refuses to start without it.
        if self.location is not None:
            try:
                s3.pull(self.location, self.repo)
            except RepositoryError as e:  # the bucket unreachable: what the working copy last saw
                self.reporter.say(f"restarting from the last copy of {self.location}:", "warn", f" {e}")
        self.repository = Repository(self.repo)
        self.server_options = dataclasses.replace(
            self.server_options, api_key=server.api_key, load_models=tuple(self.repository.model_names())
        )
        self._server = TritonServer(self.server_options, log_path=server.log_path)
        self.reporter.say(f"restarting Triton ({len(self.crashes)} of at most {restarts} in 10 minutes)...")
        self._server.start(timeout_s=self.options.startup_timeout_s)
        self._warm_up()
        self.reporter.say("Triton is ready again", "ok", f" (pid {self._server.pid})")  # no record from S3
        return True


def _give_freed_memory_back() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass
