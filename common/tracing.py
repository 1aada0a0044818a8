"""OpenTelemetry traces of a request across the services: router -> prefill -> KV transfer -> decode.

    provider = setup_tracing("router", config.observability)   # __main__: None = tracing off
    svc = await RouterService.start(config, tracer=tracer(provider))
    ...
    shutdown_tracing(provider)                                  # flushes the spans still batched

One TracerProvider per process, made here and passed down as a `Tracer` (no global provider: tests
start several services in one process, each with its own). Off (no --otlp-endpoint and no
OTEL_EXPORTER_OTLP_ENDPOINT) the tracer is the API's no-op tracer: spans cost a call each and
nothing is exported. Spans go over OTLP/gRPC in batches.

Across a gRPC call the span context travels as W3C `traceparent` (and `tracestate`) metadata (the
propagators opentelemetry.propagate is configured with; OTEL_PROPAGATORS): `grpc_metadata(ctx)` on
the caller, `parent_from(context)` in the servicer. Spans here are started
with `tracer.start_span(..., context=parent)` and ended explicitly rather than made current: the
request paths are async generators, and a context attached in one must not leak to whoever iterates
it between two yields.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context

ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TIMEOUT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
# Seconds one export may take, retries included (the SDK's default is 10): the last flush runs at
# SIGTERM, and an unreachable collector must not eat the pod's termination grace period.
EXPORT_TIMEOUT_S = 3.0
NOOP = trace.NoOpTracer()


def make_provider(service: str, exporter: Any = None, *, batch: bool = True,
                  attributes: Mapping[str, str] | None = None) -> Any:
    """A TracerProvider for service `service` (resource service.name = "mnemosyne-<service>") that
    sends its spans to `exporter` (default: OTLP/gRPC, whose endpoint the SDK reads from
    OTEL_EXPORTER_OTLP_* when not given). `batch=False` exports each span as it ends (tests)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    resource = Resource.create({"service.name": f"mnemosyne-{service}", "service.namespace": "mnemosyne",
                                **(attributes or {})})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor((BatchSpanProcessor if batch else SimpleSpanProcessor)(exporter))
    return provider


def setup_tracing(service: str, observability: Any, env: Mapping[str, str] | None = None) -> Any:
    """The provider a service's __main__ makes from its ObservabilityConfig: OTLP/gRPC to
    `otlp_endpoint`, else to the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT; None when neither
    is set (tracing off)."""
    env = os.environ if env is None else env
    endpoint = observability.otlp_endpoint
    if not endpoint and not any(env.get(k) for k in ENDPOINT_ENV):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    timeout = None if any(env.get(k) for k in TIMEOUT_ENV) else EXPORT_TIMEOUT_S
    return make_provider(service, OTLPSpanExporter(endpoint=endpoint or None, timeout=timeout))


def shutdown_tracing(provider: Any) -> None:
    """Exports what is still batched and stops the provider (None: nothing to do)."""
    if provider is not None:
        provider.shutdown()


def tracer(provider: Any = None) -> trace.Tracer:
    """The tracer of `provider`, or the no-op tracer for None."""
    return NOOP if provider is None else provider.get_tracer("mnemosyne")


def grpc_metadata(ctx: Context | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that carries the span context of `ctx` (traceparent, tracestate); empty when
    it holds no recording span (tracing off), so an untraced call sends nothing extra."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)      # the configured propagators: W3C trace context by default
    return tuple((k.lower(), v) for k, v in carrier.items())


def parent_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> Context | None:
    """The caller's span context from gRPC metadata (None without a valid one, e.g. no traceparent)."""
    carrier = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
    ctx = propagate.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def parent_from(context: Any) -> Context | None:
    """The caller's span context from a servicer's `context` (grpc.aio.ServicerContext)."""
    try:
        metadata = context.invocation_metadata()
    except AttributeError:                  # a test's stand-in context
        return None
    return parent_from_metadata(metadata)


def context_of(span: trace.Span) -> Context:
    """A context whose current span is `span`: the parent of its children and what travels."""
    return trace.set_span_in_context(span)


def end_span(span: trace.Span, error: BaseException | None = None, **attributes: Any) -> None:
    """Sets `attributes` (None values left out), marks an error (its type; status ERROR), ends."""
    for k, v in attributes.items():
        if v is not None:
            span.set_attribute(k, v)
    if error is not None:
        span.set_attribute("error.type", type(error).__name__)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)[:200]))
    span.end()
