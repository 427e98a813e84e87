"""Any subset of a model's documented outputs can be asked for, over every transport.

Triton's ensemble scheduler prunes the steps whose outputs a request leaves out; when an
ensemble output also fed another step, asking `classify` for `RESULT` alone (the README's own
curl example) deadlocked. Every subset of every served model's outputs is asked for here,
over HTTP JSON, HTTP binary and gRPC, and compared with the full answer.
"""

from __future__ import annotations

import base64
import itertools
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

D = 384  # ViT-S-32's embedding size


def model_cases(photos) -> dict[str, tuple[str, str, np.ndarray, list[str]]]:
    """model -> (input name, datatype, one-row input, documented outputs)."""
    image = np.array([[photos["chelsea.png"]]], dtype=object)
    embedding = np.random.default_rng(0).normal(size=(1, D)).astype(np.float32)
    embedding /= np.linalg.norm(embedding)
    return {
        "classify": ("IMAGE", "BYTES", image, ["EMBEDDING", "RESULT", "SCORES_animal", "SCORES_has_cat"]),
        "classify_embedding": ("EMBEDDING", "FP32", embedding, ["RESULT", "SCORES_animal", "SCORES_has_cat"]),
        "embed": ("IMAGE", "BYTES", image, ["EMBEDDING"]),
        "embed_text": ("TEXT", "BYTES", np.array([[b"a photo of a cat"]], dtype=object), ["EMBEDDING"]),
    }


def subsets(outputs: list[str]) -> list[tuple[str, ...]]:
    return [s for r in range(len(outputs) + 1) for s in itertools.combinations(outputs, r)]


def via_json(url: str, model: str, name: str, dtype: str, value: np.ndarray, outputs) -> dict[str, np.ndarray]:
    """Plain KServe v2 JSON, no tritonclient: what curl sends."""
    data = [base64.b64encode(v).decode() for v in value.reshape(-1)] if dtype == "BYTES" else value.reshape(-1).tolist()
    body = {"inputs": [{"name": name, "shape": list(value.shape), "datatype": dtype, "data": data}]}
    if outputs:
        body["outputs"] = [{"name": o} for o in outputs]
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=json.dumps(body).encode())
    try:
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{model} {outputs}: HTTP {e.code} {e.read()[:300]!r}") from None
    return {
        o["name"]: np.array(o["data"], dtype=object if o["datatype"] == "BYTES" else np.float32).reshape(o["shape"])
        for o in answer["outputs"]
    }


def via_client(
    module, url: str, model: str, name: str, dtype: str, value: np.ndarray, outputs
) -> dict[str, np.ndarray]:
    client = module.InferenceServerClient(url)
    try:
        tensor = module.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        requested = [
            module.InferRequestedOutput(o, binary_data=True) if module is httpclient else module.InferRequestedOutput(o)
            for o in outputs
        ] or None
        result = client.infer(model, [tensor], outputs=requested)
        names = [
            o["name"]
            for o in (
                result.get_response()["outputs"]
                if module is httpclient
                else result.get_response(as_json=True)["outputs"]
            )
        ]
        return {n: result.as_numpy(n) for n in names}
    finally:
        client.close()


def same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype == object or b.dtype == object:
        decode = [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).reshape(-1)]
        other = [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(b).reshape(-1)]
        return [json.loads(x) for x in decode] == [json.loads(x) for x in other]
    return np.allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-5)


@pytest.mark.parametrize("transport", ["http-json", "http-binary", "grpc"])
@pytest.mark.parametrize("model", ["classify", "classify_embedding", "embed", "embed_text"])
def test_every_subset_of_outputs_is_answered(server, photos, model, transport):
    name, dtype, value, documented = model_cases(photos)[model]

    def ask(outputs):
        if transport == "http-json":
            return via_json(server.http_url, model, name, dtype, value, outputs)
        module, url = (httpclient, server.http_url) if transport == "http-binary" else (grpcclient, server.grpc_url)
        return via_client(module, url, model, name, dtype, value, outputs)

    full = ask(())
    assert sorted(full) == sorted(documented)
    for subset in subsets(documented)[1:]:
        answer = ask(subset)
        assert sorted(answer) == sorted(subset), (model, subset)
        for output in subset:
            assert same(answer[output], full[output]), (model, subset, output)
