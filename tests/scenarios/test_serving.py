"""The served `classify`, `embed` and `embed_text` ensembles on a real Triton server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.request

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from headmaster.client import AsyncHeadmasterClient, Classification, HeadmasterClient
from headmaster.export.card import EncoderCard
from headmaster.export.heads import HeadCard, HeadWeights
from headmaster.rules.threshold import accept
from tests.helpers import cosine_rows


@pytest.fixture(scope="module")
def served(server, photos):
    names = sorted(photos)
    with HeadmasterClient(server.grpc_url, "grpc", batch_size=3) as client:
        results = client.classify([photos[n] for n in names])
    assert all(isinstance(r, Classification) for r in results)
    return names, results


def open_clip_embeddings(open_clip_model, images: list[bytes]) -> np.ndarray:
    model, preprocess, _ = open_clip_model
    batch = torch.stack([preprocess(Image.open(io.BytesIO(data))) for data in images])
    with torch.no_grad():
        return model.encode_image(batch, normalize=True).numpy()


def test_served_embeddings_match_open_clip_on_real_photos(served, photos, open_clip_model):
    names, results = served
    served_embeddings = np.stack([r.embedding for r in results])
    reference = open_clip_embeddings(open_clip_model, [photos[n] for n in names])
    cosines = cosine_rows(served_embeddings, reference)
    assert cosines.min() >= 0.999, dict(zip(names, cosines))
    np.testing.assert_allclose(np.linalg.norm(served_embeddings, axis=1), 1.0, atol=1e-5)


def head_reference(repo, name: str) -> tuple[HeadWeights, HeadCard]:
    card = HeadCard.load(repo / name / "1")
    graph = onnx.load(str(repo / name / "1" / "model.onnx")).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return HeadWeights(((init["w0"], init["b0"]),), card.multi_label), card


@pytest.mark.parametrize("head", ["animal", "has_cat"])
def test_head_scores_and_labels_equal_a_numpy_reference(served, repo, head):
    _, results = served
    weights, card = head_reference(repo, head)
    embeddings = np.stack([r.embedding for r in results])
    expected_scores = weights.scores(embeddings)
    served_scores = np.array([[r.heads[head].scores[label] for label in card.labels] for r in results])
    np.testing.assert_allclose(served_scores, expected_scores, atol=1e-5)
    expected_labels = accept(expected_scores, card.info())
    assert [list(r.heads[head].labels) for r in results] == expected_labels
    assert {r.heads[head].version for r in results} == {1}


def test_binary_threshold_is_applied_by_the_threshold_step(served):
    _, results = served
    for r in results:
        cat = r.heads["has_cat"]
        assert cat.labels == (("cat",) if cat.scores["cat"] >= 0.52 else ("no cat",))


def test_grpc_and_http_give_the_same_answers(server, served, photos):
    names, grpc_results = served
    with HeadmasterClient(server.http_url, "http", batch_size=2) as client:
        http_results = client.classify([photos[n] for n in names])
    for g, h in zip(grpc_results, http_results):
        np.testing.assert_allclose(g.embedding, h.embedding, atol=1e-6)
        assert {k: v.labels for k, v in g.heads.items()} == {k: v.labels for k, v in h.heads.items()}


def test_async_client(server, served, photos):
    names, sync_results = served

    async def run():
        async with AsyncHeadmasterClient(server.grpc_url, batch_size=4, max_in_flight=2) as client:
            assert await client.is_ready()
            return await client.classify([photos[n] for n in names])

    for a, s in zip(asyncio.run(run()), sync_results):
        np.testing.assert_allclose(a.embedding, s.embedding, atol=1e-6)
        assert a.sha256 == s.sha256


def test_per_head_score_tensors_are_outputs_too(server, photos):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[photos["chelsea.png"]]], dtype=object))
        result = client.infer("classify", [image])
        assert result.as_numpy("SCORES_animal").shape == (1, 3)
        assert result.as_numpy("SCORES_has_cat").shape == (1, 2)
        assert json.loads(result.as_numpy("RESULT")[0, 0])["heads"]["animal"]["version"] == 1
    finally:
        client.close()


def http_json(url: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://{url}{path}",
        data=json.dumps(body).encode() if body else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_plain_kserve_v2_json_without_tritonclient(server, served, photos):
    """curl-style: JSON in, JSON out; images travel as base64 text."""
    names, grpc_results = served
    picked = names[:2]
    body = {
        "inputs": [
            {
                "name": "IMAGE",
                "shape": [2, 1],
                "datatype": "BYTES",
                "data": [base64.b64encode(photos[n]).decode() for n in picked],
            }
        ],
        "outputs": [{"name": "RESULT"}, {"name": "EMBEDDING"}],
    }
    answer = http_json(server.http_url, "/v2/models/classify/infer", body)
    outputs = {o["name"]: o for o in answer["outputs"]}
    documents = [json.loads(text) for text in outputs["RESULT"]["data"]]
    for doc, expected in zip(documents, grpc_results[:2]):
        assert {h: tuple(v["labels"]) for h, v in doc["heads"].items()} == {
            h: v.labels for h, v in expected.heads.items()
        }
    embeddings = np.array(outputs["EMBEDDING"]["data"], np.float32).reshape(outputs["EMBEDDING"]["shape"])
    np.testing.assert_allclose(embeddings, np.stack([r.embedding for r in grpc_results[:2]]), atol=1e-5)


def test_model_metadata_documents_the_contract(server):
    meta = http_json(server.http_url, "/v2/models/classify")
    assert [i["name"] for i in meta["inputs"]] == ["IMAGE"]
    assert {o["name"] for o in meta["outputs"]} == {"EMBEDDING", "RESULT", "SCORES_animal", "SCORES_has_cat"}


def test_embed_ensemble_gives_the_classify_embedding(server, served, photos, encoder_dir):
    names, results = served
    with HeadmasterClient(server.grpc_url) as client:
        embedded = client.embed([photos[n] for n in names] + [b"not an image"])
        assert client.encoder_fingerprint() == EncoderCard.load(encoder_dir).fingerprint
    assert [e.ok for e in embedded] == [True] * len(names) + [False]
    assert "cannot identify" in embedded[-1].error
    np.testing.assert_allclose(
        np.stack([e.embedding for e in embedded[:-1]]), np.stack([r.embedding for r in results]), atol=1e-6
    )
    assert [e.sha256 for e in embedded[:-1]] == [r.sha256 for r in results]


def test_text_embeddings_match_open_clip(server, open_clip_model):
    model, _, tokenizer = open_clip_model
    prompts = ["a photo of a cat", "a diagram", "ein Foto von einem Hund", ""]
    with HeadmasterClient(server.http_url, "http") as client:
        served = client.embed_text(prompts)
    with torch.no_grad():
        reference = model.encode_text(tokenizer(prompts), normalize=True).numpy()
    assert cosine_rows(served, reference).min() >= 0.999
