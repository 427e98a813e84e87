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
    max_pixels: Annotated[int, typer.Option(
        help="Most pixels an image may decode to at full size (larger JPEGs decode at 1/2..1/8); 0 = 16,000,000.")] = 0,
    max_aspect_ratio: Annotated[float, typer.Option(help="Longest over shortest side an image may have; 0 = 32.")] = 0,
    max_request_mb: Annotated[float, typer.Option(
        help="Encoded megabytes of images one request may carry (all its images); 0 = 64.")] = 0,
) -> None:
    """Assemble a Triton repository: preprocess -> encoder -> heads -> threshold, as `classify`."""
    from headmaster.model_repository.repository import BuildOptions, build_repository

    options = BuildOptions(flavour=flavour, max_batch_size=max_batch_size,
                           preferred_batch_sizes=tuple(preferred_batch_size or (8, 16, 32)),
                           max_queue_delay_us=max_queue_delay_us, encoder_instances=encoder_instances,
                           preprocess_instances=preprocess_instances, preprocess_threads=preprocess_threads,
                           device=device, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio,
                           max_request_bytes=int(max_request_mb * 1024 * 1024))
    repository = build_repository(encoder, repo, options)
    console.print(f"[green]built[/] {repo} ({flavour}) with encoder {repository.card.model} "
                  f"{repository.card.short_fingerprint}: {', '.join(repository.model_names())}")


@app.command("check")
def check(repo: RepoOption = Path("model_repository")) -> None:
    """Find every way the repository differs from what can be served: configs, files, head
    versions (each one run once), ensembles, leftovers. Exit 1 when there is any."""
    from headmaster.model_repository.consistency import problems
    from headmaster.model_repository.repository import Repository

    found = problems(repo)
    if found:
        for problem in found:
            console.print(problem, markup=False, highlight=False)
        console.print(f"[red]{len(found)} problem(s)[/] in {repo}; fix them with "
                      f"`headmaster repo repair --repo {repo}`", highlight=False)
        raise typer.Exit(1)
    repository = Repository(repo)
    console.print(f"[green]ok[/] {repo}: {len(repository.model_names())} models, "
                  f"heads: {', '.join(repository.head_names()) or '(none)'}")


@app.command("repair")
def repair(repo: RepoOption = Path("model_repository")) -> None:
    """Make the repository describe what can be served, from what is on disk: each head serves
    its configured version if valid, else its newest valid one; invalid versions and heads are
    moved aside (.invalid-*); configs are re-rendered; leftovers removed."""
    from headmaster.model_repository.consistency import problems
    from headmaster.model_repository.consistency import repair as repair_repository

    for action in repair_repository(repo):
        console.print(action, markup=False, highlight=False)
    left = problems(repo)
    if left:
        for problem in left:
            console.print(problem, markup=False, highlight=False)
        console.print(f"[red]{len(left)} problem(s) repair cannot fix[/] in {repo}", highlight=False)
        raise typer.Exit(1)
    console.print(f"[green]ok[/] {repo} describes what it serves", highlight=False)


def serve(
    repo: RepoOption = Path("model_repository"),
    host: Annotated[str, typer.Option(help="Address to listen on. 127.0.0.1 (default) serves this machine only; "
                                           "0.0.0.0 serves every network the machine is on (see README, Security).")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP/REST (KServe v2) port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    model_control_mode: Annotated[str, typer.Option(
        help="explicit (default: heads hot-load when train-head/zero-shot ask), poll or none.")] = "explicit",
    poll_interval: Annotated[int, typer.Option(help="Seconds between repository scans in poll mode.")] = 2,
    log_verbose: Annotated[int, typer.Option(help="Triton's --log-verbose level.")] = 0,
    log_file: Annotated[Path | None, typer.Option(
        help="Where to write the server log (default: REPO/.headmaster/triton.log).")] = None,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to become ready.")] = 300.0,
    api_key_file: Annotated[Path | None, typer.Option(
        help="File holding the key of the control API (default: $HEADMASTER_API_KEY, else a new random key, "
             "written to REPO/.headmaster/server.json for the owner).")] = None,
    open_control_api: Annotated[bool, typer.Option(
        "--open-control-api", help="Leave Triton's model-repository, model-config and logging APIs open to "
                                   "anyone who reaches the ports (they can load code onto this machine).")] = False,
    watch: Annotated[bool, typer.Option(help="Adopt head versions copied into the repository by hand.")] = True,
    triton_arg: Annotated[list[str] | None, typer.Option(
        help="Pass an option to tritonserver as it is (repeat), e.g. --triton-arg=--grpc-use-ssl=true.")] = None,
) -> None:
    """Run the Triton server bundled in nvidia-pytriton on a repository until Ctrl-C / SIGTERM."""
    import os

    from headmaster.export.errors import RepositoryError, ServerError
    from headmaster.model_repository.repository import Repository
    from headmaster.model_repository.server import ServerOptions, TritonServer
    from headmaster.model_repository.server_record import KEY_ENV, RESTRICTED_APIS, STATE_DIR, running_server
    from headmaster.model_repository.supervisor import Supervisor

    running = running_server(repo)
    if running is not None:
        raise ServerError(f"{repo} is already served by tritonserver pid {running.pid} at {running.http_url}; "
                          "stop it first (two servers on one repository would disagree about its heads)")
    repository = Repository(repo)
    try:
        repository.validate()
    except RepositoryError as e:
        from headmaster.model_repository.consistency import repair

        console.print(f"[yellow]the repository does not describe a servable state:[/] {e}")
        for action in repair(repo):
            console.print(f"  repaired: {action}")
        repository = Repository(repo)
        repository.validate()
    key = api_key_file.read_text().strip() if api_key_file else os.environ.get(KEY_ENV) or None
    options = ServerOptions(repository=repo, host=host, http_port=http_port, grpc_port=grpc_port,
                            metrics_port=metrics_port, model_control_mode=model_control_mode,
                            poll_interval_s=poll_interval, load_models=tuple(repository.model_names()),
                            log_verbose=log_verbose, api_key=key,
                            restricted_apis=() if open_control_api else RESTRICTED_APIS,
                            extra_args=tuple(triton_arg or ()))
    server = TritonServer(options, log_path=log_file or Path(repo) / STATE_DIR / "triton.log")
    stopping = False

    def request_stop(signum, _frame):
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    code = None
    try:
        with console.status(f"starting Triton on {repo} (log: {server.log_path})..."):
            server.start(timeout_s=startup_timeout)
        console.print(f"[green]Triton is ready[/] serving {len(options.load_models)} models from {repo}")
        console.print(f"  HTTP     http://{server.http_url}   (curl http://{server.http_url}/v2/models/classify)")
        console.print(f"  gRPC     {server.grpc_url}")
        console.print(f"  metrics  {server.metrics_url}")
        console.print(f"  log      {server.log_path}")
        if open_control_api:
            console.print("[yellow]the control API is open:[/] anyone who reaches these ports can load and unload "
                          "models, and upload code that runs as this user")
        else:
            console.print(f"  control  closed; the key is in {Path(repo) / STATE_DIR / 'server.json'} (owner only)")
        if host not in ("127.0.0.1", "localhost", "::1"):
            console.print(f"[yellow]listening on {host}:[/] inference, health, metadata and statistics answer anyone "
                          "who reaches this address, unencrypted over HTTP (see README, Security, for TLS)")
        console.print("Ctrl-C or SIGTERM stops it.")
        supervisor = Supervisor(server, Path(repo), say=lambda line: console.print(line, highlight=False))
        while not stopping:
            if not server.is_alive():
                console.print(f"[red]Triton exited unexpectedly:[/]\n{server.failure_summary()}")
                break
            if model_control_mode == "explicit":  # Triton refuses load and unload calls in the other modes
                supervisor.tick() if watch else supervisor.heal_stubs()
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


heads_app = typer.Typer(help="List, remove and import heads.", invoke_without_command=True)
ServerOption = Annotated[str | None, typer.Option(
    "--server", help="HTTP address (host:port) of the server to apply the change to (default: the server "
                     "recorded in the repository by `headmaster serve`, if it runs).")]


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
    """Take a head out of the repository, and out of the server that serves it."""
    from headmaster.model_repository import lifecycle

    change = lifecycle.remove(repo, name, server)
    console.print(f"removed head {name} from {repo}" + _where(change))


@heads_app.command("import")
def import_(version_dir: Annotated[Path, typer.Argument(help="A head version folder (model.onnx + head.json).")],
            repo: RepoOption = Path("model_repository"),
            name: Annotated[str | None, typer.Option(help="Publish under another name.")] = None,
            server: ServerOption = None) -> None:
    """Publish a head version made elsewhere as the next version here (same encoder only)."""
    from headmaster.model_repository import lifecycle
    from headmaster.model_repository.repository import Repository
    from headmaster.model_repository.validation import check_version_dir

    here = Repository(repo)  # a corrupt folder is refused in one line (InvalidVersionError), before anything
    check_version_dir(version_dir, here.fingerprint, here.card.embed_dim)

    change = lifecycle.import_version(repo, version_dir, name, server)
    card = change.card
    console.print(f"[green]head {card.name} v{card.version}[/] imported from {version_dir}" + _where(change))


def rollback(name: Annotated[str, typer.Argument(help="The head to roll back.")],
             to: Annotated[int | None, typer.Option(help="Version to serve (default: the one before the live one).")] = None,
             repo: RepoOption = Path("model_repository"), server: ServerOption = None) -> None:
    """Serve an older version of a head again (validated first)."""
    from headmaster.model_repository import lifecycle

    change = lifecycle.rollback(repo, name, to, server)
    console.print(f"head {name} now serves v{change.version}" + _where(change))


def _where(change) -> str:
    return f"; live on the server at {change.server}" if change.server else "; no server serves this repository"
