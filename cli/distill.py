"""`headmaster distill`: a small timm student of one head, trained on the stored images, served as its own model."""

from __future__ import annotations

from typing import Annotated

import typer

from headmaster.cli.common import DEFAULT_REPO, RepoOption, ServerOption, StoreOption, console, out


def distill_command(
    name: Annotated[str, typer.Argument(help="The teacher head (its live version, with the repository's encoder).")],
    student: Annotated[str, typer.Option(help="A timm model name.")] = "mobilenetv3_small_100",
    store: StoreOption = "store",
    repo: RepoOption = DEFAULT_REPO,
    as_name: Annotated[
        str | None, typer.Option("--name", help="The served model's name (default NAME_student).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training images.")] = 10,
    image_size: Annotated[int | None, typer.Option(help="Student input size (default: its timm data config).")] = None,
    pretrained: Annotated[bool, typer.Option(help="Start from timm's pretrained weights (must be cached).")] = False,
    val_fraction: Annotated[float, typer.Option(help="Held-out share of items for the agreement.")] = 0.2,
    max_items: Annotated[int | None, typer.Option(help="Use at most this many stored images.")] = None,
    min_agreement: Annotated[
        float,
        typer.Option(
            help="Publish only a student that accepts the teacher's labels on at least this share of the held-out "
            "images (lower it to publish a weaker student knowingly)."
        ),
    ] = 0.9,  # training.distill.MIN_AGREEMENT
    seed: int = 0,
    server: ServerOption = None,
) -> None:
    """Train a small timm student to reproduce a head's (encoder + head) scores from the stored
    images, export it to ONNX, report its agreement with the teacher and both CPU speeds, and
    serve it as its own model (image bytes -> SCORES + RESULT) if it agrees enough (--min-agreement)."""
    from headmaster.training.distill import DistillOptions, distill

    with console.status(f"distilling {name} into {student}"):
        report = distill(
            DistillOptions(
                name,
                repo,
                store,
                student,
                as_name,
                pretrained,
                image_size,
                epochs,
                val_fraction=val_fraction,
                seed=seed,
                max_items=max_items,
                min_agreement=min_agreement,
            ),
            server,
        )
    out.print(
        f"student {report.name} v{report.version} ({report.student}, {report.parameters:,} parameters) of "
        f"{report.teacher}: {report.train_items} training / {report.val_items} held-out images",
        highlight=False,
    )
    out.print(
        f"agreement with the teacher (held out): top-1 {report.top1_agreement:.1%}, accepted labels "
        f"{report.label_agreement:.1%}, mean |score diff| {report.mean_abs_score_diff:.3f}; "
        f"(training images: top-1 {report.train_top1_agreement:.1%}); ONNX vs PyTorch {report.onnx_max_diff:.1e}",
        highlight=False,
    )
    out.print(
        f"CPU speed (onnxruntime, from pixels, batch 16): student {report.student_img_s:.1f} img/s, "
        f"teacher (encoder + head) {report.teacher_img_s:.1f} img/s "
        f"({report.student_img_s / report.teacher_img_s:.1f}x)",
        highlight=False,
    )
