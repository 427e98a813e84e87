"""`train-head`: real labelled images (scikit-learn's digits), real embeddings, real ONNX heads."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from headmaster.errors import DataError, FingerprintMismatchError, HeadmasterError
from headmaster.export.encoder import ExportOptions, export_encoder
from headmaster.export.heads import HeadCard, HeadWeights
from headmaster.lifecycle import operations as lifecycle
from headmaster.repository.build import build_repository
from headmaster.repository.repo import Repository
from headmaster.rules.threshold import accept
from headmaster.training.embeddings import EmbeddingCache, LocalEmbedder, embed_files
from headmaster.training.heads.train_head import TrainOptions, train_head
from headmaster.training.heads.trainer import TrainConfig
from headmaster.training.heads.zero_shot import create_zero_shot_head
from tests.helpers import CLI, TINY_MODEL, build_repo, subset


@pytest.fixture(scope="module")
def train_repo(tiny_encoder_dir, tmp_path_factory) -> Path:
    """The tiny encoder: these tests are about training, not the encoder (embedding the digits
    through ViT-S-32 made this module about 34 s of CPU)."""
    return build_repo(tiny_encoder_dir, tmp_path_factory.mktemp("train") / "repo", heads={})


@pytest.fixture(scope="module")
def vit_train_repo(encoder_dir, tmp_path_factory) -> Path:
    """ViT-S-32, for the accuracy figures measured on it (the slow tests)."""
    return build_repo(encoder_dir, tmp_path_factory.mktemp("train-vit") / "repo", heads={})


@pytest.fixture(scope="module")
def digits_split(digits_dir, tmp_path_factory):
    """A held-out split the trainer never sees: 80% as folders to train on, 20% aside."""
    from sklearn.model_selection import train_test_split

    paths = sorted(digits_dir.rglob("*.png"))
    labels = [p.parent.name for p in paths]
    train, holdout = train_test_split(paths, test_size=0.2, stratify=labels, random_state=0)
    root = tmp_path_factory.mktemp("digits-train") / "train"
    for path in train:
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / path.parent.name / path.name)
    return root, holdout


def embed(repo: Path, paths, cache: Path) -> np.ndarray:
    repository = Repository(repo)
    hashes, vectors, failures = embed_files(
        list(paths), LocalEmbedder(repository), EmbeddingCache(cache, repository.fingerprint)
    )
    assert not failures
    return np.stack([vectors[h] for h in hashes])


@pytest.mark.slow  # embeds the 1,797 digits and fits both: 210 s on 2 busy cores (2026-12-07)
def test_digits_head_is_as_accurate_as_logistic_regression(vit_train_repo, digits_split, embedding_cache):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_root, holdout = digits_split
    result = train_head(TrainOptions(name="digit", repo=vit_train_repo, data=train_root, cache_dir=embedding_cache))
    assert result.card.labels == tuple(str(d) for d in range(10)) and not result.card.multi_label
    # The published ONNX file, run by onnxruntime, on images the trainer never saw.
    x_hold = embed(vit_train_repo, holdout, embedding_cache)
    y_hold = np.array([int(p.parent.name) for p in holdout])
    session = ort.InferenceSession(str(vit_train_repo / "digit" / str(result.card.version) / "model.onnx"))
    ours = (session.run(["SCORES"], {"EMBEDDING": x_hold})[0].argmax(axis=1) == y_hold).mean()
    # scikit-learn's LogisticRegression on the same training images' embeddings.
    train_paths = sorted(train_root.rglob("*.png"))
    x_train = embed(vit_train_repo, train_paths, embedding_cache)
    y_train = np.array([int(p.parent.name) for p in train_paths])
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x_train, y_train)
    theirs = (reference.predict(x_hold) == y_hold).mean()
    print(f"holdout accuracy: trained head {ours:.4f}, scikit-learn LogisticRegression {theirs:.4f}")
    assert ours >= theirs - 0.02
    assert result.metrics["accuracy"] > 0.8  # validation, inside train-head
    assert len(result.metrics["confusion_matrix"]) == 10


def test_same_data_and_seed_give_the_same_head_without_re_embedding(train_repo, digits_dir, embedding_cache, tmp_path):
    data = subset(digits_dir, tmp_path / "data", {"3": 40, "8": 40})
    options = TrainOptions(
        name="three_or_eight", repo=train_repo, data=data, cache_dir=embedding_cache, config=TrainConfig(seed=7)
    )
    first = train_head(options)
    shards = sorted((embedding_cache / first.card.encoder_fingerprint.split(":")[1]).glob("*.parquet"))
    second = train_head(options)
    assert sorted((embedding_cache / first.card.encoder_fingerprint.split(":")[1]).glob("*.parquet")) == shards
    a = HeadWeights.from_onnx(train_repo / "three_or_eight" / str(first.card.version) / "model.onnx")
    b = HeadWeights.from_onnx(train_repo / "three_or_eight" / str(second.card.version) / "model.onnx")
    assert second.card.version == first.card.version + 1
    assert all(np.array_equal(wa, wb) and np.array_equal(ba, bb) for (wa, ba), (wb, bb) in zip(a.layers, b.layers))
    assert first.card.details["data"]["sha256"] == second.card.details["data"]["sha256"]


def test_mlp_head(train_repo, digits_dir, embedding_cache, tmp_path):
    data = subset(digits_dir, tmp_path / "data", {"1": 60, "7": 60, "4": 60})
    result = train_head(
        TrainOptions(
            name="mlp_digits",
            repo=train_repo,
            data=data,
            cache_dir=embedding_cache,
            config=TrainConfig(kind="mlp", hidden=64),
        )
    )
    weights = HeadWeights.from_onnx(train_repo / "mlp_digits" / str(result.card.version) / "model.onnx")
    dim = Repository(train_repo).card.embed_dim
    assert [w.shape for w, _ in weights.layers] == [(64, dim), (3, 64)]
    assert result.card.kind == "mlp" and result.metrics["accuracy"] > 0.7


def test_data_checks_warn_list_and_skip(train_repo, digits_dir, embedding_cache, tmp_path):
    data = subset(digits_dir, tmp_path / "data", {"0": 100, "1": 12})
    zero = sorted((data / "0").glob("*.png"))
    shutil.copy(zero[0], data / "0" / "copy-of-first.png")  # exact duplicate, same bucket
    shutil.copy(zero[1], data / "1" / "also-a-one.png")  # same bytes under two labels
    (data / "1" / "notes.txt").write_text("taken on a Tuesday")  # not an image file name
    (data / "1" / "broken.png").write_bytes(zero[2].read_bytes()[:60])  # truncated PNG
    (data / "0" / "text.png").write_text("I am text")  # not an image at all
    result = train_head(TrainOptions(name="zero_or_one", repo=train_repo, data=data, cache_dir=embedding_cache))
    report = result.checks
    warnings = "\n".join(report.warnings)
    assert "label '1' has only 12 images (fewer than 20)" in warnings
    assert "strong imbalance" in warnings and "weight" in warnings
    assert report.counts == {"0": 99, "1": 12}  # a duplicate merged, a contradictory image dropped from both
    assert report.class_weights["1"] > report.class_weights["0"]
    skipped = {Path(path).name: why for path, why in report.unreadable}
    assert "truncated" in skipped["broken.png"] and "cannot identify" in skipped["text.png"]
    assert skipped["notes.txt"] == "not an image file name"
    assert [sorted(Path(p).name for p in group) for group in report.exact_duplicates] == [
        sorted([zero[0].name, "copy-of-first.png"])
    ]
    assert [sorted(Path(p).name for p in group) for group in report.conflicting] == [
        sorted([zero[1].name, "also-a-one.png"])
    ]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"cat": 3}, "single bucket"),
        ({"cat": 3, "dog": 0}, "bucket 'dog' .* has no images"),
        ({}, "has no sub-folders"),
    ],
)
def test_unusable_data_is_a_clear_error(train_repo, digits_dir, embedding_cache, tmp_path, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    for bucket, count in layout.items():
        (root / bucket).mkdir()
        for path in sorted((digits_dir / "5").glob("*.png"))[:count]:
            shutil.copy(path, root / bucket / path.name)
    with pytest.raises(DataError, match=message):
        train_head(TrainOptions(name="bad", repo=train_repo, data=root, cache_dir=embedding_cache))
    assert not (train_repo / "bad").exists()


def test_a_collapsed_encoder_is_named_as_the_problem_not_a_flag(train_repo, digits_dir, tmp_path):
    """Embeddings of every label nearly identical (as a random-weight DINOv2 gives on digits): train-head
    with its default --ood says the encoder is wrong for the data, in one line, and writes nothing."""
    from headmaster.store.base import file_sha256

    data = subset(digits_dir, tmp_path / "data", {"1": 30, "2": 30, "3": 30})
    repository = Repository(train_repo)
    rng = np.random.default_rng(0)
    base = rng.normal(size=repository.card.embed_dim)
    paths = sorted(data.rglob("*.png"))
    vectors = base + 1e-6 * rng.normal(size=(len(paths), repository.card.embed_dim))
    EmbeddingCache(tmp_path / "cache", repository.fingerprint).add(
        {file_sha256(p): v.astype(np.float32) for p, v in zip(paths, vectors)}
    )
    result = subprocess.run(
        [
            *CLI,
            "train-head",
            str(data),
            "--name",
            "collapsed",
            "--repo",
            str(train_repo),
            "--cache",
            str(tmp_path / "cache"),
            "--local",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert result.returncode == 1, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "the embeddings of different labels are nearly identical" in error[0]
    assert "the encoder or its preprocessing is wrong for these images" in error[0] and "--ood" not in error[0]
    assert not (train_repo / "collapsed").exists()


def test_precision_target_thresholds_a_binary_head(train_repo, digits_dir, embedding_cache, tmp_path):
    data = subset(digits_dir, tmp_path / "data", {"0": 120, "6": 120}, rename={"0": "zero", "6": "other"})
    result = train_head(
        TrainOptions(
            name="is_zero",
            repo=train_repo,
            data=data,
            cache_dir=embedding_cache,
            thresholds="precision",
            target_precision=0.95,
            positive="zero",
        )
    )
    rows = {row["label"]: row for row in result.thresholds}
    assert rows["other"]["threshold"] == 0.0 and "fallback" in rows["other"]["why"]
    assert rows["zero"]["precision"] >= 0.95 or "unreachable" in rows["zero"]["why"]
    card = HeadCard.load(train_repo / "is_zero" / str(result.card.version))
    assert card.thresholds == (0.0, rows["zero"]["threshold"])  # label order: other, zero
    assert card.details["thresholds"]["mode"] == "precision"


def write_manifest(digits_dir: Path, path: Path, count: int = 300) -> Path:
    """Multi-label: each digit image tagged even / small (< 5) / round (0, 6, 8, 9)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels"])
        for image in sorted(digits_dir.rglob("*.png"))[::5][:count]:  # every digit
            d = int(image.parent.name)
            tags = [t for t, yes in (("even", d % 2 == 0), ("small", d < 5), ("round", d in (0, 6, 8, 9))) if yes]
            writer.writerow([str(image), ";".join(tags)])
    return path


def test_multi_label_head_from_a_manifest(train_repo, digits_dir, embedding_cache, tmp_path):
    manifest = write_manifest(digits_dir, tmp_path / "tags.csv")
    result = train_head(TrainOptions(name="digit_tags", repo=train_repo, manifest=manifest, cache_dir=embedding_cache))
    card = result.card
    assert card.multi_label and card.labels == ("even", "round", "small")
    assert result.metrics["multi_label"] and result.metrics["micro_f1"] > 0.6
    weights = HeadWeights.from_onnx(train_repo / "digit_tags" / str(card.version) / "model.onnx")
    assert weights.multi_label
    x = embed(train_repo, sorted(digits_dir.rglob("*.png"))[1::5][:10], embedding_cache)  # not in the manifest
    session = ort.InferenceSession(str(train_repo / "digit_tags" / str(card.version) / "model.onnx"))
    np.testing.assert_allclose(
        session.run(["SCORES"], {"EMBEDDING": x})[0], weights.scores(x), atol=1e-4
    )  # float32 Gemm vs numpy: 1.1e-5 seen


def test_trained_head_takes_priority_over_zero_shot(train_repo, digits_dir, embedding_cache, tmp_path):
    create_zero_shot_head(
        train_repo, "is_seven", ["seven=a photo of the digit seven", "other=a photo of another digit"]
    )
    data = subset(digits_dir, tmp_path / "data", {"7": 60, "2": 60}, rename={"7": "seven", "2": "other"})
    trained = train_head(TrainOptions(name="is_seven", repo=train_repo, data=data, cache_dir=embedding_cache))
    state = Repository(train_repo).head("is_seven")
    assert (state.live, state.card.kind) == (trained.card.version, "linear") and trained.card.version == 2
    with pytest.raises(HeadmasterError, match="trained heads take priority over zero-shot ones"):
        create_zero_shot_head(train_repo, "is_seven", ["seven=a seven", "other=a digit"])
    assert lifecycle.rollback(train_repo, "is_seven").version == 1
    assert Repository(train_repo).head("is_seven").card.kind == "zero-shot"


@pytest.fixture(scope="module")
def other_repo(tmp_path_factory) -> Path:
    """A repository serving another encoder (the tiny one's architecture, other weights)."""
    root = tmp_path_factory.mktemp("other-encoder")
    export_encoder(ExportOptions(model=TINY_MODEL, pretrained=None, out=root / "enc", seed=1, towers=("image",)))
    build_repository(root / "enc", root / "repo")
    return root / "repo"


def test_a_head_trained_on_one_encoder_is_refused_by_a_repository_serving_another(
    train_repo, other_repo, digits_dir, embedding_cache, tmp_path
):
    data = subset(digits_dir, tmp_path / "data", {"3": 30, "5": 30})
    trained = train_head(TrainOptions(name="three_five", repo=train_repo, data=data, cache_dir=embedding_cache))
    with pytest.raises(FingerprintMismatchError, match=r"head three_five v\d+ was made with encoder"):
        lifecycle.import_version(other_repo, train_repo / "three_five" / str(trained.card.version))
    assert "three_five" not in Repository(other_repo).head_names()
    # The same head imports fine into a repository of its own encoder.
    assert (
        lifecycle.import_version(train_repo, train_repo / "three_five" / str(trained.card.version), name="copy").version
        == 1
    )


def test_embeddings_from_a_server_of_another_encoder_are_refused(
    other_repo, server, digits_dir, embedding_cache, tmp_path
):
    data = subset(digits_dir, tmp_path / "data", {"3": 10, "5": 10})
    with pytest.raises(FingerprintMismatchError, match=f"the server at {server.http_url} was made with encoder"):
        train_head(
            TrainOptions(
                name="three_five", repo=other_repo, data=data, server=server.http_url, cache_dir=embedding_cache
            )
        )


def test_train_head_through_the_server_embeds_like_locally(repo, server, digits_dir, embedding_cache, tmp_path):
    """Same encoder, two ways to embed: the server's embeddings equal the local ones."""
    paths = sorted((digits_dir / "9").glob("*.png"))[:12]
    repository = Repository(repo)
    from headmaster.training.embeddings import ServerEmbedder

    served = ServerEmbedder(repository, server.http_url)(paths)
    local = LocalEmbedder(repository)(paths)
    np.testing.assert_allclose(np.stack(served), np.stack(local), atol=1e-5)


def test_cli_prints_the_report(train_repo, digits_dir, embedding_cache, tmp_path, cli, monkeypatch):
    from headmaster.cli import common

    data = subset(digits_dir, tmp_path / "data", {"1": 40, "2": 40, "3": 40})
    # In this process (the `cli` fixture): train-head's entry point runs as a subprocess in
    # test_a_collapsed_encoder_is_named_as_the_problem_not_a_flag. 200 columns, as COLUMNS=200 gave
    # the subprocess: rich wraps the report's tables at the console's width.
    for console in (common.console, common.out):
        monkeypatch.setattr(console, "_width", 200)
    result = cli("train-head", data, "--name", "small", "--repo", train_repo, "--cache", embedding_cache)
    assert result.returncode == 0, result.stderr
    assert "confusion matrix" in result.stdout and "why this threshold" in result.stdout
    assert "head small v1 (linear, single-label): 1, 2, 3" in result.stderr
    listing = subprocess.run(
        [*CLI, "heads", "--repo", str(train_repo)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0 and "small" in listing.stdout and "live" in listing.stdout


@pytest.mark.slow  # reads the `digit` head test_digits_head_is_as_accurate_as_logistic_regression publishes
def test_accept_rule_matches_the_report_for_the_published_thresholds(vit_train_repo):
    """What the threshold step will do with the published thresholds is what was measured."""
    state = Repository(vit_train_repo).head("digit")
    coverage = state.card.details["metrics"]["thresholded"]["coverage"]
    assert 0 < coverage <= 1
    assert accept(np.eye(10, dtype=np.float32), state.card.info()) == [[str(d)] for d in range(10)]
