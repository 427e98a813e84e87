"""What ``headmaster serve`` does while Triton runs: heal dead stubs, adopt dropped-in versions.

- **A dead stub is healed.** A python-backend stub killed (OOM killer, ``kill -9``) leaves its
  model READY while every request fails with "Stub process is not healthy", and Triton does not
  restart it. The supervisor notices the missing process within a tick, unloads the model
  (readiness goes false at once, and with it the server's and the ensembles' that use it), loads
  it again (a fresh stub; Triton reloads the ensembles with it), and unlinks the dead stub's
  shared-memory region.
- **A version folder copied in by hand is adopted.** ``cp -r elsewhere/animal/7 REPO/animal/``
  (or a whole new head folder) is noticed by a scan of the repository every few seconds. A
  folder is only looked at once its files have stopped changing (a copy in progress is not a
  version), then it goes through the same validation and ordered loading as any other version
  (:func:`lifecycle.adopt`). A refused folder is reported once and left alone until it changes.
  A version a command wrote (``publish.published_versions``) is never adopted: a candidate stays a
  candidate, and a version Triton refused when the command loaded it stays put back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from headmaster.errors import HeadmasterError
from headmaster.lifecycle import operations as lifecycle
from headmaster.repository.layout import versions
from headmaster.repository.publish import published_versions
from headmaster.repository.repo import Repository
from headmaster.server import live

if TYPE_CHECKING:  # the server module imports this one
    from headmaster.server.triton import TritonServer

LOG = logging.getLogger(__name__)
SETTLE_S = 1.0  # a dropped-in folder whose files changed less than this long ago may still be copying


def _signature(folder: Path) -> tuple:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@dataclass
class Supervisor:
    server: TritonServer  # a started one
    repo: Path
    say: Callable[[str], None] = LOG.warning  # how events reach the operator
    scan_every_s: float = 2.0
    _seen: dict[Path, tuple] = field(default_factory=dict)  # candidate folder -> signature last scan
    _refused: dict[Path, tuple] = field(default_factory=dict)  # folder -> signature it was refused at
    _last_scan: float = 0.0
    # Per head, the newest version that was on disk when serving began or has been live since:
    # only a version above it is new. A version rolled back from stays below it, so it is never
    # taken for a drop-in and made live again.
    _known: dict[str, int] | None = None

    def tick(self) -> None:
        """One round: heal stubs every call; scan the repository every ``scan_every_s``."""
        self.heal_stubs()
        if time.monotonic() - self._last_scan >= self.scan_every_s:
            self._last_scan = time.monotonic()
            self.adopt_dropped_versions()

    # -- stubs ----------------------------------------------------------------------------
    def heal_stubs(self) -> list[str]:
        dead = self.server.watch_stubs()
        healed = []
        for model in sorted({stub.model for stub in dead}):
            self.say(f"the python stub of model {model} died; reloading {model}")
            try:
                live.reload(self.server, model)
                healed.append(model)
                self.say(f"model {model} reloaded")
            except HeadmasterError as e:
                self.say(f"model {model} could not be reloaded: {e}")
        if dead:
            self.server.forget_stub_regions(dead)
        return healed

    # -- dropped-in versions ----------------------------------------------------------------
    def _candidates(self) -> list[tuple[str, int]]:
        """(head, version) folders newer than what the repository serves, or of heads it does
        not serve yet."""
        repository = Repository(self.repo)
        published = published_versions(self.repo)
        if self._known is None:  # what is on disk when serving begins is not dropped in
            self._known = {
                name: max(versions(self.repo / name), default=0)
                for name in repository.head_names() + repository.candidate_heads()
            }
        found = []
        for name in repository.head_names():
            try:
                live_version = repository.head(name).live
            except HeadmasterError:
                continue  # a damaged head is `repo check`'s business, not the watcher's
            known = self._known[name] = max(self._known.get(name, 0), live_version, published.get(name, 0))
            found += [(name, v) for v in versions(self.repo / name) if v > known]
        for name in repository.candidate_heads():
            known = max(self._known.get(name, 0), published.get(name, 0))
            numbers = [v for v in versions(self.repo / name) if v > known]
            if numbers:
                found.append((name, numbers[-1]))
        return found

    def adopt_dropped_versions(self) -> list[str]:
        adopted: list[str] = []
        try:
            candidates = self._candidates()
        except HeadmasterError as e:
            LOG.info("repository scan skipped: %s", e)
            return adopted
        for name, version in candidates:
            folder = self.repo / name / str(version)
            signature = _signature(folder)
            settled = (
                self._seen.get(folder) == signature
                and signature
                and max(m for _, _, m in signature) / 1e9 < time.time() - SETTLE_S
            )
            self._seen[folder] = signature
            if not settled or self._refused.get(folder) == signature:
                continue
            try:
                change = lifecycle.adopt(self.repo, name, version, self.server)
            except HeadmasterError as e:
                self._refused[folder] = signature
                self.say(f"refused the version copied into {folder}: {e}")
                continue
            self._seen.pop(folder, None)
            adopted.append(f"{name} v{version}")
            self.say(f"adopted {folder}: head {name} now serves v{change.version}")
        return adopted
