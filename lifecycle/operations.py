"""The head lifecycle: publish, roll back, import, remove, adopt; on disk, then on the server.

Every operation that changes which head versions a repository serves goes through here:
the version is validated before it can become live (``validation.validate_version``), the
repository on disk is changed under its lock (``repository/repo.py``), and then the server that
serves the repository is told, in the order :mod:`live` explains. The server is the one
given, or else the one recorded in the repository (``REPO/.headmaster/server.json``), so
``train-head``, ``zero-shot``, ``rollback`` and ``heads import/remove`` go live with no flag
while ``headmaster serve`` runs. A working copy of an S3 repository (:mod:`s3`) is pushed after
the disk change and before any server is told, so every replica loads from the bucket what the
command validated; several servers (``--server a,b,c``) are changed one after another.

Each operation is one :class:`change.RepositoryChange` (the lock for each disk write, the push,
the ordered loads, the undo), in as many phases as the server needs to stay consistent. When the
server refuses to load what the disk now says, the disk goes back to what the server still serves
(the previous live version, or no head at all for a new one), so the repository never describes
something that is not served. A head version to publish is a :class:`HeadDraft`: its weights and
card, numbered by the repository.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from headmaster.errors import HeadmasterError, RepositoryError
from headmaster.export.card import require_same_encoder
from headmaster.export.heads import MODEL_FILE, HeadCard, HeadWeights, check_head_name, write_head
from headmaster.lifecycle import ledger
from headmaster.lifecycle.change import RepositoryChange
from headmaster.repository import ab
from headmaster.repository.layout import CONFIG_FILE, copy_backend, version_dir
from headmaster.repository.publish import prune_versions, publish_version
from headmaster.repository.repo import Repository
from headmaster.repository.topology import HEAD_DEPENDENT
from headmaster.repository.validation import check_rollback, check_version_dir, validate_version
from headmaster.server import live

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """What a lifecycle operation did."""

    head: str
    version: int | None  # the live version now (None: the head was removed)
    server: str | None  # the HTTP address of the server that was updated, if one was
    card: HeadCard | None = None


@dataclass(frozen=True)
class HeadDraft:
    """A head version before the repository numbers it: what :func:`publish` writes."""

    weights: HeadWeights
    card: HeadCard  # its ``version`` is provisional: the repository assigns the number (:meth:`numbered`)
    check_embeddings: np.ndarray | None = None  # the ONNX file is checked against ``weights`` on these
    references: np.ndarray | None = None  # the out-of-distribution reference set ``card.ood`` describes
    ood_index: bytes | None = None  # its serialized IVF index (large sets: ``ood.index_sha256``)

    @property
    def name(self) -> str:
        return self.card.name

    def numbered(self, version: int) -> HeadCard:
        return replace(self.card, version=version)


def _live_version(repo: Path, name: str) -> int | None:
    try:
        return Repository(repo).head(name).live
    except HeadmasterError:
        return None


def _go_live(change: RepositoryChange, name: str, previous: int | None) -> None:
    """Load ``name`` (and what depends on it) everywhere; if refused, the disk goes back to what the
    server still serves: the previous live version, or no head at all for a new one."""

    def put_back(version: int) -> None:
        with change.phase() as repository:  # in the bucket too, before any replica reloads
            repository.set_live(name, version)
            repository.render_heads()
        change.head_published(name)

    if previous is not None:
        change.undo_with(f"the repository serves v{previous} again", lambda: put_back(previous))
    else:
        aside = change.repo / f".refused-{name}-{int(time.time())}"
        change.undo_with(f"the head was moved aside to {aside}", lambda: _take_out(change, name, aside, True))
    change.head_published(name)


def publish(repo: Path, draft: HeadDraft, keep: int = 5, server: str | None = None, go_live: bool = True) -> Change:
    """Publish the next version of a head (``draft`` numbered by the repository; see
    :func:`_publish_on_disk`) and make it live. ``go_live=False`` publishes a candidate: on disk,
    validated, never served until an A/B or shadow test (``heads canary``) or a rollback names it,
    so no request sees it untested."""
    name = draft.name
    ab.refuse_during_test(repo, name, "publish a version of")
    change = RepositoryChange.of(repo, server)
    previous = _live_version(repo, name)
    if not go_live and previous is None:
        raise RepositoryError(
            f"head {name} has no live version to test a candidate against: its first version "
            "goes live (drop --candidate)",
            option="candidate",
        )
    with change:
        card = _publish_on_disk(change, draft, keep, live_version=None if go_live else previous)
        if not go_live:  # the head's config still names the live version: nothing to load
            return Change(card.name, previous, change.server, card)
        _go_live(change, name, previous)
    return Change(card.name, card.version, change.server, card)


def rollback(repo: Path, name: str, to: int | None = None, server: str | None = None) -> Change:
    """Serve an older version of a head (default: the one before the live one), validated first."""
    ab.refuse_during_test(repo, name, "roll back")
    change = RepositoryChange.of(repo, server)
    previous = _live_version(repo, name)
    with change:
        version = _rollback_on_disk(change, name, to)
        _go_live(change, name, previous)
    return Change(name, version, change.server)


def import_version(repo: Path, version_dir: Path, name: str | None = None, server: str | None = None) -> Change:
    """A head version made elsewhere becomes the next version here (same encoder only)."""
    target = name or HeadCard.load(version_dir).name
    ab.refuse_during_test(repo, target, "import a version of")
    change = RepositoryChange.of(repo, server)
    previous = _live_version(repo, target)
    with change:
        card = _publish_on_disk(change, _imported(repo, version_dir, name))
        _go_live(change, card.name, previous)
    return Change(card.name, card.version, change.server, card)


def remove(repo: Path, name: str, server: str | None = None) -> Change:
    """Take a head out: the ensembles stop naming it, then the server unloads it."""
    ab.refuse_during_test(repo, name, "remove")
    change = RepositoryChange.of(repo, server)
    check_head_name(name)
    Repository(repo).head(name)  # raises if there is no such head
    with change:
        _take_out(change, name, Path(repo) / f".removed-{name}-{os.getpid()}")
    return Change(name, None, change.server)


def _take_out(change: RepositoryChange, name: str, aside: Path, keep_aside: bool = False) -> None:
    """Move head ``name`` out of the repository to ``aside`` (deleted after, unless ``keep_aside``)
    and off the server, in two phases. Triton loads an ensemble's changed dependencies with it:
    were threshold's new config (without the head) on disk or in the bucket already, loading
    classify_embedding would reload threshold first and drop the still-old classify (which feeds
    threshold the head's scores) until it loads too: requests fail meanwhile. So first the
    ensembles change (threshold's head inputs are optional: the old one fits them), load
    everywhere and the head unloads; then threshold changes and loads. A crash in between leaves
    a consistent repository: the next render finishes it."""
    first = {f"{model}/{CONFIG_FILE}" for model in HEAD_DEPENDENT if model != "threshold"}  # threshold waits
    with change.phase(only=first) as repository:
        (change.repo / name).rename(aside)  # one step for readers
        _write_ensembles(repository, {}, with_tests=True)
    change.head_removed(name, reload_threshold=False)
    with change.phase() as repository:  # the head's folder and threshold leave the bucket
        repository.render_heads()
    change.load(["threshold"])
    if not keep_aside:
        shutil.rmtree(aside)


def adopt(repo: Path, name: str, version: int, server=None) -> Change:
    """A version folder put into the repository by hand (``cp -r``) becomes the live one,
    after the same validation as any other version: what the server's watcher calls."""
    change = RepositoryChange(repo, live.Control.of(server) if server is not None else live.find(repo))
    ab.refuse_during_test(repo, name, "adopt a version of")
    with change:
        with change.writing() as state:
            previous = _live_version(repo, name) if name in state.head_names() else None
            if previous is not None and previous >= version:
                return Change(name, previous, None)  # published meanwhile by a command, which loads it
            card = validate_version(state, name, version)
            state.set_live(name, version)
            state.render_heads()
        _go_live(change, name, previous)
    return Change(name, version, change.server, card)


# -- A/B and shadow tests (ab.py) ------------------------------------------------------------------
# Both versions load into the head's model at once; the ensembles' steps name each by number, since
# Triton's "-1" (newest loaded) would route every request to the newer of the two. Every change of
# a test goes in phases so that each request, in flight or arriving, meets a consistent set:
#   start:  ensembles pinned to the live version -> head loads [live, candidate] -> threshold with
#           the test -> ensembles running both versions;
#   finish: ensembles pinned to the version that stays, running one -> head loads that version
#           alone -> threshold without the test -> ensembles back to "-1".
ENSEMBLES = [m for m in HEAD_DEPENDENT if m != "threshold"]


def _write_ensembles(repository: Repository, pinned: dict[str, int], with_tests: bool) -> None:
    for model in repository.head_models(repository.head_names(), pinned, with_tests)[1:]:  # [0] is threshold
        repository.write_config(model)


def start_test(
    repo: Path,
    name: str,
    version: int,
    share: float = 0.1,
    shadow: bool = False,
    server: str | None = None,
    record: bool = True,
) -> ab.AbTest:
    """Serve ``version`` of head ``name`` beside its live version: to ``share`` of the items (stable
    by image sha256), or to none (``shadow``), its answers recorded either way (and the start in
    the head's ledger, unless ``record`` is False)."""
    change = RepositoryChange.of(repo, server)
    with change:
        with change.phase() as repository:
            state = repository.head(name)
            ab.refuse_during_test(repo, name, "start another test on")
            state.chosen(version)
            card = validate_version(repository, name, version)
            if tuple(card.labels) != tuple(state.card.labels):
                raise RepositoryError(
                    f"head {name} v{version} has labels {list(card.labels)}, v{state.live} has "
                    f"{list(state.card.labels)}: an A/B test compares versions with the same labels"
                )
            test = ab.AbTest.new(name, state.live, version, share, shadow)
            _write_ensembles(repository, {name: state.live}, with_tests=False)

        def put_back() -> None:
            with change.phase() as repository:
                ab.clear(repo, name)
                # Named again before the render: without the test's record, the head's config (listing
                # both versions) would read as the candidate being live.
                repository.set_live(name, state.live)
                repository.render_heads()
            change.head_published(name)

        change.undo_with(f"the test was not started: head {name} serves v{state.live} alone", put_back)
        change.load(ENSEMBLES)
        with change.phase() as repository:
            ab.record(repo, test)
            repository.render_heads()
        change.head_published(name)
    if record:
        ledger.append(
            repo,
            name,
            test.mode,
            live_version=test.live,
            candidate_version=test.version,
            reason=f"v{test.version} beside v{test.live}" + ("" if shadow else f" for {test.share:.1%} of items"),
        )
    return test


def finish_test(repo: Path, name: str, promote: bool, server: str | None = None, record: bool = True) -> Change:
    """End the test of head ``name``: its candidate becomes the live version (``promote``), or
    goes back to disk only (abort); the head then loads one version again. Recorded in the
    head's ledger unless ``record`` is False (the caller records it with its reasons)."""
    change = RepositoryChange.of(repo, server)
    with change:
        with change.phase() as repository:
            test = ab.running(repo, name)
            if test is None:
                repository.head(name)  # no such head: that message first
                raise RepositoryError(
                    f"head {name} runs no A/B or shadow test; start one with "
                    f"`headmaster heads canary {name} --version N`"
                )
            final = test.version if promote else test.live
            if promote:
                validate_version(repository, name, final)
            _write_ensembles(repository, {name: final}, with_tests=False)
        change.load(ENSEMBLES)
        with change.phase() as repository:
            ab.clear(repo, name)
            repository.set_live(name, final)
            repository.render_heads()
        change.head_published(name)
    if record:
        ledger.append(
            repo,
            name,
            "promoted" if promote else "aborted",
            live_version=final,
            candidate_version=test.version,
            reason=f"{test.mode} test ended by hand",
        )
    return Change(name, final, change.server)


# -- the disk side of each operation ------------------------------------------------------------
def _rollback_on_disk(change: RepositoryChange, name: str, to: int | None = None) -> int:
    """Serve an older version of a head again (default: the one before the live one)."""
    check_rollback(change.repo, name, to)  # the target must validate before it goes live
    with change.phase() as repository:
        state = repository.head(name)
        older = [v for v in state.versions if v < state.live]
        target = to if to is not None else (older[-1] if older else None)
        if target is None:
            raise RepositoryError(
                f"head {name} serves v{state.live}, its oldest version on disk; nothing to roll back to"
            )
        state.chosen(target)
        card = HeadCard.load(version_dir(repository.path, name, target))
        require_same_encoder(repository.fingerprint, card.encoder_fingerprint, f"head {name} v{target}")
        repository.set_live(name, target)
    return target


def _imported(repo: Path, version_dir: Path, name: str | None = None) -> HeadDraft:
    """A head version made elsewhere (another repository, a training machine) as the draft of the
    next version here; refused if it was made with another encoder."""
    here = Repository(repo)
    check_version_dir(version_dir, here.fingerprint, here.card.embed_dim)  # a corrupt folder: one line
    source = HeadCard.load(version_dir)
    weights = HeadWeights.from_onnx(Path(version_dir) / MODEL_FILE)
    details = {**source.details, "imported_from": str(Path(version_dir).resolve())}
    references, ood_index = None, None
    if source.ood is not None:  # check_version_dir has verified them against the card
        from headmaster.rules.threshold import OOD_FILE, OOD_INDEX_FILE

        references = np.load(Path(version_dir) / OOD_FILE, allow_pickle=False)
        if source.ood.get("index_sha256"):  # the very index it was published with, not rebuilt
            ood_index = (Path(version_dir) / OOD_INDEX_FILE).read_bytes()
    card = replace(source, name=name or source.name, details=details)
    return HeadDraft(weights, card, references=references, ood_index=ood_index)


def _publish_on_disk(
    change: RepositoryChange, draft: HeadDraft, keep: int = 5, live_version: int | None = None
) -> HeadCard:
    """Publish the next version of a head: the only way head versions enter a repository.

    The repository numbers ``draft``; the encoder fingerprint must be the served one; the ONNX
    file is checked against the draft's weights before the version is renamed into place; the new
    version becomes the live one (``live_version``: a candidate stays off the air, that version
    stays live); the oldest versions beyond ``keep`` are deleted.
    """
    published: list[HeadCard] = []
    with change.phase() as repository:

        def build(folder: Path, version: int) -> None:
            card = draft.numbered(version)
            require_same_encoder(repository.fingerprint, card.encoder_fingerprint, f"head {card.name}")
            if card.embed_dim != repository.card.embed_dim:
                raise RepositoryError(
                    f"head {card.name} reads {card.embed_dim}-d embeddings; "
                    f"the encoder gives {repository.card.embed_dim}-d"
                )
            write_head(folder, draft.weights, card, draft.check_embeddings, draft.references, draft.ood_index)
            copy_backend("runtime", folder)
            published.append(card)

        version = publish_version(change.repo, draft.name, build)
        repository.set_live(draft.name, live_version or version)
        repository.render_heads()
        prune_versions(change.repo, draft.name, keep, protect={version, live_version or version})
    return published[0]
