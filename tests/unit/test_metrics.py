"""common/metrics.py: names and labels by Prometheus conventions, buckets, helpers as they show in
the exposition, per-process registries, the /metrics endpoint and the gRPC error interceptor."""
from __future__ import annotations

import asyncio
import re
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common import metrics as mm
from common.errors import CapacityError, ConfigError, InvalidRequestError, PlacementError
from common.metrics import (SPECS, Metrics, PromptClasses, RequestTiming, new_registry, serve_metrics,
                            start_metrics_server)

NAME = re.compile(r"^mnemosyne_[a-z][a-z0-9_]*$")
UNITS = ("_seconds", "_bytes", "_tokens", "_ratio", "_total")


def samples(registry) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(registry, name, **labels) -> float | None:
    """The one sample `name` whose labels include `labels` (None if absent)."""
    found = [v for (n, ls), v in samples(registry).items()
             if n == name and set(labels.items()) <= set(ls)]
    assert len(found) <= 1, f"{name} {labels} is ambiguous: {found}"
    return found[0] if found else None


@pytest.fixture
def router():
    registry = new_registry()
    return registry, Metrics(registry, role="router", pool="p", instance="r0")


def test_names_types_and_labels_follow_prometheus_conventions():
    assert len({s.name for s in SPECS}) == len(SPECS)
    for s in SPECS:
        assert NAME.match(s.name), s.name
        assert s.kind in ("counter", "gauge", "histogram")
        assert (s.kind == "counter") == s.name.endswith("_total"), s.name
        assert not re.search(r"_(ms|milliseconds|us|kb|mb|percent)(_|$)", s.name), s.name
        if s.kind == "histogram":
            assert s.name.endswith(("_seconds", "_tokens", "_size")), s.name
            assert list(s.buckets) == sorted(s.buckets) and s.buckets
        for label in s.labels:
            assert re.match(r"^[a-z][a-z_]*$", label) and label not in mm.IDENTITY
        assert s.help and set(s.recorded_by) <= set(mm.ROLES)
    durations = [s for s in SPECS if "time" in s.name or "latency" in s.name or "duration" in s.name]
    assert all(s.name.endswith("_seconds") for s in durations)


def test_buckets_suit_ttft_and_tbt():
    ttft = mm.SPEC_BY_NAME["mnemosyne_time_to_first_token_seconds"].buckets
    tbt = mm.SPEC_BY_NAME["mnemosyne_time_between_tokens_seconds"].buckets
    assert (ttft[0], ttft[-1]) == (0.01, 600.0) and len(ttft) >= 12
    assert (tbt[0], tbt[-1]) == (0.001, 2.0) and len(tbt) >= 12
    # the common SLO thresholds are bucket bounds, so percentiles near them are exact
    assert {0.5, 1.0, 2.0 if 2.0 in ttft else 2.5, 10.0, 60.0} <= set(ttft)
    assert {0.05, 0.1, 0.2} <= set(tbt)


def test_every_family_is_exposed_with_identity_labels_and_known_series_start_at_zero(router):
    registry, _ = router
    text = generate_latest(registry).decode()
    for s in SPECS:
        assert f"# TYPE {s.name} {s.kind}" in text, s.name
    assert value(registry, "mnemosyne_slo_requests_total", slo="ttft", result="missed") == 0
    assert value(registry, "mnemosyne_requests_finished_total", finish_reason="error") == 0
    assert value(registry, "mnemosyne_time_to_first_token_seconds_count", prompt_class="xlong") == 0
    assert value(registry, "mnemosyne_active_requests", pool="p", role="router", instance="r0") == 0
    assert value(registry, "mnemosyne_tokens_total", kind="prompt") is None   # not a router family
    assert "process_cpu_seconds_total" in text


def test_request_level_families_carry_the_model_name():
    registry = new_registry()
    m = Metrics(registry, role="decode", pool="p", instance="d0", model_name="SmolLM2-135M-Instruct")
    m.observe_iteration(0.01, 2, chunk_tokens=(64,), generated_tokens=1)
    m.observe_queue_time(0.5)
    per_model = {s.name for s in SPECS if s.per_model}
    assert {"mnemosyne_time_to_first_token_seconds", "mnemosyne_requests_finished_total",
            "mnemosyne_tokens_total", "mnemosyne_active_requests"} <= per_model
    seen = set()
    for (name, labels), _ in samples(registry).items():
        family = next((s.name for s in SPECS if name in mm.exposed_names(s)), None)
        if family is None:
            continue                                       # process_*
        labels = dict(labels)
        assert ("model_name" in labels) == (family in per_model), (name, labels)
        if family in per_model:
            assert labels["model_name"] == "SmolLM2-135M-Instruct"
            seen.add(family)
    assert {"mnemosyne_tokens_total", "mnemosyne_queue_time_seconds", "mnemosyne_active_requests"} <= seen
    # the kvstore serves no model: Prometheus reads an empty label as no label
    k = new_registry()
    Metrics(k, role="kvstore", instance="k0")
    assert value(k, "mnemosyne_active_requests", model_name="") == 0


def test_a_histogram_observed_n_times_shows_count_n(router):
    registry, m = router
    for i in range(7):
        m.observe_token_gap(0.004 * (i + 1))
    assert value(registry, "mnemosyne_time_between_tokens_seconds_count") == 7
    assert value(registry, "mnemosyne_time_between_tokens_seconds_sum") == pytest.approx(0.004 * 28)
    assert value(registry, "mnemosyne_time_between_tokens_seconds_bucket", le="0.01") == 2
    assert value(registry, "mnemosyne_time_between_tokens_seconds_bucket", le="+Inf") == 7


def test_registries_are_independent():
    a, b = new_registry(), new_registry()
    Metrics(a, role="decode", instance="d0").observe_iteration(0.01, 3)
    Metrics(b, role="decode", instance="d0")
    assert value(a, "mnemosyne_iteration_seconds_count") == 1
    assert value(b, "mnemosyne_iteration_seconds_count") is None


def test_request_recorder_observes_ttft_tbt_latency_and_slo_results(router):
    registry, m = router
    t = [10.0]
    rec = m.request(100_000, ttft_slo_s=1.0, tbt_slo_s=0.05, clock=lambda: t[0])
    assert value(registry, "mnemosyne_active_requests") == 1
    t[0] = 10.2
    rec.admitted()
    t[0] = 10.5
    rec.token()                                  # TTFT 0.5 s
    for _ in range(4):
        t[0] += 0.04
        rec.token()
    t[0] += 0.01
    rec.done("length")
    rec.done("length")                           # idempotent
    assert value(registry, "mnemosyne_time_to_first_token_seconds_count", prompt_class="medium") == 1
    assert value(registry, "mnemosyne_time_to_first_token_seconds_sum",
                 prompt_class="medium") == pytest.approx(0.5)
    assert value(registry, "mnemosyne_time_between_tokens_seconds_count") == 4
    assert value(registry, "mnemosyne_queue_time_seconds_sum") == pytest.approx(0.2)
    assert value(registry, "mnemosyne_request_latency_seconds_sum",
                 prompt_class="medium") == pytest.approx(0.67)
    assert value(registry, "mnemosyne_requests_finished_total", finish_reason="length") == 1
    assert value(registry, "mnemosyne_slo_requests_total", slo="ttft", result="met") == 1
    assert value(registry, "mnemosyne_slo_requests_total", slo="tbt", result="met") == 1
    assert value(registry, "mnemosyne_active_requests") == 0


def test_slo_rules_for_failed_aborted_and_slow_requests(router):
    registry, m = router
    m.observe_request_done(RequestTiming(10, 0, "error", 1.0, ttft_slo_s=1.0, tbt_slo_s=0.1))
    m.observe_request_done(RequestTiming(10, 0, "abort", 1.0, ttft_slo_s=1.0, tbt_slo_s=0.1))
    m.observe_request_done(RequestTiming(10, 3, "stop", 3.0, ttft_s=2.0, ttft_slo_s=1.0, tbt_slo_s=0.1,
                                         token_gaps_s=(0.3, 0.1), queue_s=0.1))
    m.observe_request_done(RequestTiming(10, 1, "stop", 0.5, ttft_s=0.5, ttft_slo_s=1.0, tbt_slo_s=0.1))
    m.observe_request_done(RequestTiming(10, 5, "weird", 1.0, ttft_s=0.5))     # no SLO: not judged
    assert value(registry, "mnemosyne_slo_requests_total", slo="ttft", result="missed") == 2
    assert value(registry, "mnemosyne_slo_requests_total", slo="ttft", result="met") == 1
    assert value(registry, "mnemosyne_slo_requests_total", slo="tbt", result="missed") == 1
    assert value(registry, "mnemosyne_slo_requests_total", slo="tbt", result="met") == 0
    assert value(registry, "mnemosyne_requests_finished_total", finish_reason="error") == 2
    assert value(registry, "mnemosyne_time_to_first_token_seconds_count", prompt_class="short") == 3
    assert value(registry, "mnemosyne_time_between_tokens_seconds_count") == 2
    assert value(registry, "mnemosyne_queue_time_seconds_count") == 1


def test_slo_targets_and_admission_decisions(router):
    registry, m = router
    m.set_slo_targets({"short": 2.0, "long": 60.0}, 0.1, 0.99)
    m.observe_admission("rejected", "ttft_slo")
    m.observe_admission("admitted", "fits")
    m.set_admission_queue(4)
    assert value(registry, "mnemosyne_slo_target_seconds", slo="ttft", prompt_class="long") == 60
    assert value(registry, "mnemosyne_slo_target_seconds", slo="tbt") == 0.1
    assert value(registry, "mnemosyne_slo_objective_ratio", slo="tbt") == 0.99
    assert value(registry, "mnemosyne_admission_decisions_total", outcome="rejected") == 1
    assert value(registry, "mnemosyne_admission_queued_requests") == 4
    with pytest.raises(ValueError):
        m.observe_admission("maybe", "x")


def test_engine_helpers():
    registry = new_registry()
    m = Metrics(registry, role="prefill", pool="p", instance="pf0")
    m.observe_iteration(0.05, 3, chunk_tokens=(512, 64))
    m.observe_iteration(0.02, 8, generated_tokens=8)
    m.set_scheduler_load(queued_prefill_tokens=9000, running_decodes=0, waiting_requests=2)
    m.set_kv_blocks(1, 0, used=30, free=70)
    m.set_kv_layout(16)
    m.observe_kv_transfer("nixl", "send", 1 << 20, 0.01)
    m.observe_kv_transfer("nixl", "send", 100, 1.0, ok=False)
    m.observe_queue_time(0.3)
    assert value(registry, "mnemosyne_tokens_total", kind="prompt") == 576
    assert value(registry, "mnemosyne_tokens_total", kind="generated") == 8
    assert value(registry, "mnemosyne_prefill_chunk_tokens_count") == 2
    assert value(registry, "mnemosyne_batch_size_sum") == 11
    assert value(registry, "mnemosyne_scheduler_queued_prefill_tokens") == 9000
    assert value(registry, "mnemosyne_kv_blocks_free", group="1", tp_rank="0") == 70
    assert value(registry, "mnemosyne_kv_block_size_tokens") == 16
    assert value(registry, "mnemosyne_kv_transfer_bytes_total", backend="nixl") == (1 << 20) + 100
    assert value(registry, "mnemosyne_kv_transfer_seconds_count", backend="nixl") == 1
    assert value(registry, "mnemosyne_kv_transfer_failures_total", backend="nixl") == 1
    with pytest.raises(ValueError):
        m.observe_kv_transfer("tcp", "sideways", 1, 1.0)


def test_kvstore_helpers():
    registry = new_registry()
    m = Metrics(registry, role="kvstore", pool="p", instance="kv")
    for err in (None, None, CapacityError("x"), InvalidRequestError("x"), PlacementError("x"),
                RuntimeError("x")):
        m.observe_reservation(err)
    m.add_lease_expiries(3)
    m.add_lease_expiries(0)
    m.set_placements(5)
    m.set_live_instances("decode", 2)
    for outcome, n in [("reserved", 2), ("no_capacity", 1), ("invalid", 1), ("unknown_instance", 1),
                       ("error", 1)]:
        assert value(registry, "mnemosyne_kvstore_reservations_total", outcome=outcome) == n
    assert value(registry, "mnemosyne_kvstore_lease_expiries_total") == 3
    assert value(registry, "mnemosyne_kvstore_placements") == 5
    assert value(registry, "mnemosyne_kvstore_live_instances", member_role="decode") == 2
    assert value(registry, "mnemosyne_kvstore_live_instances", member_role="prefill") == 0


def test_prompt_classes_and_bad_identity():
    pc = PromptClasses()
    assert [pc.of(n) for n in (1, 8191, 8192, 200_000, 5_000_000)] == \
        ["short", "short", "medium", "long", "xlong"]
    with pytest.raises(ConfigError):
        PromptClasses((("a", 10), ("b", 5)))
    with pytest.raises(ConfigError):
        Metrics(new_registry(), role="gateway")


def test_metrics_server_binds_a_free_port_and_serves_the_registry():
    registry = new_registry()
    Metrics(registry, role="decode", instance="d9").observe_iteration(0.01, 1)
    server = serve_metrics(0, registry)
    try:
        assert server.port > 0
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
        assert 'mnemosyne_iteration_seconds_count{instance="d9",pool="default",role="decode"} 1.0' in body
        with pytest.raises(ConfigError, match="cannot bind"):
            serve_metrics(server.port, registry)
    finally:
        server.close()
    port = start_metrics_server(0, new_registry())
    assert isinstance(port, int) and port > 0
    with pytest.raises(ConfigError):
        serve_metrics(70000, registry)


def test_interceptor_counts_rpc_errors_by_method_and_code():
    registry = new_registry()
    m = Metrics(registry, role="kvstore", instance="kv")

    async def scenario():
        server = grpc.aio.server(interceptors=[mm.MetricsInterceptor(m)])
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("known", health_pb2.HealthCheckResponse.SERVING)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                await stub.Check(health_pb2.HealthCheckRequest(service="known"), timeout=5)
                for _ in range(2):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
                    assert e.value.code() is grpc.StatusCode.NOT_FOUND
        finally:
            await server.stop(0)

    asyncio.run(scenario())
    assert value(registry, "mnemosyne_rpc_errors_total", method="/grpc.health.v1.Health/Check",
                 code="NOT_FOUND") == 2
    assert [k for k in samples(registry) if k[0] == "mnemosyne_rpc_errors_total"
            and ("code", "OK") in k[1]] == []
