"""The one way anything is written into a model repository: atomically.

Triton may read the repository at any moment (poll mode, an explicit load, a restart), so
nothing appears there half-written: a version is built in a hidden folder beside its final
place, checked, then renamed into place; a file is written beside its target and replaced
in one ``os.replace``. A lock file serialises writers (two ``train-head`` runs must not both
take version N+1).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from headmaster.errors import RepositoryError
from headmaster.repository.layout import LOCK_FILE, STATE_DIR, versions

PUBLISHED_FILE = "published.json"  # in STATE_DIR: per model, the highest version a command wrote


@contextlib.contextmanager
def repository_lock(repo: Path) -> Iterator[None]:
    """Exclusive lock on the repository for the duration of a write."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    with open(repo / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_file(path: Path, content: str | bytes) -> None:
    """Replace ``path`` in one step: readers see the old file or the new one, never a mix."""
    path = Path(path)
    data = content.encode() if isinstance(content, str) else content
    if path.is_file() and path.read_bytes() == data:
        return  # untouched files keep their mtime, so Triton sees no change to reload
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def publish_version(repo: Path, model: str, build: Callable[[Path, int], None], version: int | None = None) -> int:
    """Create version ``version`` (default: the next one) of ``model`` in ``repo``.

    ``build(folder, version)`` writes and checks the version's files in a staging folder;
    if it raises, nothing is published. Returns the published version number. The caller
    must hold :func:`repository_lock`.
    """
    model_dir = Path(repo) / model
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    existing = versions(model_dir)
    version = version if version is not None else (existing[-1] + 1 if existing else 1)
    final = model_dir / str(version)
    if final.exists():
        raise RepositoryError(f"{final} already exists; versions are never overwritten")
    # Non-numeric folders inside a model are ignored by Triton, so staging can sit right
    # beside the final place and the rename below stays on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        build(staging, version)
        staging.chmod(0o755)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(model_dir, ignore_errors=True)  # a refused first version leaves no trace
        raise
    ledger = published_versions(repo)
    ledger[model] = max(ledger.get(model, 0), version)
    write_file(Path(repo) / STATE_DIR / PUBLISHED_FILE, json.dumps(ledger, indent=1, sort_keys=True) + "\n")
    return version


def published_versions(repo: Path) -> dict[str, int]:
    """Per model, the highest version written by :func:`publish_version` (a command's own:
    ``train-head``, a candidate, an import, a student). ``serve``'s watcher adopts only versions
    above it: those copied in by hand. A command's version goes live, stays a candidate, or was
    refused by Triton and put back, as the command decided; the watcher must not decide again."""
    try:
        ledger = json.loads((Path(repo) / STATE_DIR / PUBLISHED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in ledger.items()} if isinstance(ledger, dict) else {}


def replace_version(repo: Path, model: str, version: int, build: Callable[[Path, int], None]) -> None:
    """Rebuild an existing version in place (the encoder's, when the repository is rebuilt)."""
    model_dir = Path(repo) / model
    final = model_dir / str(version)
    if not final.exists():
        publish_version(repo, model, build, version)
        return
    old = model_dir / f".old-{version}-{os.getpid()}"
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        build(staging, version)
        staging.chmod(0o755)
        final.rename(old)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def prune_versions(repo: Path, model: str, keep: int, protect: set[int]) -> list[int]:
    """Delete all but the newest ``keep`` versions (never one in ``protect``)."""
    existing = versions(Path(repo) / model)
    doomed = [v for v in existing[:-keep] if v not in protect] if keep > 0 else []
    for v in doomed:
        shutil.rmtree(Path(repo) / model / str(v))
    return doomed
