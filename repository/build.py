"""Assemble (or re-assemble) a repository from an exported encoder: the encoder towers, the
python-backend models, every config, and the heads already there (same encoder only).

A repository served by an fp32 (or fp16) image tower that is rebuilt with an int8 export of
the same encoder passes the int8 promotion gate first (export/quantize.py): the new tower
against the one served now, on held-out real images, with every head's live version; when it
fails, nothing is written."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from headmaster.errors import HeadmasterError, RepositoryError
from headmaster.export.card import EncoderCard, require_same_encoder
from headmaster.export.heads import HEAD_FILE
from headmaster.repository import consistency
from headmaster.repository.head_version import HeadVersion
from headmaster.repository.layout import ARTIFACT_FILES, MANIFEST, MANIFEST_SCHEMA, copy_backend, encoder_artifact
from headmaster.repository.publish import replace_version, repository_lock, write_file
from headmaster.repository.repo import BuildOptions, Repository
from headmaster.served.tokenize import TOKENIZER_DIR

LOG = logging.getLogger(__name__)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # encoders are hundreds of MB: share the bytes when we can
    except OSError:
        shutil.copyfile(source, target)


def _tokenizer_files(card: EncoderCard, encoder_dir: Path, folder: Path) -> None:
    """The served tokenize model plus an hf:FOLDER's own tokenizer files, each checked against the card."""
    copy_backend("tokenize", folder)
    (folder / TOKENIZER_DIR).mkdir()
    for name, digest in card.tokenizer["files"].items():
        source = encoder_dir / TOKENIZER_DIR / name
        found = hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else "missing"
        if found != digest:
            raise RepositoryError(
                f"{encoder_dir}: tokenizer file {TOKENIZER_DIR}/{name} is {found}, not the "
                f"{digest} its card records; export the encoder again"
            )
        shutil.copyfile(source, folder / TOKENIZER_DIR / name)


def precision_gate(previous: Repository, card: EncoderCard, encoder_dir: Path) -> dict | None:
    """The int8 promotion gate when ``previous`` (same encoder, not int8) switches to the int8
    export in ``encoder_dir``: its figures, or None when no switch happens. Raises
    RepositoryError naming the figures when the int8 tower fails."""
    if not (
        card.precision == "int8"
        and previous.card.precision != "int8"
        and previous.fingerprint == card.fingerprint
        and "image" in previous.card.towers
        and "image" in card.towers
    ):
        return None
    from headmaster.export import quantize  # onnxruntime.quantization: only when switching

    served = previous.card.towers["image"]
    new = card.towers["image"]
    heads = [HeadVersion.load(previous, head.name) for head in previous.heads() if head.live is not None]
    figures = quantize.promotion_gate(
        encoder_artifact(previous.path, "image", served.format),
        Path(encoder_dir) / new.file,
        new.input_name,
        new.output_name,
        quantize.gate_images(quantize.calibration_images()),
        card.preprocessing,
        heads,
    )
    quantize.require_passed(
        figures, RepositoryError, f"cannot switch {previous.path} from {previous.card.precision} to int8"
    )
    return {"from": previous.card.precision, "to": "int8", "gate": figures}


def build_repository(encoder_dir: Path, repo: Path, options: BuildOptions = BuildOptions()) -> Repository:
    """Assemble (or re-assemble) ``repo`` from an exported encoder; existing heads are kept
    only if they were made with this same encoder."""
    card = EncoderCard.load(encoder_dir)
    repo = Path(repo)
    with repository_lock(repo):
        promotion = None
        if (repo / MANIFEST).exists():
            try:
                previous = Repository(repo)
                for head in previous.heads():
                    require_same_encoder(
                        card.fingerprint, head.card.encoder_fingerprint, f"head {head.name} v{head.live} in {repo}"
                    )
            except HeadmasterError as e:
                raise RepositoryError(
                    f"cannot build {repo} with encoder {card.short_fingerprint}: {e}. Build into a new "
                    "repository, or remove the heads of the old encoder first"
                ) from None
            promotion = precision_gate(previous, card, encoder_dir)  # before anything is written
        for tower, spec in card.towers.items():

            def build_tower(folder: Path, _version: int, spec=spec) -> None:
                _link_or_copy(Path(encoder_dir) / spec.file, folder / ARTIFACT_FILES[spec.format])
                copy_backend("runtime", folder)
                card.save(folder)

            replace_version(repo, f"{tower}_encoder", 1, build_tower)
        for name, source in (
            ((("preprocess", "preprocess"),) if "image" in card.towers else ())
            + (("threshold", "threshold"),)
            + ((("tokenize", "tokenize"),) if "text" in card.towers else ())
        ):
            own = source == "tokenize" and card.tokenizer is not None  # an hf:FOLDER's own tokenizer
            replace_version(
                repo,
                name,
                1,
                lambda folder, _v, source=source, own=own: (
                    _tokenizer_files(card, Path(encoder_dir), folder) if own else copy_backend(source, folder)
                ),
            )
        for head_dir in repo.glob(f"*/[0-9]*/{HEAD_FILE}"):
            copy_backend("runtime", head_dir.parent)
        manifest = {"schema": MANIFEST_SCHEMA, "build": asdict(options), "encoder": json.loads(card.to_json())}
        if promotion is not None:
            manifest["promotion"] = promotion
        write_file(repo / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        repository = Repository(repo)
        for model in repository.static_models():
            repository.write_config(model)
        repository.render_heads()
        consistency.check(repo)
    LOG.info("built %s (%s flavour) with encoder %s", repo, options.flavour, card.short_fingerprint)
    return repository
