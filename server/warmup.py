"""Warm every served model before `headmaster serve` says ready.

Triton warms what it can itself: the encoders carry ``model_warmup`` in their configs
(config.warmup), so Triton runs them while they load (the heads do not: see config.EncoderModel). It cannot warm what reads image bytes or
text (it would invent random bytes, which no decoder accepts) nor ensembles (Triton refuses
``model_warmup`` there). So the server's own requests do the rest: one small real JPEG through
``classify`` (preprocess, the encoder, every head, threshold) and ``embed``, a word through
``embed_text``, each a few times, so the python stubs have imported, allocated and run every
path once. They are real requests: they show in Triton's statistics and in the headmaster_*
item counters as ordinary traffic.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np

LOG = logging.getLogger(__name__)

ROUNDS = 3  # the first call of a python model pays for imports and allocations; the next are steady


def tiny_jpeg(size: int = 64) -> bytes:
    """A real JPEG (a colour gradient), small enough to decode in a millisecond."""
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128, np.uint8)], axis=-1
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _bytes_input(client_module, name: str, item: bytes):
    tensor = client_module.InferInput(name, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[item]], dtype=object))
    return tensor


def warm_up(
    http_url: str,
    models: tuple[str, ...] | list[str],
    students: tuple[str, ...] | list[str] = (),
    timeout_s: float = 120.0,
    text_only: bool = False,
) -> dict[str, float]:
    """Send the warm-up requests to the ensembles among ``models`` (and to the distilled
    ``students``, python models reading image bytes) on the server at ``http_url``; returns
    seconds spent per model; ``text_only``: a text encoder's repository. A failure is logged, not raised: the server is up and a broken
    model answers its own error to the first client."""
    import tritonclient.http as http

    jpeg = tiny_jpeg()
    # A text encoder's repository (topology.text_only): classify reads TEXT, and there is no embed.
    plan = [
        (name, "TEXT", b"a short text") if text_only and name == "classify" else (name, "IMAGE", jpeg)
        for name in ("classify", "embed", *students)
        if name in models
    ]
    if "embed_text" in models:
        plan.append(("embed_text", "TEXT", b"a photo"))
    spent: dict[str, float] = {}
    embedding = None  # from classify / embed: what classify_embedding is warmed with
    client = http.InferenceServerClient(http_url, network_timeout=timeout_s, connection_timeout=timeout_s)
    try:
        for model, input_name, item in plan:
            start = time.monotonic()
            try:
                ensemble = model in ("classify", "embed", "embed_text")
                for _ in range(ROUNDS):
                    answer = client.infer(
                        model,
                        [_bytes_input(http, input_name, item)],
                        outputs=[http.InferRequestedOutput("EMBEDDING")] if ensemble else None,
                    )
                    if model in ("classify", "embed"):
                        embedding = answer.as_numpy("EMBEDDING")
            except Exception as e:  # noqa: BLE001 - any failure: say so and go on
                LOG.warning("warm-up request to %s failed: %s", model, e)
            spent[model] = time.monotonic() - start
        if "classify_embedding" in models and embedding is not None:
            start = time.monotonic()
            tensor = http.InferInput("EMBEDDING", list(embedding.shape), "FP32")
            tensor.set_data_from_numpy(embedding.astype(np.float32))
            try:
                for _ in range(ROUNDS):
                    client.infer("classify_embedding", [tensor])
            except Exception as e:  # noqa: BLE001
                LOG.warning("warm-up request to classify_embedding failed: %s", e)
            spent["classify_embedding"] = time.monotonic() - start
    finally:
        client.close()
    return spent
