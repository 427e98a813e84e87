"""`headmaster serve`: the bundled Triton on a repository, watched until Ctrl-C / SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from headmaster.cli.common import DEFAULT_REPO, RepoOption, console


def serve(
    repo: RepoOption = DEFAULT_REPO,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. 127.0.0.1 (default) serves this machine only; "
            "0.0.0.0 serves every network the machine is on (see docs/serving.md, security)."
        ),
    ] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP/REST (KServe v2) port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    model_control_mode: Annotated[
        str, typer.Option(help="explicit (default: heads hot-load when train-head/zero-shot ask), poll or none.")
    ] = "explicit",
    poll_interval: Annotated[int, typer.Option(help="Seconds between repository scans in poll mode.")] = 2,
    log_verbose: Annotated[int, typer.Option(help="Triton's --log-verbose level.")] = 0,
    log_file: Annotated[
        Path | None, typer.Option(help="Where to write the server log (default: REPO/.headmaster/triton.log).")
    ] = None,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to become ready.")] = 300.0,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the key of the control API (default: $HEADMASTER_API_KEY, else a new random key, "
            "written to REPO/.headmaster/server.json for the owner)."
        ),
    ] = None,
    open_control_api: Annotated[
        bool,
        typer.Option(
            "--open-control-api",
            help="Leave Triton's model-repository, logging, trace and shared-memory APIs open "
            "to anyone who reaches the ports (they can load code onto this machine).",
        ),
    ] = False,
    watch: Annotated[bool, typer.Option(help="Adopt head versions copied into the repository by hand.")] = True,
    tritonserver: Annotated[
        Path | None,
        typer.Option(
            help="Another tritonserver binary (default: the one bundled in nvidia-pytriton), e.g. one with the "
            "onnxruntime backend for a native-flavour repository."
        ),
    ] = None,
    backend_directory: Annotated[
        Path | None,
        typer.Option(help="Triton backend directory for --tritonserver (holding onnxruntime/, python/, ...)."),
    ] = None,
    triton_arg: Annotated[
        list[str] | None,
        typer.Option(help="Pass an option to tritonserver as it is (repeat), e.g. --triton-arg=--grpc-use-ssl=true."),
    ] = None,
    trace_url: Annotated[
        str | None,
        typer.Option(
            help="Turn on Triton's OpenTelemetry tracing: export spans to this OTLP/HTTP collector, e.g. "
            "http://127.0.0.1:4318/v1/traces (a request's traceparent header continues the caller's trace)."
        ),
    ] = None,
    trace_rate: Annotated[int, typer.Option(help="With --trace-url: trace one request in this many.")] = 1,
    restarts: Annotated[
        int,
        typer.Option(
            help="Restart tritonserver when it dies, at most this many times in 10 minutes (the bundled Triton "
            "2.51 can crash when a gRPC client disconnects mid-request); 0 = exit 1 at once."
        ),
    ] = 3,
) -> None:
    """Run the Triton server bundled in nvidia-pytriton on a repository until Ctrl-C / SIGTERM."""
    import dataclasses
    import os

    from headmaster.errors import RepositoryError, ServerError
    from headmaster.model_repository import consistency, s3
    from headmaster.model_repository.repository import Repository
    from headmaster.model_repository.server import ServerOptions, TritonServer
    from headmaster.model_repository.server_record import KEY_ENV, RESTRICTED_APIS, STATE_DIR, running_server
    from headmaster.model_repository.supervisor import Supervisor
    from headmaster.model_repository.topology import text_only
    from headmaster.model_repository.tracing import trace_args
    from headmaster.model_repository.warmup import warm_up

    tracing = trace_args(trace_url, trace_rate) if trace_url else ()  # a bad URL is refused before anything starts

    location = s3.location_of(repo)  # --repo s3://...: repo is its fresh working copy
    if location is None:
        running = running_server(repo)
        if running is not None:
            raise ServerError(
                f"{repo} is already served by tritonserver pid {running.pid} at {running.http_url}; "
                "stop it first (two servers on one repository would disagree about its heads)"
            )
    repository = Repository(repo)
    try:
        consistency.check(repo)
    except RepositoryError as e:
        if location is not None:  # a replica never writes to the bucket: many start at once
            raise RepositoryError(
                f"{location} does not describe a servable state: {e}; fix it with "
                f"`headmaster repo repair --repo {location}`",
                option="repo",
            ) from None
        console.print(f"[yellow]the repository does not describe a servable state:[/] {e}")
        for action in consistency.repair(repo):
            console.print(f"  repaired: {action}")
        consistency.check(repo)
        repository = Repository(repo)
    # The checks above opened every ONNX file in onnxruntime (~450 MB for a ViT-B-32 repository);
    # glibc keeps what they freed unless asked, and this process then watches the server for days.
    _give_freed_memory_back()
    key = api_key_file.read_text().strip() if api_key_file else os.environ.get(KEY_ENV) or None
    # From S3, Triton reads the bucket itself (AWS_* from this environment); the working copy only
    # told us what to load. No record is written: the replicas of a bucket are many, on many
    # machines, and head commands name them with --server (their key from HEADMASTER_API_KEY).
    options = ServerOptions(
        repository=location.triton_path() if location else repo,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        model_control_mode=model_control_mode,
        poll_interval_s=poll_interval,
        load_models=tuple(repository.model_names()),
        log_verbose=log_verbose,
        api_key=key,
        restricted_apis=() if open_control_api else RESTRICTED_APIS,
        extra_args=tuple(triton_arg or ()) + tracing,
        binary=tritonserver,
        backend_directory=backend_directory,
    )
    default_log = Path(repo) / STATE_DIR / (f"triton-{http_port}.log" if location else "triton.log")
    server = TritonServer(options, log_path=log_file or default_log)
    shown = str(location) if location else str(repo)
    stopping = False

    def request_stop(signum, _frame):
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    code = None
    try:
        with console.status(f"starting Triton on {shown} (log: {server.log_path})..."):
            server.start(timeout_s=startup_timeout)
        with console.status("warming the ensembles..."):  # encoders and heads warmed as they loaded
            warm_up(
                server.http_url, options.load_models, repository.student_names(), text_only=text_only(repository.card)
            )
        console.print(
            f"[green]Triton is ready[/] serving {len(options.load_models)} models from {shown}", highlight=False
        )
        console.print(f"  HTTP     http://{server.http_url}   (curl http://{server.http_url}/v2/models/classify)")
        console.print(f"  gRPC     {server.grpc_url}")
        console.print(f"  metrics  {server.metrics_url}")
        console.print(f"  log      {server.log_path}")
        if open_control_api:
            console.print(
                "[yellow]the control API is open:[/] anyone who reaches these ports can load and unload "
                "models, and upload code that runs as this user"
            )
        elif location is not None:
            console.print(
                f"  control  closed; the key is {KEY_ENV} ({'given' if key else 'random: give one to change heads'})"
            )
        else:
            console.print(f"  control  closed; the key is in {Path(repo) / STATE_DIR / 'server.json'} (owner only)")
        if host not in ("127.0.0.1", "localhost", "::1"):
            console.print(
                f"[yellow]listening on {host}:[/] inference, health, metadata, model configs and "
                "statistics answer anyone who reaches this address, unencrypted over HTTP (see docs/serving.md, "
                "security, for TLS)"
            )
        console.print("Ctrl-C or SIGTERM stops it.")
        say = lambda line: console.print(line, highlight=False)  # noqa: E731
        supervisor = Supervisor(server, Path(repo), say=say)
        crashes: list[float] = []
        while not stopping:
            if not server.is_alive():
                console.print(
                    f"[red]Triton exited unexpectedly[/] ({server.exit_description()}):\n{server.failure_summary()}"
                )
                crashes = [t for t in crashes if time.monotonic() - t < 600] + [time.monotonic()]
                if len(crashes) > restarts:
                    if restarts:
                        console.print(
                            f"[red]not restarting:[/] {len(crashes)} crashes within 10 minutes (--restarts {restarts})"
                        )
                    break
                # Same key and ports: clients and the repository's commands carry on once it is back.
                server.stop(drain=False, failed=True)  # reaps the stubs, frees their shared memory
                # What the repository names now: a head removed (or added) since the first start would
                # otherwise be asked for by name, and Triton refuses to start without it.
                if location is not None:
                    try:
                        s3.pull(location, Path(repo))
                    except RepositoryError as e:  # the bucket unreachable: what the working copy last saw
                        console.print(f"[yellow]restarting from the last copy of {location}:[/] {e}")
                repository = Repository(repo)
                options = dataclasses.replace(
                    options, api_key=server.api_key, load_models=tuple(repository.model_names())
                )
                server = TritonServer(options, log_path=server.log_path)
                console.print(f"restarting Triton ({len(crashes)} of at most {restarts} in 10 minutes)...")
                server.start(timeout_s=startup_timeout)
                warm_up(
                    server.http_url,
                    options.load_models,
                    repository.student_names(),
                    text_only=text_only(repository.card),
                )
                supervisor = Supervisor(server, Path(repo), say=say)
                console.print(f"[green]Triton is ready again[/] (pid {server.pid})")  # no record from S3
                continue
            if model_control_mode == "explicit":  # Triton refuses load and unload calls in the other modes
                # Versions dropped into a bucket are not watched: S3 writes go through head commands.
                supervisor.tick() if watch and location is None else supervisor.heal_stubs()
            time.sleep(0.25)
        if stopping:
            console.print("stopping: refusing new requests, finishing those in flight, unloading models...")
    finally:
        code = server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    console.print(f"stopped (tritonserver exit code {code})")
    if code != 0:
        raise typer.Exit(1)


def _give_freed_memory_back() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass
