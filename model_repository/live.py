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
"""

from __future__ import annotations

import logging

from headmaster.export.errors import ServerError

LOG = logging.getLogger(__name__)
# Models whose configs name every head, in the order they are loaded after a head arrives.
HEAD_DEPENDENT = ("threshold", "classify", "classify_embedding")


def _client(url: str, timeout_s: float):
    import tritonclient.http as http

    return http.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)


def _call(url: str, action: str, names: list[str], timeout_s: float) -> None:
    from tritonclient.utils import InferenceServerException

    client = _client(url, timeout_s)
    try:
        for name in names:
            LOG.info("%s %s on %s", action, name, url)
            try:
                getattr(client, f"{action}_model")(name)
            except InferenceServerException as e:
                raise ServerError(f"the server at {url} could not {action} model {name!r}: {e.message()}") from None
            except Exception as e:  # connection refused, timeouts
                raise ServerError(f"cannot reach the Triton server at {url} to {action} {name!r}: {e}") from None
    finally:
        client.close()


def head_published(url: str, head: str, timeout_s: float = 300.0) -> None:
    """A head got a new (or its first) version, or a new live version: load it everywhere."""
    _call(url, "load", [head, *HEAD_DEPENDENT], timeout_s)


def head_removed(url: str, head: str, timeout_s: float = 300.0) -> None:
    _call(url, "load", [*reversed(HEAD_DEPENDENT)], timeout_s)
    _call(url, "unload", [head], timeout_s)
