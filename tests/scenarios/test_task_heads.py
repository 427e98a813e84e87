"""Hierarchy, regression and ordinal heads, trained on real data and served by a real Triton.

scikit-learn's digits make a taxonomy (round: 0 6 8 9, straight: the rest) and a score (the
digit's value, 0-9, from a CSV) and ordered classes (the digit folders, in numeric order). The
encoder is the session's random-weight ViT-S-32, so the figures measure pixels, not meaning
(README, "What was not run here"). The heads go live in a running server (a copy of the
session repository, next to its zero-shot heads) by hot load; its answers are compared with
the CPU path (HeadVersion: the same ONNX file and the same threshold function), the store is
filled by `classify --store` and `rescore`, and `eval` writes the review pages.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from headmaster.client import HeadmasterClient
from headmaster.repository.head_version import HeadVersion
from headmaster.repository.repo import Repository
from headmaster.training.heads.train_head import TrainOptions, train_head
from headmaster.training.heads.trainer import TrainConfig
from tests.helpers import ARTIFACTS, clone_repo, run_cli, start_server

TRAIN, HOLD = 50, 15  # per digit
ROUND = {"0", "6", "8", "9"}
CONFIG = TrainConfig(epochs=150, seed=0)


def shape_of(digit: str) -> str:
    return "round" if digit in ROUND else "straight"


@pytest.fixture(scope="module")
def tasks(repo, digits_dir, embedding_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("task-heads")
    served = clone_repo(repo, root / "repo")
    existing = set(Repository(served).head_names())
    tree, flat, hold = root / "tree", root / "flat", root / "holdout"
    rows, hold_rows = [], []
    for digit in map(str, range(10)):
        paths = sorted((digits_dir / digit).glob("*.png"))
        for target in (tree / shape_of(digit) / digit, flat / digit, hold / digit):
            target.mkdir(parents=True)
        for path in paths[:TRAIN]:
            shutil.copy(path, tree / shape_of(digit) / digit)
            shutil.copy(path, flat / digit)
            rows.append((str(flat / digit / path.name), digit))
        for path in paths[TRAIN : TRAIN + HOLD]:
            shutil.copy(path, hold / digit)
            hold_rows.append((str(hold / digit / path.name), digit))
    values, hold_values = root / "values.csv", root / "holdout_values.csv"
    for file, content in ((values, rows), (hold_values, hold_rows)):
        with open(file, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "digit_value"])
            writer.writerows(content)
    server = start_server(served, ARTIFACTS / "task-heads")
    # The taxonomy through the command line, as a user trains it: nested folders.
    done = run_cli(
        "train-head",
        tree,
        "--name",
        "shape",
        "--task",
        "hierarchy",
        "--repo",
        served,
        "--server",
        server.http_url,
        "--local",
        "--cache",
        embedding_cache,
        "--epochs",
        CONFIG.epochs,
    )
    assert done.returncode == 0, done.stderr
    common = {"repo": served, "server": server.http_url, "local": True, "cache_dir": embedding_cache, "config": CONFIG}
    value = train_head(TrainOptions(name="digit_value", task="regression", manifest=values, **common))
    rank = train_head(TrainOptions(name="digit_rank", task="ordinal", data=flat, **common))
    yield {
        "repo": served,
        "server": server,
        "existing": existing,
        "holdout": hold,
        "hold_values": hold_values,
        "root": root,
        "cli": done.stdout,
        "value": value,
        "rank": rank,
        "cache": embedding_cache,
    }
    server.stop()


@pytest.fixture(scope="module")
def served(tasks):
    """The holdout classified by the server: (paths, answers)."""
    paths = sorted(str(p) for p in tasks["holdout"].rglob("*.png"))
    with HeadmasterClient(tasks["server"].http_url, "http", batch_size=8) as client:
        answers = client.classify(paths)
    assert all(a.ok for a in answers)
    return paths, answers


def test_training_reports_per_task(tasks):
    assert "level 0 (round, straight)" in tasks["cli"] and "level 1" in tasks["cli"]
    card = HeadVersion.load(tasks["repo"], "shape").card
    assert card.task == "hierarchy" and card.parents["8"] == "round" and card.parents["7"] == "straight"
    assert card.details["data"]["checks"]["counts"]["round"] == 4 * TRAIN  # a parent holds its children's images
    value = tasks["value"].card
    assert value.task == "regression" and value.labels == ("digit_value",) and value.value_range == (0.0, 9.0)
    rank = tasks["rank"]
    assert rank.card.task == "ordinal" and rank.card.labels == tuple(map(str, range(10)))
    ordinal, flat = rank.metrics, rank.metrics["multiclass_baseline"]
    assert ordinal["n"] == flat["n"] == rank.card.details["data"]["validation"]
    # Neighbouring mistakes cost less: the ordinal head's wrong answers fall nearer the truth.
    assert ordinal["mistake_mean_distance"] < flat["mistake_mean_distance"], (ordinal, flat)


def test_served_answers_equal_the_cpu_path_next_to_existing_heads(tasks, served):
    paths, answers = served
    assert {*tasks["existing"], "shape", "digit_value", "digit_rank"} <= set(answers[0].heads)
    embeddings = np.stack([a.embedding for a in answers])
    for name in ("shape", "digit_value", "digit_rank"):
        cpu = HeadVersion.load(tasks["repo"], name).results(embeddings)
        for answer, expected in zip(answers, cpu):
            got = answer.heads[name]
            assert got.version == expected["version"] == 1
            assert list(got.labels) == expected["labels"], (name, got, expected)
            np.testing.assert_allclose(
                [got.scores[k] for k in expected["scores"]], list(expected["scores"].values()), atol=1e-5
            )
            if name == "digit_value":
                assert got.value == pytest.approx(expected["value"], abs=1e-5) and 0 <= got.value <= 9
            if name == "digit_rank":
                assert got.ordinal_class == expected["class"] and got.labels == (got.ordinal_class,)
                assert got.expected == pytest.approx(expected["expected"], abs=1e-5)
    parents = HeadVersion.load(tasks["repo"], "shape").card.parents
    truth = [Path(p).parent.name for p in paths]
    paths_served = [a.heads["shape"].labels for a in answers]
    for path in paths_served:  # a child only with its parent, root first
        assert not path or path[0] in ("round", "straight")
        assert len(path) < 2 or parents[path[1]] == path[0]
    answered = [p for p in paths_served if p]
    right = np.mean([p[0] == shape_of(t) for p, t in zip(paths_served, truth) if p])
    assert len(answered) > 0.5 * len(paths) and right > 0.75, (len(answered), right)
    values = np.array([a.heads["digit_value"].value for a in answers])
    from scipy.stats import spearmanr

    assert spearmanr(values, [int(t) for t in truth]).statistic > 0.5


def test_eval_pages_per_task(tasks):
    root, repo = tasks["root"], tasks["repo"]
    common = ("--repo", repo, "--cache-dir", tasks["cache"])
    shape = run_cli("eval", "shape", "--data", tasks["holdout"], "--report", root / "r-shape", *common)
    value = run_cli("eval", "digit_value", "--manifest", tasks["hold_values"], "--report", root / "r-value", *common)
    rank = run_cli("eval", "digit_rank", "--data", tasks["holdout"], "--report", root / "r-rank", *common)
    for done in (shape, value, rank):
        assert done.returncode == 0, done.stderr
    # Hierarchy: metrics per level, recomputed here from the ONNX file and the served rule.
    m = json.loads((root / "r-shape" / "metrics.json").read_text())["evaluation"]
    head = HeadVersion.load(repo, "shape")
    x, paths = _embed(tasks, sorted(tasks["holdout"].rglob("*.png")))
    results = head.results(x)
    top = np.mean([bool(r["labels"]) and r["labels"][0] == shape_of(p.parent.name) for r, p in zip(results, paths)])
    assert m["per_level"][0]["accuracy"] == pytest.approx(top) and m["paths_consistent"]
    page = (root / "r-shape" / "index.html").read_text()
    assert 'id="levels"' in page and 'data-level="0"' in page and 'data-level="1"' in page
    assert page.count('class="thumb"') > 10
    # Regression: MAE / RMSE / Spearman from scikit-learn and scipy on the same answers; a scatter plot.
    from scipy.stats import spearmanr
    from sklearn.metrics import mean_absolute_error

    m = json.loads((root / "r-value" / "metrics.json").read_text())["evaluation"]
    predicted = np.array([r["value"] for r in HeadVersion.load(repo, "digit_value").results(x)])
    truth = np.array([int(p.parent.name) for p in paths])
    assert m["mae"] == pytest.approx(mean_absolute_error(truth, predicted), rel=1e-6)
    assert m["spearman"] == pytest.approx(spearmanr(predicted, truth).statistic, rel=1e-6)
    assert m["rmse"] >= m["mae"] and "MAE" in value.stdout
    page = (root / "r-value" / "index.html").read_text()
    assert 'id="plot-scatter"' in page and (root / "r-value" / "scatter.png").stat().st_size > 5000
    # Ordinal: confusion by distance beside the plain multiclass head of the same training split.
    m = json.loads((root / "r-rank" / "metrics.json").read_text())["evaluation"]
    assert sum(m["by_distance"]) == len(paths) == m["n"]
    assert m["mae_classes"] == pytest.approx(np.dot(np.arange(10), m["by_distance"]) / len(paths))
    assert "multiclass_baseline_at_training" in m and "plain multiclass" in rank.stdout
    figures = {
        name: json.loads((root / f"r-{name}" / "metrics.json").read_text())["evaluation"]
        for name in ("shape", "value", "rank")
    }
    figures["rank_at_training"] = HeadVersion.load(repo, "digit_rank").card.details["metrics"]
    (ARTIFACTS / "task-heads").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "task-heads" / "figures.json").write_text(json.dumps(figures, indent=1))  # for the README's figures
    page = (root / "r-rank" / "index.html").read_text()
    assert 'data-distance="1"' in page and 'id="plot-scatter"' in page and "plain multiclass" in page


def _embed(tasks, paths):
    from headmaster.training.embeddings import EmbeddingCache, LocalEmbedder, embed_files

    repository = Repository(tasks["repo"])
    hashes, vectors, failures = embed_files(
        paths, LocalEmbedder(repository), EmbeddingCache(tasks["cache"], repository.fingerprint)
    )
    assert not failures
    return np.stack([vectors[h] for h in hashes]), paths


def test_classify_store_rescore_and_a_hot_swapped_version(tasks, served, tmp_path):
    from headmaster.store import open_store

    repo, server = tasks["repo"], tasks["server"]
    store = tmp_path / "store"
    files = sorted(tasks["holdout"].rglob("*.png"))[::5]
    done = run_cli("classify", *files, "--url", server.http_url, "--protocol", "http", "--store", store)
    assert done.returncode == 0, done.stderr
    # A second version of the value head goes live while the server runs; rescore applies it to the store.
    second = train_head(
        TrainOptions(
            name="digit_value",
            task="regression",
            manifest=tasks["root"] / "values.csv",
            repo=repo,
            server=server.http_url,
            local=True,
            cache_dir=tasks["cache"],
            config=TrainConfig(kind="mlp", hidden=32, epochs=60, seed=1),
        )
    )
    assert second.card.version == 2
    with HeadmasterClient(server.http_url, "http") as client:
        assert client.classify([str(files[0])])[0].heads["digit_value"].version == 2
    for name in ("digit_value", "digit_rank", "shape"):
        done = run_cli("rescore", name, "--store", store, "--repo", repo)
        assert done.returncode == 0, done.stderr
    opened = open_store(str(store), create=False)
    fingerprint = Repository(repo).fingerprint
    stored = opened.embeddings(opened.hashes(fingerprint), fingerprint)
    hashes, x = list(stored), np.stack(list(stored.values()))
    for name, version in (("digit_value", 2), ("digit_rank", 1), ("shape", 1)):
        table = opened.labels(name).to_pylist()
        rows = {r["sha256"]: r for r in table}
        assert len(rows) == len(files) and {r["version"] for r in table} == {version}
        head = HeadVersion.load(repo, name, version)
        expected = head.results(x)
        for sha, result in zip(hashes, expected):
            np.testing.assert_allclose(rows[sha]["scores"], list(result["scores"].values()), atol=1e-5)
            assert sorted(rows[sha]["labels"]) == sorted(result["labels"])


def test_bad_task_input_is_one_clear_line(tasks, tmp_path):
    (tmp_path / "tax.csv").write_text("parent,child\nround,8\nstraight,8\n")
    done = run_cli(
        "train-head",
        tasks["holdout"],
        "--name",
        "bad",
        "--task",
        "hierarchy",
        "--taxonomy",
        tmp_path / "tax.csv",
        "--repo",
        tasks["repo"],
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "'8' has two parents" in done.stderr + done.stdout
    done = run_cli(
        "eval", "digit_value", "--data", tasks["holdout"], "--report", tmp_path / "r", "--repo", tasks["repo"]
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "regression head: give its holdout as --manifest" in done.stderr + done.stdout
    done = run_cli(
        "train-head", tasks["holdout"], "--name", "bad", "--task", "ordinal", "--order", "0,1", "--repo", tasks["repo"]
    )
    assert "must name each class folder once" in done.stderr + done.stdout and "Traceback" not in done.stderr
    for name, task in (("shape", "hierarchy"), ("digit_value", "regression"), ("digit_rank", "ordinal")):
        done = run_cli("distill", name, "--store", tmp_path / "store", "--repo", tasks["repo"])
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.startswith(f"error: head {name} is a {task} head: distill makes students of label heads")


def test_a_regression_head_from_the_command_line_is_called_one(tiny_repo, digits_dir, embedding_cache, tmp_path, cli):
    """A path,value file without --task is refused naming --task regression; with it, the
    summary line calls the head a regression head (not "single-label"). The tiny encoder: the
    command line is the subject."""
    own = clone_repo(tiny_repo, tmp_path / "repo")
    values = tmp_path / "values.csv"
    with open(values, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "digit_value"])
        for digit in ("0", "5", "9"):
            writer.writerows((str(p), digit) for p in sorted((digits_dir / digit).glob("*.png"))[:10])
    common = ["--name", "digit_value", "--repo", own, "--local", "--cache", embedding_cache, "--epochs", 20]
    done = run_cli("train-head", "--manifest", values, *common)
    assert done.returncode == 1 and done.stderr.strip() == (  # after the progress bar's empty line
        f"error: {values}: a CSV manifest needs the columns path,labels (got ['path', 'digit_value']); "
        "path,digit_value (a number per image) is what a regression head trains on: `train-head --task regression`"
    )
    # In this process (the subprocess above checked the entry point).
    done = cli("train-head", "--manifest", values, "--task", "regression", *common)
    assert done.returncode == 0, done.stderr
    summary = [line for line in done.stderr.splitlines() if line.startswith("head digit_value v1 ")]
    assert summary == ["head digit_value v1 (linear, regression): digit_value; no server serves this repository"]
