"""Triton's OpenTelemetry tracing, turned on by `headmaster serve --trace-url`.

Triton 2.51 (the bundled server included) exports its spans (the request, each model it runs,
the compute inside) over OTLP/HTTP to a collector, and continues a trace whose W3C
``traceparent`` header comes with the request: the client sends the caller's current span
(``headmaster.client``), so one trace runs from the application through every model.
"""

from __future__ import annotations

from urllib.parse import urlparse

from headmaster.errors import ConfigError

TRACE_LEVELS = ("TIMESTAMPS", "TENSORS", "TIMESTAMPS,TENSORS")


def trace_args(url: str, rate: int = 1, level: str = "TIMESTAMPS") -> tuple[str, ...]:
    """tritonserver options that export a trace of one request in ``rate`` to the OTLP/HTTP
    collector at ``url`` (e.g. http://127.0.0.1:4318/v1/traces)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(
            f"the trace URL must be an OTLP/HTTP address such as http://127.0.0.1:4318/v1/traces, not {url!r}",
            option="trace_url",
        )
    if rate < 1:
        raise ConfigError(f"the trace rate is one request in N, N >= 1, not {rate}", option="trace_rate")
    if level not in TRACE_LEVELS:
        raise ConfigError(
            f"the trace level must be one of {', '.join(TRACE_LEVELS)}, not {level!r}", option="trace_level"
        )
    args = [
        "--trace-config=mode=opentelemetry",
        f"--trace-config=rate={rate}",
        f"--trace-config=opentelemetry,url={url}",
        "--trace-config=opentelemetry,resource=service.name=headmaster",
    ]
    args += [f"--trace-config=level={part}" for part in level.split(",")]
    return tuple(args)
