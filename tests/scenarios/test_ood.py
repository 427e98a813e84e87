"""Out of distribution, served: a digits head that knows photos are not digits.

Real data: scikit-learn's handwritten digits are the head's world; the photos that ship with
scikit-learn and scikit-image are not. The encoder is the session's random-weight ViT-S-32,
so "unlike" here means unlike in pixels and texture, not in meaning; a pretrained encoder
separates by content, and its AUROC would be higher (see README, "What was not run here").
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headmaster.client import HeadmasterClient
from headmaster.export.reference import held_out_images, reference_images
from headmaster.model_repository.backends.threshold import OOD_FILE
from headmaster.model_repository.head_version import HeadVersion
from headmaster.model_repository.repository import Repository
from headmaster.training.embeddings import EmbeddingCache, LocalEmbedder, embed_files
from headmaster.training.heads.train_head import TrainOptions, train_head
from tests.helpers import ARTIFACTS, build_repo, run_cli, start_server

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
    for i in order[TRAIN:TRAIN + HOLD]:
        (hold / paths[i].parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(paths[i], hold / paths[i].parent.name)
    photos = root / "photos"
    photos.mkdir()
    for name, data in _photos().items():
        (photos / name).write_bytes(data)
    result = train_head(TrainOptions(name="digit", repo=repo, data=train, cache_dir=embedding_cache, ood="abstain"))
    server = start_server(repo, ARTIFACTS)
    yield {"repo": repo, "train": train, "holdout": hold, "photos": photos, "server": server, "card": result.card,
           "cache": embedding_cache}
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
    digit_flags, photo_flags = flags[:len(digits)], flags[len(digits):]
    assert digit_flags.mean() <= 0.2 and photo_flags.mean() >= 0.5, (digit_flags.mean(), photo_flags.mean())
    # Day two: the zero-shot head made without a reference set answers exactly as before.
    assert all(r.heads["animal"].ood is None for r in served)
    assert all(set(r.heads["animal"].as_dict()) == {"version", "labels", "scores"} for r in served)


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
        hashes, vectors, _ = embed_files(paths, LocalEmbedder(repository),
                                         EmbeddingCache(ood_setup["cache"], repository.fingerprint))
        return np.stack([vectors[h] for h in hashes])

    inside = embed(sorted(ood_setup["holdout"].rglob("*.png")))
    outside = embed(sorted(ood_setup["photos"].iterdir()))
    d_in, d_out = head.ood_distances(inside), head.ood_distances(outside)
    assert o["auroc"] == pytest.approx(roc_auc_score(np.r_[np.zeros(len(d_in)), np.ones(len(d_out))],
                                                     np.r_[d_in, d_out]), abs=1e-6)
    assert o["auroc"] > 0.8 and 0 <= o["fpr_at_95_tpr"] <= 1
    assert o["fpr_at_95_tpr"] == pytest.approx((d_out <= np.quantile(d_in, 0.95, method="higher")).mean())
    assert o["holdout_with_rule"]["coverage"] <= o["holdout_without_rule"]["coverage"]
    assert o["ood_labelled_with_rule"] < o["ood_labelled_without_rule"]
    # A head without a reference set, and a folder without images: one line each.
    bad = run_cli("eval", "animal", "--report", tmp_path / "r2", "--repo", ood_setup["repo"], "--data",
                  ood_setup["holdout"], "--no-quality", "--ood", ood_setup["photos"])
    assert bad.returncode == 1 and "has no out-of-distribution reference set" in bad.stderr
    assert "Traceback" not in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run_cli("eval", "digit", "--report", tmp_path / "r3", *common, "--no-quality", "--ood", empty)
    assert bad.returncode == 1 and "holds no image files" in bad.stderr and "Traceback" not in bad.stderr


def test_a_tampered_reference_set_is_refused_before_it_goes_live(ood_setup, tmp_path):
    """Rollback / import validate the reference set: another file of the same shape is refused."""
    from headmaster.errors import InvalidVersionError
    from headmaster.model_repository import lifecycle

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
