"""Run the Triton Inference Server 2.51 that ships inside the ``nvidia-pytriton`` wheel.

No Docker engine is needed: the wheel carries the ``tritonserver`` binary, its shared
libraries and the python backend. Only the python backend is in it, which is why the
*portable* repository flavour runs every model through python-backend ``model.py`` files.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from headmaster.errors import ServerError
from headmaster.rules.threshold import REPOSITORY_ENV
from headmaster.server import record as server_record
from headmaster.server.record import KEY_HEADER, RESTRICTED_APIS, ServerRecord

LOG = logging.getLogger(__name__)
SHM_PREFIX = "triton_python_backend_shm_region_"
STUB_NAME = "triton_python_backend_stub"
# Where Triton copies each model it loads from S3 (it makes a folderXXXXXX there per model and
# removes it when the model unloads): a folder of this server's own, so that what a stop leaves
# is known and removed, whatever else on the machine also copies into /tmp.
S3_COPIES_ENV = "TRITON_AWS_MOUNT_DIRECTORY"

MODEL_CONTROL_MODES = ("explicit", "poll", "none")
# Exactly the lines Triton prints on every machine without a GPU: a model that fails to load for
# want of CUDA says "CUDA driver version is insufficient" too, and that line must stay.
_NO_GPU_NOISE = re.compile(
    r"CudaDriverHelper has not been initialized|"
    r"unable to create stream for \w+: CUDA driver version is insufficient"
)


@dataclass(frozen=True)
class BundledTriton:
    """Where the pieces of the bundled server live in site-packages."""

    binary: Path  # pytriton/tritonserver/bin/tritonserver
    libs: Path  # nvidia_pytriton.libs: the server's vendored shared libraries
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this interpreter's Python version

    @classmethod
    def locate(cls) -> BundledTriton:
        try:
            import pytriton
        except ImportError as e:  # pragma: no cover - a dependency of the package
            raise ServerError(
                "the bundled Triton server comes with the 'nvidia-pytriton' package, "
                "which is not installed: pip install nvidia-pytriton==0.7.0"
            ) from e
        root = Path(pytriton.__file__).parent / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(
            binary=root / "bin" / "tritonserver",
            libs=root.parent.parent / "nvidia_pytriton.libs",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        for path in (found.binary, found.libs, found.python_backend, found.stub):
            if not path.exists():
                raise ServerError(
                    f"the nvidia-pytriton wheel has no {path} (Python {version}); "
                    "reinstall nvidia-pytriton==0.7.0 for this interpreter"
                )
        return found


@dataclass(frozen=True)
class ServerOptions:
    """How to run tritonserver; each field maps to one of its command-line options."""

    repository: Path | str  # a folder, or Triton's s3://[http(s)://host:port/]bucket/prefix
    host: str = "127.0.0.1"  # --http-address / --grpc-address; 0.0.0.0 to serve other hosts
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    # explicit: models load at start and later only when asked (train-head asks after it
    # publishes a version); poll: Triton rescans the repository; none: load once.
    model_control_mode: str = "explicit"
    poll_interval_s: int = 2
    # Models loaded at start in explicit mode; empty means every model in the repository.
    load_models: tuple[str, ...] = ()
    log_verbose: int = 0
    # How long Triton waits, once told to exit, for models to unload (the drain before it has
    # already finished the requests in flight).
    exit_timeout_s: int = 10
    # Python-backend shared memory per model instance; images travel through it, so start
    # large enough for a full batch instead of growing 1 MB at a time.
    shm_default_bytes: int = 64 * 1024 * 1024
    shm_growth_bytes: int = 16 * 1024 * 1024
    # Triton APIs closed to callers without the key (header headmaster-api-key); () opens them all.
    restricted_apis: tuple[str, ...] = RESTRICTED_APIS
    api_key: str | None = None  # None: a new random key per start (found in the server record)
    # Record address, pids and key in REPO/.headmaster/server.json, for the commands that change
    # the repository; readable by the owner only.
    write_record: bool = True
    # Another tritonserver binary and --backend-directory instead of the bundled ones, e.g. a
    # build with Triton's onnxruntime backend for the native flavour (the folder then holds
    # python/ and onnxruntime/ as Triton expects). None: the nvidia-pytriton wheel's.
    binary: Path | None = None
    backend_directory: Path | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise ServerError(
                f"model_control_mode must be one of {', '.join(MODEL_CONTROL_MODES)}, not {self.model_control_mode!r}"
            )
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        for name, port in ports.items():
            if not 0 < port < 65536:
                raise ServerError(f"{name} must be between 1 and 65535, not {port}")
        if len(set(ports.values())) != len(ports):
            raise ServerError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: if the Python process that started the server is
    # killed outright, the kernel stops tritonserver too instead of leaving it orphaned.
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # pragma: no cover - non-glibc systems
        pass


class TritonServer:
    """One tritonserver process on one repository.

    ``start()`` returns once the server reports ready, or raises :class:`ServerError` with
    the reason taken from the server's own log. Use it as a context manager.
    """

    def __init__(self, options: ServerOptions, log_path: Path | None = None):
        self.options = options
        self._workdir = Path(tempfile.mkdtemp(prefix="headmaster-triton-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"
        self._log_start = 0  # where this start's lines begin in the (appended) log
        self._process: subprocess.Popen | None = None
        self._log_file: IO[bytes] | None = None
        self.api_key = (options.api_key or server_record.new_key()) if options.restricted_apis else None
        self.stubs: dict[int, Stub] = {}  # python-backend stubs seen alive, by pid
        self._suspects: list[Stub] = []  # stubs gone since the last look, judged at the next
        # Models whose stub died under a request: Triton's python backend never frees that request,
        # so the old model object outlives every unload and holds the server's exit to its timeout.
        self.leaked_models: set[str] = set()
        self.record: ServerRecord | None = None

    # -- addresses ---------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.options.host in ("0.0.0.0", "") else self.options.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.options.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def remote(self) -> bool:
        return str(self.options.repository).startswith("s3://")

    @property
    def repository_arg(self) -> str:
        return str(self.options.repository) if self.remote else str(Path(self.options.repository).resolve())

    # -- life cycle ----------------------------------------------------------------------
    def command(self, bundled: BundledTriton, backend_dir: Path) -> list[str]:
        o = self.options
        args = [
            str(o.binary or bundled.binary),
            f"--model-repository={self.repository_arg}",
            f"--backend-directory={backend_dir}",
            f"--http-address={o.host}",
            f"--grpc-address={o.host}",
            f"--metrics-address={o.host}",
            f"--http-port={o.http_port}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-port={o.metrics_port}",
            f"--model-control-mode={o.model_control_mode}",
            f"--log-verbose={o.log_verbose}",
            f"--exit-timeout-secs={o.exit_timeout_s}",
            f"--backend-config=python,shm-default-byte-size={o.shm_default_bytes}",
            f"--backend-config=python,shm-growth-byte-size={o.shm_growth_bytes}",
            # The models never run on a GPU through this server's python backend without
            # the user asking; no need to probe for one at start.
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
        ]
        if o.restricted_apis:
            apis = ",".join(o.restricted_apis)
            args += [
                f"--http-restricted-api={apis}:{KEY_HEADER}={self.api_key}",
                f"--grpc-restricted-protocol={apis}:{KEY_HEADER}={self.api_key}",
            ]
        if o.model_control_mode == "poll":
            args.append(f"--repository-poll-secs={o.poll_interval_s}")
        if o.model_control_mode == "explicit":
            args += [f"--load-model={name}" for name in (o.load_models or ("*",))]
        return args + list(o.extra_args)

    def _backend_dir(self, bundled: BundledTriton) -> Path:
        # The python backend looks for its stub beside libtriton_python.so, and the wheel
        # keeps one stub per Python version elsewhere: assemble the folder it expects.
        if self.options.backend_directory is not None:
            return Path(self.options.backend_directory).resolve()
        backend_dir = self._workdir / "backends"
        python_dir = backend_dir / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for source in (
            bundled.python_backend / "libtriton_python.so",
            bundled.python_backend / "triton_python_backend_utils.py",
            bundled.stub,
        ):
            shutil.copy2(source, python_dir / source.name)
        return backend_dir

    def _env(self, bundled: BundledTriton) -> dict[str, str]:
        env = dict(os.environ)
        # The stub's RPATH is relative to its folder in the wheel; after the copy above it
        # finds the server's libraries (and libpython) through LD_LIBRARY_PATH.
        # The stub must also load the libpython of *this* interpreter: its stdlib's extension
        # modules (ssl, ...) fail against another patch release's libpython3.X.so.
        libpython_dir = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libpython_dir, str(bundled.libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        # The stub takes its interpreter from the first python3 on PATH: make it this one,
        # so model.py files see the same site-packages (onnxruntime, Pillow, ...).
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        # From S3, Triton copies each model into its own temporary folder: the threshold model
        # reads the head versions' reference sets from the bucket named here.
        if str(self.options.repository).startswith("s3://"):
            env[REPOSITORY_ENV] = str(self.options.repository)
            self.s3_copies.mkdir(parents=True, exist_ok=True)  # Triton wants it to exist, empty
            env[S3_COPIES_ENV] = str(self.s3_copies)
        return env

    @property
    def s3_copies(self) -> Path:
        """The folder Triton copies the models it loads from S3 into (one folderXXXXXX each)."""
        return self._workdir / "s3-copies"

    def model_copies(self) -> dict[Path, str]:
        """The copies of S3 models Triton holds now: folder -> the model's name (from its config)."""
        if not self.s3_copies.is_dir():
            return {}
        return {folder: _model_name(folder) for folder in sorted(self.s3_copies.iterdir()) if folder.is_dir()}

    def start(self, timeout_s: float = 180.0) -> TritonServer:
        o = self.options
        repository = Path(o.repository)
        if not self.remote and not repository.is_dir():
            raise ServerError(f"model repository {repository} does not exist or is not a folder")
        for name, port in (("http", o.http_port), ("grpc", o.grpc_port), ("metrics", o.metrics_port)):
            if port_in_use(o.host, port):
                raise ServerError(
                    f"port {port} ({name}) is already in use on {o.host}; "
                    f"stop what holds it or choose another with --{name}-port"
                )
        bundled = BundledTriton.locate()
        cmd = self.command(bundled, self._backend_dir(bundled))
        LOG.debug("starting %s", " ".join(cmd))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = self._log_size()  # the log is appended to: this start's lines begin here
        self._log_file = open(self.log_path, "ab")
        self._process = subprocess.Popen(
            cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env(bundled),
            # Its own process group: Ctrl-C in a terminal reaches us, and we stop the server
            # in order (drain, unload, reap the python stubs) instead of all at once.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            self._wait_ready(self._process, timeout_s)
        except BaseException:
            self.stop(failed=True)
            raise
        self.watch_stubs()
        if o.write_record and not self.remote:
            self.record = ServerRecord(
                repository=str(repository.resolve()),
                pid=self._process.pid,
                owner_pid=os.getpid(),
                http_url=self.http_url,
                grpc_url=self.grpc_url,
                metrics_url=self.metrics_url,
                api_key=self.api_key,
                started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            server_record.write_record(repository, self.record)
        return self

    def _wait_ready(self, process: subprocess.Popen, timeout_s: float) -> None:
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {process.returncode} while starting:\n"
                    f"{self.failure_summary()}\n(full log: {self.log_path})"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise ServerError(
            f"tritonserver did not become ready within {timeout_s:.0f} s:\n"
            f"{self.failure_summary()}\n(full log: {self.log_path})"
        )

    def log_text(self) -> str:
        """What the server has logged since this start (the log file is appended to across starts)."""
        return self._log_since(self._log_start)

    def failure_summary(self, max_lines: int = 15) -> str:
        """The server's own error lines: what failed to load and why."""
        if not self.log_path.exists():
            return "(no server log)"
        lines = self.log_text().splitlines()  # not an earlier run's lines
        # Triton's glog lines start with a severity letter: E = error. Its crash handler prints
        # "Signal (11) received." The CUDA lines are what it says on every machine without a GPU.
        errors = [
            l
            for l in lines
            if (l[:1] == "E" or "failed to load" in l or "error:" in l.lower() or l.startswith("Signal ("))
            and not _NO_GPU_NOISE.search(l)
        ]
        picked = errors or lines
        return "\n".join(picked[-max_lines:]) or "(the server printed nothing)"

    def exit_description(self) -> str:
        """How the process ended, for an operator: an exit code or the signal that killed it."""
        code = self._process.poll() if self._process is not None else None
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- python-backend stubs ------------------------------------------------------------
    def watch_stubs(self) -> list[Stub]:
        """Look at the server's python-backend stubs; returns those that died (a stub killed or
        crashed leaves its model answering 500 for every request, and Triton never restarts it).

        A stub also goes away when its model unloads or changes version. A stub counts as dead
        when, one look after it vanished, its shared-memory region is still there (a clean exit
        removes it; a killed stub cannot), no stub took its place, and Triton still calls the
        version it ran READY."""
        process = self._process
        if process is None or process.poll() is not None:  # not started, or gone
            return []
        alive = {stub.pid: stub for stub in _stubs_of(process.pid)}
        dead = []
        if self._suspects:
            from headmaster.server import live

            try:
                ready = live.serving(self, 10.0)
            except Exception:
                ready = {}
            running = {(stub.instance, stub.version) for stub in alive.values()}
            dead = [
                stub
                for stub in self._suspects
                if os.path.exists(f"/dev/shm/{stub.region}")
                and (stub.instance, stub.version) not in running
                and stub.version in ready.get(stub.model, ())
            ]
        self._suspects = [stub for pid, stub in self.stubs.items() if pid not in alive]
        self.stubs = alive
        return dead

    def forget_stub_regions(self, stubs: list[Stub]) -> None:
        """Unlink the shared-memory regions of dead stubs. Only tritonserver still maps one (for the
        model object the python backend never frees, see ``leaked_models``); the name goes now, the
        memory when that mapping does."""
        self.leaked_models |= {stub.model for stub in stubs}
        _unlink_regions({stub.region for stub in stubs}, even_if_mapped=True)

    # -- stopping ------------------------------------------------------------------------
    def drain(self, timeout_s: float = 10.0) -> None:
        """Stop taking requests and finish those in flight, before the process is told to exit:
        the ensembles unload first (new requests are refused at once, in-flight ones finish on
        the models they use), then every other model (python stubs exit and free their memory).

        Nothing here reads the repository (Triton's model statistics say what is loaded, its stubs
        what still runs): with an S3 endpoint gone, a call that lists the bucket waits on it, and
        Triton's exit waits on that call until its exit timeout, with the models still loaded."""
        from headmaster.server import live

        process = self._process
        if process is None:  # never started: nothing to drain
            return
        try:
            models = live.serving(self, timeout_s)
        except Exception as e:  # an unreachable or already stopping server: SIGTERM does the rest
            LOG.info("no drain (%s)", e)
            return
        ensembles: list[str] = [m for m in ("classify", "classify_embedding", "embed", "embed_text") if m in models]
        # An unload returns at once; the model goes when its last in-flight request is done (an
        # ensemble request holds the models it uses until it is answered). So the ensembles go
        # first, then the models they use; each batch until Triton no longer serves it and its
        # python stubs have exited.
        deadline = time.monotonic() + timeout_s
        for batch in (ensembles, [m for m in models if m not in ensembles]):
            if not batch:
                continue
            try:
                live.unload(self, batch, timeout_s)
                while time.monotonic() < deadline and (
                    set(batch) & set(live.serving(self, timeout_s))
                    or any(stub.model in batch for stub in _stubs_of(process.pid))
                ):
                    time.sleep(0.1)
            except Exception as e:  # a server stopping under us: SIGTERM does the rest
                LOG.warning("drain: %s", e)
                return

    def stop(self, timeout_s: float | None = None, *, drain: bool = True, failed: bool = False) -> int | None:
        """Stop the server: drain (see :meth:`drain`), then SIGTERM, which lets Triton finish and
        exit; no process, no shared-memory file and no temporary folder is left behind."""
        process = self._process
        code = None
        if process is not None:
            regions = {stub.region for stub in self.stubs.values()}
            regions |= {stub.region for stub in _stubs_of(process.pid)}
            if drain and process.poll() is None:
                self.drain()
            self._process = None
            wait_s = timeout_s if timeout_s is not None else self.options.exit_timeout_s + 15
            drained_leak = False
            told_at = self._log_size()
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                # After a drain nothing is in flight: only the model object of a dead stub can keep
                # Triton waiting, for its whole exit timeout, and then it exits with 1.
                grace = min(wait_s, 3.0) if (drain and self.leaked_models) else wait_s
                try:
                    process.wait(grace)
                except subprocess.TimeoutExpired:
                    if grace < wait_s:
                        LOG.warning(
                            "tritonserver still holds the model(s) %s whose python stub died (a python-backend "
                            "defect: the failed request is never released); stopped it after the drain",
                            ", ".join(sorted(self.leaked_models)),
                        )
                        process.kill()
                        process.wait()
                        drained_leak = True  # everything was drained and unloaded; nothing was lost
                    else:
                        LOG.warning("tritonserver did not stop within %.0f s; killing it", wait_s)
                        process.kill()
                        process.wait()
            code = 0 if drained_leak else process.returncode
            timed_out = _exit_timeout(self._log_since(told_at)) if code not in (0, None) else None
            if timed_out is not None:
                lost, why = timed_out
                LOG.warning(
                    "tritonserver's exit timeout (%d s) ran out %s%s",
                    self.options.exit_timeout_s,
                    why,
                    "" if lost else "; nothing in flight was lost",
                )
                code = code if lost else 0
            # Python-backend stubs are in the server's process group; none may outlive it.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _unlink_regions(regions, even_if_mapped=True)  # every process that mapped them was just killed
            # A model unloaded in time takes its S3 copy with it; Triton exiting with models still
            # loaded (its exit timeout, a kill) leaves theirs, which nothing else would remove.
            copies = self.model_copies()
            if copies:
                how = (
                    "ran out of its exit timeout"
                    if timed_out
                    else f"was killed by signal {-process.returncode}"
                    if process.returncode < 0
                    else f"exited with code {process.returncode}"
                )
                LOG.warning(
                    "tritonserver %s with %d models still loaded from S3 (%s): removed the copies it had made of them",
                    how,
                    len(copies),
                    ", ".join(sorted(set(copies.values()))),
                )
                for folder in copies:
                    shutil.rmtree(folder, ignore_errors=True)
            if self.record is not None:
                server_record.remove_record(Path(self.options.repository), self.record.pid)
                self.record = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        keep_log = (failed or (code not in (None, 0))) and self.log_path.is_relative_to(self._workdir)
        if keep_log:
            shutil.rmtree(self._workdir / "backends", ignore_errors=True)
            shutil.rmtree(self.s3_copies, ignore_errors=True)
        else:
            shutil.rmtree(self._workdir, ignore_errors=True)
        return code

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _exit_timeout(shutdown_log: str) -> tuple[bool, str] | None:
    """Why Triton, stopping, ran out of its exit timeout, read from its countdown lines: None when it
    did not; else (whether requests were cut off, the reason). Triton first waits for its HTTP and
    gRPC connections, then for in-flight inferences, then for models to unload, all within one
    timeout; the exit code 1 says only that the timeout expired, not which wait spent it."""
    if "Exit timeout expired" not in shutdown_log:
        return None
    inflight = re.findall(r"Found (\d+) model versions that have in-flight inferences", shutdown_log)
    if inflight and inflight[-1] != "0":
        return True, f"with inferences still running in {inflight[-1]} model versions: they were cut off"
    live = re.findall(r"Found (\d+) live models and (\d+) in-flight non-inference requests", shutdown_log)
    if not (inflight and live and "All models are stopped" in shutdown_log):
        return True, "before its in-flight inferences were counted"
    models, calls = live[-1]
    if calls != "0":
        return True, f"with {calls} control calls (a model load or unload) still running"
    open_at_end = [
        (service, n)
        for timeout, n, service in re.findall(r"Timeout (\d+): Found (\d+) (\w+) service connections", shutdown_log)
        if int(timeout) <= 1 and n != "0"
    ]
    if open_at_end:
        service, n = open_at_end[-1]
        return False, (
            f"waiting for {n} open {service} connection(s), with {models} models still loaded: a call "
            "was still running (from an S3 repository, one that reads the bucket, such as the "
            "repository index, waits as long as the endpoint is unreachable), so no time was left to "
            "unload the models"
        )
    return False, (
        f"with {models} models still held after every request was answered (Triton 2.51 keeps a "
        "reference when a gRPC client disconnects mid-request, upstream "
        "triton-inference-server/server#7368)"
    )


@dataclass(frozen=True)
class Stub:
    """One python-backend stub process: a model instance's Python interpreter."""

    pid: int
    model: str  # the model it runs
    version: str  # the version folder it runs
    instance: str  # e.g. preprocess_0_0
    region: str  # its shared-memory region in /dev/shm


def _stubs_of(server_pid: int) -> list[Stub]:
    """The stubs whose parent is ``server_pid``, from /proc (their command line names the model
    file, the shared-memory region and the instance)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != server_pid:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if len(args) > 8 and args[0].endswith(STUB_NAME.encode()):
            model_file = Path(args[1].decode())
            found.append(
                Stub(
                    int(entry.name),
                    _model_name(model_file.parent.parent),
                    model_file.parent.name,
                    args[8].decode(),
                    args[2].decode(),
                )
            )
    return found


@functools.lru_cache(maxsize=1024)
def _model_name(folder: Path) -> str:
    """A model folder's model name: the folder's own name in a repository on disk; a copy Triton made
    from S3 is named folderXXXXXX, and its config.pbtxt says which model it is."""
    if not folder.name.startswith("folder"):
        return folder.name
    try:
        found = re.search(r'^name:\s*"([^"]+)"', (folder / "config.pbtxt").read_text(), re.M)
    except OSError:
        found = None
    return found.group(1) if found else folder.name


def _regions_in_use() -> set[str]:
    """Shared-memory regions some process still maps."""
    used: set[str] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            maps = (entry / "maps").read_text()
        except OSError:
            continue
        used.update(line.rsplit("/", 1)[-1] for line in maps.splitlines() if f"/dev/shm/{SHM_PREFIX}" in line)
    return used


def _unlink_regions(regions: set[str], even_if_mapped: bool = False) -> None:
    """Unlink the given regions (a stub killed with SIGKILL never unlinks its own) unless a
    process still maps one."""
    regions = {r for r in regions if r.startswith(SHM_PREFIX)}
    if not regions:
        return
    in_use = set() if even_if_mapped else _regions_in_use()
    for region in regions - in_use:
        try:
            os.unlink(f"/dev/shm/{region}")
            LOG.info("removed the shared-memory region %s", region)
        except FileNotFoundError:
            pass
