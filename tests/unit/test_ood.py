"""Out of distribution, without a server: the kNN rule, how a version's reference set is fitted,
carried, validated and applied (real data: scikit-learn's digits as pixels)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from headmaster.errors import ExportError, InvalidVersionError, TrainingError
from headmaster.export.heads import HeadCard, HeadWeights, write_head
from headmaster.repository.validation import check_version_dir
from headmaster.rules import threshold
from headmaster.rules.threshold import OOD_FILE, KnnIndex, head_results, knn_distance, references_sha256
from headmaster.served import threshold as served_threshold
from headmaster.training.heads.ood import K_CANDIDATES, TPR, fit_ood

FINGERPRINT = "sha256:" + "b" * 64


@pytest.fixture(scope="module")
def digits():
    """Digits 0-7 as in-distribution (train / validation), 8 and 9 as images never trained on."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32) - d.data.mean(axis=0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    seen = d.target < 8
    rng = np.random.default_rng(0)
    idx = rng.permutation(np.flatnonzero(seen))
    train, val = idx[:1000], idx[1000:]
    return x[train], d.target[train], x[val], d.target[val], x[~seen]


def test_faiss_and_the_numpy_fallback_find_the_same_neighbours(digits):
    x_train, _, x_val, _, _ = digits
    with_faiss = KnnIndex(x_train)
    assert with_faiss.index is not None  # faiss-cpu is a dependency
    without = KnnIndex(x_train)
    without.index = None
    for k in (1, 7, 50):
        np.testing.assert_allclose(with_faiss.similarities(x_val, k), without.similarities(x_val, k), atol=1e-5)
    # An exact search: the nearest reference of a reference is itself.
    assert np.allclose(knn_distance(with_faiss, x_train[:20], 1), 0.0, atol=1e-5)


def test_fit_keeps_95_percent_of_validation_and_flags_unseen_digits(digits):
    x_train, y_train, x_val, y_val, unseen = digits
    fit = fit_ood(x_train, y_train, x_val, y_val, "abstain")
    assert fit.card["k"] in K_CANDIDATES and fit.card["references"] == len(x_train)
    assert fit.references.dtype == np.float16 and fit.card["sha256"] == references_sha256(fit.references)
    assert set(fit.details["auroc_by_k"]) <= set(K_CANDIDATES)
    index = KnnIndex(fit.references.astype(np.float32))
    kept = (knn_distance(index, x_val, fit.card["k"]) <= fit.card["threshold"]).mean()
    assert TPR <= kept < TPR + 0.02
    # 8s and 9s were never seen: far more of them lie beyond the threshold than the 5% of seen digits.
    flagged = (knn_distance(index, unseen, fit.card["k"]) > fit.card["threshold"]).mean()
    assert flagged > 0.3, flagged


def test_a_capped_reference_set_is_a_seeded_subsample(digits):
    x_train, y_train, x_val, y_val, _ = digits
    a = fit_ood(x_train, y_train, x_val, y_val, "flag", max_references=300, seed=1)
    b = fit_ood(x_train, y_train, x_val, y_val, "flag", max_references=300, seed=1)
    assert a.card == b.card and a.card["references"] == 300 and a.details["subsampled"]
    with pytest.raises(TrainingError, match="ood must be one of off, abstain, flag, not 'maybe'"):
        fit_ood(x_train, y_train, x_val, y_val, "maybe")


def _head(policy: str | None, dim: int = 64) -> tuple[HeadCard, HeadWeights, np.ndarray | None]:
    rng = np.random.default_rng(0)
    weights = HeadWeights(((rng.normal(size=(3, dim)).astype(np.float32), np.zeros(3, np.float32)),), False)
    references = None
    ood = None
    if policy:
        references = rng.normal(size=(50, dim)).astype(np.float32)
        references = (references / np.linalg.norm(references, axis=1, keepdims=True)).astype(np.float16)
        ood = {"k": 1, "threshold": 0.5, "policy": policy, "references": 50, "sha256": references_sha256(references)}
    card = HeadCard(
        name="kind",
        version=2,
        labels=("a", "b", "c"),
        thresholds=(0.0, 0.0, 0.0),
        multi_label=False,
        encoder_fingerprint=FINGERPRINT,
        embed_dim=dim,
        kind="linear",
        ood=ood,
    )
    return card, weights, references


@pytest.mark.parametrize("policy", ["abstain", "flag"])
def test_results_say_ood_with_the_distance_and_an_abstaining_head_accepts_nothing(policy):
    card, weights, references = _head(policy)
    index = KnnIndex(references.astype(np.float32))
    inside = references[:2].astype(np.float32)  # distance 0 to themselves, their own nearest (k=1)
    outside = -inside  # the far side of the sphere
    embeddings = np.concatenate([inside, outside])
    scores = weights.scores(embeddings)
    results = head_results(scores, card.info(), knn_distance(index, embeddings, card.ood["k"]))
    assert [r["ood"] for r in results] == [False, False, True, True]
    assert all(r["ood_distance"] > card.ood["threshold"] for r in results[2:])
    assert all(len(r["labels"]) == 1 for r in results[:2])
    assert all(len(r["labels"]) == (0 if policy == "abstain" else 1) for r in results[2:])


def test_a_version_without_a_reference_set_answers_as_before():
    card, weights, _ = _head(None)
    info = card.info()
    assert "ood" not in info
    results = head_results(weights.scores(np.eye(3, 64, dtype=np.float32)), info)
    assert all(set(r) == {"version", "labels", "scores"} for r in results)


def test_the_reference_set_is_validated_with_the_version(tmp_path):
    card, weights, references = _head("abstain")
    folder = tmp_path / "2"
    write_head(folder, weights, card, references=references)
    assert check_version_dir(folder, FINGERPRINT, 64).ood == card.ood
    # Another set of the same shape: refused, and so is none at all.
    np.save(folder / OOD_FILE, np.flip(references, axis=0))
    with pytest.raises(InvalidVersionError, match=r"ood\.npy: .* is not the reference set this version was made with"):
        check_version_dir(folder, FINGERPRINT, 64)
    (folder / OOD_FILE).unlink()
    with pytest.raises(InvalidVersionError, match=r"ood\.npy is missing"):
        check_version_dir(folder, FINGERPRINT, 64)
    with pytest.raises(ExportError, match="a reference set goes with a card that describes it"):
        write_head(tmp_path / "3", weights, replace(card, version=3))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"policy": "ignore"}, "ood policy must be one of abstain, flag, not 'ignore'"),
        ({"k": 51}, r"ood k must be an integer in \[1, references=50\]"),
        ({"threshold": 3.0}, r"ood threshold is a cosine distance in \[0, 2\]"),
    ],
)
def test_bad_ood_entries_are_refused(change, message):
    card, _, _ = _head("flag")
    with pytest.raises(ExportError, match=message):
        replace(card, ood={**card.ood, **change})


def test_the_threshold_step_reads_each_versions_reference_set_from_the_repository(tmp_path):
    """The python backend, as Triton runs it: REPO/threshold next to REPO/<head>/<version>."""
    card, weights, references = _head("abstain")
    write_head(tmp_path / "repo" / "kind" / "2", weights, card, references=references)
    model = served_threshold.TritonPythonModel.__new__(served_threshold.TritonPythonModel)
    model.repository = str(tmp_path / "repo")
    model._indexes = {}
    index = model._index("kind", card.info())
    assert len(index) == 50 and model._index("kind", card.info()) is index  # built once per version


def _clustered(rng, centres: np.ndarray, n: int) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + 1.2 / np.sqrt(centres.shape[1]) * rng.normal(
        size=(n, centres.shape[1])
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)


def test_a_large_reference_set_is_searched_through_ivf_with_high_recall():
    """Above EXACT_MAX references the card records an IVF search, and its neighbours are the exact
    search's (recall@10 measured on clustered 128-d references of real size)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(400, 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    size = threshold.EXACT_MAX + 5_000
    references, queries = _clustered(rng, centres, size), _clustered(rng, centres, 300)
    assert threshold.ivf_search(threshold.EXACT_MAX) is None
    search = threshold.ivf_search(size)
    assert search["kind"] == "ivf" and search["lists"] == round(size**0.5)
    exact, ivf = KnnIndex(references), KnnIndex(references, search)
    assert len(ivf) == size and ivf.index.nprobe == threshold.IVF_PROBE
    want, got = exact.index.search(queries, 10)[1], ivf.index.search(queries, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got)])
    assert recall >= 0.95, recall
    # An index built again from the same references finds the same neighbours at the same distances.
    np.testing.assert_array_equal(
        knn_distance(KnnIndex(references, search), queries, 10), knn_distance(ivf, queries, 10)
    )


def test_fit_records_the_ivf_search_and_its_threshold_keeps_95_percent(monkeypatch, digits):
    """The threshold of an IVF card is measured with the IVF search the server will run."""
    x_train, y_train, x_val, y_val, _ = digits
    monkeypatch.setattr(threshold, "EXACT_MAX", 500)
    fit = fit_ood(x_train, y_train, x_val, y_val, "flag")
    assert fit.card["search"] == {
        "kind": "ivf",
        "lists": 32,
        "probe": threshold.IVF_PROBE,
        "seed": 1,
        "iterations": threshold.IVF_ITERATIONS,
    }
    index = KnnIndex(fit.references.astype(np.float32), fit.card["search"])
    kept = (knn_distance(index, x_val, fit.card["k"]) <= fit.card["threshold"]).mean()
    assert TPR <= kept < TPR + 0.02
    card, _, _ = _head("flag")
    with pytest.raises(ExportError, match="ood search must be absent"):
        replace(card, ood={**card.ood, "search": {"kind": "hnsw"}})


def test_distances_stay_in_range_on_a_collapsed_set():
    """Unit vectors that are all the same direction give a cosine a hair above 1 by rounding: the
    distance is 0, never below, and the threshold fitted on them is a valid card entry."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=384)
    x = base + 1e-6 * rng.normal(size=(200, 384))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    raw = 1.0 - KnnIndex(x[:150]).similarities(x[150:], 3)[:, -1]
    d = knn_distance(KnnIndex(x[:150]), x[150:], 3)
    assert d.min() >= 0.0 and d.max() <= 2.0 and raw.min() < 0.0  # the rounding is real; the clamp holds it
    y = np.arange(200) % 2
    fit = fit_ood(x[:150], y[:150], x[150:], y[150:], "flag")
    assert fit.card["threshold"] >= 0.0


def test_a_collapsed_embedding_set_is_refused_plainly():
    from headmaster.errors import DataError
    from headmaster.training.heads import checks

    rng = np.random.default_rng(0)
    base = rng.normal(size=384)
    collapsed = base + 1e-6 * rng.normal(size=(60, 384))  # a random-weight DINOv2 on digits: 3e-07 apart
    truth = np.eye(3, dtype=np.int64)[np.arange(60) % 3]
    with pytest.raises(
        DataError,
        match=r"the embeddings of different labels are nearly identical \(the means of "
        r"a, b, c lie within cosine distance \d\.\de-\d\d of each other; 1e-04 or more "
        r"is needed\): the encoder or its preprocessing is wrong for these images",
    ) as e:
        checks.check_spread(collapsed, truth, ("a", "b", "c"))
    assert e.value.option is None and "\n" not in str(e.value)
    spread = rng.normal(size=(60, 384))  # distinct images: accepted
    checks.check_spread(spread, truth, ("a", "b", "c"))
    assert checks.label_spread(spread, truth) > checks.COLLAPSED_DISTANCE


def test_an_ivf_index_is_built_once_at_publish_and_read_back_not_rebuilt(tmp_path, monkeypatch, digits):
    """fit_ood serializes the IVF index it measured the threshold with; write_head stores it as
    ood.faiss with its sha256 on the card; the CPU path and the threshold step read that file and
    find the distances the in-memory index finds; a tampered or missing file is refused."""
    x_train, y_train, x_val, y_val, unseen = digits
    monkeypatch.setattr(threshold, "EXACT_MAX", 500)
    fit = fit_ood(x_train, y_train, x_val, y_val, "flag")
    monkeypatch.undo()
    assert fit.index is not None and fit.card["index_sha256"] == threshold.index_sha256(fit.index)
    base, weights, _ = _head("flag")
    card = replace(base, ood=fit.card)
    folder = tmp_path / "repo" / "kind" / "2"
    write_head(folder, weights, card, references=fit.references, ood_index=fit.index)
    assert (folder / threshold.OOD_INDEX_FILE).read_bytes() == fit.index
    assert check_version_dir(folder, FINGERPRINT, 64).ood == card.ood

    queries = np.concatenate([x_val, unseen])
    in_memory = knn_distance(KnnIndex(fit.references.astype(np.float32), fit.card["search"]), queries, fit.card["k"])
    loaded = threshold.load_index(str(folder), card.ood)
    assert loaded.index.nprobe == threshold.IVF_PROBE and len(loaded) == fit.card["references"]
    np.testing.assert_array_equal(knn_distance(loaded, queries, fit.card["k"]), in_memory)
    model = served_threshold.TritonPythonModel.__new__(served_threshold.TritonPythonModel)
    model.repository, model._indexes = str(tmp_path / "repo"), {}
    np.testing.assert_array_equal(knn_distance(model._index("kind", card.info()), queries, fit.card["k"]), in_memory)

    # Another index of the same references (other centres): refused at load and by validation.
    other = KnnIndex(fit.references.astype(np.float32), {**fit.card["search"], "seed": 7}).serialized()
    assert other != fit.index
    (folder / threshold.OOD_INDEX_FILE).write_bytes(other)
    with pytest.raises(ValueError, match=r"ood\.faiss is not the faiss index this version was published with"):
        threshold.load_index(str(folder), card.ood)
    with pytest.raises(InvalidVersionError, match=r"ood\.faiss is not the faiss index this version was published"):
        check_version_dir(folder, FINGERPRINT, 64)
    (folder / threshold.OOD_INDEX_FILE).unlink()
    with pytest.raises(InvalidVersionError, match=r"ood\.faiss is missing"):
        check_version_dir(folder, FINGERPRINT, 64)
    # A card naming an index is only written with that index.
    with pytest.raises(ExportError, match=r"a faiss index \(ood\.faiss\) goes with a card"):
        write_head(tmp_path / "3", weights, replace(card, version=3), references=fit.references, ood_index=other)


def test_a_version_published_before_the_index_was_stored_builds_it(tmp_path, monkeypatch, digits):
    """An ivf search without index_sha256 (yesterday's versions): no ood.faiss, the index is
    built from the references as before, and finds what the stored index finds."""
    x_train, y_train, x_val, y_val, unseen = digits
    monkeypatch.setattr(threshold, "EXACT_MAX", 500)
    fit = fit_ood(x_train, y_train, x_val, y_val, "flag")
    monkeypatch.undo()
    base, weights, _ = _head("flag")
    old = replace(base, ood={k: v for k, v in fit.card.items() if k != "index_sha256"})
    folder = tmp_path / "2"
    write_head(folder, weights, old, references=fit.references)
    assert not (folder / threshold.OOD_INDEX_FILE).exists()
    assert check_version_dir(folder, FINGERPRINT, 64).ood == old.ood
    built = threshold.load_index(str(folder), old.ood)
    stored = KnnIndex.deserialized(fit.index, fit.card["search"])
    queries = np.concatenate([x_val, unseen])
    np.testing.assert_array_equal(
        knn_distance(built, queries, fit.card["k"]), knn_distance(stored, queries, fit.card["k"])
    )


def test_an_s3_served_threshold_step_fetches_the_stored_index(tmp_path, monkeypatch, digits):
    """Served from a bucket (moto's real S3 server), the threshold step fetches ood.faiss beside
    ood.npy, finds the distances the in-memory index finds, and refuses a tampered object."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.helpers import free_port

    x_train, y_train, x_val, y_val, unseen = digits
    monkeypatch.setattr(threshold, "EXACT_MAX", 500)
    fit = fit_ood(x_train, y_train, x_val, y_val, "flag")
    monkeypatch.undo()
    base, weights, _ = _head("flag")
    card = replace(base, ood=fit.card)
    folder = tmp_path / "local" / "kind" / "2"
    write_head(folder, weights, card, references=fit.references, ood_index=fit.index)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            threshold.REPOSITORY_ENV: f"s3://127.0.0.1:{port}/models/prod",
        }.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        client.create_bucket(Bucket="models")
        for name in (threshold.OOD_FILE, threshold.OOD_INDEX_FILE):
            client.put_object(Bucket="models", Key=f"prod/kind/2/{name}", Body=(folder / name).read_bytes())
        model = served_threshold.TritonPythonModel.__new__(served_threshold.TritonPythonModel)
        model.repository, model._indexes = str(tmp_path / "elsewhere"), {}  # no head folders beside it
        queries = np.concatenate([x_val, unseen])
        in_memory = knn_distance(
            KnnIndex(fit.references.astype(np.float32), fit.card["search"]), queries, fit.card["k"]
        )
        served = model._index("kind", card.info())
        np.testing.assert_array_equal(knn_distance(served, queries, fit.card["k"]), in_memory)
        other = KnnIndex(fit.references.astype(np.float32), {**fit.card["search"], "seed": 7}).serialized()
        client.put_object(Bucket="models", Key=f"prod/kind/2/{threshold.OOD_INDEX_FILE}", Body=other)
        with pytest.raises(ValueError, match=r"^s3://models/prod/kind/2/ood\.faiss is not the faiss index"):
            threshold.fetch_index(f"s3://127.0.0.1:{port}/models/prod", "kind", 2, card.ood)
    finally:
        server.stop()
