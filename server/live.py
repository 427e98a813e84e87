"""Make a running server (explicit model control) pick up repository changes, safely.

Why explicit control rather than polling: a writer knows the moment a version is complete
and valid; a poller can catch a repository between two related writes (a new head's
folder before the ensemble that uses it). Explicit loads let us order the reloads so that
every request in flight or arriving meanwhile still finds a consistent set of models:

- adding a head or a version: the head first, then ``threshold`` (whose head inputs are
  optional, so the old ensembles still fit it), then the ensembles ``classify`` and
  ``classify_embedding``;
- removing a head: the ensembles first (they stop routing to the head), then
  ``threshold``, then unload the head.

Triton itself keeps serving the old version of a model until the new one has loaded, and
lets in-flight requests finish on the version they started on.

The control API is closed by a key (see :mod:`headmaster.server.record`); a :class:`Control` carries
the address and the key, found in the repository's server record or given by the caller.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from headmaster.errors import ServerError
from headmaster.repository.topology import HEAD_DEPENDENT
from headmaster.server.record import KEY_ENV, KEY_HEADER, ServerRecord, running_server

LOG = logging.getLogger(__name__)
# Models whose configs name every head, in the order they are loaded after a head arrives.


@dataclass(frozen=True)
class Control:
    """A server's control API: its HTTP address and the key its restricted APIs want."""

    http_url: str
    api_key: str | None = None
    # The working copy of an S3 repository this server reads: its configs go with each load.
    configs: Path | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {KEY_HEADER: self.api_key} if self.api_key else {}

    @classmethod
    def of(cls, server) -> Control:
        """From a Control, a ServerRecord or TritonServer (anything with http_url and api_key),
        or a bare host:port, whose key then comes from HEADMASTER_API_KEY."""
        if isinstance(server, Control):
            return server
        if isinstance(server, str):
            return cls(server, os.environ.get(KEY_ENV) or None)
        return cls(server.http_url, getattr(server, "api_key", None))


@dataclass(frozen=True)
class Replicas:
    """Several servers of one (S3) repository: every change is loaded on all of them at once,
    each in the same order as on one server, so that each replica moves from one consistent set
    of models to the next; a replica that refuses is named and the change is undone everywhere."""

    members: tuple[Control, ...]

    @property
    def http_url(self) -> str:
        return ",".join(member.http_url for member in self.members)


def members(server) -> tuple[Control, ...]:
    return server.members if isinstance(server, Replicas) else (Control.of(server),)


def find(repo: Path, server: str | None = None) -> Control | Replicas | None:
    """The server a command that changed ``repo`` must update: ``server`` when given (its key
    from the repository's record when the addresses match, else HEADMASTER_API_KEY; several
    servers separated by commas: the replicas of one repository), else the live server recorded
    in the repository, else None (nothing is serving it)."""
    record: ServerRecord | None = running_server(repo)
    if server is not None and "," in server:
        return Replicas(tuple(_control(repo, record, one.strip()) for one in server.split(",") if one.strip()))
    if server is None and record is None:
        return None
    return _control(repo, record, server)


def _control(repo: Path, record: ServerRecord | None, server: str | None) -> Control:
    """``server`` (None: the recorded one) as a Control of ``repo``: its key from the record when
    the addresses match."""
    if record is not None and (server is None or same_address(record.http_url, server)):
        control = Control.of(record)
    else:
        control = Control.of(server)
    from headmaster.repository import s3

    if s3.location_of(repo) is not None:
        control = replace(control, configs=Path(repo))
    return control


def _config_override(control: Control, name: str) -> dict:
    """For a server reading S3, the model's config as JSON with the load call: the replica loads
    exactly the config the command validated, whatever Triton makes of the objects' modification
    times (S3 gives them to the second). The model's files still come from the bucket."""
    if control.configs is None:
        return {}
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(control.configs) / name / "config.pbtxt"
    if not path.is_file():
        return {}
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return {"config": json_format.MessageToJson(config, preserving_proto_field_name=True)}


LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0", ""}


def same_address(a: str, b: str) -> bool:
    """host:port equality where every name of this machine's loopback is one host."""
    (host_a, _, port_a), (host_b, _, port_b) = a.rpartition(":"), b.rpartition(":")
    if port_a != port_b:
        return False
    return host_a == host_b or (host_a.lower() in LOOPBACK and host_b.lower() in LOOPBACK)


def _client(control: Control, timeout_s: float):
    import tritonclient.http as http

    return http.InferenceServerClient(control.http_url, connection_timeout=timeout_s, network_timeout=timeout_s)


def _call(server, action: str, names: list[str], timeout_s: float) -> None:
    from tritonclient.utils import InferenceServerException

    control = Control.of(server)
    client = _client(control, timeout_s)
    try:
        for name in names:
            LOG.info("%s %s on %s", action, name, control.http_url)
            started = time.monotonic()
            try:
                extra = _config_override(control, name) if action == "load" else {}
                getattr(client, f"{action}_model")(name, headers=control.headers, **extra)
            except InferenceServerException as e:
                message = e.message() or str(e)
                if "403" in str(e.status()) or "restricted" in message.lower():
                    raise ServerError(
                        f"the server at {control.http_url} refused to {action} {name!r}: its control API is "
                        f"closed and this command has no key for it (set {KEY_ENV}, or run the command on the "
                        "machine that serves the repository, where the key is in REPO/.headmaster/server.json)"
                    ) from None
                raise ServerError(
                    f"the server at {control.http_url} could not {action} model {name!r}: {message}"
                ) from None
            except Exception as e:  # connection refused, timeouts
                raise ServerError(
                    f"cannot reach the Triton server at {control.http_url} to {action} {name!r}: {e}"
                ) from None
            LOG.info("%s %s on %s: %.2f s", action, name, control.http_url, time.monotonic() - started)
    finally:
        client.close()


def _on_each(server, step) -> None:
    """``step(control)`` on every replica at once (each replica still in the safe order): the
    slowest replica, not their sum, bounds how long a change takes to reach all. A failure names
    the replica and those that did change (the caller puts them back)."""
    from concurrent.futures import ThreadPoolExecutor

    controls = members(server)
    if len(controls) == 1:
        step(controls[0])
        return
    with ThreadPoolExecutor(max_workers=len(controls)) as pool:
        futures = {control.http_url: pool.submit(step, control) for control in controls}
    failed = {url: future.exception() for url, future in futures.items() if future.exception() is not None}
    if failed:
        done = [url for url in futures if url not in failed]
        first = next(iter(failed.values()))
        raise ServerError(
            f"{first}"
            + (f" (and {len(failed) - 1} more replicas)" if len(failed) > 1 else "")
            + (f" (replicas that did change: {', '.join(done)})" if done else "")
        ) from None


def head_published(server, head: str, timeout_s: float = 300.0) -> None:
    """A head got a new (or its first) version, or a new live version: load it everywhere."""
    _on_each(server, lambda control: _call(control, "load", [head, *HEAD_DEPENDENT], timeout_s))


def _still_routes(control: Control, model: str, head: str, timeout_s: float) -> bool:
    """Whether the config ``model`` is loaded with still names ``head`` (model-config API)."""
    import json

    client = _client(control, timeout_s)
    try:
        config = client.get_model_config(model, headers=control.headers)
    except Exception:
        return False  # not loaded: nothing routes through it
    finally:
        client.close()
    return f'"{head}"' in json.dumps(config)


def load(server, models: list[str], timeout_s: float = 300.0) -> None:
    """Load ``models`` in order on the server, or on every replica at once."""
    _on_each(server, lambda control: _call(control, "load", models, timeout_s))


def head_removed(server, head: str, timeout_s: float = 300.0, reload_threshold: bool = True) -> None:
    """The ensembles stop naming ``head``, then ``threshold`` reloads, then ``head`` unloads.
    ``reload_threshold=False`` leaves the old ``threshold`` (its head inputs are optional, so the
    new ensembles fit it) for a later :func:`load`: see ``lifecycle.remove`` for S3."""
    ensembles = [m for m in reversed(HEAD_DEPENDENT) if m != "threshold"]

    def step(control):
        _call(control, "load", ensembles, timeout_s)
        # Before threshold changes, every ensemble must have let go of the head (threshold without
        # the head's input would make Triton drop an ensemble that still names it): check.
        for model in ensembles:
            for _ in range(3):
                if not _still_routes(control, model, head, timeout_s):
                    break
                LOG.warning("%s still routes %s through %s: loading it again", control.http_url, head, model)
                time.sleep(1.0)
                _call(control, "load", [model], timeout_s)
            else:
                raise ServerError(
                    f"the server at {control.http_url} kept serving {model} with head {head!r} "
                    "after three loads of its new config"
                )
        if reload_threshold:
            _call(control, "load", ["threshold"], timeout_s)
        _call(control, "unload", [head], timeout_s)

    _on_each(server, step)


def rollout(server, heads: list[str], timeout_s: float = 300.0) -> dict[str, str | None]:
    """Make every replica load what the repository names now (after a write made without
    ``--server``, or to catch up a replica that missed one): each head, then the models that
    name heads, replica after replica. Returns replica -> None, or the reason it is a straggler;
    unlike a head command, one straggler does not stop the others."""
    report: dict[str, str | None] = {}
    for control in members(server):
        try:
            _call(control, "load", [*heads, *HEAD_DEPENDENT], timeout_s)
            report[control.http_url] = None
        except ServerError as e:
            report[control.http_url] = str(e)
    return report


def reload(server, model: str, timeout_s: float = 300.0) -> None:
    """Unload, then load ``model`` again: a fresh instance even when nothing on disk changed
    (Triton treats a load of an unchanged model as done). Ensembles that use it go unready
    meanwhile and are reloaded by Triton with it."""
    _call(server, "unload", [model], timeout_s)
    _call(server, "load", [model], timeout_s)


def unload(server, models: list[str], timeout_s: float = 60.0) -> None:
    _call(server, "unload", models, timeout_s)


def _ask(server, timeout_s: float, question):
    """One read-only call of the control API, on a client opened and closed for it."""
    control = Control.of(server)
    client = _client(control, timeout_s)
    try:
        return question(client, control.headers)
    finally:
        client.close()


def states(server, timeout_s: float = 30.0) -> list[tuple[str, str, str]]:
    """(model, version, state) of every model version Triton knows (its repository index)."""
    index = _ask(server, timeout_s, lambda client, headers: client.get_model_repository_index(headers=headers))
    return [(m["name"], m.get("version", ""), m.get("state", "")) for m in index]


def loaded(server, timeout_s: float = 30.0) -> dict[str, str]:
    """Model name -> the version Triton has READY."""
    return {name: version for name, version, state in states(server, timeout_s) if state == "READY"}


def serving(server, timeout_s: float = 30.0) -> dict[str, set[str]]:
    """Model name -> the versions Triton has READY, from its model statistics: what the server holds,
    without reading the repository. The repository index (:func:`states`) lists the repository first:
    from S3 with the endpoint gone it waits on the bucket, and Triton's exit then waits on that call."""
    stats = _ask(server, timeout_s, lambda client, headers: client.get_inference_statistics(headers=headers))
    versions: dict[str, set[str]] = {}
    for model in stats.get("model_stats", []):
        versions.setdefault(model["name"], set()).add(model["version"])
    return versions
