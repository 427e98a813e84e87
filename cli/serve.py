"""`headmaster serve`: the bundled Triton on a repository, watched until Ctrl-C / SIGTERM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

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
    import os

    from headmaster.lifecycle.serving import ServeLoop, ServeOptions
    from headmaster.server.record import KEY_ENV

    key = api_key_file.read_text().strip() if api_key_file else os.environ.get(KEY_ENV) or None
    options = ServeOptions(
        repo=Path(repo),
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        model_control_mode=model_control_mode,
        poll_interval_s=poll_interval,
        log_verbose=log_verbose,
        log_file=log_file,
        startup_timeout_s=startup_timeout,
        api_key=key,
        open_control_api=open_control_api,
        watch=watch,
        tritonserver=tritonserver,
        backend_directory=backend_directory,
        triton_args=tuple(triton_arg or ()),
        trace_url=trace_url,
        trace_rate=trace_rate,
        restarts=restarts,
    )
    code = ServeLoop(options, _ConsoleReporter()).run()
    console.print(f"stopped (tritonserver exit code {code})")
    if code != 0:
        raise typer.Exit(1)


class _ConsoleReporter:
    """The serve loop's events on the console (a rich status line while it starts)."""

    TONES = {"ok": "green", "warn": "yellow", "bad": "red"}

    def say(self, text: str, tone: str = "", rest: str = "") -> None:
        stressed = f"[{self.TONES[tone]}]{escape(text)}[/]" if tone else escape(text)
        console.print(stressed + escape(rest), highlight=False)

    def phase(self, text: str):
        return console.status(escape(text))

    def ready(self, loop) -> None:
        from headmaster.server.record import KEY_ENV, STATE_DIR

        server, o = loop.server, loop.options
        console.print(
            f"[green]Triton is ready[/] serving {len(loop.server_options.load_models)} models from "
            f"{escape(loop.shown)}",
            highlight=False,
        )
        console.print(f"  HTTP     http://{server.http_url}   (curl http://{server.http_url}/v2/models/classify)")
        console.print(f"  gRPC     {server.grpc_url}")
        console.print(f"  metrics  {server.metrics_url}")
        console.print(f"  log      {escape(str(server.log_path))}")
        if o.open_control_api:
            console.print(
                "[yellow]the control API is open:[/] anyone who reaches these ports can load and unload "
                "models, and upload code that runs as this user"
            )
        elif loop.location is not None:
            given = "given" if o.api_key else "random: give one to change heads"
            console.print(f"  control  closed; the key is {KEY_ENV} ({given})")
        else:
            console.print(
                f"  control  closed; the key is in {escape(str(loop.repo / STATE_DIR / 'server.json'))} (owner only)"
            )
        if o.host not in ("127.0.0.1", "localhost", "::1"):
            console.print(
                f"[yellow]listening on {o.host}:[/] inference, health, metadata, model configs and "
                "statistics answer anyone who reaches this address, unencrypted over HTTP (see docs/serving.md, "
                "security, for TLS)"
            )
        console.print("Ctrl-C or SIGTERM stops it.")
