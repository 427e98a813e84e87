"""A recording stand-in for Triton's model-control HTTP API, for load-order unit tests.

Not a fake of Triton: it serves nothing and loads nothing. It answers the handful of calls
:mod:`headmaster.server.live` makes (``POST /v2/repository/models/NAME/load|unload``,
``GET /v2/models/NAME/config``, ``POST /v2/repository/index``) on a loopback port, and writes
down each one, in order, with the key header it carried. What our code asks, and in which order,
is then checked in milliseconds; what Triton does with it stays the business of the real-Triton
tests (tests/scenarios/test_hot_swap.py and friends).

A model's config as the server "holds" it is what ``disk`` says at the time of its last load
(``stale_loads`` makes the first loads of a model keep the old one, as a Triton that reloaded
from a config not yet rewritten would); ``refuse`` answers a load or unload of a model with an
HTTP status (403: the restricted API without the key; 400: Triton could not load it). ``look``,
when given, is called at each call and what it returns is kept with the call (``Call.saw``): the
repository-change tests note what the disk said at the moment each load came.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from headmaster.server.record import KEY_HEADER


@dataclass(frozen=True)
class Call:
    action: str  # load, unload, config, index
    model: str  # "" for index
    key: str | None  # the KEY_HEADER it carried
    body: dict  # the JSON body of a POST ({} for a GET)
    saw: object = None  # what ``look`` returned when the call came


@dataclass
class ControlRecorder:
    """Start with ``with ControlRecorder() as api:``; ``api.http_url`` is its host:port."""

    disk: dict[str, dict] = field(default_factory=dict)  # model -> the config a load picks up
    refuse: dict[tuple[str, str], int] = field(default_factory=dict)  # (action, model) -> HTTP status
    stale_loads: dict[str, int] = field(default_factory=dict)  # model -> loads that keep the old config
    look: Callable[[], object] | None = None  # called at each call, before it is answered
    calls: list[Call] = field(default_factory=list)
    held: dict[str, dict] = field(default_factory=dict)  # model -> config as loaded
    _lock: threading.Lock = field(default_factory=threading.Lock)
    http_url: str = ""  # host:port, once started (kept after it stops, for messages that name it)
    _server: ThreadingHTTPServer | None = None

    def order(self, *actions: str) -> list[tuple[str, str]]:
        """(action, model) of the calls, in order; only ``actions`` when given."""
        return [(c.action, c.model) for c in self.calls if not actions or c.action in actions]

    def seen(self, *actions: str) -> list[tuple[str, str, object]]:
        """(action, model, what ``look`` returned) of the calls, in order; only ``actions`` when given."""
        return [(c.action, c.model, c.saw) for c in self.calls if not actions or c.action in actions]

    def __enter__(self) -> ControlRecorder:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Triton answers

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, payload: object) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw.strip() else {}
                parts = self.path.split("?", 1)[0].strip("/").split("/")
                if parts == ["v2", "repository", "index"]:
                    recorder._record("index", "", self.headers, body)
                    self._answer(200, [{"name": n, "version": "1", "state": "READY"} for n in recorder.held])
                    return
                if len(parts) == 5 and parts[:3] == ["v2", "repository", "models"] and parts[4] in ("load", "unload"):
                    self._answer(*recorder._change(parts[4], parts[3], self.headers, body))
                    return
                self._answer(404, {"error": f"no such endpoint {self.path}"})

            def do_GET(self):
                parts = self.path.split("?", 1)[0].strip("/").split("/")
                if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "config":
                    recorder._record("config", parts[2], self.headers, {})
                    config = recorder.held.get(parts[2])
                    if config is None:
                        self._answer(400, {"error": f"Request for unknown model: '{parts[2]}' is not found"})
                    else:
                        self._answer(200, config)
                    return
                self._answer(404, {"error": f"no such endpoint {self.path}"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.block_on_close = False  # a client's idle keep-alive connection does not hold up the exit
        host, port = self._server.server_address[:2]
        self.http_url = f"{host}:{port}"
        threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _record(self, action: str, model: str, headers, body: dict) -> None:
        saw = self.look() if self.look is not None else None
        with self._lock:
            self.calls.append(Call(action, model, headers.get(KEY_HEADER), body, saw))

    def _change(self, action: str, model: str, headers, body: dict) -> tuple[int, dict]:
        self._record(action, model, headers, body)
        with self._lock:
            status = self.refuse.get((action, model))
            if status == 403:
                return 403, {"error": "This API is restricted, expecting header 'headmaster-api-key'"}
            if status is not None:
                return status, {"error": f"failed to {action} '{model}': refused by the test"}
            if action == "unload":
                self.held.pop(model, None)
            elif self.stale_loads.get(model, 0) > 0:
                self.stale_loads[model] -= 1
                self.held.setdefault(model, {"name": model})
            else:
                self.held[model] = self.disk.get(model, {"name": model})
        return 200, {}
