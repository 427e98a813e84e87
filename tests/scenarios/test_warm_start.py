"""Warm at ready: when `headmaster serve` says "Triton is ready", every model has already run.

The encoders are warmed by Triton itself (``model_warmup`` in their configs); the heads, the
models that read bytes or text, and the ensembles, by serve's own requests
(server/warmup.py). What the first requests after ready cost against steady state is
measured in benchmarks/peer_infinity.py, not here.
"""

from __future__ import annotations

import signal
import subprocess

import pytest
import tritonclient.http as httpclient

from headmaster.repository.config import parse
from headmaster.repository.repo import Repository
from headmaster.server.warmup import ROUNDS
from tests.helpers import ARTIFACTS, Ports, clone_repo, read_until_ready, serve_command

pytestmark = [
    pytest.mark.portable_only("`headmaster serve` runs the bundled Triton (python backend only)"),
    pytest.mark.server,
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def warm_served(repo, tmp_path_factory):
    copy = clone_repo(repo, tmp_path_factory.mktemp("warm") / "model_repository")
    ports = Ports.free()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        serve_command(copy, ports, "--log-file", ARTIFACTS / "warm-start-triton.log"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        read_until_ready(process)
        yield copy, f"127.0.0.1:{ports.http}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)


def test_encoder_configs_carry_triton_warmup_and_ensembles_do_not(warm_served):
    repo, _ = warm_served
    encoder = parse((repo / "image_encoder" / "config.pbtxt").read_text())
    assert [w.batch_size for w in encoder.model_warmup] == [1, 4]  # batch 1 and the first preferred size
    assert [w.batch_size for w in parse((repo / "text_encoder" / "config.pbtxt").read_text()).model_warmup] == [1, 4]
    for ensemble in ("classify", "embed", "classify_embedding"):
        assert not parse((repo / ensemble / "config.pbtxt").read_text()).model_warmup


def test_every_model_has_run_before_the_first_client_request(warm_served):
    repo, url = warm_served
    client = httpclient.InferenceServerClient(url)
    try:
        # Nothing but serve itself has sent a request yet.
        stats = {s["name"]: s for s in client.get_inference_statistics()["model_stats"]}
        ran = {name: int(s["inference_stats"]["success"]["count"]) for name, s in stats.items()}
        expected = set(Repository(repo).model_names())
        not_run = sorted(name for name in expected if ran.get(name, 0) == 0)
        assert not not_run, f"not warmed at ready: {not_run} (counts: {ran})"
        # Triton's own warm-up ran too, while the models loaded: serve sent ROUNDS single images
        # through classify and through embed; the encoder ran a batch of 1 and one of 4 besides.
        assert ran["image_encoder"] == 2 * ROUNDS + 1 + 4, ran
        for head in Repository(repo).head_names():  # through classify and classify_embedding
            assert ran[head] == 2 * ROUNDS, (head, ran)
    finally:
        client.close()
