"""The client's system shared memory (issue 12) against the session's real server.

Images go into, and embeddings come back through, /dev/shm regions the client registers with
the server's key; the answers must equal the socket's, bit for bit. The shared-memory API is
closed without the key, and nothing is left in /dev/shm, even by a client killed with SIGKILL.
CUDA shared memory is the same code with CUDA regions: it needs a GPU and did not run here.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from headmaster.client import ClientError, HeadmasterClient
from headmaster.client.shared_memory import KEY_HEADER as CLIENT_KEY_HEADER
from headmaster.server.record import KEY_HEADER

SHM = Path("/dev/shm")


def ours() -> set[str]:
    return {p.name for p in SHM.glob("headmaster-*")}


def registered(server) -> list[str]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        status = client.get_system_shared_memory_status(
            headers={f"triton-grpc-protocol-{KEY_HEADER}": server.api_key}, as_json=True
        )
    finally:
        client.close()
    return sorted(status.get("regions", {}))


@pytest.fixture(scope="module")
def images(jpeg_photos, photos) -> list[bytes]:
    big = io.BytesIO()
    Image.open(io.BytesIO(jpeg_photos["astronaut.jpg"])).resize((1600, 1600)).save(big, "JPEG", quality=95)
    # Small first, then one large enough that a region must grow mid-run.
    return [*jpeg_photos.values(), *photos.values(), big.getvalue(), *jpeg_photos.values()]


def test_the_client_key_header_is_the_servers():
    assert CLIENT_KEY_HEADER == KEY_HEADER


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_classify_and_embed_through_system_shared_memory_equal_the_socket(server, images, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    before = ours()
    with HeadmasterClient(url, protocol, batch_size=3, max_in_flight=2) as client:
        plain = client.classify(images)
        embedded = client.embed(images)
    with HeadmasterClient(
        url, protocol, batch_size=3, max_in_flight=2, shared_memory="system", api_key=server.api_key
    ) as client:
        shared = client.classify(images)
        shared_embedded = client.embed(images)
        assert len(registered(server)) >= 1  # the server holds the client's regions while it is open
        assert ours() == before  # unlinked as soon as the server mapped them
    assert all(r.ok for r in plain) and all(r.ok for r in shared)
    for a, b in zip(plain, shared):
        assert np.array_equal(a.embedding, b.embedding)
        assert {h: r.labels for h, r in a.heads.items()} == {h: r.labels for h, r in b.heads.items()}
    for a, b in zip(embedded, shared_embedded):
        assert np.array_equal(a.embedding, b.embedding)
    assert registered(server) == [] and ours() == before


def test_a_bad_image_in_a_shared_memory_batch_fails_alone(server, jpeg_photos):
    batch = [jpeg_photos["chelsea.jpg"], b"not an image at all", jpeg_photos["coffee.jpg"]]
    with HeadmasterClient(server.grpc_url, batch_size=3, shared_memory="system", api_key=server.api_key) as client:
        results = client.classify(batch)
    assert [r.ok for r in results] == [True, False, True]
    assert "not an image" in results[1].error


def test_registering_shared_memory_needs_the_key(server, jpeg_photos, monkeypatch):
    monkeypatch.delenv("HEADMASTER_API_KEY", raising=False)
    with (
        HeadmasterClient(server.grpc_url, shared_memory="system") as client,
        pytest.raises(ClientError, match=r"shared-memory API is restricted to callers with its key.*api_key="),
    ):
        client.classify([jpeg_photos["chelsea.jpg"]])
    monkeypatch.setenv("HEADMASTER_API_KEY", server.api_key)  # the environment variable works as well
    with HeadmasterClient(server.grpc_url, shared_memory="system") as client:
        assert client.classify([jpeg_photos["chelsea.jpg"]])[0].ok
    assert registered(server) == [] and not ours()


def test_a_client_killed_mid_run_leaves_nothing_in_dev_shm(server, tmp_path, jpeg_photos):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_photos["chelsea.jpg"])
    # Over HTTP: the bundled Triton 2.51 crashes when a gRPC client vanishes mid-request (upstream
    # triton-inference-server/server#7368, fixed in 24.12), shared memory or not.
    script = textwrap.dedent(f"""
        from headmaster.client import HeadmasterClient
        with HeadmasterClient({server.http_url!r}, "http", batch_size=2, max_in_flight=2, shared_memory="system",
                              api_key={server.api_key!r}) as client:
            print("ready", flush=True)
            while True:
                assert all(r.ok for r in client.classify([{str(photo)!r}] * 8))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    assert not ours()
    # Its regions stay registered (mapped by the server) until someone with the key unregisters them.
    left = registered(server)
    assert left
    client = grpcclient.InferenceServerClient(server.grpc_url)
    deadline = time.monotonic() + 30
    while True:  # Triton refuses to unregister a region while a request it was given still runs
        try:
            client.unregister_system_shared_memory(headers={f"triton-grpc-protocol-{KEY_HEADER}": server.api_key})
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    client.close()
    assert registered(server) == []
    with HeadmasterClient(server.grpc_url) as client:
        assert client.classify([jpeg_photos["chelsea.jpg"]])[0].ok


def test_closing_right_after_a_busy_run_unregisters_every_region(server, jpeg_photos):
    # Triton answers before it releases a request's buffers and refuses to unregister a region in
    # use: a client closed straight after its last answer must still leave nothing registered.
    batch = list(jpeg_photos.values()) * 2
    for _ in range(15):
        with HeadmasterClient(
            server.grpc_url, batch_size=2, max_in_flight=4, shared_memory="system", api_key=server.api_key
        ) as client:
            assert all(r.ok for r in client.embed(batch))
        assert registered(server) == []
    assert not ours()
