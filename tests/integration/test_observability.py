"""One request, one trace and one log line: a real kvstore (Redis), decode and prefill instances and
the router in this process, each with its own TracerProvider exporting to one in-memory exporter.

A short prompt gives router.generate -> router.decode -> decode; a long one router.generate ->
router.prefill -> prefill -> kv_transfer and router.generate -> router.decode -> decode, all in
one trace; a prompt admission rejects is a one-span trace. The router writes one INFO "request"
line per request, the rejected one included, with its reason.
"""
from __future__ import annotations

import logging
import uuid

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common.client import RouterClient
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.errors import CapacityError
from common.tracing import make_provider, tracer
from services.decode.config import DecodeConfig
from services.decode.service import DecodeService
from services.kvstore.config import KVStoreConfig
from services.kvstore.service import KVStoreService
from services.prefill.config import PrefillConfig
from services.prefill.service import PrefillService
from services.router.config import RouterConfig
from services.router.service import RouterService
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.waiting import wait_until
from tests.fixtures.loop import Loop

pytestmark = pytest.mark.timeout(120)
SHORT = 32


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    model = str(write_random_hf_model(tmp_path_factory.mktemp("obs-model"), "llama", num_hidden_layers=2,
                                      max_position_embeddings=512, seed=5))
    exporter = InMemorySpanExporter()
    providers = {s: make_provider(s, exporter, batch=False) for s in ("router", "prefill", "decode")}
    engine = EngineConfig(model=model, cache=CacheConfig(block_size=16, num_blocks=64),
                          scheduler=SchedulerConfig(chunk_size=32))
    loop = Loop()
    kv = loop.run(KVStoreService.start(KVStoreConfig(port=0, redis_url=redis_url, grace_s=0.5,
                                                     deployment=f"obs-{uuid.uuid4().hex[:8]}")))
    decode = loop.run(DecodeService.start(DecodeConfig(kvstore=kv.address, engine=engine, grace_s=0.5),
                                          tracer(providers["decode"])))
    prefill = loop.run(PrefillService.start(PrefillConfig(kvstore=kv.address, engine=engine, grace_s=0.5),
                                            tracer(providers["prefill"])))
    router = loop.run(RouterService.start(RouterConfig(kvstore=kv.address, port=0, model=model, grace_s=0.5,
                                                       short_prompt_tokens=SHORT, discovery_ttl_s=0.1),
                                          tracer(providers["router"])))
    yield router, exporter
    for svc in (router, prefill, decode, kv):
        loop.run(svc.stop())
    loop.close()
    for p in providers.values():
        p.shutdown()


def trace_of(exporter, request_id: str) -> dict:
    """name -> span of the trace whose router.generate span has this request id."""
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "router.generate"
                and s.attributes["mnemosyne.request_id"] == request_id)
    return {s.name: s for s in spans if s.context.trace_id == root.context.trace_id}


def parent_of(spans: dict, name: str) -> str:
    by_id = {s.context.span_id: n for n, s in spans.items()}
    return by_id[spans[name].parent.span_id]


def request_lines(caplog) -> dict:
    return {r.request_id: r for r in caplog.records if r.name == "services.router.router"
            and getattr(r, "event", None) == "request"}


def test_one_trace_and_one_log_line_per_request(stack, caplog):
    router, exporter = stack
    caplog.set_level(logging.INFO, logger="services.router.router")
    ids = [(5 * i + 7) % 300 + 10 for i in range(80)]
    with RouterClient(router.address, timeout_s=60) as c:
        short = c.complete(token_ids=ids[:SHORT - 1], max_tokens=3, request_id="obs-short")
        long = c.complete(token_ids=ids, max_tokens=3, request_id="obs-long")
        with pytest.raises(CapacityError, match="RESOURCE_EXHAUSTED") as rejected:
            c.complete(token_ids=ids, max_tokens=3, request_id="obs-rejected", ttft_slo_s=1e-6)
    assert (short.route, long.route) == ("decode_only", "disaggregated")
    assert "ttft_unattainable" in str(rejected.value)
    # the servers end their spans as their streams close, a moment after the client's last message
    wait_until(lambda: {"decode", "kv_transfer", "prefill"} <= set(trace_of(exporter, "obs-long")),
               10.0, "the long request's spans", poll_s=0.05)

    s = trace_of(exporter, "obs-short")
    assert {"router.generate", "router.admission", "router.decode", "decode"} <= set(s), sorted(s)
    assert "router.prefill" not in s
    assert parent_of(s, "decode") == "router.decode" and parent_of(s, "router.decode") == "router.generate"
    assert s["router.generate"].attributes["mnemosyne.route"] == "decode_only"
    assert s["router.generate"].attributes["mnemosyne.outcome"] == "length"
    assert s["decode"].attributes["mnemosyne.completion_tokens"] == 3
    assert s["decode"].resource.attributes["service.name"] == "mnemosyne-decode"

    l = trace_of(exporter, "obs-long")
    assert parent_of(l, "router.prefill") == "router.generate" and parent_of(l, "prefill") == "router.prefill"
    assert parent_of(l, "kv_transfer") == "prefill" and parent_of(l, "decode") == "router.decode"
    assert parent_of(l, "decode.prepare_receive") == "router.generate"
    assert l["router.generate"].attributes["mnemosyne.route"] == "disaggregated"
    assert l["kv_transfer"].attributes["mnemosyne.kv.bytes"] > 0 and l["kv_transfer"].status.is_ok
    chunks = [e for e in l["prefill"].events if e.name == "chunk"]
    assert [e.attributes["tokens_done"] for e in chunks][-1] == 80 and len(chunks) >= 2
    assert l["decode"].attributes["mnemosyne.prefilled"] is True

    r = trace_of(exporter, "obs-rejected")
    assert set(r) == {"router.generate", "router.admission"}
    assert r["router.admission"].attributes["mnemosyne.admission"] == "rejected"
    assert not r["router.generate"].status.is_ok

    lines = request_lines(caplog)
    assert {"obs-short", "obs-long", "obs-rejected"} <= set(lines)
    ok, bad = lines["obs-long"], lines["obs-rejected"]
    assert (ok.levelno, ok.route, ok.admission, ok.outcome, ok.prompt_tokens, ok.completion_tokens) == \
           (logging.INFO, "disaggregated", "admitted", "length", 80, 3)
    assert ok.ttft_s > 0 and ok.e2e_s >= ok.ttft_s and ok.tbt_mean_s > 0 and ok.predicted_ttft_s > 0
    assert (bad.route, bad.admission, bad.admission_reason, bad.outcome, bad.error_status) == \
           ("none", "rejected", "ttft_unattainable", "error", "RESOURCE_EXHAUSTED")
    assert lines["obs-short"].route == "decode_only"
