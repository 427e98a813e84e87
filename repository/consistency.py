"""Does the repository on disk describe what is served? Find every way it does not, and repair.

:func:`problems` lists every inconsistency, one line each, and never raises: a manifest that
cannot be read, configs that are missing, unreadable, name another model or are not what
the manifest renders, heads whose configured (live) version is missing or fails
:func:`validation.validate_version`, head versions that fail it, ensembles and ``threshold``
that run heads that are not on disk (or have no valid version) or leave out heads that are,
leftovers of interrupted writes (``.staging-*``, ``.removed-*``, ``.old-*``), missing encoder
and backend files.

:func:`repair` fixes what can be fixed from what is on disk, under the repository lock: each
head serves its configured version if that validates, else its newest version that does;
versions that fail validation are moved aside (``<head>/.invalid-<N>-<time>``, which Triton
ignores: not a version number), and a head left with no valid version is moved aside whole
(``.invalid-<head>-<time>``) and so leaves the ensembles; every config is re-rendered from
the manifest and the heads on disk. What repair cannot fix (missing encoder files, an
unreadable manifest) needs ``headmaster repo build`` again; its problem line says so.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from headmaster.errors import (
    ForeignHeadsRepositoryError,
    ForeignVersionError,
    HeadmasterError,
    InconsistentRepositoryError,
)
from headmaster.export.heads import HEAD_FILE, MODEL_FILE, NAME_PATTERN, RESERVED_NAMES
from headmaster.repository.layout import CONFIG_FILE, versions
from headmaster.repository.publish import repository_lock
from headmaster.repository.validation import RUNNER_FILE, validate_version

CONFIG = CONFIG_FILE
LEFTOVER_DIRS = (".staging-", ".removed-", ".old-")  # publish.py / remove_head, interrupted
LEFTOVER_FILES = (".config.pbtxt.", ".headmaster.json.")  # publish.write_file's temporary files
QUARANTINE = ".invalid-"  # where repair puts what must not be served (never a version number)
NON_HEAD_STEPS = {"preprocess", "image_encoder", "tokenize", "text_encoder", "threshold"}


class Problem(str):
    """One problem line; ``model``: the model it is about (if one); ``foreign``: a head made
    with another encoder."""

    model: str | None = None
    foreign: bool = False


def _problem(text: str, model: str | None = None, foreign: bool = False) -> Problem:
    p = Problem(" ".join(str(text).split()))
    p.model, p.foreign = model, foreign
    return p


def error_for(repo: Path, found: list[str]) -> InconsistentRepositoryError:
    """The exception Repository.validate raises for a non-empty ``problems()`` list."""
    foreign = any(getattr(p, "foreign", False) for p in found)
    error = ForeignHeadsRepositoryError if foreign else InconsistentRepositoryError
    lines = "\n".join(f"  - {p}" for p in found)
    return error(f"{repo} has {len(found)} problem(s):\n{lines}\nfix them with `headmaster repo repair --repo {repo}`")


def check(repo: Path) -> None:
    """Raise, listing every problem, unless the repository describes exactly what can be served."""
    if found := problems(repo):
        raise error_for(Path(repo), found)


def _rebuild(repo: Path) -> str:
    return f"rebuild with `headmaster repo build --encoder DIR --repo {repo}`"


# -- reading configs ------------------------------------------------------------------------
def _read_config(folder: Path, name: str):
    """(config, None) or (None, problem text) for ``folder/config.pbtxt``."""
    from headmaster.repository.config import parse

    path = folder / CONFIG
    if not path.is_file():
        return None, f"{name}/{CONFIG} is missing"
    try:
        config = parse(path.read_text())
    except HeadmasterError as e:
        return None, f"{name}/{CONFIG}: {e}"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{name}/{CONFIG} cannot be read: {e}"
    if config.name != name:
        return None, f"{name}/{CONFIG} names the model {config.name!r}, not {name!r}"
    return config, None


def _rendered(repository, model):
    from headmaster.repository.config import parse, render

    return parse(render(model, repository.flavour))


def _config_matches(repository, model) -> bool:
    config, error = _read_config(repository.path / model.name, model.name)
    return error is None and config == _rendered(repository, model)


def _configured_version(config, test=None) -> int | None:
    from headmaster.repository.repo import live_of

    return live_of(config, test)


def _configured_heads(model_name: str, config) -> list[str]:
    if model_name == "threshold":
        try:
            return list(json.loads(config.parameters["heads"].string_value))
        except (KeyError, ValueError, TypeError):
            return []
    # A head under an A/B test has two steps (its live version and the candidate): named once.
    return list(
        dict.fromkeys(s.model_name for s in config.ensemble_scheduling.step if s.model_name not in NON_HEAD_STEPS)
    )


def _test_of(repo: Path, name: str):
    from headmaster.repository import ab

    try:
        return ab.running(repo, name)
    except Exception:  # an unreadable record: the config's newest version, as without a test
        return None


# -- heads ------------------------------------------------------------------------------------
@dataclass
class HeadSurvey:
    name: str
    versions: list[int]
    has_config: bool = False  # False: a folder copied in by hand, not adopted (not served) yet
    configured: int | None = None  # the version config.pbtxt serves
    config_error: str | None = None
    valid: list[int] = field(default_factory=list)
    invalid: dict[int, Problem] = field(default_factory=dict)

    @property
    def live(self) -> int | None:
        """The version repair serves: the configured one if valid, else the newest valid one."""
        if self.configured in self.valid:
            return self.configured
        return self.valid[-1] if self.valid else None


def _looks_like_head(folder: Path) -> bool:
    if any((folder / str(v) / HEAD_FILE).is_file() for v in versions(folder)):
        return True
    config, error = _read_config(folder, folder.name)
    return error is None and {"SCORES", "INFO"} <= {o.name for o in config.output}


def head_folders(repo: Path) -> list[str]:
    """Folders that are heads: a version with head.json, or a head's config.pbtxt. Other
    folders (this package's source, when the repository is the checkout's) are not."""
    return sorted(
        d.name
        for d in Path(repo).iterdir()
        if d.is_dir() and NAME_PATTERN.match(d.name) and d.name not in RESERVED_NAMES and _looks_like_head(d)
    )


def survey_head(repository, name: str) -> HeadSurvey:
    folder = repository.path / name
    survey = HeadSurvey(name, versions(folder), has_config=(folder / CONFIG).is_file())
    config, survey.config_error = _read_config(folder, name)
    if config is not None:
        survey.configured = _configured_version(config, _test_of(repository.path, name))
    for v in survey.versions:
        try:
            validate_version(repository, name, v, shown=f"{name}/{v}")
            survey.valid.append(v)
        except ForeignVersionError as e:
            survey.invalid[v] = _problem(str(e), name, foreign=True)
        except HeadmasterError as e:
            survey.invalid[v] = _problem(str(e), name)
        except Exception as e:  # never let one odd version stop the survey
            survey.invalid[v] = _problem(f"head version {name}/{v}: {type(e).__name__}: {e}", name)
    return survey


def _head_problems(repository, survey: HeadSurvey) -> list[Problem]:
    found: list[Problem] = []
    name, live = survey.name, survey.configured
    if not survey.has_config:
        found.append(
            _problem(
                f"head {name}: {name}/{CONFIG} is missing, so it is not served (a head folder "
                "copied in by hand and not adopted yet?)",
                name,
            )
        )
    elif survey.config_error:
        found.append(_problem(f"head {name}: {survey.config_error}", name))
    elif live is None:
        found.append(_problem(f"head {name}: {name}/{CONFIG} does not name the version it serves", name))
    elif live not in survey.versions:
        found.append(
            _problem(
                f"head {name}: {name}/{CONFIG} serves v{live}, which is not on disk "
                f"(versions: {survey.versions or 'none'})",
                name,
            )
        )
    for v, problem in survey.invalid.items():
        if v == live:
            found.append(_problem(f"{problem} (the version {name}/{CONFIG} serves)", name, problem.foreign))
        else:
            found.append(problem)
    if not survey.valid:
        found.append(_problem(f"head {name}: no valid version on disk (versions: {survey.versions or 'none'})", name))
    elif survey.has_config and live in survey.valid and not survey.config_error:
        try:
            if not _config_matches(repository, repository.head_model(name, live)):
                found.append(_problem(f"head {name}: {name}/{CONFIG} is not what the repository renders for v{live}"))
        except Exception as e:
            found.append(_problem(f"head {name}: its config cannot be rendered: {e}", name))
    return found


# -- the rest -------------------------------------------------------------------------------
def _leftovers(repo: Path) -> list[Path]:
    found = []
    for entry in sorted(repo.iterdir()):
        if entry.name.startswith(LEFTOVER_DIRS + LEFTOVER_FILES):
            found.append(entry)
        elif entry.is_dir() and not entry.name.startswith("."):
            found += sorted(p for p in entry.iterdir() if p.name.startswith(LEFTOVER_DIRS + LEFTOVER_FILES))
    return found


def _old_version_target(repo: Path, path: Path) -> Path | None:
    """For ``model/.old-N-PID`` (replace_version, interrupted) whose ``model/N`` is missing:
    ``model/N``, which repair restores it to."""
    if path.name.startswith(".old-") and path.parent != repo and path.is_dir():
        number = path.name[len(".old-") :].split("-", 1)[0]
        if number.isdigit() and not (path.parent / number).exists():
            return path.parent / number
    return None


def _leftover_problem(repo: Path, path: Path) -> Problem:
    shown = path.relative_to(repo)
    target = _old_version_target(repo, path)
    if target is not None:
        return _problem(f"{shown}: leftover of an interrupted rebuild, and {target.relative_to(repo)} is missing")
    what = "an interrupted `heads remove`" if path.name.startswith(".removed-") else "an interrupted write"
    return _problem(f"{shown}: leftover of {what}")


def _static_problems(repository) -> list[Problem]:
    from headmaster.repository.config import EncoderModel, EnsembleModel

    repo = repository.path
    found: list[Problem] = []
    models = list(repository.static_models())
    for model in models + [m for m in repository.head_models([]) if not isinstance(m, EnsembleModel)]:
        config, error = _read_config(repo / model.name, model.name)
        if error:
            found.append(_problem(error, model.name))
        elif model.name != "threshold" and config != _rendered(repository, model):
            found.append(_problem(f"{model.name}/{CONFIG} is not what the manifest renders"))
        if isinstance(model, EnsembleModel):
            continue
        folder = repo / model.name / "1"
        if not folder.is_dir():
            found.append(_problem(f"{model.name}/1/ is missing; {_rebuild(repo)}", model.name))
            continue
        needed = [RUNNER_FILE]
        if isinstance(model, EncoderModel):
            needed = [model.artifact] + ([RUNNER_FILE] if repository.flavour == "portable" else []) + ["card.json"]
        for file in needed:
            if not (folder / file).is_file():
                found.append(_problem(f"{model.name}/1/{file} is missing; {_rebuild(repo)}", model.name))
        if isinstance(model, EncoderModel) and (folder / "card.json").is_file():
            from headmaster.export.card import EncoderCard

            try:
                card_fingerprint = EncoderCard.load(folder).fingerprint
            except HeadmasterError as e:
                found.append(_problem(f"{model.name}/1/card.json: {e}; {_rebuild(repo)}", model.name))
                continue
            if card_fingerprint != repository.fingerprint:
                found.append(
                    _problem(
                        f"{model.name}/1 holds encoder {card_fingerprint.split(':')[-1][:12]}, but the "
                        f"manifest names {repository.card.short_fingerprint}; {_rebuild(repo)}",
                        model.name,
                    )
                )
    return found


def _head_model_problems(repository, surveys: dict[str, HeadSurvey]) -> list[Problem]:
    from headmaster.repository.config import EnsembleModel

    serving = sorted(name for name, s in surveys.items() if s.valid and s.has_config)
    found: list[Problem] = []
    for model in repository.head_models(serving):
        config, error = _read_config(repository.path / model.name, model.name)
        if error:
            if model.name != "threshold":  # threshold's config is reported with the static models
                found.append(_problem(error, model.name))
            continue
        what = f"ensemble {model.name}" if isinstance(model, EnsembleModel) else model.name
        verb = "runs" if isinstance(model, EnsembleModel) else "expects"
        configured = _configured_heads(model.name, config)
        gone = [h for h in configured if h not in surveys]
        broken = [h for h in configured if h in surveys and not surveys[h].valid]
        unconfigured = [h for h in configured if h in surveys and surveys[h].valid and not surveys[h].has_config]
        left_out = [h for h in serving if h not in configured]
        if gone:
            found.append(_problem(f"{what} {verb} heads that are not on disk: {', '.join(gone)}", model.name))
        if broken:
            found.append(_problem(f"{what} {verb} heads with no valid version: {', '.join(broken)}", model.name))
        if unconfigured:
            found.append(_problem(f"{what} {verb} heads that have no {CONFIG}: {', '.join(unconfigured)}", model.name))
        if left_out:
            found.append(_problem(f"{what} leaves out heads that are on disk: {', '.join(left_out)}", model.name))
        if not (gone or broken or unconfigured or left_out) and config != _rendered(repository, model):
            found.append(
                _problem(f"{model.name}/{CONFIG} is not what the repository renders for heads [{', '.join(serving)}]")
            )
    return found


def problems(repo_path: Path) -> list[str]:
    """Every inconsistency of the repository at ``repo_path``, one line each ([] = clean).
    Never raises: a repository too damaged to look into is itself the one problem."""
    from headmaster.repository.repo import MANIFEST, Repository

    repo = Path(repo_path)
    try:
        repository = Repository(repo)
    except HeadmasterError as e:
        return [_problem(f"{e}")]
    except Exception as e:  # e.g. a manifest with missing or mistyped fields
        return [_problem(f"{repo / MANIFEST} cannot be read: {type(e).__name__}: {e}; {_rebuild(repo)}")]

    found: list[Problem] = []

    def check(what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # a check that trips over damage reports it, the others go on
            found.append(_problem(f"{what} could not be checked: {type(e).__name__}: {e}"))
            return None

    found += [_leftover_problem(repo, p) for p in check("leftover folders", _leftovers, repo) or []]
    found += check("the encoder, preprocess, tokenize and threshold models", _static_problems, repository) or []
    surveys: dict[str, HeadSurvey] = {}
    for name in check("the head folders", head_folders, repo) or []:
        survey = check(f"head {name}", survey_head, repository, name)
        if survey is not None:
            surveys[name] = survey
            found += check(f"head {name}", _head_problems, repository, survey) or []
    found += check("threshold and the classify ensembles", _head_model_problems, repository, surveys) or []
    found += check("configs against model files", _native_problems, repository, found) or []
    return found


def _native_problems(repository, found: list[Problem]) -> list[Problem]:
    """native_check's comparisons of configs with model files (what Triton's backends check
    at load), for the models not already reported above as missing, unreadable or invalid (no
    line twice for one defect; a config that merely differs from its rendering is no reason to
    hold back the more precise line)."""
    try:
        from headmaster.repository.native_check import check_repository
    except ImportError:
        return []
    reported = {p.model for p in found if p.model}
    lines = []
    for line in check_repository(repository):
        model = line.split(":", 1)[0].split(" v", 1)[0]
        if model not in reported:
            lines.append(_problem(line, model))
    return lines


# -- repair ----------------------------------------------------------------------------------
def _aside(path: Path, parent: Path, stem: str) -> Path:
    """Rename ``path`` to ``parent/.invalid-<stem>-<time>`` (a fresh name); returns it."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = parent / f"{QUARANTINE}{stem}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = parent / f"{QUARANTINE}{stem}-{stamp}-{n}"
    path.rename(target)
    return target


def repair(repo_path: Path) -> list[str]:
    """Make the repository describe what can be served, from what is on disk; returns one
    line per action taken ([] when there was nothing to do). Raises RepositoryError only if
    the manifest cannot be read. Problems it cannot fix (missing encoder files) remain in
    ``problems()``, which names the rebuild."""
    from headmaster.repository.layout import copy_backend
    from headmaster.repository.repo import Repository

    repo = Path(repo_path)
    repository = Repository(repo)
    actions: list[str] = []
    with repository_lock(repo):
        for path in _leftovers(repo):
            shown = path.relative_to(repo)
            target = _old_version_target(repo, path)
            if target is not None:
                path.rename(target)
                actions.append(f"restored {target.relative_to(repo)} from the leftover {shown}")
            else:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                actions.append(f"removed the leftover {shown}")

        for model in repository.static_models():  # threshold and classify*: with the heads, below
            if not _config_matches(repository, model):
                repository.write_config(model)
                actions.append(f"rewrote {model.name}/{CONFIG}")

        serving: list[str] = []
        for name in head_folders(repo):
            folder = repo / name
            if repository.flavour == "portable":
                for v in versions(folder):
                    version_dir = folder / str(v)
                    if (
                        (version_dir / MODEL_FILE).is_file()
                        and (version_dir / HEAD_FILE).is_file()
                        and not (version_dir / RUNNER_FILE).is_file()
                    ):
                        copy_backend("runtime", version_dir)
                        actions.append(f"restored {name}/{v}/{RUNNER_FILE}")
            survey = survey_head(repository, name)
            if not survey.valid:
                moved = _aside(folder, repo, name)
                actions.append(
                    f"head {name} has no valid version (versions: {survey.versions or 'none'}): moved "
                    f"{name}/ to {moved.name}/ and left it out of the ensembles"
                )
                continue
            for v, problem in survey.invalid.items():
                moved = _aside(folder / str(v), folder, str(v))
                actions.append(f"moved the invalid {name}/{v} to {name}/{moved.name}: {problem}")
            live = survey.live
            model = repository.head_model(name, live)
            if not _config_matches(repository, model):
                repository.write_config(model)
                before = f"; its config named v{survey.configured}" if survey.configured not in (None, live) else ""
                actions.append(f"head {name} serves v{live}{before} (rewrote {name}/{CONFIG})")
            serving.append(name)

        for model in repository.head_models(serving):
            if not _config_matches(repository, model):
                repository.write_config(model)
                actions.append(f"rewrote {model.name}/{CONFIG} for heads [{', '.join(serving)}]")
    return actions
