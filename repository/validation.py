"""Whether a head version may go live: the one check every path to "live" runs first.

Publishing, rollback, import, the server's drop-in watcher and ``repo repair`` all ask
:func:`validate_version` (or :func:`check_version_dir` for a folder outside a repository)
before a version is served. A version passes when Triton would load it *and* every answer
it gives would be right: its ``head.json`` is readable and names this head and version, it
reads the served encoder's embeddings, its ``model.onnx`` loads in onnxruntime, and running it
on a few unit vectors gives one score in [0, 1] per label (softmax rows summing to 1 for a
single-label head, a sigmoid per label for a multi-label one) and the ``INFO`` its card
says. A failure raises :class:`InvalidVersionError` with one line that names the folder and
what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from headmaster.errors import (
    ForeignVersionError,
    HeadmasterError,
    InvalidVersionError,
)
from headmaster.export.heads import HEAD_FILE, MODEL_FILE, HeadCard
from headmaster.repository.layout import version_dir

RUNNER_FILE = "model.py"  # the portable flavour serves heads through the python backend
PROBE_ROWS = 4  # unit vectors run through the head; small, so a check costs milliseconds


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _short(fingerprint: str) -> str:
    return str(fingerprint).split(":")[-1][:12]


def check_version_dir(
    folder: Path,
    fingerprint: str,
    embed_dim: int,
    *,
    name: str | None = None,
    version: int | None = None,
    needs_runner: bool = False,
    shown: str | None = None,
) -> HeadCard:
    """Check one head version folder (anywhere: a repository, a staging folder, another
    machine's export) against the encoder ``fingerprint`` / ``embed_dim`` it would serve with.

    ``name`` / ``version``, when given, must be what head.json says (a version inside a
    repository: its folder's names). ``needs_runner``: the folder must hold the python-backend
    ``model.py`` (the portable flavour). ``shown`` is how the folder is named in the message
    (default: its path). Returns the card; raises :class:`InvalidVersionError`.
    """
    folder = Path(folder)
    where = shown or str(folder)

    def refuse(what: str, error: type[InvalidVersionError] = InvalidVersionError) -> InvalidVersionError:
        return error(f"head version {where}: {_one_line(what)}")

    if not folder.is_dir():
        raise refuse("no such folder")
    if not (folder / HEAD_FILE).is_file():
        raise refuse(f"{HEAD_FILE} is missing")
    try:
        card = HeadCard.load(folder)
    except HeadmasterError as e:
        raise refuse(f"{HEAD_FILE} is not a valid head card: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:
        raise refuse(f"{HEAD_FILE} is not a valid head card: {type(e).__name__}: {e}") from None
    if name is not None and card.name != name:
        raise refuse(f"{HEAD_FILE} names head {card.name!r}, not {name!r}")
    if version is not None and card.version != version:
        raise refuse(f"{HEAD_FILE} says version {card.version}, not {version}")
    if card.encoder_fingerprint != fingerprint:
        raise refuse(
            f"head {card.name} v{card.version} was made with encoder {_short(card.encoder_fingerprint)}, "
            f"but this repository serves encoder {_short(fingerprint)}: retrain or re-create it against "
            "the served encoder",
            ForeignVersionError,
        )
    if card.embed_dim != embed_dim:
        raise refuse(f"{HEAD_FILE} reads {card.embed_dim}-d embeddings; the encoder gives {embed_dim}-d")
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise refuse(f"{MODEL_FILE} is missing")
    if needs_runner and not (folder / RUNNER_FILE).is_file():
        raise refuse(f"{RUNNER_FILE} is missing (the portable flavour serves heads through it)")

    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind11 types for every kind of bad file
        raise refuse(f"{MODEL_FILE} does not load in onnxruntime: {e}") from None
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if list(inputs) != ["EMBEDDING"] or not {"SCORES", "INFO"} <= outputs:
        raise refuse(
            f"{MODEL_FILE} takes {sorted(inputs)} and gives {sorted(outputs)}; a head takes EMBEDDING "
            "and gives SCORES and INFO"
        )
    shape = inputs["EMBEDDING"].shape
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != embed_dim):
        raise refuse(f"{MODEL_FILE} takes EMBEDDING of shape {shape}, not [batch, {embed_dim}]")

    rng = np.random.default_rng(0)
    probe = rng.normal(size=(PROBE_ROWS, embed_dim)).astype(np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    try:
        scores, info = session.run(["SCORES", "INFO"], {"EMBEDDING": probe})
    except Exception as e:
        raise refuse(f"{MODEL_FILE} fails on a batch of {PROBE_ROWS} embeddings: {e}") from None

    labels = len(card.labels)
    scores = np.asarray(scores)
    if scores.shape != (PROBE_ROWS, labels):
        per_row = scores.shape[1] if scores.ndim == 2 and scores.shape[0] == PROBE_ROWS else None
        if per_row is not None:
            raise refuse(
                f"{MODEL_FILE} gives {per_row} scores per embedding, but {HEAD_FILE} has {labels} labels "
                f"{list(card.labels)}"
            )
        raise refuse(
            f"{MODEL_FILE} gives SCORES of shape {list(scores.shape)} for {PROBE_ROWS} embeddings, "
            f"not [{PROBE_ROWS}, {labels}]"
        )
    if scores.dtype != np.float32:
        raise refuse(f"{MODEL_FILE} gives SCORES as {scores.dtype}, not float32")
    if not np.isfinite(scores).all():
        raise refuse(f"{MODEL_FILE} gives scores that are not finite (NaN or infinity)")
    regression = card.task == "regression"  # a value, any real number; every other task scores in [0, 1]
    if not regression and (scores.min() < -1e-6 or scores.max() > 1 + 1e-6):
        raise refuse(f"{MODEL_FILE} gives scores outside [0, 1] ({scores.min():.4g} .. {scores.max():.4g})")

    activation = _scores_activation(model_path)
    if activation == "Sigmoid" and not card.multi_label:
        raise refuse(f"{MODEL_FILE} scores each label with a sigmoid (multi-label), but {HEAD_FILE} says single-label")
    if activation == "Softmax" and card.multi_label:
        raise refuse(f"{MODEL_FILE} scores with a softmax (single-label), but {HEAD_FILE} says multi-label")
    made_by = {"regression": "Identity", "ordinal": "Sub"}.get(card.task)
    if activation is not None and made_by is not None and activation != made_by:
        raise refuse(
            f"{MODEL_FILE} makes SCORES with {activation}, but a {card.task} head's SCORES come from "
            f"{made_by} (see export/heads.py)"
        )
    if not card.multi_label and not regression and not np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        raise refuse(
            f"{MODEL_FILE}: the scores of a single-label head must sum to 1 (softmax), they sum to "
            f"{scores.sum(axis=1).round(4).tolist()}"
        )

    info = np.asarray(info)
    if info.shape != (PROBE_ROWS, 1):
        raise refuse(
            f"{MODEL_FILE} gives INFO of shape {list(info.shape)} for {PROBE_ROWS} embeddings, not [{PROBE_ROWS}, 1]"
        )
    expected = card.info()
    for row in info[:, 0]:
        try:
            found = json.loads(row.decode() if isinstance(row, bytes) else str(row))
        except (ValueError, UnicodeDecodeError):
            raise refuse(f"{MODEL_FILE} gives INFO that is not JSON: {str(row)[:80]!r}") from None
        if found != expected:
            differ = (
                sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
                if isinstance(found, dict)
                else ["everything"]
            )
            raise refuse(
                f"{MODEL_FILE} answers with INFO that disagrees with {HEAD_FILE} on "
                f"{', '.join(differ)}: {json.dumps(found)[:160]}"
            )
    if card.ood is not None:
        _check_references(folder, card, refuse)
    return card


def _check_references(folder: Path, card: HeadCard, refuse) -> None:
    """The out-of-distribution reference set the card names: present, that size, those bytes."""
    from headmaster.rules.threshold import OOD_FILE, load_references

    path = folder / OOD_FILE
    if not path.is_file():
        raise refuse(f"{OOD_FILE} is missing ({HEAD_FILE} describes an out-of-distribution reference set)")
    try:
        references = load_references(str(folder), card.ood)
    except ValueError as e:
        raise refuse(f"{OOD_FILE}: {e}") from None
    except OSError as e:
        raise refuse(f"{OOD_FILE} cannot be read: {e}") from None
    if references.shape != (card.ood["references"], card.embed_dim):
        raise refuse(f"{OOD_FILE} is {list(references.shape)}, not [{card.ood['references']}, {card.embed_dim}]")
    if card.ood.get("index_sha256"):
        _check_index(folder, card, refuse)


def _check_index(folder: Path, card: HeadCard, refuse) -> None:
    """The IVF index the card names (ood.index_sha256): present, those bytes."""
    from headmaster.rules.threshold import OOD_INDEX_FILE, index_sha256

    path = folder / OOD_INDEX_FILE
    if not path.is_file():
        raise refuse(f"{OOD_INDEX_FILE} is missing ({HEAD_FILE} names its sha256 in ood.index_sha256)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise refuse(f"{OOD_INDEX_FILE} cannot be read: {e}") from None
    if index_sha256(data) != card.ood["index_sha256"]:
        raise refuse(
            f"{OOD_INDEX_FILE} is not the faiss index this version was published with "
            f"(its sha256 differs from {HEAD_FILE}'s ood.index_sha256)"
        )


def _scores_activation(model_path: Path) -> str | None:
    """The op that makes SCORES (Softmax, Sigmoid, ...), or None if the graph does not say."""
    try:
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception:
        return None  # onnxruntime loaded it; the numeric checks still apply
    for node in graph.node:
        if "SCORES" in node.output:
            return node.op_type
    return None


def validate_version(repository, name: str, version: int, *, shown: str | None = None) -> HeadCard:
    """Check version ``version`` of head ``name`` inside ``repository`` (a Repository or its
    path) before it goes live: see :func:`check_version_dir`; head.json must also name this
    folder's head and version, and a portable repository needs the version's ``model.py``.
    Returns the card; raises :class:`InvalidVersionError` (a RepositoryError), one line.
    ``shown``: how the folder is named in the message (default: its path)."""
    from headmaster.repository.repo import Repository

    if not isinstance(repository, Repository):
        repository = Repository(Path(repository))
    folder = version_dir(repository.path, name, version)
    return check_version_dir(
        folder,
        repository.fingerprint,
        repository.card.embed_dim,
        name=name,
        version=int(version),
        needs_runner=repository.flavour == "portable",
        shown=shown,
    )


def check_rollback(repo: Path, name: str, to: int | None = None) -> None:
    """The version ``rollback(repo, name, to)`` would serve must validate first (the rule for
    the default target is rollback's: the newest version below the live one). Targets that
    are not on disk are left to rollback's own message."""
    from headmaster.repository.repo import Repository

    repository = Repository(Path(repo))
    state = repository.head(name)
    older = [v for v in state.versions if v < state.live]
    target = to if to is not None else (older[-1] if older else None)
    if target is not None and target in state.versions:
        validate_version(repository, name, target)


def check_student_dir(folder: Path, name: str, version: int, num_labels: int, needs_runner: bool = True) -> dict:
    """A distilled student's version folder (``training/distill.py``) before it goes live, as
    :func:`check_version_dir` checks a head's: ``student.json`` names this student and version and
    carries its preprocessing and its teacher's labels and thresholds, ``model.onnx`` loads and gives
    one score in [0, 1] per label for a batch of pixels. Returns the card; raises
    :class:`InvalidVersionError`, one line."""
    from headmaster.served.student import STUDENT_FILE

    folder = Path(folder)

    def refuse(what: str) -> InvalidVersionError:
        return InvalidVersionError(f"student version {folder}: {_one_line(what)}")

    try:
        card = json.loads((folder / STUDENT_FILE).read_text())
        size = int(card["preprocessing"]["size"])
        labels, thresholds = list(card["labels"]), list(card["thresholds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise refuse(f"{STUDENT_FILE} is missing or not a student card: {type(e).__name__}: {e}") from None
    if card.get("name") != name or card.get("version") != version:
        raise refuse(f"{STUDENT_FILE} names {card.get('name')!r} v{card.get('version')}, not {name!r} v{version}")
    if len(labels) != num_labels or len(thresholds) != num_labels:
        raise refuse(f"{STUDENT_FILE} has {len(labels)} labels and {len(thresholds)} thresholds, not {num_labels}")
    if needs_runner and not (folder / RUNNER_FILE).is_file():
        raise refuse(f"{RUNNER_FILE} is missing (a student is served through it)")
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
        pixels = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
        scores = np.asarray(session.run(["SCORES"], {"PIXELS": pixels})[0])
    except Exception as e:  # onnxruntime raises its own pybind11 types for every kind of bad file
        raise refuse(f"{MODEL_FILE} does not run on a batch of [2, 3, {size}, {size}] pixels: {e}") from None
    if scores.shape != (2, num_labels) or not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1:
        raise refuse(f"{MODEL_FILE} gives SCORES of shape {list(scores.shape)}, not [2, {num_labels}] in [0, 1]")
    return card
