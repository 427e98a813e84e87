"""`headmaster repo build | check | repair`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from headmaster.cli.common import DEFAULT_REPO, RepoOption, console

app = typer.Typer(help="Build, check and repair Headmaster model repositories.", no_args_is_help=True)


@app.command("build")
def build(
    encoder: Annotated[Path, typer.Option("--encoder", help="Folder written by `headmaster export encoder`.")],
    repo: RepoOption = DEFAULT_REPO,
    flavour: Annotated[
        str,
        typer.Option(
            help="portable: python-backend models for the bundled Triton (no Docker); "
            "native: onnxruntime/TensorRT/PyTorch backends for NVIDIA's container."
        ),
    ] = "portable",
    max_batch_size: Annotated[
        int | None, typer.Option(help="Largest batch any model takes [default: 64; 512 with --device cuda].")
    ] = None,
    preferred_batch_size: Annotated[
        list[int] | None,
        typer.Option(
            help="Encoder dynamic batcher's preferred sizes (repeat the option) [default: 8 16 32; "
            "64 128 256 512 with --device cuda]."
        ),
    ] = None,
    max_queue_delay_us: Annotated[
        int | None,
        typer.Option(
            help="How long the encoder's batcher may wait to fill a preferred batch, in microseconds "
            "[default: 2000; 1000 with --device cuda]."
        ),
    ] = None,
    encoder_instances: Annotated[
        int | None, typer.Option(help="Encoder model instances (per GPU on a GPU) [default: 1; 2 with --device cuda].")
    ] = None,
    preprocess_instances: Annotated[
        int | None, typer.Option(help="Preprocess model instances [default: 1; 2 with --device cuda].")
    ] = None,
    preprocess_threads: Annotated[int, typer.Option(help="Decode threads per preprocess instance (0 = per core).")] = 0,
    device: Annotated[
        str,
        typer.Option(
            help="Portable flavour: auto, cpu or cuda for the encoders; cuda also picks GPU batching defaults."
        ),
    ] = "auto",
    decoder: Annotated[
        str | None,
        typer.Option(
            help="pillow (CPU threads, open_clip's exact pixels) or torchvision (batched; nvJPEG on the GPU with "
            "--device cuda, pixels on the GPU for the encoder) [default: pillow; torchvision with --device cuda]."
        ),
    ] = None,
    max_pixels: Annotated[
        int,
        typer.Option(
            help="Most pixels an image may decode to at full size (larger JPEGs decode at 1/2..1/8); 0 = 16,000,000."
        ),
    ] = 0,
    max_aspect_ratio: Annotated[float, typer.Option(help="Longest over shortest side an image may have; 0 = 32.")] = 0,
    max_request_mb: Annotated[
        float, typer.Option(help="Encoded megabytes of images one request may carry (all its images); 0 = 64.")
    ] = 0,
    exact_decode: Annotated[
        bool,
        typer.Option(
            help="Decode large JPEGs at full size (open_clip's exact pixels) instead of at reduced DCT scale "
            "(>= 4x the encoder's input side; within 3 levels of 255)."
        ),
    ] = False,
    max_text_bytes: Annotated[
        int, typer.Option(help="UTF-8 bytes one text may have (tokenize refuses longer ones with a 400); 0 = 1 MiB.")
    ] = 0,
    embedding_cache_mb: Annotated[
        float,
        typer.Option(
            help="Memory for the image encoder's cache of embeddings by sha256 of an image's pixels, so a repeated "
            "image skips the encoder (portable flavour; least recently used out first); 0 = no cache."
        ),
    ] = 64.0,
    decoded_cache_mb: Annotated[
        float,
        typer.Option(
            help="Memory for preprocess's cache of decoded pixels by sha256 of an image's bytes, so a repeated "
            "image skips decode and resize (~150 KB an image at 224 px; Pillow decoder only; least recently used "
            "out first); 0 = no cache."
        ),
    ] = 32.0,
    serve_text: Annotated[
        bool,
        typer.Option(
            help="Load an image encoder's text tower, tokenize and embed_text in the server. Off by default: they "
            "stay in the repository (zero-shot heads are still made from them) but unloaded: ~850 MB and two "
            "processes less for a ViT-B-32. A text encoder (st:FOLDER: no image tower) always serves them: "
            "they are its classify."
        ),
    ] = False,
) -> None:
    """Assemble a Triton repository: preprocess -> encoder -> heads -> threshold, as `classify`."""
    from headmaster.repository.build import build_repository
    from headmaster.repository.repo import BuildOptions

    options = BuildOptions.for_device(
        device,
        flavour=flavour,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=tuple(preferred_batch_size) if preferred_batch_size else None,
        max_queue_delay_us=max_queue_delay_us,
        encoder_instances=encoder_instances,
        preprocess_instances=preprocess_instances,
        preprocess_threads=preprocess_threads,
        decoder=decoder,
        max_pixels=max_pixels,
        max_aspect_ratio=max_aspect_ratio,
        max_request_bytes=int(max_request_mb * 1024 * 1024),
        exact_decode=exact_decode,
        max_text_bytes=max_text_bytes,
        embedding_cache_mb=embedding_cache_mb,
        decoded_cache_mb=decoded_cache_mb,
        serve_text=serve_text,
    )
    from headmaster.repository import s3

    served_text = _served_text(repo)
    repository = build_repository(encoder, repo, options)
    pushed = s3.sync_up(repo)  # an S3 repository: versions first, configs, then the manifest
    console.print(
        f"[green]built[/] {s3.describe(repo)}{f' ({len(pushed)} objects pushed)' if pushed else ''} ({flavour}) with encoder {repository.card.model} "
        f"{repository.card.short_fingerprint} ({repository.card.precision}): "
        f"{', '.join(repository.model_names())}"
    )
    note = repository.text_note()
    if note:
        was = " (its previous build served it)" if served_text else ""
        console.print(f"[yellow]{note}{was}[/]", highlight=False)
    promotion = repository.promotion
    if promotion:
        gate = promotion["gate"]
        agreement = ", ".join(f"{head} {figures['label_agreement']:.2%}" for head, figures in gate["heads"].items())
        console.print(
            f"{promotion['from']} -> {promotion['to']} gate passed: cosine to {promotion['from']} mean "
            f"{gate['mean_cosine']:.5f}, min {gate['min_cosine']:.5f} over {gate['images']} held-out "
            f"images; labels unchanged: {agreement or 'no heads'}"
        )


@app.command("check")
def check(repo: RepoOption = DEFAULT_REPO) -> None:
    """Find every way the repository differs from what can be served: configs, files, head
    versions (each one run once), ensembles, leftovers. Exit 1 when there is any."""
    from headmaster.repository import s3
    from headmaster.repository.consistency import problems
    from headmaster.repository.repo import Repository

    found = problems(repo)
    if found:
        for problem in found:
            console.print(problem, markup=False, highlight=False)
        console.print(
            f"[red]{len(found)} problem(s)[/] in {s3.describe(repo)}; fix them with "
            f"`headmaster repo repair --repo {s3.describe(repo)}`",
            highlight=False,
        )
        raise typer.Exit(1)
    repository = Repository(repo)
    console.print(
        f"[green]ok[/] {s3.describe(repo)}: {len(repository.model_names())} models, "
        f"heads: {', '.join(repository.head_names()) or '(none)'}"
    )
    note = repository.text_note()
    if note:
        console.print(note, markup=False, highlight=False)


def _served_text(repo) -> bool:
    """Whether the repository already at ``repo`` (if any) serves embed_text, so a rebuild that
    drops it says so."""
    from headmaster.errors import HeadmasterError
    from headmaster.repository.layout import MANIFEST
    from headmaster.repository.repo import Repository

    try:
        return (Path(repo) / MANIFEST).is_file() and "embed_text" in Repository(repo).model_names()
    except HeadmasterError:
        return False


@app.command("repair")
def repair(repo: RepoOption = DEFAULT_REPO) -> None:
    """Make the repository describe what can be served, from what is on disk: each head serves
    its configured version if valid, else its newest valid one; invalid versions and heads are
    moved aside (.invalid-*); configs are re-rendered; leftovers removed."""
    from headmaster.repository import s3
    from headmaster.repository.consistency import problems
    from headmaster.repository.consistency import repair as repair_repository

    for action in repair_repository(repo):
        console.print(action, markup=False, highlight=False)
    s3.sync_up(repo)
    left = problems(repo)
    if left:
        for problem in left:
            console.print(problem, markup=False, highlight=False)
        console.print(f"[red]{len(left)} problem(s) repair cannot fix[/] in {s3.describe(repo)}", highlight=False)
        raise typer.Exit(1)
    console.print(f"[green]ok[/] {s3.describe(repo)} describes what it serves", highlight=False)


@app.command("push")
def push(
    source: Annotated[Path, typer.Argument(help="A repository folder (written by `headmaster repo build`).")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="s3://BUCKET/PREFIX (or s3://HOST:PORT/BUCKET/PREFIX); "
            "credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.",
        ),
    ],
) -> None:
    """Copy a repository into S3, versions before the configs that name them, the manifest last;
    objects the source no longer has are deleted last. Servers of the bucket are not told: see
    `headmaster rollout`."""
    from headmaster.repository import s3
    from headmaster.repository.consistency import check as check_repository

    check_repository(source)  # never push a repository that cannot be served
    location, changed = s3.push_repository(source, to)
    console.print(f"[green]pushed[/] {source} to {location}: {len(changed)} objects changed", highlight=False)
