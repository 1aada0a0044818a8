"""common/tracing.py: off unless an endpoint is configured (flag or OTEL_EXPORTER_OTLP_ENDPOINT),
the no-op tracer sends nothing, and a span context survives the trip through gRPC metadata."""
from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common.config import ObservabilityConfig
from common.tracing import (NOOP, context_of, end_span, grpc_metadata, make_provider, parent_from,
                            parent_from_metadata, setup_tracing, shutdown_tracing, tracer)


def test_tracing_is_off_without_an_endpoint_and_on_with_one():
    assert setup_tracing("router", ObservabilityConfig(), env={}) is None
    assert tracer(None) is NOOP
    for cfg, env in ((ObservabilityConfig(otlp_endpoint="http://127.0.0.1:1"), {}),
                     (ObservabilityConfig(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})):
        provider = setup_tracing("decode", cfg, env=env)
        try:
            assert provider.resource.attributes["service.name"] == "mnemosyne-decode"
        finally:
            shutdown_tracing(provider)        # nothing batched: returns at once


def test_the_noop_tracer_puts_nothing_on_the_wire():
    span = NOOP.start_span("router.generate")
    assert grpc_metadata(context_of(span)) == ()
    end_span(span, ValueError("x"), a=1)     # harmless


def test_a_span_context_crosses_grpc_metadata():
    exporter = InMemorySpanExporter()
    provider = make_provider("router", exporter, batch=False)
    t = tracer(provider)
    parent = t.start_span("router.decode")
    md = grpc_metadata(context_of(parent))
    assert dict(md)["traceparent"].startswith("00-") and all(k == k.lower() for k, _ in md)
    # as a servicer receives it: the call's metadata (other keys too) -> the child's parent
    child = t.start_span("decode", context=parent_from_metadata((("user-agent", "grpc"), *md)))
    end_span(child, KeyError("k"), **{"mnemosyne.completion_tokens": 3, "mnemosyne.route": None})
    end_span(parent)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["decode"].parent.span_id == spans["router.decode"].context.span_id
    assert spans["decode"].context.trace_id == spans["router.decode"].context.trace_id
    assert spans["decode"].attributes["mnemosyne.completion_tokens"] == 3
    assert "mnemosyne.route" not in spans["decode"].attributes
    assert spans["decode"].attributes["error.type"] == "KeyError" and not spans["decode"].status.is_ok
    provider.shutdown()


@pytest.mark.parametrize("metadata", [None, (), (("traceparent", "garbage"),), (("x-bin", b"\x00"),)])
def test_no_or_a_bad_traceparent_gives_no_parent(metadata):
    assert parent_from_metadata(metadata) is None


def test_parent_from_a_servicer_context():
    class Ctx:
        def __init__(self, md):
            self.md = md

        def invocation_metadata(self):
            return self.md
    provider = make_provider("prefill", InMemorySpanExporter(), batch=False)
    span = tracer(provider).start_span("router.prefill")
    ctx = parent_from(Ctx(grpc_metadata(context_of(span))))
    assert ctx is not None and parent_from(Ctx(())) is None and parent_from(object()) is None
    provider.shutdown()
