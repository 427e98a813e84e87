"""Where everything of a Headmaster model repository lives: the one place that knows the layout.

    REPO/headmaster.json        manifest: flavour, build settings, the encoder card
    REPO/.headmaster/           the running server's record and log (server/record.py); the lock file
    REPO/preprocess/1/model.py  bytes -> pixels          (served/preprocess.py)
    REPO/preprocess/1/headmaster_cache.py    the cache class it imports (served/cache.py)
    REPO/image_encoder/1/       model.onnx|plan|pt (+ model.py, the portable runner, and
                                headmaster_cache.py beside it, as beside every runner)
    REPO/text_encoder/1/        same, for the text tower
    REPO/tokenize/1/model.py    text -> token ids        (served/tokenize.py)
    REPO/<head>/<N>/            model.onnx + head.json (+ model.py): one folder per version
    REPO/threshold/1/model.py   scores -> accepted labels (served/threshold.py)
    REPO/threshold/1/headmaster_rules.py   the rule kernel it imports (rules/threshold.py)
    REPO/classify/, REPO/classify_embedding/, REPO/embed/, REPO/embed_text/   ensembles
    REPO/<model>/config.pbtxt   every model's config, rendered by config.render

The manifest lists the models, and the server loads exactly those by name, so other folders in
the same directory (the checkout's ``model_repository/`` holds a README.md) are never taken
for models.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from headmaster import rules, served
from headmaster.export.heads import HEAD_FILE, MODEL_FILE, NAME_PATTERN
from headmaster.repository.config import ARTIFACT_FILES

MANIFEST = "headmaster.json"
MANIFEST_SCHEMA = 1
CONFIG_FILE = "config.pbtxt"
RUNNER_FILE = "model.py"  # a python-backend model's source in its version folder
STATE_DIR = ".headmaster"  # the server record and log; never a model (Triton loads by name)
LOCK_FILE = ".headmaster.lock"  # serialises writers (publish.repository_lock)
BACKENDS_DIR = Path(served.__file__).parent  # the python-backend model sources
KERNEL_FILE = "headmaster_rules.py"  # the rule kernel, beside the model.py that imports it
# Served model -> the rule kernel module it imports from its own version folder (see the import
# at the top of served/threshold.py for why a copy, and why this name).
KERNELS = {source: Path(rules.__file__).parent / "threshold.py" for source in ("threshold", "student")}
CACHE_FILE = "headmaster_cache.py"  # the content cache class (served/cache.py), beside its users' model.py
# Served models that import the cache class from their own version folder, as threshold does its
# kernel: preprocess (decoded pixels) and the runner (the image encoder's embeddings; the other
# runners, text encoder and heads, import the module too, even with their cache off).
CACHE_USERS = ("preprocess", "runtime")
__all__ = [
    "ARTIFACT_FILES",
    "CACHE_FILE",
    "CACHE_USERS",
    "CONFIG_FILE",
    "HEAD_FILE",
    "KERNEL_FILE",
    "LOCK_FILE",
    "MANIFEST",
    "MODEL_FILE",
    "RUNNER_FILE",
    "STATE_DIR",
    "config_path",
    "copy_backend",
    "encoder_artifact",
    "head_folders",
    "version_dir",
    "versions",
]


def config_path(repo: Path, model: str) -> Path:
    return Path(repo) / model / CONFIG_FILE


def version_dir(repo: Path, model: str, version: int) -> Path:
    return Path(repo) / model / str(version)


def encoder_artifact(repo: Path, tower: str, fmt: str) -> Path:
    """The exported tower file a repository serves (``tower``: image or text)."""
    return version_dir(repo, f"{tower}_encoder", 1) / ARTIFACT_FILES[fmt]


def versions(model_dir: Path) -> list[int]:
    """The numeric version folders of a model, ascending (what Triton counts as versions)."""
    if not Path(model_dir).is_dir():
        return []
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def head_folders(repo: Path) -> list[str]:
    """Folders holding at least one head version (``N/head.json``), with a valid head name:
    staging and trash folders start with '.', which pathlib's glob would match."""
    found = {p.parent.parent.name for p in Path(repo).glob(f"*/[0-9]*/{HEAD_FILE}")}
    return sorted(name for name in found if NAME_PATTERN.match(name))


def copy_backend(source: str, folder: Path) -> None:
    """Put a python-backend model source into a version folder as model.py, with the rule
    kernel and the cache class beside it when the model imports them."""
    shutil.copyfile(BACKENDS_DIR / f"{source}.py", Path(folder) / RUNNER_FILE)
    if source in KERNELS:
        shutil.copyfile(KERNELS[source], Path(folder) / KERNEL_FILE)
    if source in CACHE_USERS:
        shutil.copyfile(BACKENDS_DIR / "cache.py", Path(folder) / CACHE_FILE)
    # The stub imports model.py with Python in isolated mode (no PYTHON* variables), so it
    # would write __pycache__/ into the version folder after loading; Triton then sees a
    # newer mtime and reloads the model on the next load call (the encoder included, on the
    # first head published after a start). A plain file of that name makes the import system
    # skip writing bytecode, with any Python version.
    (Path(folder) / "__pycache__").touch()
