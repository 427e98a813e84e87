"""`headmaster repo ...` and `headmaster serve`: the Triton side."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Build and check Headmaster model repositories.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)

RepoOption = Annotated[Path, typer.Option("--repo", help="The model repository folder.")]


@app.command("build")
def build(
    encoder: Annotated[Path, typer.Option("--encoder", help="Folder written by `headmaster export encoder`.")],
    repo: RepoOption = Path("model_repository"),
    flavour: Annotated[str, typer.Option(
        help="portable: python-backend models for the bundled Triton (no Docker); "
             "native: onnxruntime/TensorRT/PyTorch backends for NVIDIA's container.")] = "portable",
    max_batch_size: Annotated[int, typer.Option(help="Largest batch any model takes.")] = 64,
    preferred_batch_size: Annotated[list[int] | None, typer.Option(
        help="Encoder dynamic batcher's preferred sizes (repeat the option).")] = None,
    max_queue_delay_us: Annotated[int, typer.Option(
        help="How long the encoder's batcher may wait to fill a preferred batch, in microseconds.")] = 2000,
    encoder_instances: Annotated[int, typer.Option(help="Encoder model instances.")] = 1,
    preprocess_instances: Annotated[int, typer.Option(help="Preprocess model instances.")] = 1,
    preprocess_threads: Annotated[int, typer.Option(help="Decode threads per preprocess instance (0 = per core).")] = 0,
    device: Annotated[str, typer.Option(help="Portable flavour: auto, cpu or cuda for the encoders.")] = "auto",
) -> None:
    """Assemble a Triton repository: preprocess -> encoder -> heads -> threshold, as `classify`."""
    from headmaster.model_repository.repository import BuildOptions, build_repository

    options = BuildOptions(flavour=flavour, max_batch_size=max_batch_size,
                           preferred_batch_sizes=tuple(preferred_batch_size or (8, 16, 32)),
                           max_queue_delay_us=max_queue_delay_us, encoder_instances=encoder_instances,
                           preprocess_instances=preprocess_instances, preprocess_threads=preprocess_threads,
                           device=device)
    repository = build_repository(encoder, repo, options)
    console.print(f"[green]built[/] {repo} ({flavour}) with encoder {repository.card.model} "
                  f"{repository.card.short_fingerprint}: {', '.join(repository.model_names())}")


@app.command("check")
def check(repo: RepoOption = Path("model_repository")) -> None:
    """Validate every config.pbtxt against Triton's protobuf, the files, and head fingerprints."""
    from headmaster.model_repository.repository import Repository

    repository = Repository(repo)
    repository.validate()
    console.print(f"[green]ok[/] {repo}: {len(repository.model_names())} models, "
                  f"heads: {', '.join(repository.head_names()) or '(none)'}")


def serve(
    repo: RepoOption = Path("model_repository"),
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 to serve other hosts.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP/REST (KServe v2) port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    model_control_mode: Annotated[str, typer.Option(
        help="explicit (default: heads hot-load when train-head/zero-shot ask), poll or none.")] = "explicit",
    poll_interval: Annotated[int, typer.Option(help="Seconds between repository scans in poll mode.")] = 2,
    log_verbose: Annotated[int, typer.Option(help="Triton's --log-verbose level.")] = 0,
    log_file: Annotated[Path | None, typer.Option(help="Where to write the server log (default: a temp file).")] = None,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to become ready.")] = 300.0,
) -> None:
    """Run the Triton server bundled in nvidia-pytriton on a repository until Ctrl-C / SIGTERM."""
    from headmaster.model_repository.repository import Repository
    from headmaster.model_repository.server import ServerOptions, TritonServer

    repository = Repository(repo)
    repository.validate()
    options = ServerOptions(repository=repo, host=host, http_port=http_port, grpc_port=grpc_port,
                            metrics_port=metrics_port, model_control_mode=model_control_mode,
                            poll_interval_s=poll_interval, load_models=tuple(repository.model_names()),
                            log_verbose=log_verbose)
    server = TritonServer(options, log_path=log_file)
    stopping = False

    def request_stop(signum, _frame):
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with console.status(f"starting Triton on {repo} (log: {server.log_path})..."):
            server.start(timeout_s=startup_timeout)
        console.print(f"[green]Triton is ready[/] serving {len(options.load_models)} models from {repo}")
        console.print(f"  HTTP     http://{server.http_url}   (curl http://{server.http_url}/v2/models/classify)")
        console.print(f"  gRPC     {server.grpc_url}")
        console.print(f"  metrics  {server.metrics_url}")
        console.print(f"  log      {server.log_path}")
        console.print("Ctrl-C or SIGTERM stops it.")
        while not stopping:
            if not server.is_alive():
                console.print(f"[red]Triton exited unexpectedly:[/]\n{server.failure_summary()}")
                raise typer.Exit(1)
            time.sleep(0.2)
        console.print("stopping: draining in-flight requests and unloading models...")
    finally:
        code = server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    console.print(f"stopped (tritonserver exit code {code})")


heads_app = typer.Typer(help="List, remove and import heads.", invoke_without_command=True)
ServerOption = Annotated[str | None, typer.Option(
    "--server", help="HTTP address (host:port) of a running server to apply the change to.")]


def _metric(card) -> str:
    metrics = card.details.get("metrics") or {}
    if "accuracy" in metrics:
        return f"acc {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
    if "micro_f1" in metrics:
        return f"micro-F1 {metrics['micro_f1']:.3f}"
    return "-"


@heads_app.callback()
def heads(ctx: typer.Context, repo: RepoOption = Path("model_repository")) -> None:
    """List heads: versions on disk, the live one, labels, kind and validation metrics."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from headmaster.export.heads import HeadCard
    from headmaster.model_repository.repository import Repository

    repository = Repository(repo)
    table = Table(title=f"heads in {repo} (encoder {repository.card.model} {repository.card.short_fingerprint})")
    for column in ("head", "version", "live", "kind", "labels", "validation", "created"):
        table.add_column(column)
    for state in repository.heads():
        for version in reversed(state.versions):
            card = HeadCard.load(repository.path / state.name / str(version))
            table.add_row(state.name, str(version), "[green]live[/]" if version == state.live else "",
                          card.kind + (" multi-label" if card.multi_label else ""),
                          ", ".join(card.labels), _metric(card), card.created)
    Console(soft_wrap=True).print(table)


@heads_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="The head to take out.")],
           repo: RepoOption = Path("model_repository"), server: ServerOption = None) -> None:
    """Take a head out of the repository (and out of a running server with --server)."""
    from headmaster.model_repository import live
    from headmaster.model_repository.repository import remove_head

    remove_head(repo, name)
    if server:
        live.head_removed(server, name)
    console.print(f"removed head {name}" + (f" from {repo} and {server}" if server else f" from {repo}"))


@heads_app.command("import")
def import_(version_dir: Annotated[Path, typer.Argument(help="A head version folder (model.onnx + head.json).")],
            repo: RepoOption = Path("model_repository"),
            name: Annotated[str | None, typer.Option(help="Publish under another name.")] = None,
            server: ServerOption = None) -> None:
    """Publish a head version made elsewhere as the next version here (same encoder only)."""
    from headmaster.model_repository import live
    from headmaster.model_repository.repository import import_head

    card = import_head(repo, version_dir, name)
    if server:
        live.head_published(server, card.name)
    console.print(f"[green]head {card.name} v{card.version}[/] imported from {version_dir}")


def rollback(name: Annotated[str, typer.Argument(help="The head to roll back.")],
             to: Annotated[int | None, typer.Option(help="Version to serve (default: the one before the live one).")] = None,
             repo: RepoOption = Path("model_repository"), server: ServerOption = None) -> None:
    """Serve an older version of a head again."""
    from headmaster.model_repository import live
    from headmaster.model_repository.repository import rollback as rollback_head

    version = rollback_head(repo, name, to)
    if server:
        live.head_published(server, name)
    console.print(f"head {name} now serves v{version}" + (f" on {server}" if server else ""))
