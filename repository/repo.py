"""A built repository on disk, as the code reads it: its manifest (build options, encoder card),
its heads and their live versions, and the configs it writes for them.

Where files live is ``layout.py``; which models exist and how they connect, ``topology.py``;
assembling a repository, ``build.py``; changing heads, ``lifecycle/operations.py``; finding every
inconsistency, ``consistency.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from headmaster.errors import ConfigError, RepositoryError
from headmaster.export.card import EncoderCard, require_same_encoder
from headmaster.export.heads import HEAD_FILE, HeadCard
from headmaster.repository import ab, topology
from headmaster.repository.config import Batching, EnsembleModel, parse, render
from headmaster.repository.layout import (
    CONFIG_FILE,
    MANIFEST,
    MANIFEST_SCHEMA,
    config_path,
    head_folders,
    version_dir,
    versions,
)
from headmaster.repository.publish import write_file


def live_of(config, test=None) -> int | None:
    """The live version a head's parsed config serves: the version its policy names, other than the
    candidate of a running A/B test (``test``, an ab.AbTest), which loads beside it."""
    policy = config.version_policy
    if not (policy.HasField("specific") and policy.specific.versions):
        return None
    served = [v for v in policy.specific.versions if test is None or v != test.version]
    return max(served) if served else None


GPU_DEFAULTS = {
    "max_batch_size": 512,
    "preferred_batch_sizes": (64, 128, 256, 512),
    "max_queue_delay_us": 1000,
    "encoder_instances": 2,
    "preprocess_instances": 2,
    "decoder": "torchvision",
}


@dataclass(frozen=True)
class BuildOptions:
    """How `repo build` configures serving; stored in the manifest and reused on re-render."""

    flavour: str = "portable"  # portable (bundled server, python backend) | native (NVIDIA container)
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)  # encoder's dynamic batcher
    max_queue_delay_us: int = 2000  # how long the encoder's batcher waits to fill a batch
    encoder_instances: int = 1
    preprocess_instances: int = 1
    preprocess_threads: int = 0  # 0 = one decode thread per CPU core
    # Bounds per image and request in preprocess (0 = its defaults: 16 MP, 32:1, 64 MiB).
    max_pixels: int = 0
    max_aspect_ratio: float = 0
    max_request_bytes: int = 0
    exact_decode: bool = False  # large JPEGs decoded at full size instead of at reduced DCT scale
    max_text_bytes: int = 0  # UTF-8 bytes per text the tokenize model takes (0 = its default, 1 MiB)
    device: str = "auto"  # portable runner: auto | cpu | cuda
    decoder: str = "pillow"  # pillow (CPU threads) | torchvision (batched; on the GPU when device is cuda)
    # The image encoder's cache of embeddings by sha256 of the pixels (served/runtime.py), portable flavour.
    embedding_cache_mb: float = 64.0
    # Preprocess's cache of decoded pixels by sha256 of an image's bytes (served/preprocess.py), so a
    # repeated image skips decode and resize; Pillow's decoder only. ~150 KB an image at 224 px:
    # 32 MiB holds ~220 of them.
    decoded_cache_mb: float = 32.0
    # Load an image encoder's text tower, tokenize and embed_text (a text encoder's always load:
    # they are its classify). Off by default: they stay in the repository (zero-shot heads are made
    # from them on this machine, not through the server) but the server does not load them, so a
    # ViT-B-32 serves classify and embed in ~850 MB less (two fewer processes). `--serve-text` asks.
    serve_text: bool = False

    def __post_init__(self) -> None:
        if self.flavour not in ("portable", "native"):
            raise ConfigError(f"flavour must be portable or native, not {self.flavour!r}", option="flavour")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, not {self.device!r}", option="device")
        if self.decoder not in ("pillow", "torchvision"):
            raise ConfigError(f"decoder must be pillow or torchvision, not {self.decoder!r}", option="decoder")
        Batching(self.max_batch_size, self.preferred_batch_sizes, self.max_queue_delay_us)
        if self.embedding_cache_mb < 0:
            raise ConfigError(
                f"embedding_cache_mb must be >= 0 (0 = no cache), not {self.embedding_cache_mb}",
                option="embedding-cache-mb",
            )
        if self.decoded_cache_mb < 0:
            raise ConfigError(
                f"decoded_cache_mb must be >= 0 (0 = no cache), not {self.decoded_cache_mb}",
                option="decoded-cache-mb",
            )

    @classmethod
    def for_device(cls, device: str = "auto", **given) -> BuildOptions:
        """Defaults chosen for where the encoder runs, then whatever is ``given`` (None = default).

        On a GPU the encoder wants large batches (ViT-B-32 in fp16 on an H100: ~30,000 img/s at
        batch 512, a fraction of that at 32) and two instances per GPU, so one batch is copied
        and queued while the other computes; decoding moves to the GPU (nvJPEG) with two
        preprocess instances, so host threads never starve it. On CPU, small batches keep
        latency down and one instance uses every core.
        """
        defaults = dict(GPU_DEFAULTS) if device == "cuda" else {}
        return cls(device=device, **{**defaults, **{k: v for k, v in given.items() if v is not None}})

    @classmethod
    def from_dict(cls, d: dict) -> BuildOptions:
        # A manifest written before serve_text existed (or before it defaulted to off) was built
        # serving text: it keeps doing so, so an upgrade never drops embed_text from a deployment.
        # One written before the decoded cache has a preprocess/1/model.py that keeps none: its
        # config renders as it was built (no cache_bytes), so `repo check` finds nothing to
        # rewrite; a rebuild brings the cache.
        return cls(
            **{
                **d,
                "preferred_batch_sizes": tuple(d.get("preferred_batch_sizes", ())),
                "serve_text": d.get("serve_text", True),
                "decoded_cache_mb": d.get("decoded_cache_mb", 0.0),
            }
        )

    @property
    def light_batching(self) -> Batching:
        # Cheap models (decode, heads, thresholds) batch whatever is queued, without waiting.
        return Batching(self.max_batch_size)

    @property
    def encoder_batching(self) -> Batching:
        return Batching(self.max_batch_size, self.preferred_batch_sizes, self.max_queue_delay_us)


@dataclass(frozen=True)
class HeadState:
    name: str
    versions: tuple[int, ...]
    live: int  # the version the server loads
    card: HeadCard  # of the live version

    def chosen(self, version: int | None) -> int:
        """``version`` (the live one when None), refused when it is not on disk."""
        chosen = self.live if version is None else version
        if chosen not in self.versions:
            raise RepositoryError(
                f"head {self.name} has no version {chosen} on disk; versions: {list(self.versions)} (live: {self.live})"
            )
        return chosen


class Repository:
    """A built repository on disk: its manifest, encoder card, heads and model descriptions."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise RepositoryError(
                f"{self.path} is not a Headmaster model repository (no {MANIFEST}); "
                f"build one with `headmaster repo build --encoder DIR --repo {self.path}`"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise RepositoryError(f"{manifest_path} is not valid JSON: {e}") from None
        if manifest.get("schema") != MANIFEST_SCHEMA:
            raise RepositoryError(f"{manifest_path}: schema {manifest.get('schema')!r} is not supported")
        self.options = BuildOptions.from_dict(manifest["build"])
        self.card = EncoderCard.from_dict(manifest["encoder"])
        self.promotion = manifest.get("promotion")  # the int8 gate's figures of the last precision switch

    @property
    def flavour(self) -> str:
        return self.options.flavour

    @property
    def fingerprint(self) -> str:
        return self.card.fingerprint

    @property
    def has_text(self) -> bool:
        return "text" in self.card.towers

    # -- heads -------------------------------------------------------------------------
    def head_names(self) -> list[str]:
        """The heads this repository serves: head folders with a config. A head folder without
        one (copied in by hand, maybe still being copied) is a candidate, not yet a head."""
        return [name for name in head_folders(self.path) if config_path(self.path, name).is_file()]

    def candidate_heads(self) -> list[str]:
        """Head folders with versions but no config yet: dropped in by hand, waiting to be adopted."""
        return [name for name in head_folders(self.path) if not config_path(self.path, name).is_file()]

    def head(self, name: str) -> HeadState:
        folder = self.path / name
        found = [v for v in versions(folder) if (folder / str(v) / HEAD_FILE).is_file()]
        if not found:
            raise RepositoryError(
                f"no head named {name!r} in {self.path}; heads here: {', '.join(self.head_names()) or '(none)'}"
            )
        live = self._live_version(name) or found[-1]
        if live not in found:
            raise RepositoryError(f"head {name}: its config serves version {live}, which is not on disk ({found})")
        return HeadState(name, tuple(found), live, HeadCard.load(folder / str(live)))

    def version_dir(self, name: str, version: int | None = None) -> Path:
        """The folder of a head version (the live one when None)."""
        return version_dir(self.path, name, self.head(name).chosen(version))

    def heads(self) -> list[HeadState]:
        return [self.head(name) for name in self.head_names()]

    def _live_version(self, name: str) -> int | None:
        path = config_path(self.path, name)
        if not path.is_file():
            return None
        return live_of(parse(path.read_text()), ab.running(self.path, name))

    # -- model descriptions (topology.py) ---------------------------------------------------
    def encoder_model(self, tower: str):
        return topology.encoder_model(self.card, self.options, tower)

    def head_model(self, name: str, live: int):
        labels = len(HeadCard.load(version_dir(self.path, name, live)).labels)  # SCORES dims of that version
        model = topology.head_model(self.card, self.options, name, live, labels)
        test = ab.running(self.path, name)
        if test is not None and test.live == live:  # the candidate of a running test loads beside it
            model = replace(model, also_serve=(test.version,))
        return model

    def static_models(self) -> list:
        return topology.static_models(self.card, self.options)

    def embed_ensembles(self) -> list:
        return topology.embed_ensembles(self.card, self.options)

    def head_models(self, heads: list[str], pinned: dict[str, int] | None = None, with_tests: bool = True) -> list:
        """threshold and the ensembles for ``heads``; a head under an A/B test runs both its
        versions (``with_tests=False``: the live one only, still pinned, as while a test starts
        or ends); ``pinned`` pins more heads' steps to a version."""
        tests = ab.tests(self.path, heads)
        pins = {head: test.live for head, test in tests.items()} | dict(pinned or {})
        running = {head: test.params() for head, test in tests.items()} if with_tests else None
        return topology.head_dependent_models(self.card, self.options, heads, pins, running)

    def model_names(self) -> list[str]:
        return topology.model_names(self.card, self.options, self.head_names()) + self.student_names()

    def text_note(self) -> str | None:
        """What a repository built without ``--serve-text`` leaves out, and how to get it; None
        when nothing is left out (text is served, or the encoder has no text tower)."""
        if "text" not in self.card.towers or topology.serves_text(self.card, self.options):
            return None
        return (
            "embed_text is not served (nor tokenize, text_encoder): the text tower stays in the repository "
            "for zero-shot heads, unloaded; to serve it, rebuild with `headmaster repo build --serve-text`"
        )

    def student_names(self) -> list[str]:
        """Distilled students (``headmaster distill``): models of their own, served from image bytes."""
        from headmaster.served.student import STUDENT_FILE

        return sorted(
            p.parent.parent.name
            for p in self.path.glob(f"*/[0-9]*/{STUDENT_FILE}")
            if config_path(self.path, p.parent.parent.name).is_file()
        )

    # -- writing ---------------------------------------------------------------------------
    def write_config(self, model) -> None:
        if isinstance(model, EnsembleModel):
            # Triton wants a version folder even for an ensemble, which has no files.
            (self.path / model.name / "1").mkdir(parents=True, exist_ok=True)
        write_file(self.path / model.name / CONFIG_FILE, render(model, self.flavour))

    def render_heads(self) -> list[str]:
        """Re-render every head config and the head-dependent models; returns the heads."""
        heads = self.heads()
        for head in heads:
            require_same_encoder(self.fingerprint, head.card.encoder_fingerprint, f"head {head.name} v{head.live}")
            self.write_config(self.head_model(head.name, head.live))
        names = [h.name for h in heads]
        for model in self.head_models(names):
            self.write_config(model)
        return names

    def set_live(self, name: str, version: int) -> None:
        self.write_config(self.head_model(name, version))
