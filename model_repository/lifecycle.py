"""The head lifecycle: publish, roll back, import, remove, adopt; on disk, then on the server.

Every operation that changes which head versions a repository serves goes through here:
the version is validated before it can become live (``validation.validate_version``), the
repository on disk is changed under its lock (``repository.py``), and then the server that
serves the repository is told, in the order :mod:`live` explains. The server is the one
given, or else the one recorded in the repository (``REPO/.headmaster/server.json``), so
``train-head``, ``zero-shot``, ``rollback`` and ``heads import/remove`` go live with no flag
while ``headmaster serve`` runs.

When the server refuses to load what the disk now says, the disk goes back to what the
server still serves (the previous live version, or no head at all for a new one), so the
repository never describes something that is not served.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from headmaster.errors import HeadmasterError, RepositoryError, ServerError
from headmaster.export.card import require_same_encoder
from headmaster.export.heads import MODEL_FILE, HeadCard, HeadWeights, check_head_name, write_head
from headmaster.model_repository import live
from headmaster.model_repository.layout import copy_backend, version_dir
from headmaster.model_repository.publish import prune_versions, publish_version, repository_lock
from headmaster.model_repository.repository import Repository
from headmaster.model_repository.validation import check_rollback, check_version_dir, validate_version

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """What a lifecycle operation did."""

    head: str
    version: int | None  # the live version now (None: the head was removed)
    server: str | None  # the HTTP address of the server that was updated, if one was
    card: HeadCard | None = None


def _live_version(repo: Path, name: str) -> int | None:
    try:
        return Repository(repo).head(name).live
    except HeadmasterError:
        return None


def _go_live(repo: Path, name: str, previous: int | None, control: live.Control | None) -> str | None:
    """Load ``name`` (and what depends on it) on the server; on failure put the disk back."""
    if control is None:
        return None
    try:
        live.head_published(control, name)
    except ServerError as e:
        with repository_lock(repo):
            repo_state = Repository(repo)
            if previous is not None:
                repo_state.set_live(name, previous)
                repo_state.render_heads()
                undo = f"the repository serves v{previous} again"
            else:
                aside = Path(repo) / f".refused-{name}-{int(time.time())}"
                (Path(repo) / name).rename(aside)
                repo_state.render_heads()
                undo = f"the head was moved aside to {aside}"
        try:
            live.head_published(control, name) if previous is not None else live.head_removed(control, name)
        except ServerError:
            pass  # the server keeps what it had loaded; the disk already says so
        raise ServerError(f"{e}; {undo}") from None
    return control.http_url


def publish(repo: Path, weights, make_card, check_embeddings=None, keep: int = 5,
            server: str | None = None, references=None) -> Change:
    """Publish the next version of a head (see ``repository.publish_head``) and make it live;
    ``references``: the out-of-distribution reference set its card's ``ood`` describes."""
    control = live.find(repo, server)
    previous = _live_version(repo, make_card(1).name)
    card = _publish_on_disk(repo, weights, make_card, check_embeddings, keep, references)
    return Change(card.name, card.version, _go_live(repo, card.name, previous, control), card)


def rollback(repo: Path, name: str, to: int | None = None, server: str | None = None) -> Change:
    """Serve an older version of a head (default: the one before the live one), validated first."""
    control = live.find(repo, server)
    previous = _live_version(repo, name)
    version = _rollback_on_disk(repo, name, to)
    return Change(name, version, _go_live(repo, name, previous, control))


def import_version(repo: Path, version_dir: Path, name: str | None = None, server: str | None = None) -> Change:
    """A head version made elsewhere becomes the next version here (same encoder only)."""
    target = name or HeadCard.load(version_dir).name
    control = live.find(repo, server)
    previous = _live_version(repo, target)
    card = _import_on_disk(repo, version_dir, name)
    return Change(card.name, card.version, _go_live(repo, card.name, previous, control), card)


def remove(repo: Path, name: str, server: str | None = None) -> Change:
    """Take a head out: the ensembles stop naming it, then the server unloads it."""
    control = live.find(repo, server)
    _remove_on_disk(repo, name)
    if control is not None:
        live.head_removed(control, name)
    return Change(name, None, control.http_url if control else None)


def adopt(repo: Path, name: str, version: int, server=None) -> Change:
    """A version folder put into the repository by hand (``cp -r``) becomes the live one,
    after the same validation as any other version: what the server's watcher calls."""
    control = live.Control.of(server) if server is not None else live.find(repo)
    with repository_lock(repo):
        state = Repository(repo)
        previous = _live_version(repo, name) if name in state.head_names() else None
        if previous is not None and previous >= version:
            return Change(name, previous, None)  # published meanwhile by a command, which loads it
        card = validate_version(state, name, version)
        state.set_live(name, version)
        state.render_heads()
    return Change(name, version, _go_live(repo, name, previous, control), card)


# -- the disk side of each operation ------------------------------------------------------------
def _rollback_on_disk(repo: Path, name: str, to: int | None = None) -> int:
    """Serve an older version of a head again (default: the one before the live one)."""
    check_rollback(repo, name, to)  # the target must validate before it goes live
    repository = Repository(repo)
    with repository_lock(repo):
        state = repository.head(name)
        older = [v for v in state.versions if v < state.live]
        target = to if to is not None else (older[-1] if older else None)
        if target is None:
            raise RepositoryError(f"head {name} serves v{state.live}, its oldest version on disk; nothing to roll back to")
        state.chosen(target)
        card = HeadCard.load(version_dir(repository.path, name, target))
        require_same_encoder(repository.fingerprint, card.encoder_fingerprint, f"head {name} v{target}")
        repository.set_live(name, target)
    return target


def _import_on_disk(repo: Path, version_dir: Path, name: str | None = None) -> HeadCard:
    """Publish a head version made elsewhere (another repository, a training machine) as
    the next version here; refused if it was made with another encoder."""
    here = Repository(repo)
    check_version_dir(version_dir, here.fingerprint, here.card.embed_dim)  # a corrupt folder: one line
    source = HeadCard.load(version_dir)
    weights = HeadWeights.from_onnx(Path(version_dir) / MODEL_FILE)
    details = {**source.details, "imported_from": str(Path(version_dir).resolve())}
    references = None
    if source.ood is not None:  # check_version_dir has verified it against the card
        import numpy as np

        from headmaster.model_repository.backends.threshold import OOD_FILE
        references = np.load(Path(version_dir) / OOD_FILE, allow_pickle=False)
    return _publish_on_disk(repo, weights, lambda v: replace(source, name=name or source.name, version=v, details=details),
                            references=references)


def _remove_on_disk(repo: Path, name: str) -> None:
    """Take a head out of the repository (the caller reloads classify, then unloads it)."""
    check_head_name(name)
    repository = Repository(repo)
    with repository_lock(repo):
        repository.head(name)  # raises if there is no such head
        trash = Path(repo) / f".removed-{name}-{os.getpid()}"  # renamed away first: one step for readers
        (Path(repo) / name).rename(trash)
        repository.render_heads()
        shutil.rmtree(trash)


def _publish_on_disk(repo: Path, weights, make_card, check_embeddings=None, keep: int = 5,
                     references=None) -> HeadCard:
    """Publish the next version of a head: the only way head versions enter a repository.

    ``make_card(version)`` returns the HeadCard for the version number the repository
    assigns. The encoder fingerprint must be the served one; the ONNX file is checked
    against ``weights`` before the version is renamed into place; the new version becomes
    the live one; the oldest versions beyond ``keep`` are deleted.
    """
    repository = Repository(repo)
    published: list[HeadCard] = []

    def build(folder: Path, version: int) -> None:
        card = make_card(version)
        require_same_encoder(repository.fingerprint, card.encoder_fingerprint, f"head {card.name}")
        if card.embed_dim != repository.card.embed_dim:
            raise RepositoryError(f"head {card.name} reads {card.embed_dim}-d embeddings; "
                                  f"the encoder gives {repository.card.embed_dim}-d")
        write_head(folder, weights, card, check_embeddings, references)
        copy_backend("runtime", folder)
        published.append(card)

    with repository_lock(repo):
        name = make_card(1).name  # validates the name before anything is written
        version = publish_version(repo, name, build)
        repository.set_live(name, version)
        repository.render_heads()
        prune_versions(repo, name, keep, protect={version})
    return published[0]
