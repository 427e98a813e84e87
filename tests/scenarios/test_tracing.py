"""`headmaster serve --trace-url`: Triton's OpenTelemetry spans reach a local OTLP/HTTP receiver,
in the trace of the application's span that the client propagated (W3C traceparent)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from headmaster.client import HeadmasterClient
from headmaster.client.tracing import trace_headers
from tests.helpers import Ports, clone_repo, read_until_ready, run_cli, serve_command


@pytest.fixture()
def otlp_receiver():
    """An OTLP/HTTP endpoint on loopback keeping every span it is sent (Triton sends JSON)."""
    spans: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            data = self.rfile.read(int(self.headers["content-length"]))
            try:
                body = json.loads(data)
            except ValueError:  # kept, so that a failure says a batch came in another encoding
                spans.append({"traceId": None, "name": f"undecodable {self.headers.get('content-type')}"})
                body = {}
            for resource in body.get("resourceSpans", []):
                for scope in resource.get("scopeSpans", []):
                    spans.extend(scope.get("spans", []))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1/traces", spans
    server.shutdown()


@pytest.mark.server  # starts its own Triton
def test_served_spans_join_the_callers_trace(repo, photos, tmp_path, otlp_receiver):
    from opentelemetry.sdk.trace import TracerProvider

    url, spans = otlp_receiver
    copy = clone_repo(repo, tmp_path / "repo")  # the session's repository is served already
    ports = Ports.free()
    serve = subprocess.Popen(serve_command(copy, ports, "--trace-url", url), stderr=subprocess.PIPE, text=True)
    try:
        read_until_ready(serve)
        tracer = TracerProvider().get_tracer("headmaster-test")
        with tracer.start_as_current_span("application") as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            span_id = format(span.get_span_context().span_id, "016x")
            # What the client sends is checked first: a failure below is then the server's side.
            assert trace_headers()["traceparent"].startswith(f"00-{trace_id}-{span_id}-")
            with HeadmasterClient(f"127.0.0.1:{ports.grpc}") as client:
                assert client.classify([photos["chelsea.png"]])[0].ok
        deadline = time.monotonic() + 60  # Triton exports in batches, every few seconds
        while time.monotonic() < deadline and not any(
            s["traceId"] == trace_id and s["name"] == "image_encoder" for s in spans
        ):
            time.sleep(1)
    finally:
        serve.terminate()
        serve.wait(timeout=90)
    ours = [s for s in spans if s["traceId"] == trace_id]
    names = {s["name"] for s in ours}
    received = sorted({(s["traceId"], s["name"]) for s in spans}, key=str)
    assert {"InferRequest", "classify", "preprocess", "image_encoder", "threshold"} <= names, (trace_id, received)
    request = next(s for s in ours if s["name"] == "InferRequest")
    assert request["parentSpanId"] == span_id  # Triton's request span is a child of the caller's


@pytest.mark.server  # starts its own Triton
def test_a_trace_url_that_is_not_otlp_http_is_refused(tmp_path):
    result = run_cli("serve", "--repo", tmp_path, "--trace-url", "localhost:4318")
    assert result.returncode == 1
    assert "the trace URL must be an OTLP/HTTP address" in " ".join(result.stderr.split())
