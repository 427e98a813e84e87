"""Trace context for requests: the caller's current OpenTelemetry span, as W3C headers.

With ``opentelemetry-api`` installed and a span current, each request carries ``traceparent``
(and ``tracestate``), and a server started with ``headmaster serve --trace-url`` records its
spans in the caller's trace. Without it, or without a span, no header is sent.
"""

from __future__ import annotations

import contextvars
from typing import Any

_propagate: list = []  # opentelemetry.propagate once imported, or None when it is not installed


def trace_headers() -> dict[str, str]:
    """The current trace context as request headers ({} when there is none)."""
    if not _propagate:
        found: Any = None
        try:  # looked up once: a failed import searches the path again on every call
            from opentelemetry import propagate

            found = propagate
        except ImportError:
            pass
        _propagate.append(found)
    if _propagate[0] is None:
        return {}
    carrier: dict[str, str] = {}
    _propagate[0].inject(carrier)
    return carrier


def in_context(coroutine, context: contextvars.Context):
    """Run ``coroutine`` with the caller's context variables (the current span among them) on
    another thread's event loop, where a task would otherwise start from that thread's."""

    async def run():
        for variable, value in context.items():
            variable.set(value)
        return await coroutine

    return run()
