"""Out of distribution, served: a digits head that knows photos are not digits.

Real data: scikit-learn's handwritten digits are the head's world; the photos that ship with
scikit-learn and scikit-image are not. The encoder is the session's random-weight ViT-S-32,
so "unlike" here means unlike in pixels and texture, not in meaning; a pretrained encoder
separates by content, and its AUROC would be higher (see README, "What was not run here").
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headmaster.client import HeadmasterClient
from headmaster.client.errors import ServerSideError
from headmaster.export.reference import held_out_images, reference_images
from headmaster.repository.head_version import HeadVersion
from headmaster.repository.repo import Repository
from headmaster.rules.threshold import OOD_FILE, OOD_INDEX_FILE, KnnIndex, knn_distance
from headmaster.training.embeddings import EmbeddingCache, LocalEmbedder, embed_files
from headmaster.training.heads.train_head import TrainOptions, train_head
from tests.helpers import ARTIFACTS, build_repo, read_until_ready, run_cli, start_server

TRAIN = 1200  # digits trained on; the next HOLD are the in-distribution holdout
HOLD = 200


def _photos() -> dict[str, bytes]:
    return {Path(name).name: data for name, data in reference_images() + held_out_images(faces=0, digits=0)}


@pytest.fixture(scope="module")
def ood_setup(encoder_dir, digits_dir, embedding_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("ood")
    repo = build_repo(encoder_dir, root / "repo", heads={"animal": (["cat=a cat", "dog=a dog"], ("{}",), {})})
    paths = sorted(digits_dir.rglob("*.png"))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(paths))
    train, hold = root / "train", root / "holdout"
    for i in order[:TRAIN]:
        (train / paths[i].parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(paths[i], train / paths[i].parent.name)
    for i in order[TRAIN : TRAIN + HOLD]:
        (hold / paths[i].parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(paths[i], hold / paths[i].parent.name)
    photos = root / "photos"
    photos.mkdir()
    for name, data in _photos().items():
        (photos / name).write_bytes(data)
    result = train_head(TrainOptions(name="digit", repo=repo, data=train, cache_dir=embedding_cache, ood="abstain"))
    server = start_server(repo, ARTIFACTS)
    yield {
        "repo": repo,
        "train": train,
        "holdout": hold,
        "photos": photos,
        "server": server,
        "card": result.card,
        "cache": embedding_cache,
    }
    server.stop()


def test_a_trained_version_carries_its_reference_set(ood_setup):
    card = ood_setup["card"]
    assert card.ood["policy"] == "abstain" and card.ood["references"] == card.details["data"]["train"]
    folder = Repository(ood_setup["repo"]).version_dir("digit")
    assert (folder / OOD_FILE).is_file()
    assert card.details["ood"]["validation_kept"] >= 0.95
    assert json.loads((folder / "head.json").read_text())["ood"] == card.ood


def test_served_results_say_ood_as_the_cpu_path_does_and_abstain(ood_setup):
    """Digits the head never saw are mostly kept; photos mostly flagged and given no label; the
    server's flags and distances equal HeadVersion's (one rule, two places)."""
    repo, server = ood_setup["repo"], ood_setup["server"]
    digits = sorted(ood_setup["holdout"].rglob("*.png"))[:48]
    photos = sorted(ood_setup["photos"].iterdir())
    with HeadmasterClient(server.http_url, "http", batch_size=8) as client:
        served = client.classify([str(p) for p in digits + photos])
    head = HeadVersion.load(repo, "digit")
    embeddings = np.stack([r.embedding for r in served])
    distances = head.ood_distances(embeddings)
    flags = head.out_of_distribution(embeddings)
    got = [r.heads["digit"] for r in served]
    assert [g.ood for g in got] == flags.tolist()
    np.testing.assert_allclose([g.ood_distance for g in got], distances, atol=1e-4)
    accepted = head.accepted(head.scores(embeddings), embeddings)
    assert [list(g.labels) for g in got] == accepted
    assert all(not g.labels for g in got if g.ood)  # abstain: no label for what lies outside
    digit_flags, photo_flags = flags[: len(digits)], flags[len(digits) :]
    assert digit_flags.mean() <= 0.2 and photo_flags.mean() >= 0.5, (digit_flags.mean(), photo_flags.mean())
    # Day two: the zero-shot head made without a reference set answers exactly as before.
    assert all(r.heads["animal"].ood is None for r in served)
    assert all(set(r.heads["animal"].as_dict()) == {"version", "labels", "scores"} for r in served)


def test_an_ivf_version_is_served_as_the_cpu_path_searches_it(ood_setup, monkeypatch):
    """A version whose reference set is searched through IVF (EXACT_MAX lowered so that 1,200 digits
    are "large"): train-head stores the index it built (ood.faiss, its sha256 on the card); the
    server reads that file and flags what HeadVersion, reading the same file, flags."""
    from headmaster.rules import threshold

    monkeypatch.setattr(threshold, "EXACT_MAX", 500)
    card = train_head(
        TrainOptions(
            name="digit_ivf", repo=ood_setup["repo"], data=ood_setup["train"], cache_dir=ood_setup["cache"], ood="flag"
        )
    ).card
    monkeypatch.undo()
    assert card.ood["search"]["kind"] == "ivf" and card.ood["references"] > 500
    index_file = Repository(ood_setup["repo"]).version_dir("digit_ivf") / OOD_INDEX_FILE
    stored = index_file.read_bytes()
    assert hashlib.sha256(stored).hexdigest() == card.ood["index_sha256"]
    digits = sorted(ood_setup["holdout"].rglob("*.png"))[:48]
    photos = sorted(ood_setup["photos"].iterdir())
    # The server reads that file (it does not build its own): before the first request, a
    # tampered copy is refused, naming the file; put back, the version answers.
    index_file.write_bytes(stored[:-1] + bytes([stored[-1] ^ 1]))
    try:
        with (
            HeadmasterClient(ood_setup["server"].http_url, "http", batch_size=8) as client,
            pytest.raises(ServerSideError, match=r"ood\.faiss is not the faiss index this version was published with"),
        ):
            client.classify([str(digits[0])])
    finally:
        index_file.write_bytes(stored)
    with HeadmasterClient(ood_setup["server"].http_url, "http", batch_size=8) as client:
        served = client.classify([str(p) for p in digits + photos])
    head = HeadVersion.load(ood_setup["repo"], "digit_ivf")
    embeddings = np.stack([r.embedding for r in served])
    got = [r.heads["digit_ivf"] for r in served]
    assert [g.ood for g in got] == head.out_of_distribution(embeddings).tolist()
    np.testing.assert_allclose([g.ood_distance for g in got], head.ood_distances(embeddings), atol=1e-4)
    np.testing.assert_allclose(
        [g.ood_distance for g in got],
        atol=1e-4,
        desired=knn_distance(KnnIndex.deserialized(stored, card.ood["search"]), embeddings, card.ood["k"]),
    )
    assert not all(g.ood for g in got) and any(g.ood for g in got)


def test_ood_flags_and_abstentions_are_counted_on_the_metrics_port(ood_setup):
    """headmaster_ood_total and headmaster_abstentions_total rise by the flags and empty answers."""
    from tests.live_metrics import increase, scrape

    server = ood_setup["server"]
    photos = sorted(ood_setup["photos"].iterdir())
    digits = sorted(ood_setup["holdout"].rglob("*.png"))[:8]
    before = scrape(server.metrics_url)
    with HeadmasterClient(server.grpc_url, batch_size=4) as client:
        got = [r.heads["digit"] for r in client.classify([str(p) for p in digits + photos])]
    rise = increase(before, scrape(server.metrics_url))
    labels = (("head", "digit"), ("version", str(got[0].version)))
    assert sum(g.ood for g in got) >= 1
    assert rise.get(("headmaster_ood_total", labels), 0) == sum(g.ood for g in got)
    assert rise.get(("headmaster_abstentions_total", labels), 0) == sum(not g.labels for g in got)
    assert rise[("headmaster_items_total", labels)] == len(got)
    assert ("headmaster_ood_total", (("head", "animal"), ("version", "1"))) not in rise  # no reference set


def test_hostile_input_beside_ood_heads_fails_alone(ood_setup):
    """A broken image in the batch is refused alone; the others still get their ood answer."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, "PNG")
    with HeadmasterClient(ood_setup["server"].http_url, "http", batch_size=4) as client:
        results = client.classify([buffer.getvalue(), b"not an image at all"])
    assert results[0].ok and results[0].heads["digit"].ood is not None
    assert not results[1].ok


def test_eval_reports_auroc_and_fpr_against_an_ood_folder(ood_setup, tmp_path):
    common = ["--data", ood_setup["holdout"], "--repo", ood_setup["repo"], "--cache-dir", ood_setup["cache"]]
    result = run_cli("eval", "digit", "--report", tmp_path / "r", *common, "--no-quality", "--ood", ood_setup["photos"])
    assert result.returncode == 0, result.stderr
    assert "AUROC" in result.stdout and "FPR at 95% TPR" in result.stdout
    o = json.loads((tmp_path / "r" / "metrics.json").read_text())["evaluation"]["ood"]
    # Recomputed independently from the version's own distances with scikit-learn.
    from sklearn.metrics import roc_auc_score

    repository = Repository(ood_setup["repo"])
    head = HeadVersion.load(repository, "digit")

    def embed(paths):  # the command's cache: the same embeddings, not computed twice
        hashes, vectors, _ = embed_files(
            paths, LocalEmbedder(repository), EmbeddingCache(ood_setup["cache"], repository.fingerprint)
        )
        return np.stack([vectors[h] for h in hashes])

    inside = embed(sorted(ood_setup["holdout"].rglob("*.png")))
    outside = embed(sorted(ood_setup["photos"].iterdir()))
    d_in, d_out = head.ood_distances(inside), head.ood_distances(outside)
    assert o["auroc"] == pytest.approx(
        roc_auc_score(np.r_[np.zeros(len(d_in)), np.ones(len(d_out))], np.r_[d_in, d_out]), abs=1e-6
    )
    assert o["auroc"] > 0.8 and 0 <= o["fpr_at_95_tpr"] <= 1
    assert o["fpr_at_95_tpr"] == pytest.approx((d_out <= np.quantile(d_in, 0.95, method="higher")).mean())
    assert o["holdout_with_rule"]["coverage"] <= o["holdout_without_rule"]["coverage"]
    assert o["ood_labelled_with_rule"] < o["ood_labelled_without_rule"]
    # A head without a reference set, and a folder without images: one line each.
    bad = run_cli(
        "eval",
        "animal",
        "--report",
        tmp_path / "r2",
        "--repo",
        ood_setup["repo"],
        "--data",
        ood_setup["holdout"],
        "--no-quality",
        "--ood",
        ood_setup["photos"],
    )
    assert bad.returncode == 1 and "has no out-of-distribution reference set" in bad.stderr
    assert "Traceback" not in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run_cli("eval", "digit", "--report", tmp_path / "r3", *common, "--no-quality", "--ood", empty)
    assert bad.returncode == 1 and "holds no image files" in bad.stderr and "Traceback" not in bad.stderr


def test_a_tampered_reference_set_is_refused_before_it_goes_live(ood_setup, tmp_path):
    """Rollback / import validate the reference set: another file of the same shape is refused."""
    from headmaster.errors import InvalidVersionError
    from headmaster.lifecycle import operations as lifecycle

    folder = Repository(ood_setup["repo"]).version_dir("digit")
    copy = tmp_path / "digit-copy"
    shutil.copytree(folder, copy)
    # A good copy imports with its reference set, under another name.
    card = lifecycle.import_version(ood_setup["repo"], copy, name="digit_twin").card
    twin = Repository(ood_setup["repo"]).version_dir("digit_twin")
    assert card.ood == ood_setup["card"].ood and (twin / OOD_FILE).read_bytes() == (folder / OOD_FILE).read_bytes()
    references = np.load(copy / OOD_FILE)
    np.save(copy / OOD_FILE, references[::-1])
    with pytest.raises(InvalidVersionError, match="is not the reference set this version was made with"):
        lifecycle.import_version(ood_setup["repo"], copy, name="digit_copy")


@pytest.fixture(scope="module")
def drift_store(ood_setup, tmp_path_factory):
    """A store holding two days of the digit head's traffic: day 1 only unseen digits, day 2
    with 30% of its items photos (27 photos among 90)."""
    import datetime as dt

    from headmaster.store import open_store
    from headmaster.store.base import label_table

    repository = Repository(ood_setup["repo"])
    head = HeadVersion.load(repository, "digit")
    digits = sorted(ood_setup["holdout"].rglob("*.png"))
    digits = [digits[i] for i in np.random.default_rng(1).permutation(len(digits))]  # every digit on both days
    photos = sorted(ood_setup["photos"].iterdir())
    hashes, vectors, _ = embed_files(
        digits + photos, LocalEmbedder(repository), EmbeddingCache(ood_setup["cache"], repository.fingerprint)
    )
    store = open_store(tmp_path_factory.mktemp("drift") / "store")
    days = {
        dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc): hashes[:100],
        dt.datetime(2026, 12, 2, 12, tzinfo=dt.timezone.utc): hashes[100:163] + hashes[len(digits) :],
    }
    assert len(days[dt.datetime(2026, 12, 2, 12, tzinfo=dt.timezone.utc)]) == 90
    for at, day in days.items():
        matrix = np.stack([vectors[h] for h in day])
        store.add_embeddings(day, [None] * len(day), repository.fingerprint, matrix)
        scores = head.scores(matrix)
        store.add_labels(
            "digit",
            [
                label_table(
                    day,
                    repository.fingerprint,
                    head.card.version,
                    scores,
                    head.card.labels,
                    head.accepted_mask(scores, matrix),
                    "classify",
                    at,
                )
            ],
        )
    return store.location


def test_drift_keeps_quiet_on_unseen_digits_and_catches_photos(ood_setup, drift_store, tmp_path):
    common = ["--store", drift_store, "--repo", ood_setup["repo"]]
    quiet = run_cli(
        "drift", "digit", *common, "--since", "2026-12-01", "--until", "2026-12-02", "--json", tmp_path / "quiet.json"
    )
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    report = json.loads((tmp_path / "quiet.json").read_text())
    assert report["n_current"] == 100 and report["drift"] is False
    assert {c["name"] for c in report["checks"]} == {
        "label_share",
        "top_score",
        "ood_rate",
        "embedding_mmd",
        "embedding_classifier",
    }

    drifted = run_cli(
        "drift",
        "digit",
        *common,
        "--since",
        "2026-12-02",
        "--json",
        tmp_path / "day2.json",
        "--html",
        tmp_path / "day2.html",
        "--metrics-file",
        tmp_path / "drift.prom",
    )
    assert drifted.returncode == 3, drifted.stdout + drifted.stderr
    checks = {c["name"]: c for c in json.loads((tmp_path / "day2.json").read_text())["checks"]}
    assert checks["ood_rate"]["drift"] and checks["ood_rate"]["value"] >= 0.2
    assert checks["embedding_mmd"]["drift"] and checks["embedding_classifier"]["drift"]
    assert "DRIFT" in (tmp_path / "day2.html").read_text()
    metrics = (tmp_path / "drift.prom").read_text()
    assert 'headmaster_drift_detected{head="digit",version="1",check="ood_rate"} 1' in metrics

    # Day 1 as the reference instead of the version's training embeddings.
    against_day1 = run_cli(
        "drift",
        "digit",
        *common,
        "--since",
        "2026-12-02",
        "--reference-since",
        "2026-12-01",
        "--reference-until",
        "2026-12-02",
    )
    assert against_day1.returncode == 3, against_day1.stdout + against_day1.stderr


def test_drift_refuses_a_small_window_and_a_head_without_reference(ood_setup, drift_store):
    common = ["--store", drift_store, "--repo", ood_setup["repo"]]
    small = run_cli("drift", "digit", *common, "--since", "2026-12-01", "--until", "2026-12-02", "--min-items", "500")
    assert small.returncode == 1
    assert (
        "the current window (store 2026-12-01T00:00:00+00:00..2026-12-02T00:00:00+00:00) holds 100 items of "
        "head digit; at least 500 are needed to test for drift (change --min-items)"
    ) in " ".join(small.stderr.split())
    none = run_cli("drift", "animal", *common)
    assert none.returncode == 1
    assert "head animal v1 has no reference embeddings" in " ".join(none.stderr.split())
    assert "Traceback" not in small.stderr + none.stderr


def test_every_dashboard_query_returns_series_from_prometheus_scraping_headmaster_serve(ood_setup, tmp_path):
    """A real Prometheus (Debian's) scrapes a real `headmaster serve` of this module's repository
    (a head with a reference set, so OOD and abstentions happen) and loads the alert rules; each
    panel query of the Grafana dashboard, its variables filled in, returns series."""
    import subprocess
    import time
    import urllib.parse
    import urllib.request

    from tests.helpers import Ports, clone_repo, free_port, serve_command

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is missing: apt-get install prometheus")
    monitoring = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
    dashboard = json.loads((monitoring / "grafana-dashboard.json").read_text())
    repo = clone_repo(ood_setup["repo"], tmp_path / "repo")  # the module's server holds the original
    ports, web = Ports.free(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(monitoring / "alerts.yml")],
                "scrape_configs": [
                    {"job_name": "headmaster", "static_configs": [{"targets": [f"127.0.0.1:{ports.metrics}"]}]}
                ],
            }
        )
    )
    serve = subprocess.Popen(serve_command(repo, ports), stderr=subprocess.PIPE, text=True)
    scraper = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),
    )

    def query(expr: str) -> list:
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    try:
        read_until_ready(serve)
        images = [
            str(p) for p in sorted(ood_setup["holdout"].rglob("*.png"))[:12] + sorted(ood_setup["photos"].iterdir())
        ]
        with HeadmasterClient(f"127.0.0.1:{ports.grpc}", batch_size=8) as client:
            for _ in range(4):  # traffic across several scrapes, so that rate() has two samples or more
                assert all(r.ok for r in client.classify(images))
                time.sleep(2)
        deadline = time.monotonic() + 60
        while not query('headmaster_items_total{head="digit"}') and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(3)
        rules = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/rules", timeout=10).read())
        assert {r["health"] for g in rules["data"]["groups"] for r in g["rules"]} == {"ok"}
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                assert (
                    "digit"
                    in json.loads(
                        urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/label/head/values", timeout=10).read()
                    )["data"]
                )
        empty = []
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$head", ".+").replace("$__rate_interval", "1m")
                if not query(expr):
                    empty.append((panel["title"], expr))
        assert empty == []
        assert query('headmaster:ood_rate:1h{head="digit"}')  # the recording rules ran on real series
    finally:
        scraper.terminate()
        serve.terminate()
        scraper.wait(timeout=30)
        serve.wait(timeout=90)
