"""The head lifecycle: publish, roll back, import, remove, adopt; on disk, then on the server.

Every operation that changes which head versions a repository serves goes through here:
the version is validated before it can become live (``validation.validate_version``), the
repository on disk is changed under its lock (``repository.py``), and then the server that
serves the repository is told, in the order :mod:`live` explains. The server is the one
given, or else the one recorded in the repository (``REPO/.headmaster/server.json``), so
``train-head``, ``zero-shot``, ``rollback`` and ``heads import/remove`` go live with no flag
while ``headmaster serve`` runs. A working copy of an S3 repository (:mod:`s3`) is pushed after
the disk change and before any server is told, so every replica loads from the bucket what the
command validated; several servers (``--server a,b,c``) are changed one after another.

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
from headmaster.model_repository import ab, ledger, live, s3
from headmaster.model_repository.layout import CONFIG_FILE, copy_backend, version_dir
from headmaster.model_repository.publish import prune_versions, publish_version, repository_lock
from headmaster.model_repository.repository import Repository
from headmaster.model_repository.topology import HEAD_DEPENDENT
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


def _go_live(repo: Path, name: str, previous: int | None, control: live.Control | live.Replicas | None) -> str | None:
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
        if previous is not None:
            s3.sync_up(repo)  # an S3 repository names the previous state again before any replica reloads
        aside = Path(repo) / f".refused-{name}-{int(time.time())}"
        try:
            if previous is not None:
                live.head_published(control, name)
            else:
                _take_out(repo, name, aside, control, keep_aside=True)
        except ServerError:
            pass  # the server keeps what it had loaded; the disk says what it should serve
        undo = (
            f"the repository serves v{previous} again"
            if previous is not None
            else f"the head was moved aside to {aside}"
        )
        raise ServerError(f"{e}; {undo}") from None
    return control.http_url


def publish(
    repo: Path,
    weights,
    make_card,
    check_embeddings=None,
    keep: int = 5,
    server: str | None = None,
    references=None,
    go_live: bool = True,
    ood_index: bytes | None = None,
) -> Change:
    """Publish the next version of a head (see ``repository.publish_head``) and make it live;
    ``references``: the out-of-distribution reference set its card's ``ood`` describes, and
    ``ood_index`` its serialized IVF index (large sets, ``ood.index_sha256`` on the card).
    ``go_live=False`` publishes a candidate: on disk, validated, never served until an A/B or
    shadow test (``heads canary``) or a rollback names it, so no request sees it untested."""
    name = make_card(1).name
    ab.refuse_during_test(repo, name, "publish a version of")
    control = live.find(repo, server)
    previous = _live_version(repo, name)
    if not go_live and previous is None:
        raise RepositoryError(
            f"head {name} has no live version to test a candidate against: its first version "
            "goes live (drop --candidate)",
            option="candidate",
        )
    card = _publish_on_disk(
        repo,
        weights,
        make_card,
        check_embeddings,
        keep,
        references,
        live_version=None if go_live else previous,
        ood_index=ood_index,
    )
    s3.sync_up(repo)
    if not go_live:  # the head's config still names the live version: nothing to load
        return Change(card.name, previous, control.http_url if control else None, card)
    return Change(card.name, card.version, _go_live(repo, card.name, previous, control), card)


def rollback(repo: Path, name: str, to: int | None = None, server: str | None = None) -> Change:
    """Serve an older version of a head (default: the one before the live one), validated first."""
    ab.refuse_during_test(repo, name, "roll back")
    control = live.find(repo, server)
    previous = _live_version(repo, name)
    version = _rollback_on_disk(repo, name, to)
    s3.sync_up(repo)
    return Change(name, version, _go_live(repo, name, previous, control))


def import_version(repo: Path, version_dir: Path, name: str | None = None, server: str | None = None) -> Change:
    """A head version made elsewhere becomes the next version here (same encoder only)."""
    target = name or HeadCard.load(version_dir).name
    ab.refuse_during_test(repo, target, "import a version of")
    control = live.find(repo, server)
    previous = _live_version(repo, target)
    card = _import_on_disk(repo, version_dir, name)
    s3.sync_up(repo)
    return Change(card.name, card.version, _go_live(repo, card.name, previous, control), card)


def remove(repo: Path, name: str, server: str | None = None) -> Change:
    """Take a head out: the ensembles stop naming it, then the server unloads it."""
    ab.refuse_during_test(repo, name, "remove")
    control = live.find(repo, server)
    check_head_name(name)
    Repository(repo).head(name)  # raises if there is no such head
    _take_out(repo, name, Path(repo) / f".removed-{name}-{os.getpid()}", control)
    return Change(name, None, control.http_url if control else None)


def _take_out(
    repo: Path, name: str, aside: Path, control: live.Control | live.Replicas | None, keep_aside: bool = False
) -> None:
    """Move head ``name`` out of the repository to ``aside`` (deleted after, unless ``keep_aside``)
    and off the server, in two phases. Triton loads an ensemble's changed dependencies with it:
    were threshold's new config (without the head) on disk or in the bucket already, loading
    classify_embedding would reload threshold first and drop the still-old classify (which feeds
    threshold the head's scores) until it loads too: requests fail meanwhile. So first the
    ensembles change (threshold's head inputs are optional: the old one fits them), load
    everywhere and the head unloads; then threshold changes and loads. A crash in between leaves
    a consistent repository: the next render finishes it."""
    with repository_lock(repo):
        repository = Repository(repo)
        (Path(repo) / name).rename(aside)  # one step for readers
        _write_ensembles(repository, {}, with_tests=True)
    s3.sync_up(repo, only={f"{model}/{CONFIG_FILE}" for model in HEAD_DEPENDENT if model != "threshold"})
    if control is not None:
        live.head_removed(control, name, reload_threshold=False)
    with repository_lock(repo):
        Repository(repo).render_heads()
    s3.sync_up(repo)  # the head's folder and threshold leave the bucket
    if control is not None:
        live.load(control, ["threshold"])
    if not keep_aside:
        shutil.rmtree(aside)


def adopt(repo: Path, name: str, version: int, server=None) -> Change:
    """A version folder put into the repository by hand (``cp -r``) becomes the live one,
    after the same validation as any other version: what the server's watcher calls."""
    control = live.Control.of(server) if server is not None else live.find(repo)
    ab.refuse_during_test(repo, name, "adopt a version of")
    with repository_lock(repo):
        state = Repository(repo)
        previous = _live_version(repo, name) if name in state.head_names() else None
        if previous is not None and previous >= version:
            return Change(name, previous, None)  # published meanwhile by a command, which loads it
        card = validate_version(state, name, version)
        state.set_live(name, version)
        state.render_heads()
    return Change(name, version, _go_live(repo, name, previous, control), card)


# -- A/B and shadow tests (ab.py) ------------------------------------------------------------------
# Both versions load into the head's model at once; the ensembles' steps name each by number, since
# Triton's "-1" (newest loaded) would route every request to the newer of the two. Every change of
# a test goes in phases so that each request, in flight or arriving, meets a consistent set:
#   start:  ensembles pinned to the live version -> head loads [live, candidate] -> threshold with
#           the test -> ensembles running both versions;
#   finish: ensembles pinned to the version that stays, running one -> head loads that version
#           alone -> threshold without the test -> ensembles back to "-1".
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
    control = live.find(repo, server)
    with repository_lock(repo):
        repository = Repository(repo)
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
    s3.sync_up(repo)
    try:
        if control is not None:
            live.load(control, [m for m in HEAD_DEPENDENT if m != "threshold"])
        with repository_lock(repo):
            ab.record(repo, test)
            Repository(repo).render_heads()
        s3.sync_up(repo)
        if control is not None:
            live.head_published(control, name)
    except ServerError as e:
        with repository_lock(repo):
            ab.clear(repo, name)
            Repository(repo).render_heads()
        s3.sync_up(repo)
        try:
            if control is not None:
                live.head_published(control, name)
        except ServerError:
            pass
        raise ServerError(f"{e}; the test was not started: head {name} serves v{state.live} alone") from None
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
    control = live.find(repo, server)
    with repository_lock(repo):
        test = ab.running(repo, name)
        if test is None:
            Repository(repo).head(name)  # no such head: that message first
            raise RepositoryError(
                f"head {name} runs no A/B or shadow test; start one with `headmaster heads canary {name} --version N`"
            )
        final = test.version if promote else test.live
        if promote:
            validate_version(Repository(repo), name, final)
        _write_ensembles(Repository(repo), {name: final}, with_tests=False)
    s3.sync_up(repo)
    if control is not None:
        live.load(control, [m for m in HEAD_DEPENDENT if m != "threshold"])
    with repository_lock(repo):
        ab.clear(repo, name)
        repository = Repository(repo)
        repository.set_live(name, final)
        repository.render_heads()
    s3.sync_up(repo)
    if control is not None:
        live.head_published(control, name)
    if record:
        ledger.append(
            repo,
            name,
            "promoted" if promote else "aborted",
            live_version=final,
            candidate_version=test.version,
            reason=f"{test.mode} test ended by hand",
        )
    return Change(name, final, control.http_url if control else None)


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
            raise RepositoryError(
                f"head {name} serves v{state.live}, its oldest version on disk; nothing to roll back to"
            )
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
    references, ood_index = None, None
    if source.ood is not None:  # check_version_dir has verified them against the card
        import numpy as np

        from headmaster.model_repository.backends.threshold import OOD_FILE, OOD_INDEX_FILE

        references = np.load(Path(version_dir) / OOD_FILE, allow_pickle=False)
        if source.ood.get("index_sha256"):  # the very index it was published with, not rebuilt
            ood_index = (Path(version_dir) / OOD_INDEX_FILE).read_bytes()
    return _publish_on_disk(
        repo,
        weights,
        lambda v: replace(source, name=name or source.name, version=v, details=details),
        references=references,
        ood_index=ood_index,
    )


def _publish_on_disk(
    repo: Path,
    weights,
    make_card,
    check_embeddings=None,
    keep: int = 5,
    references=None,
    live_version: int | None = None,
    ood_index: bytes | None = None,
) -> HeadCard:
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
            raise RepositoryError(
                f"head {card.name} reads {card.embed_dim}-d embeddings; the encoder gives {repository.card.embed_dim}-d"
            )
        write_head(folder, weights, card, check_embeddings, references, ood_index)
        copy_backend("runtime", folder)
        published.append(card)

    with repository_lock(repo):
        name = make_card(1).name  # validates the name before anything is written
        version = publish_version(repo, name, build)
        repository.set_live(name, live_version or version)  # live_version: a candidate stays off the air
        repository.render_heads()
        prune_versions(repo, name, keep, protect={version, live_version or version})
    return published[0]
