"""`eval` for hierarchy, regression and ordinal heads: the holdout, the answers, the page.

The answers are the server's: the version's model.onnx in onnxruntime (``HeadVersion``) and
``threshold.head_results``, the function the threshold step runs. The page (index.html, self
contained, like the flat heads' report) shows:

- hierarchy: metrics per level, and the mistakes grouped by level, then by (truth, answer);
- regression: MAE / RMSE / Spearman / R², a scatter plot of answer vs truth, the largest errors;
- ordinal: accuracy, MAE in classes, the confusion matrix, how far the mistakes fall, a scatter
  of expected rank vs truth, and the mistakes grouped by distance, farthest first.

Elements tests count: ``section#levels``, ``div.group`` with ``data-level`` / ``data-distance``,
``img.thumb``, ``img#plot-scatter``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headmaster.errors import EvalError
from headmaster.repository.head_version import HeadVersion
from headmaster.repository.repo import Repository
from headmaster.rules.threshold import regression_value
from headmaster.training.data import Dataset, from_folders, from_hierarchy, from_values
from headmaster.training.evaluation.report import (
    CSS,
    MAX_PER_GROUP,
    ReportFiles,
    _figure,
    _img,
    _png_uri,
    _table,
    esc,
)
from headmaster.training.heads.task_metrics import hierarchy_metrics, ordinal_metrics, regression_metrics


@dataclass(frozen=True, eq=False)
class TaskEvaluation:
    head: HeadVersion
    source: str
    paths: tuple[str, ...]
    truth: tuple  # root-first paths (hierarchy), values (regression), class indices (ordinal)
    scores: np.ndarray  # [n, L] from model.onnx
    results: tuple[dict, ...]  # threshold.head_results: what the server answers for each image
    metrics: dict
    skipped: tuple[tuple[str, str], ...] = ()


def holdout_dataset(head: HeadVersion, options) -> Dataset:
    card = head.card
    if card.task == "regression":
        if options.manifest is None:
            raise EvalError(
                f"head {head.title} is a regression head: give its holdout as --manifest CSV (path,{card.labels[0]})",
                option="manifest",
            )
        return from_values(options.manifest)
    if options.data is None:
        raise EvalError(f"head {head.title} is a {card.task} head: give its holdout as --data FOLDER", option="data")
    if card.task == "hierarchy":  # nested or flat folders, named by the head's own taxonomy
        return from_hierarchy(options.data, card.parents)
    dataset = from_folders(options.data)
    extra = [label for label in dataset.labels if label not in card.labels]
    if extra:
        raise EvalError(
            f"the holdout {options.data} has classes that head {head.title} does not have: "
            f"{', '.join(extra)} (its classes, lowest first: {', '.join(card.labels)})",
            option="data",
        )
    return dataset


def evaluate_task(
    head: HeadVersion, dataset: Dataset, embed, progress: Callable[[int], None] | None = None
) -> TaskEvaluation:
    """Embed the holdout (``embed``: evaluate.Embedder), answer as the server does, measure."""
    card = head.card
    paths = [e.path for e in dataset.examples]
    hashes, vectors, failures = embed(paths, progress)
    keep = [i for i, (p, h) in enumerate(zip(paths, hashes)) if h is not None and str(p) not in failures]
    if not keep:
        raise EvalError(f"no readable image left in the holdout {dataset.source}")
    x = np.stack([vectors[hashes[i]] for i in keep])
    examples = [dataset.examples[i] for i in keep]
    scores = head.scores(x)
    results = tuple(head.results(x))
    if card.task == "hierarchy":
        truth = tuple(e.labels for e in examples)
        metrics = hierarchy_metrics(scores, list(truth), head.info)
    elif card.task == "regression":
        truth = tuple(float(e.value) for e in examples)
        metrics = regression_metrics(regression_value(scores, head.info), np.array(truth))
    else:
        truth = tuple(card.labels.index(e.labels[0]) for e in examples)
        predicted = np.array([card.labels.index(r["class"]) for r in results])
        metrics = ordinal_metrics(predicted, np.array(truth), card.labels, np.array([r["expected"] for r in results]))
        trained = (card.details.get("metrics") or {}).get("multiclass_baseline")
        if trained:  # measured at training time, on that version's validation split
            metrics["multiclass_baseline_at_training"] = trained
    metrics.update({"head": card.name, "version": card.version, "holdout": dataset.source})
    skipped = tuple(dataset.skipped) + tuple(sorted(failures.items()))
    return TaskEvaluation(
        head, dataset.source, tuple(str(e.path) for e in examples), truth, scores, results, metrics, skipped
    )


def run_task_eval(options, progress: Callable[[int, int], None] | None = None) -> TaskEvaluation:
    from headmaster.training.evaluation.evaluate import Embedder

    repository = Repository(options.repo)
    head = HeadVersion.load(repository, options.name, options.version)
    for given, flag in (
        (options.compare, "--compare"),
        (options.against, "--against"),
        (options.snapshot, "--snapshot"),
        (options.ood, "--ood"),
    ):
        if given:
            raise EvalError(
                f"{flag} is for flat label heads; head {head.title} is a {head.card.task} head", option=flag.strip("-")
            )
    dataset = holdout_dataset(head, options)
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], len(dataset.examples))

    return evaluate_task(head, dataset, Embedder(repository, options.server, options.cache_dir), advance)


# -- the page -----------------------------------------------------------------------------------------
def scatter_png(e: TaskEvaluation, path: Path) -> Path | None:
    """Answer vs truth: the value (regression) or the expected rank, jittered truth (ordinal)."""
    if e.head.card.task == "hierarchy":
        return None
    truth = np.asarray(e.truth, np.float64)
    if e.head.card.task == "regression":
        answer = np.array([r["value"] for r in e.results])
        x, what = truth, e.head.card.labels[0]
    else:
        answer = np.array([r["expected"] for r in e.results])
        x = truth + np.random.default_rng(0).uniform(-0.2, 0.2, len(truth))  # one column per class, spread
        what = "class (0 = " + e.head.card.labels[0] + ")"
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    ax.scatter(x, answer, s=10, alpha=0.6)
    low, high = float(min(truth.min(), answer.min())), float(max(truth.max(), answer.max()))
    ax.plot([low, high], [low, high], color="grey", linewidth=1, label="answer = truth")
    ax.set_xlabel(f"truth: {what}")
    ax.set_ylabel("answer" if e.head.card.task == "regression" else "expected rank")
    ax.set_title(f"{e.head.title}: Spearman {e.metrics['spearman']:.3f}")
    ax.legend(loc="upper left")
    fig.savefig(path)
    return path


def _group(title: str, rows: list[int], e: TaskEvaluation, caption, **data) -> str:
    attrs = "".join(f' data-{k}="{esc(v)}"' for k, v in data.items())
    shown = rows[:MAX_PER_GROUP]
    more = f"<p>... and {len(rows) - len(shown)} more</p>" if len(rows) > len(shown) else ""
    items = "".join(
        f'<figure class="item">{_img(e.paths[i])}<figcaption>{esc(caption(i))}</figcaption></figure>' for i in shown
    )
    return f'<div class="group"{attrs}><h3>{esc(title)} ({len(rows)})</h3>{items}{more}</div>'


def hierarchy_html(e: TaskEvaluation) -> str:
    m = e.metrics
    table = _table(
        ["level", "labels", "images", "accuracy", "answered here", "accuracy of answered", "macro-F1"],
        [
            [
                str(x["level"]),
                ", ".join(x["labels"]),
                str(x["n"]),
                f"{x['accuracy']:.3f}",
                f"{x['coverage']:.1%}",
                f"{x['accuracy_of_answered']:.3f}",
                f"{x['macro_f1']:.3f}",
            ]
            for x in m["per_level"]
        ],
        'id="per-level"',
    )
    groups = []
    for level in m["per_level"]:
        d, by_pair = level["level"], {}
        for i, (truth, result) in enumerate(zip(e.truth, e.results)):
            said = result["labels"][d] if len(result["labels"]) > d else "(no answer at this level)"
            if len(truth) > d and said != truth[d]:
                by_pair.setdefault((truth[d], said), []).append(i)
        groups.append(
            f"<h3>level {d}: {sum(len(rows) for rows in by_pair.values())} mistakes</h3>"
            + "".join(
                _group(
                    f"{t} answered as {s}",
                    rows,
                    e,
                    lambda i: " > ".join(e.results[i]["labels"]) or "no answer",
                    level=d,
                )
                for (t, s), rows in sorted(by_pair.items(), key=lambda kv: -len(kv[1]))
            )
        )
    return (
        f'<section id="levels"><h2>per level</h2>{table}<p>exact path {m["exact_path"]:.3f}; images by depth '
        f"answered (0, 1, ...): {m['answered_depth']}; every path consistent: {m['paths_consistent']}</p>"
        f'</section><section id="mistakes"><h2>mistakes by level</h2>{"".join(groups)}</section>'
    )


def regression_html(e: TaskEvaluation) -> str:
    m = e.metrics
    table = _table(
        ["MAE", "RMSE", "Spearman", "R²", "images"],
        [[f"{m['mae']:.3f}", f"{m['rmse']:.3f}", f"{m['spearman']:.3f}", f"{m['r2']:.3f}", str(m["n"])]],
        'id="scores"',
    )
    error = np.abs(np.array([r["value"] for r in e.results]) - np.asarray(e.truth))
    worst = [int(i) for i in np.argsort(-error)[:MAX_PER_GROUP]]
    return (
        f'<section id="metrics"><h2>metrics</h2>{table}</section><section id="mistakes"><h2>largest errors'
        "</h2>"
        + _group(
            "farthest from the truth", worst, e, lambda i: f"truth {e.truth[i]:g}, answer {e.results[i]['value']:.3f}"
        )
        + "</section>"
    )


def _ordinal_table(m: dict, name: str) -> list[str]:
    return [
        name,
        f"{m['accuracy']:.3f}",
        f"{m['mae_classes']:.3f}",
        f"{m['mistake_mean_distance']:.2f}",
        f"{m['neighbour_share_of_mistakes']:.1%}",
        f"{m['far_mistakes']:.1%}",
        " ".join(map(str, m["by_distance"])),
    ]


def ordinal_html(e: TaskEvaluation) -> str:
    m, labels = e.metrics, e.head.card.labels
    rows = [_ordinal_table(m, f"{e.head.title} on this holdout")]
    if "multiclass_baseline_at_training" in m:
        card_m = e.head.card.details["metrics"]
        rows += [
            _ordinal_table(card_m, "ordinal, validation at training"),
            _ordinal_table(m["multiclass_baseline_at_training"], "plain multiclass, same validation split"),
        ]
    table = _table(
        [
            "head",
            "accuracy",
            "MAE (classes)",
            "mistakes: mean distance",
            "mistakes that are neighbours",
            "off by 2+",
            "images off by 0, 1, 2, ...",
        ],
        rows,
        'id="ordinal"',
    )
    confusion = _table(
        ["actual \\ answer", *labels],
        [[labels[a], *map(str, row)] for a, row in enumerate(m["confusion_matrix"])],
        'id="confusion"',
    )
    by_distance: dict[int, list[int]] = {}
    for i, (truth, result) in enumerate(zip(e.truth, e.results)):
        d = abs(labels.index(result["class"]) - truth)
        if d:
            by_distance.setdefault(d, []).append(i)
    groups = "".join(
        _group(
            f"off by {d} class{'es' if d > 1 else ''}",
            rows_,
            e,
            lambda i: (
                f"truth {labels[e.truth[i]]}, answer {e.results[i]['class']}, "
                f"expected rank {e.results[i]['expected']:.2f}"
            ),
            distance=d,
        )
        for d, rows_ in sorted(by_distance.items(), reverse=True)
    )
    return (
        f'<section id="metrics"><h2>metrics</h2>{table}<p>An ordinal head is trained so that neighbouring '
        "mistakes cost less: compare how far its mistakes fall with the plain multiclass head's.</p>"
        f'<h3>confusion matrix</h3>{confusion}</section><section id="mistakes"><h2>mistakes by distance, '
        f"farthest first</h2>{groups}</section>"
    )


def render_task_html(e: TaskEvaluation, plots: dict[str, Path]) -> str:
    card = e.head.card
    title = f"{e.head.title} on {e.source}"
    body = {"hierarchy": hierarchy_html, "regression": regression_html, "ordinal": ordinal_html}[card.task](e)
    plots_html = "".join(
        f'<img class="plot" id="plot-{esc(n)}" src="{_png_uri(p)}" alt="{esc(n)}">' for n, p in plots.items()
    )
    skipped = "".join(f"<li>{esc(p)}: {esc(why)}</li>" for p, why in e.skipped)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><h1>{esc(title)}</h1>"
        f"<p>{esc(card.task)} head ({esc(card.kind)}), {'live' if e.head.live else 'not live'}, created "
        f"{esc(card.created)}; {len(e.paths)} images evaluated, {len(e.skipped)} skipped. Answers from the "
        "version's model.onnx (onnxruntime, CPU) and the server's own threshold rule.</p>"
        f"{body}"
        + (f'<section id="plots" class="plots"><h2>plots</h2>{plots_html}</section>' if plots else "")
        + f'<section id="skipped"><h2>skipped files ({len(e.skipped)})</h2><ul>{skipped}</ul></section>'
        "</body></html>"
    )


def write_task_report(e: TaskEvaluation, folder: Path) -> ReportFiles:
    """index.html, metrics.json and the scatter plot into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = {"scatter": scatter_png(e, folder / "scatter.png")}
    plots = {name: path for name, path in plots.items() if path is not None}
    metrics_path = folder / "metrics.json"
    metrics_path.write_text(json.dumps({"evaluation": e.metrics}, indent=2) + "\n")
    html_path = folder / "index.html"
    html_path.write_text(render_task_html(e, plots), encoding="utf-8")
    corrections = folder / "corrections.csv"  # label-error suggestions are for flat heads: none here
    corrections.write_text("")
    return ReportFiles(folder, html_path, metrics_path, corrections, plots)


def make_task_report(
    options, folder: Path, progress: Callable[[int, int], None] | None = None
) -> tuple[TaskEvaluation, ReportFiles]:
    """The whole `headmaster eval` for a hierarchy, regression or ordinal head."""
    e = run_task_eval(options, progress)
    return e, write_task_report(e, folder)
