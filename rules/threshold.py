"""The rule kernel: what a head's scores and metadata mean (accepted labels, tasks, OOD, A/B arms).

One implementation, run inside Triton by the served threshold model (``served/threshold.py``, which
imports this module from a copy beside it in its version folder: see there) and in-process by the
CPU tools (training, evaluation, the int8 gate, rescore). Numpy only, faiss-cpu where it is
installed, boto3 for a reference set in S3; it imports nothing else of headmaster, so that the
copy runs in a Triton stub with no headmaster installed (tests/unit/test_import_contracts.py).

Every head model emits its scores together with ``INFO``, a JSON string baked into that
head version's ONNX graph (version, labels, thresholds, multi_label). The threshold step applies
the thresholds it receives *with* the scores, so a hot swap can never pair new weights with
old labels or thresholds: both come out of the same execution of the same version.

faiss-cpu runs the kNN search of the out-of-distribution rule where it is installed; without it
the same exact search runs as a numpy matmul.

Tasks (INFO's ``task``; absent for yesterday's flat heads): ``hierarchy`` heads score every
node of a taxonomy (INFO ``parents``: child -> parent) with a sigmoid and answer one consistent
path, root first; ``regression`` heads give one raw number (``value``, held in INFO ``range``);
``ordinal`` heads give probabilities over ordered classes and answer the median ``class`` and
the ``expected`` rank. ``accepted_mask`` / ``head_results`` are the one implementation.

Out of distribution: a head version trained with a reference set (``ood.npy`` beside its
``model.onnx``, described by the ``ood`` entry of its INFO; read from the bucket with boto3 when
Triton serves an S3 repository; a large set's IVF index, ``ood.faiss``, is built once when the
version is published and read by the served model, never rebuilt) is asked, per image, how far the
embedding lies from the training embeddings: the cosine distance to the k-th nearest
reference. Beyond the version's threshold the image is ``"ood": true``; an ``abstain`` head
then accepts no label, a ``flag`` head labels as usual. ``ood_rule`` is the one implementation,
run by the served threshold model and by the CPU tools (``repository/head_version.py``).

A/B and shadow versions (``repository/ab.py``): while a head tests a candidate version,
the ensembles run both versions of the head on every item (heads are one small matmul) and hand
the candidate's SCORES/INFO to the threshold step. Each item's arm
is a pure function of the image's sha256 (:func:`in_candidate_arm`), so the same image always
gets the same arm, on every replica and in every run; ``shadow`` never lets the candidate
answer (:func:`ab_results`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re

import numpy as np

OOD_FILE = "ood.npy"  # float16 [R, D]: L2-normalised training embeddings of the head version
# An IVF reference set's faiss index (faiss.serialize_index), built once when the version is
# published; its sha256 is the ood entry's index_sha256. Versions without it build the index.
OOD_INDEX_FILE = "ood.faiss"
OOD_POLICIES = ("abstain", "flag")
# The repository Triton was started on (`headmaster serve` and the Helm chart set it): where an
# S3-served model finds the head versions' reference sets.
REPOSITORY_ENV = "HEADMASTER_REPOSITORY"


def in_candidate_arm(sha256_hex: str, share: float) -> bool:
    """Whether an item (its image's sha256, hex) falls in the candidate's share: the first 64
    bits of the digest as a fraction of 2**64, below ``share``. SHA-256 bits are uniform, so
    over n items the share is met within about sqrt(share*(1-share)/n)."""
    return int(sha256_hex[:16], 16) < share * 2.0**64


def item_keys(request_image, request_sha256, embedding: np.ndarray) -> list[str]:
    """Each item's arm key: the sha256 of its image bytes (``classify``), the sha256 the caller
    sent with a stored embedding (``classify_embedding``), else the sha256 of the embedding."""
    if request_image is not None:
        return [hashlib.sha256(bytes(b)).hexdigest() for b in request_image.reshape(-1)]
    if request_sha256 is not None:
        keys = [bytes(b).decode("ascii", "replace").strip().lower() for b in request_sha256.reshape(-1)]
        if all(len(k) == 64 and all(c in "0123456789abcdef" for c in k) for k in keys):
            return keys
    return [hashlib.sha256(np.ascontiguousarray(row, np.float32).tobytes()).hexdigest() for row in embedding]


def ab_results(answer: list[dict], candidate: list[dict], keys: list[str], test: dict) -> list[tuple[dict, str, bool]]:
    """Per item: (the result that answers, its arm, whether both versions accepted the same
    labels). The answer carries the other arm's result under ``ab``."""
    out = []
    for live_result, candidate_result, key in zip(answer, candidate, keys):
        arm = "candidate" if test["mode"] == "canary" and in_candidate_arm(key, float(test["share"])) else "live"
        agree = set(live_result["labels"]) == set(candidate_result["labels"])
        chosen, other = (candidate_result, live_result) if arm == "candidate" else (live_result, candidate_result)
        chosen = {
            **chosen,
            "ab": {
                "mode": test["mode"],
                "arm": arm,
                "agree": agree,
                "other": {k: other[k] for k in ("version", "labels", "scores")},
            },
        }
        out.append((chosen, arm, agree))
    return out


def references_sha256(references: np.ndarray) -> str:
    """The digest INFO carries of a reference set: its dtype, shape and bytes."""
    references = np.ascontiguousarray(references)
    digest = hashlib.sha256(f"{references.dtype.str}{references.shape}".encode())
    digest.update(references.tobytes())
    return digest.hexdigest()


def load_references(folder: str, ood: dict) -> np.ndarray:
    """A version's reference set, refused unless it is the one its INFO names."""
    return _checked(np.load(os.path.join(folder, OOD_FILE), allow_pickle=False), ood, os.path.join(folder, OOD_FILE))


def _checked(references: np.ndarray, ood: dict, where: str) -> np.ndarray:
    if references_sha256(references) != ood["sha256"]:
        raise ValueError(f"{where} is not the reference set this version was made with")
    return references


def s3_parts(url: str) -> tuple[str | None, str, str]:
    """(endpoint, bucket, prefix) of Triton's ``s3://[http(s)://host:port/]bucket/prefix``; the
    endpoint None (AWS, or AWS_ENDPOINT_URL) for the plain form. The same reading as
    ``repository/s3.py``, which this model cannot import inside NVIDIA's container."""
    rest = url[len("s3://") :]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    scheme = re.match(r"^(https?)://", rest)
    if scheme:
        rest = rest[scheme.end() :]
    first, _, after = rest.partition("/")
    if scheme or re.fullmatch(r"[A-Za-z0-9.\-]+:\d+", first):
        endpoint, rest = f"{scheme.group(1) if scheme else 'http'}://{first}", after
    bucket, _, prefix = rest.partition("/")
    return endpoint, bucket, prefix.strip("/")


def fetch_references(repository_url: str, head: str, version: int, ood: dict) -> np.ndarray:
    """A version's reference set read from the bucket Triton serves: Triton copies each model
    of an S3 repository into its own temporary folder, so the head versions are not beside
    this model there. Credentials as Triton's own (AWS_* in the environment)."""
    import io

    where, body = _fetch(repository_url, head, version, OOD_FILE)
    return _checked(np.load(io.BytesIO(body), allow_pickle=False), ood, where)


def _fetch(repository_url: str, head: str, version: int, name: str) -> tuple[str, bytes]:
    import boto3

    endpoint, bucket, prefix = s3_parts(repository_url)
    key = "/".join(p for p in (prefix, head, str(version), name) if p)
    body = boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
    return f"s3://{bucket}/{key}", body


def index_sha256(data: bytes) -> str:
    """The digest INFO's ``ood.index_sha256`` carries of a serialized faiss index."""
    return hashlib.sha256(data).hexdigest()


def _checked_index(data: bytes, ood: dict, where: str) -> bytes:
    if index_sha256(data) != ood["index_sha256"]:
        raise ValueError(
            f"{where} is not the faiss index this version was published with "
            "(its sha256 differs from the ood entry's index_sha256)"
        )
    return data


def load_index(folder: str, ood: dict) -> KnnIndex:
    """A version's kNN index: its stored faiss index (``OOD_INDEX_FILE``, refused unless it
    is the one INFO names) when INFO names one and faiss is here, else built from its
    reference set (exact sets, versions published before the index was stored)."""
    if ood.get("index_sha256") and _has_faiss():
        where = os.path.join(folder, OOD_INDEX_FILE)
        with open(where, "rb") as f:
            return KnnIndex.deserialized(_checked_index(f.read(), ood, where), ood["search"])
    return KnnIndex(load_references(folder, ood), ood.get("search"))


def fetch_index(repository_url: str, head: str, version: int, ood: dict) -> KnnIndex:
    """:func:`load_index` from the bucket Triton serves (see :func:`fetch_references`)."""
    if ood.get("index_sha256") and _has_faiss():
        where, body = _fetch(repository_url, head, version, OOD_INDEX_FILE)
        return KnnIndex.deserialized(_checked_index(body, ood, where), ood["search"])
    return KnnIndex(fetch_references(repository_url, head, version, ood), ood.get("search"))


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


EXACT_MAX = 10_000  # reference sets up to this size are searched exactly; larger ones through IVF
IVF_PROBE = 32  # lists visited per query (of about sqrt(R)): recall measured in benchmarks/ood_knn.py
IVF_ITERATIONS = 10  # k-means iterations that place the lists' centres


def ivf_search(references: int) -> dict | None:
    """The search a reference set of this many rows gets, as its INFO records it: None (exact)
    up to EXACT_MAX rows, else an inverted-file index of about sqrt(R) lists placed by seeded
    spherical k-means over the references, ``probe`` of them visited per query."""
    if references <= EXACT_MAX:
        return None
    return {
        "kind": "ivf",
        "lists": int(round(math.sqrt(references))),
        "probe": IVF_PROBE,
        "seed": 1,
        "iterations": IVF_ITERATIONS,
    }


class KnnIndex:
    """Cosine kNN over a reference set, by the rule its INFO records (``search``): exact (faiss's
    flat inner-product index, the field's library for this) or, for large sets, faiss's
    inverted-file index (IndexIVFFlat, inner product). The lists are placed by faiss's k-means,
    seeded and on one thread, so the server and the CPU tools build the same index from the
    same references. Without faiss the search is exact in numpy (for an IVF set, its k-th
    distances can then only be nearer than the server's)."""

    def __init__(self, references: np.ndarray, search: dict | None = None):
        self.references = np.ascontiguousarray(references, dtype=np.float32)
        self.search = search
        if search is not None and search.get("kind") != "ivf":
            raise ValueError(f"unknown ood search {search.get('kind')!r} (this server knows exact and ivf)")
        try:
            import faiss
        except ImportError:
            self.index = None
            return
        dim = self.references.shape[1]
        if search is None:
            self.index = faiss.IndexFlatIP(dim)
            self.index.add(self.references)
            return
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # one thread: the same centres wherever the index is built
        try:
            lists = max(1, min(int(search["lists"]), len(self.references)))
            kmeans = faiss.Kmeans(
                dim,
                lists,
                niter=int(search.get("iterations", IVF_ITERATIONS)),
                seed=int(search.get("seed", 1)),
                spherical=True,
            )
            kmeans.train(self.references)
            self._quantizer = faiss.IndexFlatIP(dim)  # the IVF index does not own it: keep it alive
            self._quantizer.add(kmeans.centroids)
            self.index = faiss.IndexIVFFlat(self._quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
            self.index.is_trained = True  # the centres are given
            self.index.add(self.references)
            self.index.nprobe = max(1, min(int(search["probe"]), lists))
        finally:
            faiss.omp_set_num_threads(threads)
        self.references = self.references[:0]  # the index holds its own copy: don't keep two

    @classmethod
    def deserialized(cls, data: bytes, search: dict) -> KnnIndex:
        """The index :meth:`serialized` wrote (faiss.deserialize_index), probed as ``search`` says."""
        import faiss

        self = cls.__new__(cls)
        self.search = search
        self.index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        self.references = np.zeros((0, self.index.d), np.float32)
        if search.get("kind") != "ivf" or not hasattr(self.index, "nprobe"):
            raise ValueError(f"a stored faiss index goes with an ivf search, not {search.get('kind')!r}")
        self.index.nprobe = max(1, min(int(search["probe"]), int(self.index.nlist)))
        return self

    def serialized(self) -> bytes:
        """The faiss index as bytes (faiss.serialize_index), what ``OOD_INDEX_FILE`` holds."""
        import faiss

        if self.index is None:
            raise ValueError("no faiss here: an index cannot be stored without faiss")
        return faiss.serialize_index(self.index).tobytes()

    def __len__(self) -> int:
        return int(self.index.ntotal) if self.index is not None else len(self.references)

    def similarities(self, queries: np.ndarray, k: int) -> np.ndarray:
        """[n, k] cosine similarities to the k nearest references found, nearest first (-inf
        where an inverted-file search found fewer than k candidates)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        if self.index is not None:
            sims = self.index.search(queries, k)[0]
            return np.where(sims < -1e30, -np.inf, sims)  # faiss marks missing neighbours with -FLT_MAX
        sims = queries @ self.references.T
        top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        return -np.sort(-top, axis=1)


def knn_distance(index: KnnIndex, embeddings: np.ndarray, k: int) -> np.ndarray:
    """[n] cosine distance of each embedding to its k-th nearest reference, held in [0, 2]:
    rounding takes unit vectors a hair past a cosine of 1, and a missing neighbour counts as
    the farthest possible."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    return np.clip(1.0 - index.similarities(embeddings, k)[:, -1], 0.0, 2.0).astype(np.float32)


def ood_rule(distances: np.ndarray, ood: dict) -> np.ndarray:
    """[n] bool: which images lie beyond the version's distance threshold."""
    return np.asarray(distances) > float(ood["threshold"])


TASKS = ("labels", "hierarchy", "regression", "ordinal")  # INFO without "task": labels (yesterday's heads)
ORDINAL_CUT = 0.5  # an ordinal answer is the median class: the last k with P(class >= k) >= this


def task_of(info: dict) -> str:
    return info.get("task", "labels")


def depths(labels: list[str], parents: dict) -> np.ndarray:
    """[L] depth of each label in its taxonomy (roots: 0)."""
    out = []
    for label in labels:
        d, node = 0, label
        while node in parents:
            node, d = parents[node], d + 1
        out.append(d)
    return np.array(out, dtype=np.int64)


def hierarchy_mask(scores: np.ndarray, info: dict) -> np.ndarray:
    """The consistent path of each row: from the roots down, the best-scoring node among the
    chosen parent's children that reaches its threshold; the path stops at the deepest
    confident level, so a child is never accepted without its parent."""
    labels, parents = info["labels"], info["parents"]
    passed = scores >= np.asarray(info["thresholds"], dtype=np.float32)
    level = depths(labels, parents)
    parent = np.array([labels.index(parents[label]) if label in parents else -1 for label in labels])
    mask = np.zeros_like(passed)
    rows = np.arange(len(scores))
    chosen = np.full(len(scores), -1)  # the node chosen one level up (-1: the root level)
    for d in range(int(level.max()) + 1 if len(level) else 0):
        candidate = passed & (level == d)[None, :] & (parent[None, :] == chosen[:, None])
        best = np.where(candidate, scores, -np.inf).argmax(axis=1)
        found = candidate[rows, best]
        mask[rows[found], best[found]] = True
        chosen = np.where(found, best, -2)  # -2: no parent chosen, nothing deeper can be
    return mask


def ordinal_class(scores: np.ndarray) -> np.ndarray:
    """[n] class index of ordinal probabilities [n, K]: the median, the last k with
    P(class >= k) >= ORDINAL_CUT (class 0 when none)."""
    above = 1.0 - np.cumsum(scores, axis=1)[:, :-1]  # P(class > k) for k < K-1, falling with k
    return (above >= ORDINAL_CUT).sum(axis=1)


def expected_rank(scores: np.ndarray) -> np.ndarray:
    """[n] expected class index (0 = the first label) under ordinal probabilities [n, K]."""
    return scores @ np.arange(scores.shape[1], dtype=np.float64)


def regression_value(scores: np.ndarray, info: dict) -> np.ndarray:
    """[n] the head's value, held inside the range its training targets spanned."""
    low, high = info["range"]
    return np.clip(scores[:, 0].astype(np.float64), low, high)


def accepted_mask(scores: np.ndarray, info: dict, out_of_distribution: np.ndarray | None = None) -> np.ndarray:
    """Which labels each row of ``scores`` [n, L] accepts under the head's thresholds, [n, L] bool.

    multi-label heads (sigmoid): every label whose score reaches its threshold.
    single-label heads (softmax): of the labels that reach their thresholds, the highest
    scoring one, or none. With a binary head ("cat" / "no cat") and a threshold only on
    "cat", an image below it falls to "no cat". With ``out_of_distribution`` ([n] bool) and an
    ``abstain`` head, those rows accept nothing.
    """
    thresholds = np.asarray(info["thresholds"], dtype=np.float32)
    if scores.ndim != 2 or scores.shape[1] != len(info["labels"]):
        raise ValueError(f"scores of shape {scores.shape} do not match {len(info['labels'])} labels")
    task = task_of(info)
    if task == "regression":  # a value, no label to accept
        return np.zeros(scores.shape, dtype=bool)
    if task == "hierarchy":
        return _abstain(hierarchy_mask(scores, info), info, out_of_distribution)
    if task == "ordinal":
        mask = np.zeros(scores.shape, dtype=bool)
        mask[np.arange(len(scores)), ordinal_class(scores)] = True
        return _abstain(mask, info, out_of_distribution)
    passed = scores >= thresholds
    if info["multi_label"]:
        return passed
    best = np.where(passed, scores, -np.inf).argmax(axis=1)
    mask = np.zeros_like(passed)
    rows = np.arange(len(scores))
    mask[rows, best] = passed[rows, best]
    return _abstain(mask, info, out_of_distribution)


def _abstain(mask: np.ndarray, info: dict, out_of_distribution: np.ndarray | None) -> np.ndarray:
    if out_of_distribution is None or (info.get("ood") or {}).get("policy") != "abstain":
        return mask
    return mask & ~np.asarray(out_of_distribution, dtype=bool)[:, None]


def accept(scores: np.ndarray, info: dict, out_of_distribution: np.ndarray | None = None) -> list[list[str]]:
    """The accepted label names of each row (see accepted_mask)."""
    labels = info["labels"]
    mask = accepted_mask(scores, info, out_of_distribution)
    if task_of(info) == "hierarchy":  # a path: root first
        level = depths(labels, info["parents"])
        return [[labels[j] for j in sorted(np.flatnonzero(row), key=lambda j: level[j])] for row in mask]
    return [[labels[j] for j in np.flatnonzero(row)] for row in mask]


def head_results(scores: np.ndarray, info: dict, distances: np.ndarray | None = None) -> list[dict]:
    """The per-image JSON of one head: version, accepted labels, score per label, and for a
    version with a reference set ``ood`` and ``ood_distance``."""
    flags = None if distances is None else ood_rule(distances, info["ood"])
    accepted = accept(scores, info, flags)
    names = info["labels"]
    results = [
        {"version": info["version"], "labels": labels, "scores": dict(zip(names, map(float, row)))}
        for labels, row in zip(accepted, scores)
    ]
    task = task_of(info)
    if task == "regression":
        for result, value in zip(results, regression_value(scores, info)):
            result["value"] = float(value)
    elif task == "ordinal":
        for result, k, rank in zip(results, ordinal_class(scores), expected_rank(scores)):
            result.update({"class": names[int(k)], "expected": float(rank)})
    elif task == "hierarchy":
        for result in results:
            result["depth"] = len(result["labels"])  # levels answered (0: not even a root was confident)
    if flags is not None:
        for result, flag, distance in zip(results, flags, distances):
            result.update(ood=bool(flag), ood_distance=round(float(distance), 6))
    return results
