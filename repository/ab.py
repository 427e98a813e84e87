"""A/B and shadow tests of head versions: what a repository records while a head tests a candidate.

While ``REPO/<head>/ab.json`` exists, the head's config loads two versions (the live one and the
candidate, ``version_policy: specific``), the ensembles run both (each step pinned to its
version) and ``threshold`` picks, per item, which one answers: in a ``canary`` test the items
whose image sha256 falls in ``share`` (see ``rules/threshold.in_candidate_arm``), in a
``shadow`` test none. Starting and finishing a test (and the order of the reloads that keeps
every request answerable) is the job of :mod:`headmaster.lifecycle.operations`; this module only
reads and writes the record.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from headmaster.errors import RepositoryError
from headmaster.repository.publish import write_file
from headmaster.rules.threshold import in_candidate_arm

AB_FILE = "ab.json"  # beside the head's config.pbtxt; not a version folder, so Triton ignores it
MODES = ("canary", "shadow")
__all__ = ["AB_FILE", "MODES", "AbTest", "in_candidate_arm", "refuse_during_test", "running", "tests"]


@dataclass(frozen=True)
class AbTest:
    head: str
    live: int  # the version that answers (every item in a shadow test, the rest in a canary)
    version: int  # the candidate
    mode: str  # canary | shadow
    share: float  # the candidate's share of items in a canary test (0 in a shadow test)
    started: str = ""  # ISO time, UTC

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RepositoryError(f"an A/B test's mode is canary or shadow, not {self.mode!r}")
        if self.mode == "canary" and not 0.0 < self.share < 1.0:
            raise RepositoryError(
                f"--share must be above 0 and below 1, got {self.share}: the share of items "
                f"version {self.version} answers (promote it to give it every item)"
            )
        if self.version == self.live:
            raise RepositoryError(f"head {self.head} already serves v{self.live}: a test needs another version")

    @classmethod
    def new(cls, head: str, live: int, version: int, share: float, shadow: bool) -> AbTest:
        return cls(
            head,
            live,
            version,
            "shadow" if shadow else "canary",
            0.0 if shadow else float(share),
            dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )

    def params(self) -> dict:
        """What threshold and the ensembles are rendered with (topology.head_dependent_models)."""
        return {"version": self.version, "share": self.share, "mode": self.mode}


def path(repo: Path, head: str) -> Path:
    return Path(repo) / head / AB_FILE


def running(repo: Path, head: str) -> AbTest | None:
    file = path(repo, head)
    if not file.is_file():
        return None
    try:
        return AbTest(**json.loads(file.read_text()))
    except (ValueError, TypeError) as e:
        raise RepositoryError(f"{file} is not an A/B test record ({e}); remove it to end the test") from None


def tests(repo: Path, heads: list[str]) -> dict[str, AbTest]:
    return {head: test for head in heads if (test := running(repo, head)) is not None}


def record(repo: Path, test: AbTest) -> None:
    write_file(path(repo, test.head), json.dumps(asdict(test), indent=2) + "\n")


def clear(repo: Path, head: str) -> None:
    path(repo, head).unlink(missing_ok=True)


def refuse_during_test(repo: Path, head: str, action: str) -> None:
    """Publishing, rolling back, importing or removing a head under test would change what the
    test's pinned ensembles name: finish the test first."""
    test = running(repo, head)
    if test is not None:
        raise RepositoryError(
            f"cannot {action} head {head}: it runs a {test.mode} test of v{test.version} against "
            f"v{test.live}; finish it first with `headmaster heads promote {head}` or "
            f"`headmaster heads abort {head}`"
        )
