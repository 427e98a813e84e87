"""Triton python-backend model: per-head scores + head metadata -> accepted labels (JSON).

Every head model emits its scores together with ``INFO``, a JSON string baked into that
head version's ONNX graph (version, labels, thresholds, multi_label). This step applies
the thresholds it receives *with* the scores, so a hot swap can never pair new weights with
old labels or thresholds: both come out of the same execution of the same version.

Head inputs are optional: a repository adding or removing a head reloads this model and the
``classify`` ensemble one after the other, and either order keeps every request answerable.
Copied as ``model.py``; numpy only.
"""

from __future__ import annotations

import json

import numpy as np


def accepted_mask(scores: np.ndarray, info: dict) -> np.ndarray:
    """Which labels each row of ``scores`` [n, L] accepts under the head's thresholds, [n, L] bool.

    multi-label heads (sigmoid): every label whose score reaches its threshold.
    single-label heads (softmax): of the labels that reach their thresholds, the highest
    scoring one, or none. With a binary head ("cat" / "no cat") and a threshold only on
    "cat", an image below it falls to "no cat".
    """
    thresholds = np.asarray(info["thresholds"], dtype=np.float32)
    if scores.ndim != 2 or scores.shape[1] != len(info["labels"]):
        raise ValueError(f"scores of shape {scores.shape} do not match {len(info['labels'])} labels")
    passed = scores >= thresholds
    if info["multi_label"]:
        return passed
    best = np.where(passed, scores, -np.inf).argmax(axis=1)
    mask = np.zeros_like(passed)
    rows = np.arange(len(scores))
    mask[rows, best] = passed[rows, best]
    return mask


def accept(scores: np.ndarray, info: dict) -> list[list[str]]:
    """The accepted label names of each row (see accepted_mask)."""
    labels = info["labels"]
    return [[labels[j] for j in np.flatnonzero(row)] for row in accepted_mask(scores, info)]


def head_results(scores: np.ndarray, info: dict) -> list[dict]:
    """The per-image JSON of one head: version, accepted labels, score per label."""
    accepted = accept(scores, info)
    names = info["labels"]
    return [
        {"version": info["version"], "labels": labels, "scores": dict(zip(names, map(float, row)))}
        for labels, row in zip(accepted, scores)
    ]


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
        self._info_cache: dict[bytes, dict] = {}

    def _info(self, raw: bytes) -> dict:
        # The same few INFO strings arrive with every request: parse each once.
        info = self._info_cache.get(raw)
        if info is None:
            if len(self._info_cache) > 256:
                self._info_cache.clear()
            info = self._info_cache[raw] = json.loads(raw)
        return info

    def _answer(self, request):
        pb = self.pb
        embedding = pb.get_input_tensor_by_name(request, "EMBEDDING").as_numpy()
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
            for item, result in zip(items, head_results(values, meta)):
                item["heads"][head] = result
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
