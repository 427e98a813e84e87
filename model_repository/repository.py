"""Assemble, read and check a Headmaster model repository.

Layout (every config.pbtxt rendered by :func:`config.render`)::

    REPO/headmaster.json        manifest: flavour, build settings, the encoder card
    REPO/preprocess/1/model.py  bytes -> pixels          (backends/preprocess.py)
    REPO/image_encoder/1/       model.onnx|plan|pt (+ model.py, the portable runner)
    REPO/text_encoder/1/        same, for the text tower
    REPO/tokenize/1/model.py    text -> token ids        (backends/tokenize.py)
    REPO/<head>/<N>/            model.onnx + head.json (+ model.py): one folder per version
    REPO/threshold/1/model.py   scores -> accepted labels (backends/threshold.py)
    REPO/classify/              ensemble: preprocess -> image_encoder -> heads -> threshold
    REPO/embed/, REPO/embed_text/  ensembles for embeddings alone

The manifest lists the models, and the server loads exactly those by name, so other
folders in the same directory (this package's own source, when the repository is the
checkout's ``model_repository/``) are never taken for models.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from headmaster.errors import ConfigError, HeadmasterError, RepositoryError
from headmaster.export.card import EncoderCard, require_same_encoder
from headmaster.export.heads import HEAD_FILE, MODEL_FILE, NAME_PATTERN, HeadCard, check_head_name
from headmaster.model_repository import backends
from headmaster.model_repository.config import (
    ARTIFACT_FILES,
    Batching,
    EncoderModel,
    EnsembleModel,
    HeadModel,
    Instances,
    PreprocessModel,
    Step,
    Tensor,
    ThresholdModel,
    TokenizeModel,
    parse,
    render,
)
from headmaster.model_repository.publish import replace_version, repository_lock, versions, write_file

LOG = logging.getLogger(__name__)

MANIFEST = "headmaster.json"
MANIFEST_SCHEMA = 1
BACKENDS_DIR = Path(backends.__file__).parent


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
    device: str = "auto"  # portable runner: auto | cpu | cuda

    def __post_init__(self) -> None:
        if self.flavour not in ("portable", "native"):
            raise ConfigError(f"--flavour must be portable or native, not {self.flavour!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        Batching(self.max_batch_size, self.preferred_batch_sizes, self.max_queue_delay_us)

    @classmethod
    def from_dict(cls, d: dict) -> "BuildOptions":
        return cls(**{**d, "preferred_batch_sizes": tuple(d.get("preferred_batch_sizes", ()))})

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
            raise RepositoryError(f"head {self.name} has no version {chosen} on disk; versions: "
                                  f"{list(self.versions)} (live: {self.live})")
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
        return [name for name in self._head_folders() if (self.path / name / "config.pbtxt").is_file()]

    def candidate_heads(self) -> list[str]:
        """Head folders with versions but no config yet: dropped in by hand, waiting to be adopted."""
        return [name for name in self._head_folders() if not (self.path / name / "config.pbtxt").is_file()]

    def _head_folders(self) -> list[str]:
        # Only valid head names: staging and trash folders start with '.', which pathlib's
        # glob would match.
        found = {p.parent.parent.name for p in self.path.glob(f"*/[0-9]*/{HEAD_FILE}")}
        return sorted(name for name in found if NAME_PATTERN.match(name))

    def head(self, name: str) -> HeadState:
        folder = self.path / name
        found = [v for v in versions(folder) if (folder / str(v) / HEAD_FILE).is_file()]
        if not found:
            raise RepositoryError(f"no head named {name!r} in {self.path}; heads here: {', '.join(self.head_names()) or '(none)'}")
        live = self._live_version(name) or found[-1]
        if live not in found:
            raise RepositoryError(f"head {name}: its config serves version {live}, which is not on disk ({found})")
        return HeadState(name, tuple(found), live, HeadCard.load(folder / str(live)))

    def version_dir(self, name: str, version: int | None = None) -> Path:
        """The folder of a head version (the live one when None)."""
        return self.path / name / str(self.head(name).chosen(version))

    def heads(self) -> list[HeadState]:
        return [self.head(name) for name in self.head_names()]

    def _live_version(self, name: str) -> int | None:
        config_path = self.path / name / "config.pbtxt"
        if not config_path.is_file():
            return None
        policy = parse(config_path.read_text()).version_policy
        return max(policy.specific.versions) if policy.HasField("specific") and policy.specific.versions else None

    # -- model descriptions ----------------------------------------------------------------
    def encoder_model(self, tower: str) -> EncoderModel:
        spec = self.card.towers[tower]
        return EncoderModel(
            name=f"{tower}_encoder", format=spec.format,
            input=Tensor(spec.input_name, spec.input_dtype, tuple(spec.input_dims)),
            output=Tensor(spec.output_name, "FP32", (self.card.embed_dim,)),
            batching=self.options.encoder_batching,
            instances=Instances(self.options.encoder_instances, gpu=True),
            graph_optimization=spec.graph_optimization, device=self.options.device,
            fingerprint=self.card.fingerprint)

    def head_model(self, name: str, live: int) -> HeadModel:
        labels = len(HeadCard.load(self.path / name / str(live)).labels)  # SCORES dims of that version
        return HeadModel(name, self.card.embed_dim, live, labels, self.options.light_batching)

    def static_models(self) -> list:
        """Everything but the heads and what depends on the set of heads."""
        o = self.options
        models = [PreprocessModel(self.card.preprocessing, o.light_batching,
                                  Instances(o.preprocess_instances), o.preprocess_threads,
                                  max_pixels=o.max_pixels, max_aspect_ratio=o.max_aspect_ratio,
                                  max_request_bytes=o.max_request_bytes),
                  self.encoder_model("image")]
        if self.has_text:
            models += [TokenizeModel(self.card.model, self.card.context_length, o.light_batching),
                       self.encoder_model("text")]
        return models + self.embed_ensembles()

    def embed_ensembles(self) -> list[EnsembleModel]:
        image = self.encoder_model("image")
        d = self.card.embed_dim
        ensembles = [EnsembleModel(
            "embed", (Tensor("IMAGE", "BYTES", (1,)),), (Tensor("EMBEDDING", "FP32", (d,)),),
            (Step("preprocess", {"IMAGE": "IMAGE"}, {"PIXELS": "PIXELS"}),
             Step(image.name, {image.input.name: "PIXELS"}, {image.output.name: "EMBEDDING"})),
            self.options.max_batch_size)]
        if self.has_text:
            text = self.encoder_model("text")
            ensembles.append(EnsembleModel(
                "embed_text", (Tensor("TEXT", "BYTES", (1,)),), (Tensor("EMBEDDING", "FP32", (d,)),),
                (Step("tokenize", {"TEXT": "TEXT"}, {"TOKENS": "TOKENS"}),
                 Step(text.name, {text.input.name: "TOKENS"}, {text.output.name: "EMBEDDING"})),
                self.options.max_batch_size))
        return ensembles

    def head_models(self, heads: list[str]) -> list:
        """The models whose config depends on the set of heads: threshold, ``classify`` (from
        image bytes) and ``classify_embedding`` (from an embedding already computed, e.g. one
        kept in a store: the heads run, the encoder does not)."""
        image = self.encoder_model("image")
        d = self.card.embed_dim
        result = Tensor("RESULT", "BYTES", (1,))
        head_outputs = tuple(Tensor(f"SCORES_{head}", "FP32", (-1,)) for head in heads)

        def head_steps(embedding: str, with_embedding: bool) -> tuple[Step, ...]:
            # Every ensemble output comes from the threshold step's copies (see ThresholdModel).
            steps, inputs, outputs = [], {"EMBEDDING": embedding}, {"RESULT": "RESULT"}
            for head in heads:
                steps.append(Step(head, {"EMBEDDING": embedding},
                                  {"SCORES": f"HEAD_SCORES_{head}", "INFO": f"HEAD_INFO_{head}"}))
                inputs.update({f"SCORES_{head}": f"HEAD_SCORES_{head}", f"INFO_{head}": f"HEAD_INFO_{head}"})
                outputs[f"SCORES_OUT_{head}"] = f"SCORES_{head}"
            if with_embedding:
                outputs["EMBEDDING_OUT"] = "EMBEDDING"
            return (*steps, Step("threshold", inputs, outputs))

        embed_steps = (Step("preprocess", {"IMAGE": "IMAGE"}, {"PIXELS": "PIXELS"}),
                       Step(image.name, {image.input.name: "PIXELS"}, {image.output.name: "IMAGE_EMBEDDING"}))
        return [ThresholdModel(tuple(heads), d, self.options.light_batching, encoder=self.fingerprint),
                EnsembleModel("classify", (Tensor("IMAGE", "BYTES", (1,)),),
                              (Tensor("EMBEDDING", "FP32", (d,)), result, *head_outputs),
                              embed_steps + head_steps("IMAGE_EMBEDDING", True), self.options.max_batch_size),
                EnsembleModel("classify_embedding", (Tensor("EMBEDDING", "FP32", (d,)),),
                              (result, *head_outputs), head_steps("EMBEDDING", False), self.options.max_batch_size)]

    def model_names(self) -> list[str]:
        """What the server loads, dependencies first."""
        heads = self.head_names()
        return [m.name for m in self.static_models() if not isinstance(m, EnsembleModel)] + heads + \
            [m.name for m in self.head_models(heads)] + [m.name for m in self.embed_ensembles()]

    # -- writing ---------------------------------------------------------------------------
    def write_config(self, model) -> None:
        if isinstance(model, EnsembleModel):
            # Triton wants a version folder even for an ensemble, which has no files.
            (self.path / model.name / "1").mkdir(parents=True, exist_ok=True)
        write_file(self.path / model.name / "config.pbtxt", render(model, self.flavour))

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

    # -- checking --------------------------------------------------------------------------
    def validate(self) -> None:
        """The repository on disk describes exactly what can be served: every problem that
        ``consistency.problems`` finds (configs, files, head versions, ensembles, leftovers, and
        native_check's configs vs model files), listed in one RepositoryError."""
        from headmaster.model_repository.consistency import error_for, problems

        if found := problems(self.path):
            raise error_for(self.path, found)


def copy_backend(source: str, folder: Path) -> None:
    """Put a python-backend model source into a version folder as model.py."""
    shutil.copyfile(BACKENDS_DIR / f"{source}.py", Path(folder) / "model.py")
    # The stub imports model.py with Python in isolated mode (no PYTHON* variables), so it
    # would write __pycache__/ into the version folder after loading; Triton then sees a
    # newer mtime and reloads the model on the next load call (the encoder included, on the
    # first head published after a start). A plain file of that name makes the import system
    # skip writing bytecode, with any Python version.
    (Path(folder) / "__pycache__").touch()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # encoders are hundreds of MB: share the bytes when we can
    except OSError:
        shutil.copyfile(source, target)


def build_repository(encoder_dir: Path, repo: Path, options: BuildOptions = BuildOptions()) -> Repository:
    """Assemble (or re-assemble) ``repo`` from an exported encoder; existing heads are kept
    only if they were made with this same encoder."""
    card = EncoderCard.load(encoder_dir)
    repo = Path(repo)
    with repository_lock(repo):
        if (repo / MANIFEST).exists():
            try:
                previous = Repository(repo)
                for head in previous.heads():
                    require_same_encoder(card.fingerprint, head.card.encoder_fingerprint,
                                         f"head {head.name} v{head.live} in {repo}")
            except HeadmasterError as e:
                raise RepositoryError(
                    f"cannot build {repo} with encoder {card.short_fingerprint}: {e}. Build into a new "
                    "repository, or remove the heads of the old encoder first"
                ) from None
        for tower, spec in card.towers.items():
            def build_tower(folder: Path, _version: int, spec=spec) -> None:
                _link_or_copy(Path(encoder_dir) / spec.file, folder / ARTIFACT_FILES[spec.format])
                copy_backend("runtime", folder)
                card.save(folder)
            replace_version(repo, f"{tower}_encoder", 1, build_tower)
        for name, source in (("preprocess", "preprocess"), ("threshold", "threshold")) + \
                ((("tokenize", "tokenize"),) if "text" in card.towers else ()):
            replace_version(repo, name, 1, lambda folder, _v, source=source: copy_backend(source, folder))
        for head_dir in repo.glob(f"*/[0-9]*/{HEAD_FILE}"):
            copy_backend("runtime", head_dir.parent)
        manifest = {"schema": MANIFEST_SCHEMA, "build": asdict(options), "encoder": json.loads(card.to_json())}
        write_file(repo / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        repository = Repository(repo)
        for model in repository.static_models():
            repository.write_config(model)
        repository.render_heads()
        repository.validate()
    LOG.info("built %s (%s flavour) with encoder %s", repo, options.flavour, card.short_fingerprint)
    return repository


def rollback(repo: Path, name: str, to: int | None = None) -> int:
    """Serve an older version of a head again (default: the one before the live one)."""
    from headmaster.model_repository.validation import check_rollback
    check_rollback(repo, name, to)  # the target must validate before it goes live
    repository = Repository(repo)
    with repository_lock(repo):
        state = repository.head(name)
        older = [v for v in state.versions if v < state.live]
        target = to if to is not None else (older[-1] if older else None)
        if target is None:
            raise RepositoryError(f"head {name} serves v{state.live}, its oldest version on disk; nothing to roll back to")
        state.chosen(target)
        card = HeadCard.load(repository.path / name / str(target))
        require_same_encoder(repository.fingerprint, card.encoder_fingerprint, f"head {name} v{target}")
        repository.set_live(name, target)
    return target


def import_head(repo: Path, version_dir: Path, name: str | None = None) -> HeadCard:
    """Publish a head version made elsewhere (another repository, a training machine) as
    the next version here; refused if it was made with another encoder."""
    from headmaster.model_repository.validation import check_version_dir
    here = Repository(repo)
    check_version_dir(version_dir, here.fingerprint, here.card.embed_dim)  # a corrupt folder: one line
    from dataclasses import replace

    from headmaster.export.heads import HeadWeights

    source = HeadCard.load(version_dir)
    weights = HeadWeights.from_onnx(Path(version_dir) / MODEL_FILE)
    details = {**source.details, "imported_from": str(Path(version_dir).resolve())}
    return publish_head(repo, weights, lambda v: replace(source, name=name or source.name, version=v, details=details))


def remove_head(repo: Path, name: str) -> None:
    """Take a head out of the repository (the caller reloads classify, then unloads it)."""
    check_head_name(name)
    repository = Repository(repo)
    with repository_lock(repo):
        repository.head(name)  # raises if there is no such head
        trash = Path(repo) / f".removed-{name}-{os.getpid()}"
        (Path(repo) / name).rename(trash)
        repository.render_heads()
        shutil.rmtree(trash)


def publish_head(repo: Path, weights, make_card, check_embeddings=None, keep: int = 5) -> HeadCard:
    """Publish the next version of a head: the only way head versions enter a repository.

    ``make_card(version)`` returns the HeadCard for the version number the repository
    assigns. The encoder fingerprint must be the served one; the ONNX file is checked
    against ``weights`` before the version is renamed into place; the new version becomes
    the live one; the oldest versions beyond ``keep`` are deleted.
    """
    from headmaster.export.heads import write_head

    repository = Repository(repo)
    published: list[HeadCard] = []

    def build(folder: Path, version: int) -> None:
        card = make_card(version)
        require_same_encoder(repository.fingerprint, card.encoder_fingerprint, f"head {card.name}")
        if card.embed_dim != repository.card.embed_dim:
            raise RepositoryError(f"head {card.name} reads {card.embed_dim}-d embeddings; "
                                  f"the encoder gives {repository.card.embed_dim}-d")
        write_head(folder, weights, card, check_embeddings)
        copy_backend("runtime", folder)
        published.append(card)

    with repository_lock(repo):
        name = make_card(1).name  # validates the name before anything is written
        from headmaster.model_repository.publish import prune_versions, publish_version

        version = publish_version(repo, name, build)
        repository.set_live(name, version)
        repository.render_heads()
        prune_versions(repo, name, keep, protect={version})
    return published[0]
