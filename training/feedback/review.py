"""What people should look at next, and the files that carry it to where they label and back.

:func:`select` picks stored items a head version labelled (served traffic or a rescore) and
nobody has corrected or been sent yet, by a mix of strategies, each given a share of the batch:

- ``margin``: top score minus the second (suggest's margin), smallest first;
- ``threshold``: closest to the head's threshold (single-label: |top score - its label's
  threshold|; multi-label: the smallest |score - threshold|), for heads whose thresholds decide;
- ``ood``: flagged out of distribution by the version's own rule, farthest first;
- ``disagreement``: the live version and a shadow or canary version (the running A/B test's,
  or ``other``) gave different labels; least certain first;
- ``diversity``: k-center greedy over the embeddings, starting from the items already corrected,
  so the picks spread over the parts of the space nobody labelled;
- ``random``: a seeded uniform draw, the control the others are measured against.

A strategy that runs short hands its share to the next. Every item sent is appended to the
head's review log (``REPO/.headmaster/reviews/NAME.jsonl``) and never sent again; ``max_per_day``
caps how many a head sends in 24 hours. Each item carries the version's prediction, top score
and version number: the pre-annotation a labelling tool shows.

Files: Label Studio JSON tasks (``predictions`` with ``result``, ``score``, ``model_version``)
and its JSON export read back as corrections; a plain CSV both ways. A correction read back
records who, when, with which tool, and the prediction it confirms or corrects (in its note,
as JSON: the store's correction rows have no other column for it).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from headmaster.errors import DataError
from headmaster.repository.layout import STATE_DIR
from headmaster.store.base import Store, now
from headmaster.training.feedback.suggest import uncertainty

STRATEGIES = ("margin", "threshold", "ood", "disagreement", "diversity", "random")
DEFAULT_MIX = {"margin": 0.5, "ood": 0.1, "disagreement": 0.1, "diversity": 0.2, "random": 0.1}
DIVERSITY_POOL = 20_000  # k-center runs over at most this many candidates (a seeded subsample)
LOG_DIR = "reviews"
CSV_COLUMNS = ("item", "head", "label", "prediction", "score", "version", "strategy", "uri")
FROM_NAME, TO_NAME = "label", "image"  # the Label Studio control and object names of label_config


@dataclass(frozen=True)
class ReviewItem:
    sha256: str
    uri: str | None
    head: str
    version: int  # the version whose prediction this is
    prediction: tuple[str, ...]  # what it answered (the pre-annotation)
    score: float  # its top score
    strategy: str  # why it was picked
    why: float  # the strategy's value (margin, distance, ...); 0 for random


def parse_mix(text: str | None) -> dict[str, float]:
    """'margin=0.6,diversity=0.3,random=0.1' -> shares summing to 1 (default: DEFAULT_MIX)."""
    if not text:
        return dict(DEFAULT_MIX)
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in STRATEGIES:
            raise DataError(f"unknown review strategy {name!r}: use {', '.join(STRATEGIES)}", option="mix")
        try:
            mix[name] = float(value) if sep else 1.0
        except ValueError:
            raise DataError(f"{part!r}: expected STRATEGY=SHARE, e.g. margin=0.5", option="mix") from None
        if mix[name] < 0:
            raise DataError(f"{part!r}: a share is >= 0", option="mix")
    total = sum(mix.values())
    if total <= 0:
        raise DataError("the review mix gives every strategy a share of 0", option="mix")
    return {k: v / total for k, v in mix.items()}


def _allocate(n: int, mix: dict[str, float]) -> dict[str, int]:
    raw = {k: n * v for k, v in mix.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


# -- the review log -------------------------------------------------------------------------------
def log_path(repo: Path, head: str) -> Path:
    return Path(repo) / STATE_DIR / LOG_DIR / f"{head}.jsonl"


def sent_items(repo: Path, head: str) -> dict[str, str]:
    """sha256 -> when it was sent, for every item ever sent for review for this head."""
    path = log_path(repo, head)
    if not path.is_file():
        return {}
    sent = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        sent.setdefault(row["sha256"], row["at"])
    return sent


def record_sent(repo: Path, items: Sequence[ReviewItem], batch: str) -> None:
    path = log_path(repo, items[0].head) if items else None
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    at = now().isoformat(timespec="seconds")
    text = "".join(
        json.dumps({"sha256": i.sha256, "at": at, "batch": batch, "strategy": i.strategy, "version": i.version}) + "\n"
        for i in items
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# -- selection ------------------------------------------------------------------------------------
def k_center(pool: np.ndarray, centres: np.ndarray, k: int) -> list[int]:
    """Greedy k-center: each pick is the pool row farthest (cosine) from every centre so far."""
    if not len(pool) or k <= 0:
        return []
    pool = pool / np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), 1e-12)
    if len(centres):
        centres = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
        nearest = np.full(len(pool), np.inf, np.float32)
        for start in range(0, len(centres), 4096):
            nearest = np.minimum(nearest, (1 - pool @ centres[start : start + 4096].T).min(axis=1))
    else:
        nearest = np.full(len(pool), np.inf, np.float32)
        nearest[0] = -1.0  # no centre yet: start from the first row (the pool is shuffled)
    picks: list[int] = []
    for _ in range(min(k, len(pool))):
        i = int(np.argmax(nearest))
        picks.append(i)
        nearest = np.minimum(nearest, 1 - pool @ pool[i])
        nearest[i] = -np.inf
    return picks


def select(
    store: Store,
    version,
    n: int,
    mix: dict[str, float],
    repo: Path,
    other: int | None = None,
    max_per_day: int | None = None,
    seed: int = 0,
    record: bool = True,
) -> list[ReviewItem]:
    """``version``: the HeadVersion whose stored labels are reviewed (the live one, usually)."""
    card, head = version.card, version.card.name
    sent = sent_items(repo, head)
    if max_per_day is not None:
        since = (now() - dt.timedelta(days=1)).isoformat(timespec="seconds")
        n = min(n, max(0, max_per_day - sum(at >= since for at in sent.values())))
    table = store.labels(head, card.version)
    if table.num_rows == 0:
        raise DataError(
            f"the store {store.location} holds no labels of {head} v{card.version}: classify with "
            f"--store, or `headmaster rescore {head} --version {card.version}` first"
        )
    corrected = set(store.corrections(head))
    hashes_all = table["sha256"].to_pylist()
    keep = [i for i, sha in enumerate(hashes_all) if sha not in corrected and sha not in sent]
    if n <= 0 or not keep:
        return []
    hashes = [hashes_all[i] for i in keep]
    scores = np.array(table["scores"].to_pylist(), np.float32)[keep]
    labels = [tuple(table["labels"][i].as_py()) for i in keep]
    rng = np.random.default_rng(seed)
    thresholds = np.asarray(card.thresholds, np.float32)
    need_embeddings = bool({"ood", "diversity"} & {k for k, v in mix.items() if v > 0})
    embeddings = None
    if need_embeddings:
        stored = store.embeddings(hashes, card.encoder_fingerprint)
        present = [i for i, sha in enumerate(hashes) if sha in stored]
        hashes, scores, labels = [hashes[i] for i in present], scores[present], [labels[i] for i in present]
        embeddings = np.stack([stored[sha] for sha in hashes]) if hashes else np.zeros((0, card.embed_dim), np.float32)

    def ranked(strategy: str) -> tuple[np.ndarray, np.ndarray]:
        """(row order, the strategy's value per row in that order)."""
        if strategy == "margin":
            values = uncertainty(scores, "margin", card.multi_label, thresholds)
            order = np.argsort(values, kind="stable")
        elif strategy == "threshold":
            if card.multi_label:
                values = np.abs(scores - thresholds).min(axis=1)
            else:
                top = scores.argmax(axis=1)
                values = np.abs(scores[np.arange(len(top)), top] - thresholds[top])
            order = np.argsort(values, kind="stable")
        elif strategy == "ood":
            distances = version.ood_distances(embeddings) if len(hashes) else None
            if distances is None:
                return np.zeros(0, int), np.zeros(0)
            flagged = np.flatnonzero(distances > float(card.ood["threshold"]))
            order = flagged[np.argsort(-distances[flagged], kind="stable")]
            values = distances
        elif strategy == "disagreement":
            if other is None:
                return np.zeros(0, int), np.zeros(0)
            theirs = store.labels(head, other)
            answer = dict(zip(theirs["sha256"].to_pylist(), map(tuple, theirs["labels"].to_pylist())))
            differ = np.array(
                [sha in answer and set(answer[sha]) != set(mine) for sha, mine in zip(hashes, labels)], bool
            )
            values = uncertainty(scores, "margin", card.multi_label, thresholds)
            rows = np.flatnonzero(differ)
            order = rows[np.argsort(values[rows], kind="stable")]
        elif strategy == "diversity":
            pool = rng.permutation(len(hashes))[:DIVERSITY_POOL]
            done = store.embeddings(list(corrected), card.encoder_fingerprint)
            centres = np.stack(list(done.values())) if done else np.zeros((0, embeddings.shape[1]), np.float32)
            picks = k_center(embeddings[pool], centres, counts_left["diversity"] + n)
            order = pool[picks]
            values = np.zeros(len(hashes))
        elif strategy == "random":
            order = rng.permutation(len(hashes))
            values = np.zeros(len(hashes))
        else:
            raise DataError(f"unknown review strategy {strategy!r}", option="mix")
        return order, values

    counts_left = _allocate(n, mix)
    chosen: dict[int, tuple[str, float]] = {}
    carry = 0
    for strategy in [s for s in STRATEGIES if s in mix]:
        want = counts_left[strategy] + carry
        if want <= 0:
            continue
        order, values = ranked(strategy)
        taken = 0
        for row in order:
            if taken >= want:
                break
            if int(row) not in chosen:
                chosen[int(row)] = (strategy, float(values[row]))
                taken += 1
        carry = want - taken
    if carry > 0:  # every strategy ran short: the rest by margin
        values = uncertainty(scores, "margin", card.multi_label, thresholds)
        for row in np.argsort(values, kind="stable"):
            if carry <= 0:
                break
            if int(row) not in chosen:
                chosen[int(row)] = ("margin", float(values[row]))
                carry -= 1
    uris = store.uris()
    items = [
        ReviewItem(
            hashes[row],
            next((u for u in uris.get(hashes[row], {}).values() if u), None),
            head,
            card.version,
            labels[row],
            float(scores[row].max()),
            strategy,
            value,
        )
        for row, (strategy, value) in chosen.items()
    ]
    if record:
        record_sent(repo, items, now().strftime("%Y%m%dT%H%M%S"))
    return items


# -- files out ------------------------------------------------------------------------------------
def label_config(labels: Sequence[str], multi_label: bool) -> str:
    """The Label Studio labelling interface the tasks are made for (an image and its choices)."""
    choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in labels)
    return (
        f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n  <Choices name="{FROM_NAME}" toName="{TO_NAME}" '
        f'choice="{"multiple" if multi_label else "single"}" showInLine="true">\n{choices}\n  </Choices>\n</View>\n'
    )


def image_url(uri: str | None, prefix: str | None, root: Path | None) -> str:
    """What Label Studio loads the image from: the URI, or ``prefix`` + its path under ``root``
    (Label Studio's local files: prefix ``/data/local-files/?d=``)."""
    if not uri:
        return ""
    if prefix is None:
        return uri
    path = Path(uri)
    if root is not None:
        try:
            path = path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            raise DataError(f"{uri} is not under {root} (--image-root)", option="image_root") from None
    return prefix + str(path).lstrip("/")


def to_label_studio(items: Sequence[ReviewItem], prefix: str | None = None, root: Path | None = None) -> list[dict]:
    tasks = []
    for item in items:
        result = (
            [
                {
                    "id": "prediction",
                    "from_name": FROM_NAME,
                    "to_name": TO_NAME,
                    "type": "choices",
                    "value": {"choices": list(item.prediction)},
                }
            ]
            if item.prediction
            else []
        )
        tasks.append(
            {
                "data": {
                    "image": image_url(item.uri, prefix, root),
                    "sha256": item.sha256,
                    "head": item.head,
                    "version": item.version,
                    "prediction": list(item.prediction),
                    "score": item.score,
                    "strategy": item.strategy,
                },
                "predictions": [
                    {"model_version": f"{item.head} v{item.version}", "score": item.score, "result": result}
                ],
            }
        )
    return tasks


def write_tasks(
    items: Sequence[ReviewItem],
    path: Path,
    labels: Sequence[str],
    multi_label: bool,
    prefix: str | None = None,
    root: Path | None = None,
) -> list[Path]:
    """``.json``: Label Studio tasks (and its label config beside, ``.xml``); ``.csv``: a CSV whose
    empty ``label`` column a person fills in for `headmaster correct --csv`."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(to_label_studio(items, prefix, root), indent=1))
        config = path.with_suffix(".xml")
        config.write_text(label_config(labels, multi_label))
        return [path, config]
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for i in items:
                writer.writerow(
                    [i.sha256, i.head, "", ";".join(i.prediction), f"{i.score:.6f}", i.version, i.strategy, i.uri or ""]
                )
        return [path]
    raise DataError(f"{path}: review tasks are written as .json (Label Studio) or .csv", option="output")


# -- files back -----------------------------------------------------------------------------------
def parse_when(value) -> dt.datetime | None:
    """A labelling tool's timestamp (ISO 8601, "Z" for UTC, or a datetime) as an aware datetime,
    UTC when it names no zone; None when it is missing or not a time."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if not isinstance(value, str) or not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _annotator(annotation: dict) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        return str(who.get("email") or who.get("username") or who.get("id"))
    name = annotation.get("created_username") or ""
    return name.strip() or (f"label-studio user {who}" if who is not None else "label-studio")


def read_label_studio(path: Path, head: str | None = None) -> tuple[list[dict], list[str]]:
    """Label Studio's JSON export -> correction rows (for ``make_corrections``), and what was skipped.

    Per task, the newest annotation that was not cancelled counts; its ``choices`` are the labels.
    The note records the tool, task and annotation ids, and the prediction it answered. Label
    Studio's plain export names the annotator by user id only (``completed_by: 1``); an export
    made with ``annotations__completed_by`` expanded (or :func:`label_studio_api.pull`) gives the email."""
    try:
        tasks = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a Label Studio JSON export: {e}") from None
    if not isinstance(tasks, list):
        raise DataError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    return rows_from_tasks(tasks, head)


def rows_from_tasks(tasks: Sequence[dict], head: str | None = None) -> tuple[list[dict], list[str]]:
    """Label Studio tasks with their annotations (its export's shape) -> correction rows, skipped."""
    rows, skipped = [], []
    for task in tasks:
        data = task.get("data") or {}
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            skipped.append(f"task {task.get('id')}: no annotation")
            continue
        annotation = max(
            annotations, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id") or 0)
        )
        choices = [
            c
            for r in annotation.get("result") or []
            if r.get("type") == "choices"
            for c in (r.get("value") or {}).get("choices", [])
        ]
        item = data.get("sha256") or data.get("image")
        name = head or data.get("head")
        if not item or not name:
            skipped.append(f"task {task.get('id')}: no sha256/image or head in its data")
            continue
        rows.append(
            correction_row(
                item,
                name,
                choices,
                data.get("prediction"),
                data,
                _annotator(annotation),
                parse_when(annotation.get("created_at")),
                "label-studio",
                task=task.get("id"),
                annotation=annotation.get("id"),
            )
        )
    return rows, skipped


def correction_row(
    item: str, head: str, labels: Sequence[str], predicted, source: dict, by: str | None, at, tool: str, **where
) -> dict:
    """One correction as `correct` stores it, whatever tool it was made in: who, when, the tool (and
    ``where`` in it: task, annotation, sample ids) and the prediction it answers (``predicted``, with
    the ``source`` item's score and version; None: the tool's item carried no prediction)."""
    note = {
        "tool": tool,
        **where,
        "corrects": {"labels": predicted, "score": source.get("score"), "version": source.get("version")},
        "agrees": None if predicted is None else sorted(predicted) == sorted(labels),
    }
    return {"item": item, "head": head, "labels": tuple(labels), "by": by, "at": at, "note": json.dumps(note)}


def note_for_csv(row: dict) -> str | None:
    """A reviewed CSV row's note: the tool and the prediction it answered (when its columns are there)."""
    if not row.get("prediction") and not row.get("version"):
        return row.get("note")
    predicted = [p for p in (row.get("prediction") or "").split(";") if p]
    given = sorted(label.strip() for label in (row.get("label") or "").split(";") if label.strip())
    return json.dumps(
        {
            "tool": "csv",
            "corrects": {
                "labels": predicted,
                "score": float(row["score"]) if row.get("score") else None,
                "version": int(row["version"]) if row.get("version") else None,
            },
            "agrees": sorted(predicted) == given,
            "note": row.get("note") or "",
        }
    )


def as_dict(item: ReviewItem) -> dict:
    return asdict(item)
