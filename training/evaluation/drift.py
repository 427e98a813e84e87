"""Drift of a live head: a reference window against a current window of stored items.

Both windows are embeddings: the reference is the head version's own training embeddings (the
reference set it keeps for out-of-distribution search, ``ood.npy``) or a date range of the
store; the current window is a date range of the store. The head version is applied to both
on CPU (as the server's threshold step does), so labels, scores and OOD flags are compared
like with like whatever version answered when the items were stored.

The statistics are Evidently's (0.7, its ``legacy`` stat tests and embedding drift methods):
label share by chi-squared and PSI, the top-score distribution by PSI, embeddings by MMD on
PCA-reduced embeddings with a bootstrap threshold and by a domain classifier's ROC AUC with a
bootstrap threshold; the OOD rate by a one-sided binomial test (scipy) against the reference
rate. PSI under 0.1 reads as stable, over 0.2 as severe (the field's rule of thumb).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from headmaster.errors import DataError, UnsupportedHereError

LOG = logging.getLogger(__name__)

NONE_LABEL = "(none)"  # an item for which the head accepted no label
PSI_SEVERE = 0.2
PSI_MATERIAL = 0.1  # a label share must move at least this much (PSI) to count, however significant
CHI2_P = 0.01
KS_P = 0.01
OOD_P = 0.01
OOD_MARGIN = 0.05  # an OOD rate this much above the reference's, and significant, is drift
PCA_COMPONENTS = 20
MAX_EMBEDDINGS = 1000  # per window, for MMD and the domain classifier (MMD's kernel is n^2)
METRIC_PREFIX = "headmaster_drift_"


@dataclass(frozen=True)
class Window:
    """One window's embeddings, and where they come from (for messages and the report)."""

    name: str  # "reference" or "current"
    source: str  # "head v3 training embeddings", "store 2026-12-01..2026-12-02"
    embeddings: np.ndarray  # float32 [n, D]
    ood_rate: float | None = None  # a known rate (the version's validation), else measured
    trained_on: bool = False  # the version's training embeddings: its scores there are optimistic


@dataclass
class Check:
    name: str  # label_share, top_score, ood_rate, embedding_mmd, embedding_classifier
    statistic: str  # what ``value`` is: psi, p_value, rate, mmd2, roc_auc
    value: float
    threshold: float
    drift: bool
    details: dict = field(default_factory=dict)


@dataclass
class DriftReport:
    head: str
    version: int
    reference: str
    current: str
    n_reference: int
    n_current: int
    checks: list[Check]

    @property
    def drift(self) -> bool:
        return any(c.drift for c in self.checks)

    def as_dict(self) -> dict:
        return {**asdict(self), "drift": self.drift}


def store_window(
    store, head: str, fingerprint: str, since: dt.datetime | None, until: dt.datetime | None, name: str
) -> Window:
    """The embeddings of the items a head labelled between ``since`` (inclusive) and ``until``
    (exclusive), read from the store's label rows and embeddings."""
    import pyarrow.compute as pc

    table = store.labels(head)
    if since is not None:
        table = table.filter(pc.greater_equal(table["at"], since))
    if until is not None:
        table = table.filter(pc.less(table["at"], until))
    hashes = table["sha256"].to_pylist()
    found = store.embeddings(hashes, fingerprint)
    span = f"{since.isoformat() if since else 'start'}..{until.isoformat() if until else 'now'}"
    vectors = [found[h] for h in hashes if h in found]
    dim = next(iter(found.values())).shape[0] if found else 0
    return Window(name, f"store {span}", np.asarray(vectors, np.float32).reshape(len(vectors), dim))


def version_window(head_version) -> Window:
    """The version's own training embeddings (its OOD reference set), and the OOD rate its
    validation measured."""
    from headmaster.rules.threshold import load_references

    if not head_version.has_ood:
        raise DataError(
            f"head {head_version.title} has no reference embeddings (it was trained without --ood); "
            "give a date range of the store as the reference instead",
            option="reference_since",
        )
    references = load_references(str(head_version.folder), head_version.card.ood).astype(np.float32)
    kept = ((head_version.card.details or {}).get("ood") or {}).get("validation_kept")
    return Window(
        "reference",
        f"{head_version.title} training embeddings",
        references,
        None if kept is None else 1.0 - float(kept),
        trained_on=True,
    )


def _first_labels(results: list[dict]) -> list[str]:
    return [r["labels"][0] if r["labels"] else NONE_LABEL for r in results]


def _top_scores(results: list[dict]) -> np.ndarray:
    return np.array([max(r["scores"].values(), default=0.0) for r in results], np.float64)


def _sample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.random.default_rng(seed).choice(len(x), n, replace=False)]


def detect(head_version, reference: Window, current: Window, min_items: int = 50, seed: int = 0) -> DriftReport:
    """Compare two windows under one head version; every check says its statistic and threshold."""
    import pandas as pd

    try:
        from evidently.legacy.calculations.stattests import chi_stat_test, ks_stat_test, psi_stat_test
    except ImportError:
        raise UnsupportedHereError("headmaster drift needs Evidently: pip install 'headmaster[monitor]'") from None
    from evidently.legacy.core import ColumnType
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import mmd, model
    from scipy.stats import binomtest

    for window in (reference, current):
        if len(window.embeddings) < min_items:
            raise DataError(
                f"the {window.name} window ({window.source}) holds {len(window.embeddings)} items of head "
                f"{head_version.card.name}; at least {min_items} are needed to test for drift",
                option="min_items",
            )
    ref = head_version.results(reference.embeddings)
    cur = head_version.results(current.embeddings)
    checks = []
    if head_version.info.get("task", "labels") != "regression":
        ref_labels, cur_labels = pd.Series(_first_labels(ref)), pd.Series(_first_labels(cur))
        # A label the reference never gave makes chi-squared's expectation zero: count it once there.
        missing = sorted(set(cur_labels) - set(ref_labels))
        chi = chi_stat_test(
            pd.concat([ref_labels, pd.Series(missing, dtype=object)]), cur_labels, ColumnType.Categorical, CHI2_P
        )
        psi = psi_stat_test(ref_labels, cur_labels, ColumnType.Categorical, PSI_MATERIAL)
        shares = {
            "reference": ref_labels.value_counts(normalize=True).round(4).to_dict(),
            "current": cur_labels.value_counts(normalize=True).round(4).to_dict(),
        }
        # PSI alone grows with small windows (about (k-1)/n from noise): drift is a significant
        # chi-squared *and* a material PSI.
        checks.append(
            Check(
                "label_share",
                "psi",
                float(psi.drift_score),
                PSI_MATERIAL,
                bool(psi.drifted and chi.drift_score < CHI2_P),
                {"chi2_p_value": float(chi.drift_score), **shares},
            )
        )
        ref_top, cur_top = pd.Series(_top_scores(ref)), pd.Series(_top_scores(cur))
        top = psi_stat_test(ref_top, cur_top, ColumnType.Numerical, PSI_SEVERE)
        ks = ks_stat_test(ref_top, cur_top, ColumnType.Numerical, KS_P)
        details = {
            "reference_mean": float(ref_top.mean()),
            "current_mean": float(cur_top.mean()),
            "ks_p_value": float(ks.drift_score),
        }
        if reference.trained_on:  # a head is surer on what it was fitted to: reported, not judged
            details["not_judged"] = "the reference is the version's training embeddings; use a store window"
        checks.append(
            Check(
                "top_score",
                "psi",
                float(top.drift_score),
                PSI_SEVERE,
                bool(not reference.trained_on and top.drifted and ks.drift_score < KS_P),
                details,
            )
        )
    if head_version.has_ood:
        cur_flags = np.array([r["ood"] for r in cur])
        ref_rate = reference.ood_rate if reference.ood_rate is not None else float(np.mean([r["ood"] for r in ref]))
        rate = float(cur_flags.mean())
        p = binomtest(
            int(cur_flags.sum()), len(cur_flags), min(max(ref_rate, 1e-6), 1 - 1e-6), alternative="greater"
        ).pvalue
        checks.append(
            Check(
                "ood_rate",
                "rate",
                rate,
                ref_rate + OOD_MARGIN,
                bool(rate > ref_rate + OOD_MARGIN and p < OOD_P),
                {"reference_rate": ref_rate, "binomial_p_value": float(p)},
            )
        )
    x = pd.DataFrame(_sample(reference.embeddings, MAX_EMBEDDINGS, seed))
    y = pd.DataFrame(_sample(current.embeddings, MAX_EMBEDDINGS, seed + 1))
    components = min(PCA_COMPONENTS, x.shape[1], len(x), len(y))
    # Evidently's MMD default compares with the bootstrap's 5th percentile; 0.95 is the usual test.
    value, drifted, _ = mmd(bootstrap=True, quantile_probability=0.95, pca_components=components)(y.copy(), x.copy())
    checks.append(
        Check(
            "embedding_mmd",
            "mmd2",
            float(value),
            float("nan"),
            bool(drifted),
            {"pca_components": components, "threshold": "bootstrap 95th percentile"},
        )
    )
    value, drifted, _ = model(bootstrap=True, quantile_probability=0.95, pca_components=components)(y.copy(), x.copy())
    checks.append(
        Check(
            "embedding_classifier",
            "roc_auc",
            float(value),
            float("nan"),
            bool(drifted),
            {"pca_components": components, "threshold": "bootstrap 95th percentile of random AUCs"},
        )
    )
    return DriftReport(
        head_version.card.name,
        head_version.card.version,
        reference.source,
        current.source,
        len(reference.embeddings),
        len(current.embeddings),
        checks,
    )


def to_json(report: DriftReport) -> str:
    def clean(o):
        if isinstance(o, float) and not np.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(report.as_dict()), indent=2)


def to_html(report: DriftReport) -> str:
    """One self-contained page: the windows and one row per check."""
    rows = "".join(
        f"<tr class='{'drift' if c.drift else 'ok'}'><td>{html.escape(c.name)}</td><td>{c.statistic}</td>"
        f"<td>{c.value:.4g}</td><td>{'' if not np.isfinite(c.threshold) else f'{c.threshold:.4g}'}</td>"
        f"<td>{'DRIFT' if c.drift else 'ok'}</td><td><code>{html.escape(json.dumps(c.details))}</code></td></tr>"
        for c in report.checks
    )
    verdict = "drift detected" if report.drift else "no drift"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>drift: {html.escape(report.head)}</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 8px;border-bottom:1px solid #ddd}"
        "tr.drift{background:#fdd}</style></head><body>"
        f"<h1>{html.escape(report.head)} v{report.version}: {verdict}</h1>"
        f"<p>reference: {html.escape(report.reference)} ({report.n_reference} items)<br>"
        f"current: {html.escape(report.current)} ({report.n_current} items)</p>"
        "<table><tr><th>check</th><th>statistic</th><th>value</th><th>threshold</th><th>verdict</th>"
        f"<th>details</th></tr>{rows}</table></body></html>"
    )


def to_metrics(report: DriftReport) -> str:
    """The figures in Prometheus's text format, for node_exporter's textfile collector (or a
    Pushgateway): one gauge per check's statistic, one 0/1 gauge per verdict."""
    labels = f'head="{report.head}",version="{report.version}"'
    lines = [
        f"# HELP {METRIC_PREFIX}statistic value of a drift check's statistic (headmaster drift)",
        f"# TYPE {METRIC_PREFIX}statistic gauge",
    ]
    lines += [
        f'{METRIC_PREFIX}statistic{{{labels},check="{c.name}",statistic="{c.statistic}"}} {c.value:.6g}'
        for c in report.checks
    ]
    lines += [
        f"# HELP {METRIC_PREFIX}detected 1 when a drift check found drift (headmaster drift)",
        f"# TYPE {METRIC_PREFIX}detected gauge",
    ]
    lines += [f'{METRIC_PREFIX}detected{{{labels},check="{c.name}"}} {int(c.drift)}' for c in report.checks]
    lines += [
        f"# HELP {METRIC_PREFIX}window_items items in a drift window (headmaster drift)",
        f"# TYPE {METRIC_PREFIX}window_items gauge",
        f'{METRIC_PREFIX}window_items{{{labels},window="reference"}} {report.n_reference}',
        f'{METRIC_PREFIX}window_items{{{labels},window="current"}} {report.n_current}',
    ]
    return "\n".join(lines) + "\n"
