"""The evaluation report: plots (matplotlib), metrics.json, corrections.csv and one HTML page.

``index.html`` is self-contained (thumbnails and plots are base64 data URIs, the CSS and the
few lines of JS are inline), so it opens from disk, in a mail attachment or a CI artifact.
It shows the mistakes as thumbnails grouped by (actual, predicted), reachable from the
confusion matrix's cells, sortable by confidence; the comparison of two heads or versions;
and the data-quality findings, each with a suggested action.

Elements tests (and people with a browser console) can count: every thumbnail is
``img.thumb``, every confusion-matrix cell ``td.cell`` inside ``table#confusion``, every
image group ``div.group`` with the id its matrix cell links to.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from headmaster.training.evaluation.evaluate import Comparison, EvalOptions, EvalRun, Evaluation, run_eval
from headmaster.training.evaluation.label_quality import QualityReport, check_quality, corrections, write_corrections

LOG = logging.getLogger(__name__)

THUMBNAIL_PX = 112  # longest side of an embedded thumbnail
MAX_PER_GROUP = 60  # thumbnails per (actual, predicted) group; the rest are counted
MAX_FINDINGS = 100  # thumbnails per data-quality list and for changed predictions


@dataclass(frozen=True)
class ReportFiles:
    folder: Path
    html: Path
    metrics: Path
    corrections: Path
    plots: dict[str, Path]  # name -> PNG


# -- plots -----------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    # A bare Figure draws with the Agg canvas and touches no global pyplot state or display.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def confusion_png(e: Evaluation, path: Path) -> Path:
    labels = list(e.labels)
    if e.multi_label:
        matrix = np.array([[c[1, 1], c[1, 0], c[0, 1], c[0, 0]] for c in e.confusion])
        columns, ylabel, xlabel = ["TP", "FN", "FP", "TN"], "label", ""
    else:
        matrix, columns, ylabel, xlabel = e.confusion, labels, "actual", "predicted (top label)"
    size = max(4.0, 0.45 * max(len(labels), len(columns)) + 2.5)
    fig = _figure(size, size * len(labels) / max(len(columns), len(labels)) + 0.8)
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(len(columns)), columns, rotation=45 if len(columns) > 6 else 0, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{e.head.title}: confusion matrix")
    if matrix.size <= 900:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (r, c), v in np.ndenumerate(matrix):
            ax.text(
                c, r, str(int(v)), ha="center", va="center", fontsize=8, color="white" if v > threshold else "black"
            )
    fig.savefig(path)
    return path


def pr_png(e: Evaluation, path: Path) -> Path | None:
    if not e.curves:
        return None
    fig = _figure(6, 4.5)
    ax = fig.subplots()
    for curve in e.curves:
        ax.plot(
            curve.recall,
            curve.precision,
            drawstyle="steps-post",
            label=f"{curve.label} (AP {curve.average_precision:.3f})",
        )
        at = [row for row in curve.sweep if row["current"]]
        if at:
            ax.plot(at[0]["recall"], at[0]["precision"], "o", color=ax.lines[-1].get_color())
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{e.head.title}: precision-recall (dot: the head's threshold)")
    ax.legend(loc="lower left", fontsize=8)
    fig.savefig(path)
    return path


def reliability_png(e: Evaluation, path: Path) -> Path | None:
    cal = e.calibration
    if cal is None:
        return None
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.plot(cal.prob_pred, cal.prob_true, "o-", label=f"{e.head.title} (ECE {cal.ece:.3f})")
    for x, y, n in zip(cal.prob_pred, cal.prob_true, cal.counts):
        ax.annotate(str(int(n)), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("mean score in bin")
    ax.set_ylabel("share right in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("reliability diagram (numbers: images per bin)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path)
    return path


# -- HTML pieces -------------------------------------------------------------------------------------
def esc(value) -> str:
    return html.escape(str(value), quote=True)


@lru_cache(maxsize=4096)
def thumbnail(path: str) -> str:
    """A PNG data URI of the image, at most THUMBNAIL_PX on its longest side."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
    except (OSError, ValueError) as e:
        LOG.warning("no thumbnail for %s: %s", path, e)
        return ""
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


TEXT_PREVIEW_CHARS = 280  # of a text item (a .txt file: a text encoder's data), shown in place of a thumbnail


@lru_cache(maxsize=4096)
def text_preview(path: str) -> str:
    """The start of a text file, HTML-escaped (what a text item shows where an image shows a thumbnail)."""
    try:
        text = Path(path).read_bytes()[: 4 * TEXT_PREVIEW_CHARS].decode("utf-8", "replace")
    except OSError as e:
        LOG.warning("no preview for %s: %s", path, e)
        return ""
    text = " ".join(text.split())
    return esc(text[:TEXT_PREVIEW_CHARS] + ("\u2026" if len(text) > TEXT_PREVIEW_CHARS else ""))


def _img(path: str) -> str:
    if path.endswith(".txt"):
        return f'<blockquote class="thumb-text" title="{esc(path)}">{text_preview(path)}</blockquote>'
    return f'<img class="thumb" src="{thumbnail(path)}" alt="{esc(Path(path).name)}" title="{esc(path)}">'


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _f(value: float) -> str:
    return f"{value:.3f}"


def _table(headers: list[str], rows: list[list[str]], attrs: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _scores_text(e: Evaluation, i: int, top: int = 3) -> str:
    order = np.argsort(-e.scores[i])[:top]
    return ", ".join(f"{e.labels[j]} {e.scores[i, j]:.3f}" for j in order)


def _card(classes: str, paths: tuple[str, ...], caption: str, **data: str) -> str:
    """One card of thumbnails with a caption (already HTML); ``data`` become data-* attributes
    (the page sorts cards by data-confidence)."""
    attrs = "".join(f' data-{name}="{value}"' for name, value in data.items())
    return f'<figure class="{classes}"{attrs}>{"".join(map(_img, paths))}<figcaption>{caption}</figcaption></figure>'


def _item(e: Evaluation, i: int, path: str, confidence: float, caption: str) -> str:
    accepted = ", ".join(e.accepted[i]) or "none"
    return _card(
        "item",
        (path,),
        f"<b>{esc(Path(path).name)}</b><br>{esc(caption)}<br>"
        f'<span class="scores">scores: {esc(_scores_text(e, i))}</span><br>'
        f'<span class="accepted">with thresholds: {esc(accepted)}</span>',
        confidence=f"{confidence:.6f}",
        index=str(i),
    )


def mistake_groups(e: Evaluation, paths: tuple[str, ...]) -> list[tuple[str, str, list[tuple[int, float]]]]:
    """(group id, title, [(row, confidence)] most confident first) for every kind of mistake.

    Single-label: one group per (actual, predicted) pair off the diagonal, confidence being
    the score of the wrong top label. Multi-label: per label, the misses (confidence: the
    label's score) and the false alarms."""
    groups = []
    if e.multi_label:
        accepted = np.array([[label in row for label in e.labels] for row in e.accepted])
        for j, label in enumerate(e.labels):
            for kind, mask in (
                ("fn", (e.truth[:, j] == 1) & ~accepted[:, j]),
                ("fp", (e.truth[:, j] == 0) & accepted[:, j]),
            ):
                rows = [(int(i), float(e.scores[i, j])) for i in np.flatnonzero(mask)]
                if rows:
                    title = f"{label}: missed" if kind == "fn" else f"{label}: accepted but not there"
                    groups.append((f"g-{kind}-{j}", title, sorted(rows, key=lambda r: -r[1])))
        return groups
    actual, top = e.truth.argmax(axis=1), e.top
    for a in range(len(e.labels)):
        for p in range(len(e.labels)):
            rows = [(int(i), float(e.scores[i, p])) for i in np.flatnonzero((actual == a) & (top == p))]
            if a != p and rows:
                groups.append(
                    (f"g-{a}-{p}", f"actual {e.labels[a]}, predicted {e.labels[p]}", sorted(rows, key=lambda r: -r[1]))
                )
    return groups


def confusion_html(e: Evaluation) -> str:
    """The matrix as a table; each non-zero mistake cell links to its group of images."""
    if e.multi_label:
        header = "<tr><th>label</th><th>TP</th><th>FN (missed)</th><th>FP (false alarm)</th><th>TN</th></tr>"
        rows = []
        for j, (label, c) in enumerate(zip(e.labels, e.confusion)):
            cells = []
            for kind, value in (("tp", c[1, 1]), ("fn", c[1, 0]), ("fp", c[0, 1]), ("tn", c[0, 0])):
                text = (
                    f'<a href="#g-{kind}-{j}">{int(value)}</a>' if kind in ("fn", "fp") and value else str(int(value))
                )
                cells.append(f'<td class="cell" data-kind="{kind}">{text}</td>')
            rows.append(f"<tr><th>{esc(label)}</th>{''.join(cells)}</tr>")
        return f'<table id="confusion" class="matrix"><thead>{header}</thead><tbody>{"".join(rows)}</tbody></table>'
    header = "<tr><th>actual \\ predicted</th>" + "".join(f"<th>{esc(label)}</th>" for label in e.labels) + "</tr>"
    rows = []
    top = max(1, int(e.confusion.max()))
    for a, label in enumerate(e.labels):
        cells = []
        for p, value in enumerate(e.confusion[a]):
            value = int(value)
            kind = "diag" if a == p else ("miss" if value else "zero")
            text = f'<a href="#g-{a}-{p}">{value}</a>' if kind == "miss" else str(value)
            shade = (
                f"rgba({'40,120,200' if a == p else '220,60,40'},{0.08 + 0.6 * value / top:.2f})" if value else "#fff"
            )
            cells.append(f'<td class="cell" data-kind="{kind}" style="background:{shade}">{text}</td>')
        rows.append(f"<tr><th>{esc(label)}</th>{''.join(cells)}</tr>")
    return f'<table id="confusion" class="matrix"><thead>{header}</thead><tbody>{"".join(rows)}</tbody></table>'


def metrics_html(e: Evaluation) -> str:
    m = e.metrics
    if e.multi_label:
        summary = [
            ["subset accuracy", _f(m["subset_accuracy"])],
            ["micro-F1", _f(m["micro_f1"])],
            ["macro-F1", _f(m["macro_f1"])],
        ]
    else:
        summary = [
            ["accuracy (top label)", _f(m["accuracy"])],
            ["macro-F1", _f(m["macro_f1"])],
            ["share given a label with thresholds", _f(m["thresholded"]["coverage"])],
            ["accuracy of those", _f(m["thresholded"]["accuracy_of_accepted"])],
        ]
        summary += [[f"top-{k} accuracy", _f(v)] for k, v in m.get("top_k_accuracy", {}).items()]
    summary += [["expected calibration error", _f(m["calibration"]["ece"])], ["images", str(m["n"])]]
    per_label = [
        [label, _f(v["precision"]), _f(v["recall"]), _f(v["f1-score"]), str(int(v["support"])), _f(t)]
        for (label, v), t in zip(m["per_label"].items(), e.head.card.thresholds)
    ]
    return _table(["metric", "value"], summary, 'id="summary"') + _table(
        ["label", "precision", "recall", "F1", "support", "threshold"], per_label, 'id="per-label"'
    )


def sweep_html(e: Evaluation) -> str:
    parts = []
    for curve in e.curves:
        rows = [
            [
                _f(r["threshold"]) + (" (current)" if r["current"] else ""),
                _f(r["precision"]),
                _f(r["recall"]),
                _f(r["f1"]),
                _f(r["accepted"]),
            ]
            for r in curve.sweep
        ]
        parts.append(
            f"<div><h3>threshold sweep: {esc(curve.label)} (AP {curve.average_precision:.3f})</h3>"
            + _table(["threshold", "precision", "recall", "F1", "share accepted"], rows, 'class="sweep"')
            + "</div>"
        )
    return f'<div class="sweeps">{"".join(parts)}</div>' if parts else ""


def groups_html(e: Evaluation, paths: tuple[str, ...]) -> str:
    groups = mistake_groups(e, paths)
    if not groups:
        return "<p>No mistakes on this holdout.</p>"
    out = []
    for gid, title, rows in groups:
        items = []
        for i, confidence in rows[:MAX_PER_GROUP]:
            if e.multi_label:
                caption = f"actual: {', '.join(l for l, t in zip(e.labels, e.truth[i]) if t) or 'none'}"
            else:
                caption = f"predicted {e.labels[e.top[i]]} at {confidence:.3f}"
            items.append(_item(e, i, paths[i], confidence, caption))
        more = f'<p class="more">and {len(rows) - MAX_PER_GROUP} more</p>' if len(rows) > MAX_PER_GROUP else ""
        out.append(
            f'<div class="group" id="{gid}"><h3>{esc(title)} <span class="count">({len(rows)})</span></h3>'
            f'<div class="items">{"".join(items)}</div>{more}</div>'
        )
    return "".join(out)


def compare_html(c: Comparison, paths: tuple[str, ...]) -> str:
    a, b = c.a.head.title, c.b.head.title
    rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{_f(x)}</td><td>{_f(y)}</td>"
        f'<td class="{"better" if y > x else "worse" if y < x else ""}">{y - x:+.3f}</td></tr>'
        for name, x, y in c.rows
    )
    table = (
        f'<table id="compare-table"><thead><tr><th>metric</th><th>{esc(a)}</th><th>{esc(b)}</th>'
        f"<th>change</th></tr></thead><tbody>{rows}</tbody></table>"
    )
    items = []
    for ch in c.changed[:MAX_FINDINGS]:
        right = set(ch.truth)
        verdict = "fixed" if set(ch.after) == right else "broken" if set(ch.before) == right else "still wrong"
        caption = (
            f"actual {', '.join(ch.truth) or 'none'}: {a} said {', '.join(ch.before) or 'none'} "
            f"({ch.score_before:.3f}), {b} says {', '.join(ch.after) or 'none'} ({ch.score_after:.3f})"
        )
        items.append(
            _card(
                f"item change {verdict}",
                (ch.path,),
                f'<b>{esc(Path(ch.path).name)}</b> <span class="verdict">{verdict}</span><br>{esc(caption)}',
                confidence=f"{ch.score_after:.6f}",
                index=str(ch.index),
            )
        )
    more = f'<p class="more">and {len(c.changed) - MAX_FINDINGS} more</p>' if len(c.changed) > MAX_FINDINGS else ""
    return (
        f'<section id="compare"><h2>{esc(a)} vs {esc(b)}</h2>{table}'
        f"<h3>predictions that changed ({len(c.changed)} of {len(paths)} images)</h3>"
        f'<div class="items" id="changed">{"".join(items)}</div>{more}</section>'
    )


def quality_html(q: QualityReport) -> str:
    issues = []
    for issue in q.label_issues[:MAX_FINDINGS]:
        issues.append(
            _card(
                "item issue",
                (issue.path,),
                f"<b>#{issue.rank} {esc(Path(issue.path).name)}</b><br>labelled "
                f"{esc(' + '.join(issue.given) or 'none')}, looks like {esc(' + '.join(issue.suggested) or 'none')} "
                f"({issue.suggested_probability:.2f}; its label {issue.self_confidence:.2f})"
                f"{'' if issue.in_holdout else ' [training set]'}<br><i>{esc(issue.action)}</i>",
                confidence=f"{issue.self_confidence:.6f}",
            )
        )
    pairs = []
    for d in q.near_duplicates[:MAX_FINDINGS]:
        pairs.append(
            _card(
                "pair duplicate",
                (d.path_a, d.path_b),
                f"{esc(Path(d.path_a).name)} ({esc(', '.join(d.labels_a))}) ~ {esc(Path(d.path_b).name)} "
                f"({esc(', '.join(d.labels_b))}), cosine {d.cosine:.3f}<br><i>{esc(d.action)}</i>",
            )
        )
    leaks = []
    for x in q.leaks[:MAX_FINDINGS]:
        leaks.append(
            _card(
                "pair leak",
                (x.holdout_path, x.train_path),
                f"holdout {esc(x.holdout_path)} {'=' if x.kind == 'exact' else '~'} training "
                f"{esc(x.train_path)} ({esc(x.kind)}, cosine {x.cosine:.3f})<br><i>{esc(x.action)}</i>",
            )
        )

    def more(found, shown):
        if not found:
            return '<p class="none">none found</p>'
        return f'<p class="more">and {len(found) - len(shown)} more</p>' if len(found) > len(shown) else ""

    leaked = len({x.holdout_path for x in q.leaks})
    leak_text = (
        f"checked against {esc(q.train_source)}: {leaked} holdout images are in it ({len(q.leaks)} pairs)"
        if q.leakage_checked
        else "not checked"
    )
    notes = "".join(f"<li>{esc(n)}</li>" for n in q.notes)
    return (
        '<section id="quality"><h2>data quality</h2>'
        + (f'<ul class="notes">{notes}</ul>' if notes else "")
        + f"<h3>likely label errors ({len(q.label_issues)}, most likely first; cleanlab on out-of-fold "
        f'logistic-regression probabilities)</h3><div class="items" id="label-issues">{"".join(issues)}</div>'
        + more(q.label_issues, issues)
        + f"<h3>near duplicates inside the holdout ({len(q.near_duplicates)} pairs)</h3>"
        f'<div class="items" id="near-duplicates">{"".join(pairs)}</div>'
        + more(q.near_duplicates, pairs)
        + f"<h3>leakage from the training set: {leak_text}</h3>"
        f'<div class="items" id="leaks">{"".join(leaks)}</div>' + more(q.leaks, leaks) + "</section>"
    )


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f4f4f4}table.matrix td a{font-weight:bold;color:#a00}
.items{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;padding:6px;border:1px solid #ddd;border-radius:4px;width:190px;font-size:12px;background:#fafafa}
figure.pair{width:280px}
img.thumb{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#000;margin:2px}
blockquote.thumb-text{margin:2px;padding:4px;max-height:9em;overflow:auto;font-size:11px;background:#fff;border-left:3px solid #ccc}
.group{margin:1em 0;padding-top:.3em;border-top:1px solid #eee}.group:target{background:#fff6d5}
.plots img{max-width:620px;margin:4px;border:1px solid #eee}td.better{color:#070}td.worse{color:#a00}
.fixed .verdict{color:#070}.broken .verdict{color:#a00}.notes li{color:#864}
button.sort{margin-right:6px}.sweeps{display:flex;flex-wrap:wrap;gap:1.5em}.sweeps h3{font-size:14px}
"""

# Sorting happens here, in the browser; the page's default order (most confident mistake
# first) is written by Python, so the page reads the same without JS.
JS = """
function sortItems(direction){
  document.querySelectorAll('.sortable .items').forEach(function(box){
    Array.from(box.children).sort(function(a,b){
      return direction*(parseFloat(a.dataset.confidence)-parseFloat(b.dataset.confidence));
    }).forEach(function(item){box.appendChild(item);});
  });
  document.body.dataset.sorted = direction > 0 ? 'ascending' : 'descending';
}
document.addEventListener('DOMContentLoaded', function(){
  var bar = document.getElementById('sort-controls');
  [['most confident first',-1],['least confident first',1]].forEach(function(choice){
    var button = document.createElement('button');
    button.className = 'sort'; button.textContent = choice[0];
    button.addEventListener('click', function(){sortItems(choice[1]);});
    bar.appendChild(button);
  });
  document.body.dataset.js = 'ready';
});
"""


def render_html(run: EvalRun, quality: QualityReport | None, plots: dict[str, Path]) -> str:
    e, h = run.evaluation, run.holdout
    card = e.head.card
    title = f"{e.head.title} on {h.source}"
    plots_html = "".join(
        f'<img class="plot" id="plot-{esc(name)}" src="{_png_uri(path)}" alt="{esc(name)}">'
        for name, path in plots.items()
    )
    skipped = "".join(f"<li>{esc(p)}: {esc(why)}</li>" for p, why in h.skipped)
    missing = (
        f"<p class='notes'>Head labels with no holdout image (no recall measured): "
        f"{esc(', '.join(e.missing_labels))}</p>"
        if e.missing_labels
        else ""
    )
    head_info = (
        f"{card.kind}, {'multi-label' if card.multi_label else 'single-label'}, "
        f"{'live' if e.head.live else 'not live'}, created {card.created}"
    )
    body = [
        f"<h1>{esc(title)}</h1>",
        f"<p>{esc(head_info)}; {len(h)} images evaluated, {len(h.skipped)} skipped. Scores from the version's "
        "model.onnx (onnxruntime, CPU); labels accepted with the head's own thresholds.</p>",
        missing,
        f'<section id="metrics"><h2>metrics</h2>{metrics_html(e)}{sweep_html(e)}</section>',
        f'<section id="matrix"><h2>confusion matrix</h2><p>Rows: actual; columns: '
        f"{'counts per label' if e.multi_label else 'top label'}. A red number links to its images.</p>"
        f"{confusion_html(e)}</section>",
        f'<section id="plots" class="plots"><h2>plots</h2>{plots_html}<p>ECE = sum over bins of '
        "(images in bin / all images) x |share right in bin - mean score in bin|, over the 10 equal-width "
        "bins of the reliability diagram.</p></section>",
        '<section id="mistakes" class="sortable"><h2>mistakes</h2><div id="sort-controls"></div>'
        f"{groups_html(e, h.paths)}</section>",
    ]
    if run.comparison is not None:
        body.append(compare_html(run.comparison, h.paths))
    if quality is not None:
        body.append(quality_html(quality))
    body.append(f'<section id="skipped"><h2>skipped files ({len(h.skipped)})</h2><ul>{skipped}</ul></section>')
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{''.join(body)}"
        f"<script>{JS}</script></body></html>"
    )


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_report(run: EvalRun, quality: QualityReport | None, folder: Path) -> ReportFiles:
    """Plots, metrics.json, corrections.csv and index.html into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    e = run.evaluation
    plots = {
        "confusion": confusion_png(e, folder / "confusion.png"),
        "precision-recall": pr_png(e, folder / "precision_recall.png"),
        "reliability": reliability_png(e, folder / "reliability.png"),
    }
    plots = {name: path for name, path in plots.items() if path is not None}
    metrics = {"evaluation": e.metrics}
    if run.comparison is not None:
        c = run.comparison
        metrics["comparison"] = {
            "a": c.a.head.title,
            "b": c.b.head.title,
            "b_metrics": c.b.metrics,
            "side_by_side": [{"metric": name, "a": x, "b": y} for name, x, y in c.rows],
            "changed": [
                {"path": ch.path, "truth": list(ch.truth), "a": list(ch.before), "b": list(ch.after)}
                for ch in c.changed
            ],
        }
    if quality is not None:
        metrics["quality"] = quality.as_dict()
    metrics_path = folder / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
    corrections_path = write_corrections(
        corrections(quality, e.head.card.name) if quality else [], folder / "corrections.csv"
    )
    html_path = folder / "index.html"
    html_path.write_text(render_html(run, quality, plots), encoding="utf-8")
    return ReportFiles(folder, html_path, metrics_path, corrections_path, plots)


def make_report(
    options: EvalOptions, folder: Path, progress: Callable[[int, int], None] | None = None, quality: bool = True
) -> tuple[EvalRun, QualityReport | None, ReportFiles]:
    """The whole `headmaster eval`: evaluate, check the data, write the report."""
    run = run_eval(options, progress)
    checked = check_quality(run.holdout, run.evaluation.head.card, run.embed, options.train_data) if quality else None
    return run, checked, write_report(run, checked, folder)
