"""Triton python-backend model: per-head scores + head metadata -> accepted labels (JSON).

Every head model emits its scores together with ``INFO``, a JSON string baked into that
head version's ONNX graph (version, labels, thresholds, multi_label). This step applies
the thresholds it receives *with* the scores, so a hot swap can never pair new weights with
old labels or thresholds: both come out of the same execution of the same version.

Head inputs are optional: a repository adding or removing a head reloads this model and the
``classify`` ensemble one after the other, and either order keeps every request answerable.
Copied as ``model.py``, with the rule kernel (``rules/threshold.py``: the tasks, the
out-of-distribution rule and its kNN search, the A/B arm of each item) beside it; numpy, and
faiss-cpu where it is installed.

A/B and shadow versions (``repository/ab.py``): while a head tests a candidate version, the
ensembles run both versions of the head on every item (heads are one small matmul) and hand the
candidate's SCORES/INFO here as ``SCORES_AB_<head>`` / ``INFO_AB_<head>``. The item's JSON
carries the other arm's answer under ``ab``, and a Prometheus counter
(``headmaster_ab_items_total``) counts items per arm and whether the two versions agreed.
"""

from __future__ import annotations

import json
import os

import numpy as np

# The rule kernel is one module, headmaster.rules.threshold, shared with the CPU tools. Triton's
# python-backend stub (2.51, python_backend's pb_stub.cc, Stub::Initialize) appends the version
# folder, then the model folder, to sys.path before it imports ``<version>.model``; so
# layout.copy_backend copies the kernel into the version folder as ``headmaster_rules.py`` (a name
# nothing installed can shadow) and it is imported from there first. The version folder then
# serves alone, by a Triton that has no headmaster installed (the NVIDIA image, an S3 repository),
# and always with the kernel of the build that wrote it, never a newer one installed beside it.
# Imported as part of the package (tests, benchmarks), there is no such module: the package's.
try:
    import headmaster_rules as kernel  # the copy beside model.py, in Triton
except ImportError:
    from headmaster.rules import threshold as kernel  # imported as part of the package

AB_METRIC = "headmaster_ab_items_total"


class TritonPythonModel:
    """EMBEDDING + (SCORES_<head>, INFO_<head>)... -> RESULT (BYTES [1], JSON per image), and
    EMBEDDING_OUT + SCORES_OUT_<head>: the same tensors handed on as the ensembles' outputs."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.heads = json.loads(params.get("heads", "[]"))
        self.encoder = params.get("encoder", "")  # the fingerprint every RESULT names
        self.ab = json.loads(params.get("ab", "{}"))  # head -> {version, share, mode} of its running test
        self._ab_counters: dict[tuple, object] = {}
        self._ab_family = None
        if self.ab:
            self._ab_family = pb_utils.MetricFamily(
                name=AB_METRIC,
                description="items answered during an A/B or shadow test of a head version, "
                "by arm and by whether the live and candidate versions accepted the same labels",
                kind=pb_utils.MetricFamily.COUNTER,
            )
        self._info_cache: dict[bytes, dict] = {}
        self.live_metrics = LiveMetrics(pb_utils)
        try:  # one search thread: the encoder owns the cores; OpenMP spinning beside it cost 4-7x here
            import faiss

            faiss.omp_set_num_threads(1)
        except ImportError:
            pass
        # Head versions live beside this model in the repository: REPO/<head>/<version>/.
        self.repository = os.path.dirname(os.path.abspath(args["model_repository"]))
        self._indexes: dict[tuple[str, int, str], kernel.KnnIndex] = {}

    def _index(self, head: str, info: dict) -> kernel.KnnIndex:
        # One index per version, read on first use (an IVF version's index was built when it was
        # published): a hot swap brings its own reference set.
        key = (head, int(info["version"]), info["ood"]["sha256"])
        index = self._indexes.get(key)
        if index is None:
            folder = os.path.join(self.repository, head, str(info["version"]))
            for old in [k for k in self._indexes if k[0] == head]:
                del self._indexes[old]
            remote = os.environ.get(kernel.REPOSITORY_ENV, "")
            if remote.startswith("s3://") and not os.path.isdir(folder):
                index = kernel.fetch_index(remote, head, int(info["version"]), info["ood"])
            else:
                index = kernel.load_index(folder, info["ood"])
            self._indexes[key] = index
        return index

    def _info(self, raw: bytes) -> dict:
        # The same few INFO strings arrive with every request: parse each once.
        info = self._info_cache.get(raw)
        if info is None:
            if len(self._info_cache) > 256:
                self._info_cache.clear()
            info = self._info_cache[raw] = json.loads(raw)
        return info

    def _count(self, head: str, live: int, candidate: int, mode: str, arm: str, agree: bool, n: int) -> None:
        key = (head, live, candidate, mode, arm, agree)
        counter = self._ab_counters.get(key)
        if counter is None:
            counter = self._ab_counters[key] = self._ab_family.Metric(
                labels={
                    "head": head,
                    "live_version": str(live),
                    "candidate_version": str(candidate),
                    "mode": mode,
                    "arm": arm,
                    "agree": "true" if agree else "false",
                }
            )
        counter.increment(n)

    def _candidate(self, request, head: str, embedding) -> tuple[np.ndarray, list[dict]] | None:
        """The candidate version's scores and results, when this request's ensemble ran one."""
        test = self.ab.get(head)
        scores = self.pb.get_input_tensor_by_name(request, f"SCORES_AB_{head}")
        info = self.pb.get_input_tensor_by_name(request, f"INFO_AB_{head}")
        if test is None or scores is None or info is None:
            return None
        meta = self._info(info.as_numpy().reshape(-1)[0])
        distances = None
        if meta.get("ood"):
            distances = kernel.knn_distance(self._index(head, meta), embedding, int(meta["ood"]["k"]))
        return scores.as_numpy(), kernel.head_results(scores.as_numpy(), meta, distances)

    def _answer(self, request):
        pb = self.pb
        embedding = pb.get_input_tensor_by_name(request, "EMBEDDING").as_numpy()
        keys: list[str] | None = None
        items = [{"encoder": self.encoder, "heads": {}} for _ in range(len(embedding))]
        # The ensembles expose copies of the embedding and scores made here, so that no
        # ensemble output is also a step's input (see config.ThresholdModel).
        outputs = [pb.Tensor("EMBEDDING_OUT", embedding)]
        for head in self.heads:
            scores = pb.get_input_tensor_by_name(request, f"SCORES_{head}")
            info = pb.get_input_tensor_by_name(request, f"INFO_{head}")
            if scores is None or info is None:  # this request's ensemble has no such head
                continue
            meta = self._info(info.as_numpy().reshape(-1)[0])
            values = scores.as_numpy()
            distances = None
            if meta.get("ood"):
                distances = kernel.knn_distance(self._index(head, meta), embedding, int(meta["ood"]["k"]))
            results = kernel.head_results(values, meta, distances)
            candidate = self._candidate(request, head, embedding) if self.ab else None
            if candidate is not None:
                candidate_scores, candidate = candidate
                if keys is None:
                    image, sha = (pb.get_input_tensor_by_name(request, n) for n in ("IMAGE", "SHA256"))
                    keys = kernel.item_keys(
                        None if image is None else image.as_numpy(), None if sha is None else sha.as_numpy(), embedding
                    )
                test = self.ab[head]
                tally: dict[tuple[str, bool], int] = {}
                chosen = []
                values = np.array(values, copy=True)  # SCORES_OUT: each row from the arm that answered
                for i, (result, arm, agree) in enumerate(kernel.ab_results(results, candidate, keys, test)):
                    chosen.append(result)
                    if arm == "candidate":
                        values[i] = candidate_scores[i]
                    tally[arm, agree] = tally.get((arm, agree), 0) + 1
                for (arm, agree), n in tally.items():
                    self._count(head, int(meta["version"]), int(candidate[0]["version"]), test["mode"], arm, agree, n)
                results = chosen
            for item, result in zip(items, results):
                item["heads"][head] = result
            self.live_metrics.record(head, meta, results)
            outputs.append(pb.Tensor(f"SCORES_OUT_{head}", values))
        out = np.array([[json.dumps(item, separators=(",", ":"))] for item in items], dtype=object)
        return pb.InferenceResponse([pb.Tensor("RESULT", out), *outputs])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._answer(request))
            except Exception as e:  # one malformed request must not fail the others
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(f"{type(e).__name__}: {e}")))
        return responses


# -- live metrics ------------------------------------------------------------------------------
# What each head answers, on Triton's metrics port beside Triton's own per-model counts and
# latencies, labelled by head and by the version that answered: enough for a board and alert
# rules to see a label take over, a rise of abstentions or OOD flags, a shift of confidence.
# Each metric call is one message to the Triton process (about 20-25 us measured here), so
# counts are summed per request and the score distribution is a set of cumulative bucket
# counters (Prometheus's histogram layout, usable by histogram_quantile), not a HISTOGRAM
# family that would cost one call per item.
ITEMS_METRIC = "headmaster_items_total"
ANSWERS_METRIC = "headmaster_answers_total"
ABSTENTIONS_METRIC = "headmaster_abstentions_total"
OOD_METRIC = "headmaster_ood_total"
TOP_SCORE_METRIC = "headmaster_top_score_bucket"
TOP_SCORE_BUCKETS = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # upper bounds; +Inf follows
LIVE_METRICS = {  # name -> (labels beyond head and version, description)
    ITEMS_METRIC: ((), "items answered by a head version"),
    ANSWERS_METRIC: (("label",), "accepted labels per head version and label"),
    ABSTENTIONS_METRIC: (
        (),
        "items for which a head version accepted no label (below every threshold, or abstained as out of distribution)",
    ),
    OOD_METRIC: ((), "items a head version flagged as out of distribution"),
    TOP_SCORE_METRIC: (
        ("le",),
        "items per head version whose highest label score is at most le "
        "(cumulative, as a Prometheus histogram's buckets)",
    ),
}


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else f"{value:g}"


def metric_counts(head: str, task: str, results: list[dict]) -> dict[tuple[str, tuple], int]:
    """The increments one request makes to the live metrics of one head: ``(metric name, label
    pairs) -> count``, summed over the request's items; nothing with a zero count."""
    counts: dict[tuple[str, tuple], int] = {}
    by_version: dict[object, list[dict]] = {}
    for result in results:  # one version, or two during an A/B test
        by_version.setdefault(result["version"], []).append(result)
    bounds = np.array([*TOP_SCORE_BUCKETS, np.inf])
    for version, rows in by_version.items():
        base = (("head", head), ("version", str(version)))
        counts[ITEMS_METRIC, base] = len(rows)
        flagged = sum(1 for r in rows if r.get("ood"))
        if flagged:
            counts[OOD_METRIC, base] = flagged
        if task == "regression":  # a value: no label, no confidence to count
            continue
        for label in (label for r in rows for label in r["labels"]):
            key = (ANSWERS_METRIC, (*base, ("label", label)))
            counts[key] = counts.get(key, 0) + 1
        abstained = sum(1 for r in rows if not r["labels"])
        if abstained:
            counts[ABSTENTIONS_METRIC, base] = abstained
        top = np.sort([max(r["scores"].values(), default=0.0) for r in rows])
        for bound, n in zip(bounds, np.searchsorted(top, bounds, side="right")):  # items <= bound
            if n:
                counts[TOP_SCORE_METRIC, (*base, ("le", _bound(float(bound))))] = int(n)
    return counts


class LiveMetrics:
    """The live metrics of the heads, as Triton custom metric families (COUNTER)."""

    def __init__(self, pb_utils):
        self._logger = getattr(pb_utils, "Logger", None)
        self._failed = False
        self._families = {
            name: pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
            for name, (_, description) in LIVE_METRICS.items()
        }
        self._metrics: dict[tuple[str, tuple], object] = {}

    def record(self, head: str, info: dict, results: list[dict]) -> None:
        """Count one request's answers of one head (``results`` as answered, A/B arms included);
        a failure to count is logged once and never fails the answers."""
        try:
            self._record(head, info, results)
        except Exception as e:  # noqa: BLE001 - metrics must not cost an answer
            if not self._failed and self._logger is not None:
                self._logger.log_warn(f"headmaster live metrics: {type(e).__name__}: {e}")
            self._failed = True

    def _record(self, head: str, info: dict, results: list[dict]) -> None:
        for (name, labels), n in metric_counts(head, kernel.task_of(info), results).items():
            metric = self._metrics.get((name, labels))
            if metric is None:
                if len(self._metrics) > 100_000:  # versions come and go: never grow without end
                    self._metrics.clear()  # (the series restart at 0, which rate() reads as a restart)
                metric = self._metrics[name, labels] = self._families[name].Metric(labels=dict(labels))
            metric.increment(n)
