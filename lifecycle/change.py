"""One repository change: the lock for each disk write, the push of an S3 working copy, the ordered
loads on the server (or on every replica), and the undo when a server refuses a load.

Every operation that changes what a repository serves (``operations.py``: publish, rollback, import,
remove, adopt, A/B tests; ``training/distill.py``: a student) is written as phases of one
:class:`RepositoryChange`::

    with RepositoryChange.of(repo, server) as change:
        with change.phase() as repository:  # the lock for this phase's disk writes, then the push
            ...  # (an S3 working copy: the bucket says what the disk now says)
        change.undo_with("the repository serves v3 again", put_back)
        change.head_published(name)  # the ordered loads, everywhere

Phases stay phases: Triton loads an ensemble's changed dependencies from the disk (or bucket) with
it, so a change that must reach the server in steps (a head leaving, an A/B test starting or
ending) writes, pushes and loads once per step. When a load is refused (a :class:`ServerError`),
the undo steps registered so far run, newest first, and the error is raised again with what they
undid. An undo step's own loads may be refused too: the server keeps what it had loaded, and the
disk says what it should serve.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from headmaster.errors import ServerError
from headmaster.repository import s3
from headmaster.repository.publish import repository_lock
from headmaster.repository.repo import Repository
from headmaster.server import live

LOG = logging.getLogger(__name__)


class RepositoryChange:
    """One change of ``repo`` and of the server(s) ``control`` (None: nothing serves it)."""

    def __init__(self, repo: Path, control: live.Control | live.Replicas | None):
        self.repo = Path(repo)
        self.control = control
        self._undo: list[tuple[str, Callable[[], None]]] = []  # (what it restores, how), in order registered

    @classmethod
    def of(cls, repo: Path, server=None) -> RepositoryChange:
        """The change of ``repo`` and of the server a command must update: ``server`` (an address,
        several separated by commas, or anything :meth:`live.Control.of` takes), else the one
        recorded in the repository (:func:`live.find`)."""
        if server is None or isinstance(server, str):
            return cls(repo, live.find(repo, server))
        return cls(repo, server if isinstance(server, live.Replicas) else live.Control.of(server))

    @property
    def server(self) -> str | None:
        """The HTTP address(es) of the server(s) this change updates, if any."""
        return self.control.http_url if self.control is not None else None

    # -- the disk and the bucket -----------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[Repository]:
        """The repository under its lock, for one phase of disk writes."""
        with repository_lock(self.repo):
            yield Repository(self.repo)

    @contextlib.contextmanager
    def phase(self, only: set[str] | None = None) -> Iterator[Repository]:
        """One phase of the change on disk: its writes under the lock, then (if they all succeeded)
        the push, so the bucket says what the disk says before any replica is told to load it."""
        with self.writing() as repository:
            yield repository
        self.push(only)  # after the lock is let go: the push takes it again

    def push(self, only: set[str] | None = None) -> list[str]:
        """An S3 working copy goes up (nothing for an ordinary repository); ``only``: just those
        relative paths, for a phase that must reach the bucket before the rest."""
        return s3.sync_up(self.repo, only=only)

    # -- the server ------------------------------------------------------------------------------
    def load(self, models: list[str]) -> None:
        """Load ``models`` in this order on the server, or on every replica at once."""
        if self.control is not None:
            live.load(self.control, models)

    def head_published(self, name: str) -> None:
        """Head ``name`` has a new live version (or set of versions): it loads, then what names it."""
        if self.control is not None:
            live.head_published(self.control, name)

    def head_removed(self, name: str, reload_threshold: bool = True) -> None:
        """The ensembles let go of head ``name``, then it unloads (see :func:`live.head_removed`)."""
        if self.control is not None:
            live.head_removed(self.control, name, reload_threshold=reload_threshold)

    def unload(self, models: list[str]) -> None:
        if self.control is not None:
            for control in live.members(self.control):
                live.unload(control, models)

    # -- undo --------------------------------------------------------------------------------------
    def undo_with(self, what: str, step: Callable[[], None]) -> None:
        """If a later load is refused, run ``step`` (it puts the disk back, pushes and reloads, through
        this change); ``what`` says what it restores, in the error the command raises."""
        self._undo.append((what, step))

    def __enter__(self) -> RepositoryChange:
        return self

    def __exit__(self, kind, error, traceback) -> None:  # never swallows: a refusal is raised again
        if not isinstance(error, ServerError) or not self._undo:
            return
        steps, self._undo = self._undo, []  # an undo's own refusals are not undone again
        done = []
        for what, step in reversed(steps):
            try:
                step()
            except ServerError as refused:  # the server keeps what it had loaded; the disk says what it should serve
                LOG.warning("undo (%s): %s", what, refused)
            done.append(what)
        raise ServerError(f"{error}; {'; '.join(done)}") from None
