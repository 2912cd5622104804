"""OpenTelemetry traces, configured from the standard ``OTEL_*`` environment variables; nothing at all when off.

``OTEL_TRACES_EXPORTER``: ``none`` (the default), ``otlp``, ``console``, or a comma-separated list. With ``none``
the tracing SDK is never imported, the API has no tracing middleware, and every helper here is a constant-time no-op
(one module global read), so tracing off costs nothing measurable. With ``otlp`` the SDK's exporter reads its own
variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``..._HEADERS``,
``..._TIMEOUT``, ``..._COMPRESSION``); ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or ``..._TRACES_PROTOCOL``) is
``http/protobuf`` (the default, shipped) or ``grpc`` (needs ``opentelemetry-exporter-otlp-proto-grpc`` installed).
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` (``..._ARG``) and ``OTEL_BSP_*`` are
honoured by the SDK. ``OTEL_SDK_DISABLED=true`` turns everything off.

Spans of one ``/classify``: the HTTP span (``service.api.middleware.Tracing``), ``decode`` (with ``fetch`` when
images came by URL), ``text embeddings``, ``batcher wait`` and ``backbone forward`` (written by the batcher after
the batch ran, with its size and links to the other requests of the batch), and ``apply coefficients``. A job
carries the W3C context of the request that enqueued it (``TraceContext`` in its payload); the worker continues
that trace (``job <kind>``, ``extract features``, ``fit <variant>``, ``build basis``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["Parent", "configure", "current", "enabled", "extract", "ids", "inject", "record", "shutdown", "span"]

Parent = Any  # an opentelemetry SpanContext (or None: the current context)

_tracer: Any = None  # opentelemetry.trace.Tracer when on
_provider: Any = None
EXPORTERS = ("otlp", "console", "none")


def enabled() -> bool:
    return _tracer is not None


def configure(service_name: str, exporter: Any = None) -> bool:
    """Set up tracing for this process from the environment (or with ``exporter``, a SpanExporter that tests pass:
    spans are then exported synchronously). Returns whether tracing is on. A bad value raises ValueError naming it."""
    global _tracer, _provider
    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER={','.join(names)}: {unknown[0]!r} is not one of "
                         f"{', '.join(EXPORTERS)}")
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    names = [n for n in names if n != "none"]
    if disabled or (exporter is None and not names):
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    # the sampler from OTEL_TRACES_SAMPLER; our own bounded shutdown at exit instead of the SDK's unbounded one
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    _provider = provider
    _tracer = provider.get_tracer("residual-serve")
    atexit.register(shutdown)
    return True


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ValueError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the package opentelemetry-exporter-otlp-proto-"
                             "grpc; install it, or use http/protobuf (shipped)") from exc
        return OTLPSpanExporter()
    if protocol != "http/protobuf":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: use http/protobuf or grpc")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def shutdown(timeout_s: float = 5.0) -> None:
    """Flush and stop the exporters (process exit), waiting at most ``timeout_s``: an exporter that hangs (a
    collector that does not answer) never keeps the process from exiting. Tracing is off afterwards."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is not None:
        done = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
        done.start()
        done.join(timeout_s)


def _context(parent: Parent) -> Any:
    if parent is None:
        return None
    from opentelemetry import trace

    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, parent: Parent = None, kind: str = "internal",
         context: Any = None) -> Iterator[Any]:
    """A span around a block, a child of ``parent`` (a SpanContext), ``context`` (an extracted Context) or the
    current span; yields the span (None when tracing is off)."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    ctx = context if context is not None else _context(parent)
    with _tracer.start_as_current_span(name, context=ctx, kind=SpanKind[kind.upper()],
                                       attributes=dict(attributes or {})) as s:
        yield s


def current() -> Parent:
    """The current span's context (for a child made elsewhere, or a link), or None."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return ctx if ctx.is_valid else None


def record(name: str, start_ns: int, end_ns: int, parent: Parent, attributes: Mapping[str, Any] | None = None,
           links: Sequence[Parent] = ()) -> None:
    """A span that already happened (the batcher writes each request's wait and forward after the batch ran)."""
    if _tracer is None or parent is None:
        return
    from opentelemetry.trace import Link

    s = _tracer.start_span(name, context=_context(parent), start_time=start_ns, attributes=dict(attributes or {}),
                           links=[Link(p) for p in links if p is not None])
    s.end(end_time=end_ns)


def inject() -> dict[str, str]:
    """The current context as W3C headers (``traceparent``, ``tracestate``): what a job payload carries."""
    if _tracer is None:
        return {}
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str | None] | None) -> Any:
    """A Context from W3C headers (an HTTP request's, a job payload's ``trace``); None when off or absent."""
    if _tracer is None or not carrier:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    clean = {k.lower(): v for k, v in carrier.items() if isinstance(v, str)}
    if "traceparent" not in clean:
        return None
    return TraceContextTextMapPropagator().extract(clean)


def ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, for log lines; None when off or outside a span."""
    ctx = current()
    if ctx is None:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
