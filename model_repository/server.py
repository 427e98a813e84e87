"""Run the Triton Inference Server 2.51 that ships inside the ``nvidia-pytriton`` wheel.

No Docker engine is needed: the wheel carries the ``tritonserver`` binary, its shared
libraries and the python backend. Only the python backend is in it, which is why the
*portable* repository flavour runs every model through python-backend ``model.py`` files.
"""

from __future__ import annotations

import ctypes
import logging
import os
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

from headmaster.export.errors import ServerError

LOG = logging.getLogger(__name__)

MODEL_CONTROL_MODES = ("explicit", "poll", "none")


@dataclass(frozen=True)
class BundledTriton:
    """Where the pieces of the bundled server live in site-packages."""

    binary: Path  # pytriton/tritonserver/bin/tritonserver
    libs: Path  # nvidia_pytriton.libs: the server's vendored shared libraries
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this interpreter's Python version

    @classmethod
    def locate(cls) -> "BundledTriton":
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

    repository: Path
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
    # How long a stop waits for in-flight requests before Triton gives up on them.
    exit_timeout_s: int = 30
    # Python-backend shared memory per model instance; images travel through it, so start
    # large enough for a full batch instead of growing 1 MB at a time.
    shm_default_bytes: int = 64 * 1024 * 1024
    shm_growth_bytes: int = 16 * 1024 * 1024
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise ServerError(
                f"model_control_mode must be one of {', '.join(MODEL_CONTROL_MODES)}, "
                f"not {self.model_control_mode!r}"
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
        self._process: subprocess.Popen | None = None
        self._log_file = None

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

    # -- life cycle ----------------------------------------------------------------------
    def command(self, bundled: BundledTriton, backend_dir: Path) -> list[str]:
        o = self.options
        args = [
            str(bundled.binary),
            f"--model-repository={Path(o.repository).resolve()}",
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
        if o.model_control_mode == "poll":
            args.append(f"--repository-poll-secs={o.poll_interval_s}")
        if o.model_control_mode == "explicit":
            args += [f"--load-model={name}" for name in (o.load_models or ("*",))]
        return args + list(o.extra_args)

    def _backend_dir(self, bundled: BundledTriton) -> Path:
        # The python backend looks for its stub beside libtriton_python.so, and the wheel
        # keeps one stub per Python version elsewhere: assemble the folder it expects.
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
        return env

    def start(self, timeout_s: float = 180.0) -> "TritonServer":
        o = self.options
        repository = Path(o.repository)
        if not repository.is_dir():
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
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self._process.returncode} while starting:\n"
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

    def failure_summary(self, max_lines: int = 15) -> str:
        """The server's own error lines: what failed to load and why."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        # Triton's glog lines start with a severity letter: E = error.
        errors = [l for l in lines if l[:1] == "E" or "failed to load" in l or "error:" in l.lower()]
        picked = errors or lines
        return "\n".join(picked[-max_lines:]) or "(the server printed nothing)"

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop the server: SIGTERM lets Triton drain in-flight requests and unload models."""
        process, self._process = self._process, None
        code = None
        if process is not None:
            wait_s = timeout_s if timeout_s is not None else self.options.exit_timeout_s + 15
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(wait_s)
                except subprocess.TimeoutExpired:
                    LOG.warning("tritonserver did not stop within %.0f s; killing it", wait_s)
                    process.kill()
                    process.wait()
            code = process.returncode
            # Python-backend stubs are in the server's process group; none may outlive it.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
