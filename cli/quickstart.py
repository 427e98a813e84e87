"""The main job end to end, as the README's first command runs it.

Each step prints the CLI command that does the same, so the quickstart doubles as a tour.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from headmaster.cli.common import console as stderr_console
from headmaster.images import collect_images

ZERO_SHOT_HEADS = {
    # A multi-bucket head, and a binary contest (a positive and a negative prompt).
    "subject": (
        [
            "cat=a photo of a cat",
            "person=a photo of a person",
            "rocket=a photo of a rocket",
            "coffee=a photo of a cup of coffee",
            "flower=a photo of a flower",
            "building=a photo of a building",
        ],
        ("{}.",),
    ),
    "has_cat": (["cat=a photo containing a cat", "no cat=a photo with no cat"], ("{}",)),
}


def sample_images(folder: Path) -> Path:
    """Copy real photos that ship inside installed packages into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    sklearn_images = importlib.resources.files("sklearn.datasets") / "images"
    for name in ("china.jpg", "flower.jpg"):
        (folder / name).write_bytes((sklearn_images / name).read_bytes())
    if importlib.util.find_spec("skimage") is not None:
        data = importlib.resources.files("skimage.data")
        for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
            (folder / name).write_bytes((data / name).read_bytes())
    return folder


def run_quickstart(workdir: Path, model: str, pretrained: str | None, images: Path | None, console: Console) -> None:
    from headmaster.client import HeadmasterClient
    from headmaster.errors import CardError
    from headmaster.export.card import EncoderCard
    from headmaster.export.encoder import ExportOptions, export_encoder
    from headmaster.repository import consistency
    from headmaster.repository.build import build_repository
    from headmaster.repository.head_version import HeadVersion
    from headmaster.server.triton import ServerOptions, TritonServer, free_port
    from headmaster.store import ParquetStore
    from headmaster.store.classify import classify_into_store
    from headmaster.training.feedback.rescore import rescore
    from headmaster.training.heads.zero_shot import create_zero_shot_head

    workdir = Path(workdir)
    encoder_dir, repo = workdir / "encoder", workdir / "model_repository"
    tag = pretrained or "none"

    console.rule(
        f"1. export {model}  [dim]headmaster export encoder --model {model} --pretrained {tag} --out {encoder_dir}"
    )
    try:
        card = EncoderCard.load(encoder_dir)
        reuse = card.model == model and card.pretrained == pretrained
    except CardError:
        reuse = False
    if reuse:
        console.print(f"reusing the export in {encoder_dir} (fingerprint {card.short_fingerprint})")
    else:
        with console.status("exporting and checking against PyTorch..."):
            card = export_encoder(ExportOptions(model=model, pretrained=pretrained, out=encoder_dir))
        checks = ", ".join(f"{tower} {check['min_cosine']:.6f}" for tower, check in card.verification.items())
        console.print(f"exported; min cosine vs PyTorch: {checks}")

    console.rule(f"2. build the repository  [dim]headmaster repo build --encoder {encoder_dir} --repo {repo}")
    if repo.exists():
        shutil.rmtree(repo)  # a fresh repository each run: heads start at version 1
    repository = build_repository(encoder_dir, repo)
    console.print(f"models: {', '.join(repository.model_names())}")
    if repository.text_note():
        console.print(repository.text_note(), markup=False, highlight=False)

    console.rule(f"3. zero-shot heads  [dim]headmaster zero-shot NAME --repo {repo} --label ...")
    for name, (labels, templates) in ZERO_SHOT_HEADS.items():
        head = create_zero_shot_head(repo, name, labels, templates)
        console.print(f"head {name} v{head.version}: {', '.join(head.labels)}")

    console.rule(f"4. serve  [dim]headmaster serve --repo {repo}")
    consistency.check(repo)
    options = ServerOptions(
        repository=repo,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        load_models=tuple(repository.model_names()),
        exit_timeout_s=10,
    )
    image_dir = images or sample_images(workdir / "images")
    results_path, store_path = workdir / "results.jsonl", workdir / "store"
    if store_path.exists():
        shutil.rmtree(store_path)  # embeddings of an earlier run's encoder have no use here
    store = ParquetStore(store_path)
    with TritonServer(options) as server:
        console.print(f"Triton ready: gRPC {server.grpc_url}, HTTP {server.http_url}")
        console.rule(
            f"5. classify  [dim]headmaster classify {image_dir} --url {server.grpc_url} "
            f"--output {results_path} --store {store_path}"
        )
        files = collect_images([image_dir])
        with HeadmasterClient(server.grpc_url) as client:
            results, _ = classify_into_store(client, store, files)
    with open(results_path, "w") as f:
        for result in results:
            f.write(json.dumps(result.to_dict()) + "\n")
    table = Table(title="labels from the served classify ensemble")
    table.add_column("image")
    for name in ZERO_SHOT_HEADS:
        table.add_column(name)
    for result in results:
        cells = (
            [f"[red]{result.error}[/]"] * len(ZERO_SHOT_HEADS)
            if not result.ok
            else [
                f"{', '.join(result.heads[n].labels) or '-'} ({result.heads[n].top[1]:.2f}, v{result.heads[n].version})"
                for n in ZERO_SHOT_HEADS
            ]
        )
        table.add_row(Path(result.source).name, *cells)
    Console().print(table)
    console.print(f"{sum(r.ok for r in results)} of {len(results)} images classified; results in {results_path}")
    console.rule(
        f"6. rescore on CPU from the store  [dim]headmaster rescore has_cat --store {store_path} --repo {repo}"
    )
    rescored = rescore(store, HeadVersion.load(repo, "has_cat"))
    console.print(
        f"{rescored.rows} stored embeddings rescored by has_cat v{rescored.version} in "
        f"{rescored.seconds:.2f} s, no encoder and no server: {rescored.label_counts}"
    )
    if pretrained is None:
        console.print(
            "[yellow]These labels come from random weights (--pretrained none), so they are "
            "arbitrary. With internet: --pretrained laion2b_s34b_b79k (or a local checkpoint).[/]"
        )


def quickstart(
    workdir: Annotated[Path, typer.Option(help="Where the encoder, repository, images and results go.")] = Path(
        "build/quickstart"
    ),
    model: Annotated[str, typer.Option(help="open_clip model.")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="Pretrained tag or checkpoint; 'none' = random weights.")] = "none",
    images: Annotated[
        Path | None, typer.Option(help="Your own images (default: photos shipped in scikit-image/-learn).")
    ] = None,
) -> None:
    """Export -> build the repository -> zero-shot heads -> serve -> classify real photos into a store -> print
    labels -> rescore the stored embeddings on CPU."""
    run_quickstart(workdir, model, None if pretrained.lower() == "none" else pretrained, images, stderr_console)
