"""SLO-aware admission (common/admission.py): predictions, admit / queue / reject, the LARS-ordered
bounded queue, KV need vs free, staleness, and the load sources (the kvstore's heartbeat loads,
Prometheus' queries).

The performance model is linear (1 ms per token, 1 us per decode context token) so predicted times
are exact: prefilling l tokens alone takes l ms under any chunking.
"""
from __future__ import annotations

import math
from dataclasses import replace

import grpc
import pytest

from common import admission as adm
from common.admission import (AdmissionConfig, AdmissionController, AdmissionRejected, AdmissionRequest,
                              InstanceLoad, LoadSnapshot, Outcome, PoolModel, SLOConfig, heartbeat_loads,
                              kv_need_blocks)
from common.errors import CapacityError, ConfigError, InvalidRequestError
from common.metadata.types import Instance, LoadReport
from common.metrics import Metrics, new_registry
from common.rpc.status import status_for
from common.scheduler.policy import LARS, order
from common.scheduler.types import BatchShape, ReqView
from services.kvstore.placement import split_groups


class Linear:
    def predict(self, b: BatchShape) -> float:
        return 0.0 if b.is_empty else 1e-3 * b.num_tokens + 1e-6 * sum(b.decodes)


NOW = 100.0
# slo_factor 1: a default deadline is the class SLO unless the prompt alone takes longer
SLO = SLOConfig(slo_factor=1.0)


def controller(**cfg) -> AdmissionController:
    config = AdmissionConfig(**{"slo": SLO, "short_prompt_tokens": 256, "tbt_slo_s": 0.1, **cfg})
    return AdmissionController(config, decode=PoolModel.build(Linear(), 0.1),
                               prefill=PoolModel.build(Linear(), 0.1))


def prefill(iid, queued=0, at=NOW, **kw):
    return InstanceLoad(iid, "prefill", observed_at=at, queued_prefill_tokens=queued, **kw)


def decode(iid, free=(100,) * 8, used=(0,) * 8, running=0, at=NOW, **kw):
    """Default: 8 KVP groups of M = 1024 tokens, 100 blocks of 16 tokens each, all free."""
    return InstanceLoad(iid, "decode", observed_at=at, kv_free_blocks=free, kv_used_blocks=used,
                        kv_block_size=16, kvp_tokens=1024, running_decodes=running, **kw)


FULL = {"free": (0,) * 8, "used": (100,) * 8}


def snap(*loads):
    return LoadSnapshot({l.instance_id: l for l in loads}, NOW)


def request(rid="r", prompt=1000, new=16, arrival=NOW, **kw):
    return AdmissionRequest(rid, prompt, new, arrival, **kw)


def test_prefill_table_of_the_linear_model_is_exact():
    assert PoolModel.build(Linear(), 0.1).prefill_alone_s(1000) == pytest.approx(1.0)


def test_admits_to_the_instance_with_the_smallest_predicted_ttft():
    ctl = controller()
    d = ctl.decide(request(), snap(prefill("p1", queued=500), prefill("p2", queued=100),
                                   decode("d1", free=(10, 10)), decode("d2")), NOW)
    assert (d.outcome, d.reason) == (Outcome.ADMIT, "fits")
    assert d.prefill_instance == "p2" and d.decode_instance == "d2"    # most KV headroom
    assert d.predicted_ttft_s == pytest.approx(1.1)                     # 100 queued + 1000 own, 1 ms each
    assert d.kv_blocks == (64,)                                         # 1016 tokens, 16 per block


def test_short_prompts_are_prefilled_on_the_decode_instance():
    d = controller().decide(request(prompt=100), snap(prefill("p1"), decode("d1")), NOW)
    assert d.outcome is Outcome.ADMIT and d.prefill_instance is None and d.decode_instance == "d1"
    # decodes running there take part of each iteration: the prediction grows accordingly
    busy = decode("d1", used=(50, 0), running=10)
    d2 = controller().decide(request(prompt=100), snap(busy), NOW)
    assert d2.predicted_ttft_s > d.predicted_ttft_s


def test_a_cached_prefix_counts_only_the_rest_of_the_prompt():
    """The router's matches (cached_tokens): a prefill instance is predicted with the tokens it has left
    to compute, so the one holding the prompt's prefix wins over an idler one that does not."""
    loads = snap(prefill("p1"), prefill("p2", queued=300), decode("d1"))
    cold = controller().decide(request(prompt=1000), loads, NOW)
    assert cold.prefill_instance == "p1" and cold.predicted_ttft_s == pytest.approx(1.0)
    warm = controller().decide(request(prompt=1000, cached_tokens={"p2": 960}), loads, NOW)
    assert warm.prefill_instance == "p2"
    assert warm.predicted_ttft_s == pytest.approx(0.3 + 0.04)          # 300 queued + 40 left, 1 ms each
    assert request(prompt=100, cached_tokens={"x": 100}).tokens_left("x") == 1   # the last is computed


def test_a_long_prompt_whose_rest_is_short_goes_to_the_decode_instance_holding_its_prefix():
    ctl = controller()
    loads = snap(prefill("p1"), decode("d1"), decode("d2"))
    d = ctl.decide(request(prompt=4000, cached_tokens={"d2": 3968, "p1": 16}), loads, NOW)
    assert (d.outcome, d.prefill_instance, d.decode_instance) == (Outcome.ADMIT, None, "d2")
    assert d.predicted_ttft_s == pytest.approx(0.032)                   # 32 tokens left on d2
    # the rest is not short there (>= short_prompt_tokens): the prefill pool as before
    d = ctl.decide(request("r2", prompt=4000, cached_tokens={"d2": 3000}), loads, NOW)
    assert d.prefill_instance == "p1"
    # the holder has no room: not a candidate for the decode-only route
    full = snap(prefill("p1"), decode("d1"), decode("d2", **FULL))
    d = controller().decide(request(prompt=4000, cached_tokens={"d2": 3968}), full, NOW)
    assert d.prefill_instance == "p1" and d.decode_instance == "d1"


def test_rejects_with_resource_exhausted_and_a_retry_hint_when_the_ttft_cannot_fit():
    d = controller().decide(request(), snap(prefill("p1", queued=10_000), decode("d1")), NOW)
    assert (d.outcome, d.reason) == (Outcome.REJECT, "ttft_slo")
    assert d.predicted_ttft_s == pytest.approx(11.0)
    assert d.retry_after_s == pytest.approx(9.0)            # the backlog must drain by 11 - 2 s
    err = d.error("r")
    assert isinstance(err, AdmissionRejected) and isinstance(err, CapacityError)
    assert status_for(err) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ttft_slo" in str(err) and "retry after 9.0s" in str(err)
    assert err.trailing_metadata() == (("grpc-retry-pushback-ms", "9000"),)


def test_a_rejection_retrying_cannot_fix_pushes_back_minus_one():
    """A negative gRPC pushback stops a client's retry policy (gRFC A6); retry_after_s reads it as no hint."""
    err = adm.Decision(Outcome.REJECT, "ttft_unattainable", detail="too long").error("r")
    assert err.trailing_metadata() == (("grpc-retry-pushback-ms", "-1"),)
    assert "retrying will not help" in str(err)


def test_time_already_waited_counts_against_the_deadline():
    """A prompt an idle instance would serve in time from arrival, which waited too long for a
    decision, is late, not unattainable: a retry is a new arrival, so it gets a hint (a queued one
    that lost its deadline this way is a queue_timeout: CI saw one told retrying would not help)."""
    ctl = controller()
    d = ctl.decide(request(arrival=NOW - 1.5), snap(prefill("p1"), decode("d1")), NOW)
    assert (d.outcome, d.reason) == (Outcome.REJECT, "ttft_slo")
    assert d.retry_after_s is not None and d.retry_after_s > 0 and "waited 1.50s" in d.detail
    assert ctl.decide(request(arrival=NOW), snap(prefill("p1"), decode("d1")), NOW).outcome is Outcome.ADMIT


def test_unattainable_ttft_gets_no_retry_hint_and_own_slo_overrides_the_default():
    ctl = controller()
    s = snap(prefill("p1"), decode("d1"))
    d = ctl.decide(request(prompt=3000, ttft_slo_s=2.0), s, NOW)       # 3 s alone, own SLO 2 s
    assert (d.outcome, d.reason, d.retry_after_s) == (Outcome.REJECT, "ttft_unattainable", None)
    assert "retrying will not help" in str(d.error("r"))
    assert ctl.decide(request("own", prompt=3000, ttft_slo_s=5.0), s, NOW).outcome is Outcome.ADMIT
    assert ctl.slo_for(request(prompt=9000)) == (20.0, 0.1)      # medium class default
    assert ctl.slo_for(request(prompt=50_000)) == pytest.approx((50.0, 0.1))    # longer alone: the work's own time
    assert ctl.slo_for(request(ttft_slo_s=3.0, tbt_slo_s=0.05)) == (3.0, 0.05)


def test_kv_need_matches_the_kvstore_placement_and_the_decode_engines_allocation():
    """Router, kvstore and the decode engine's KVP block manager agree on every group's blocks,
    including generated tokens that spill past a full group into the next one."""
    from common.kv_cache.kvp_blocks import KVPBlockManager
    for prompt, new, m, bs in [(1, 0, 0, 16), (1000, 16, 1024, 16), (1024, 0, 1024, 16), (1000, 100, 1024, 16),
                               (5000, 300, 1024, 16), (4097, 1, 4096, 32), (300, 7, 0, 8), (2048, 1, 1024, 16)]:
        need = kv_need_blocks(prompt, new, bs, m)
        assert need == tuple(g.num_blocks for g in split_groups(prompt, new, m, bs))
        if m:
            mgr = KVPBlockManager(len(need), m, 1000, bs)
            mgr.allocate("r", prompt + new)
            assert tuple(len(t) for t in mgr.table("r")) == need
    assert kv_need_blocks(1000, 100, 16, 1024) == (64, 5)          # 76 generated tokens spill to group 1


def test_kv_need_vs_free_per_group():
    ctl = controller()
    # 2000 tokens over two groups of M=1024: 64 + 62 blocks (16 new tokens in the last group)
    req = request(prompt=2000, new=16, ttft_slo_s=10.0)
    assert kv_need_blocks(2000, 16, 16, 1024) == (64, 62)
    enough_in_total = decode("d1", free=(200, 50), used=(0, 150))   # 250 free, group 1 short
    d = ctl.decide(req, snap(prefill("p1"), enough_in_total), NOW)
    assert (d.outcome, d.reason) == (Outcome.QUEUE, "kv_full")
    # an instance that does not report its KV is not KV-checked here (the kvstore still is)
    d = ctl.decide(request("blind", prompt=2000, new=16, ttft_slo_s=10.0),
                   snap(prefill("p1"), InstanceLoad("d9", "decode", observed_at=NOW)), NOW)
    assert (d.outcome, d.decode_instance, d.kv_blocks) == (Outcome.ADMIT, "d9", ())
    # generated tokens spill into the next groups: 2000 + 5000 tokens fit in 7 of the 8 groups of 1024
    d = ctl.decide(request("spill", prompt=2000, new=5000, ttft_slo_s=10.0), snap(prefill("p1"), decode("d1")), NOW)
    assert d.outcome is Outcome.ADMIT and d.kv_blocks == (64,) * 6 + (54,)
    # more than the instance could ever hold (8 x 1024 tokens): INVALID_ARGUMENT, no retry
    d = ctl.decide(request("big", prompt=2000, new=7000, ttft_slo_s=10.0),
                   snap(prefill("p1"), decode("d1")), NOW)
    assert (d.outcome, d.reason) == (Outcome.REJECT, "kv_too_large")
    assert isinstance(d.error("big"), InvalidRequestError)
    assert status_for(d.error("big")) is grpc.StatusCode.INVALID_ARGUMENT


def test_queues_when_kv_is_full_and_admits_when_room_appears():
    ctl = controller()
    full = snap(prefill("p1"), decode("d1", **FULL))
    d = ctl.decide(request(), full, NOW)
    assert (d.outcome, d.reason) == (Outcome.QUEUE, "kv_full")
    assert d.latest_start_s == pytest.approx(NOW + 1.0)     # 2 s SLO - 1 s of prefill
    assert ctl.queue_length == 1 and ctl.poll(full, NOW + 0.1) == []
    freed = snap(prefill("p1", at=NOW + 0.5), decode("d1", at=NOW + 0.5))
    [(req, d2)] = ctl.poll(freed, NOW + 0.5)
    assert req.request_id == "r" and d2.outcome is Outcome.ADMIT
    assert d2.predicted_ttft_s == pytest.approx(1.5)        # waited 0.5 s + 1 s
    assert ctl.queue_length == 0


def test_queued_request_is_rejected_once_it_can_no_longer_make_its_deadline():
    ctl = controller(max_queue_wait_s=30.0)
    full = snap(prefill("p1"), decode("d1", **FULL))
    assert ctl.decide(request(), full, NOW).outcome is Outcome.QUEUE
    [(_, d)] = ctl.poll(full, NOW + 1.01)                    # latest start was NOW + 1
    assert (d.outcome, d.reason) == (Outcome.REJECT, "queue_timeout")
    assert d.retry_after_s > 0 and isinstance(d.error("r"), AdmissionRejected)


def test_a_queued_request_a_slower_correction_makes_late_times_out_with_a_retry_hint():
    """CI: a queued prompt, still before its latest start, was re-judged after the correction grew;
    it would have been in time from arrival, so it is a queue_timeout a retry can fix, not
    ttft_unattainable (which tells a client's retry policy to stop)."""
    ctl = controller(max_queue_wait_s=30.0)
    full = snap(prefill("p1"), decode("d1", **FULL))
    assert ctl.decide(request(), full, NOW).outcome is Outcome.QUEUE      # 1 s alone, 2 s SLO
    ctl.correction("prefill").ratio = 1.5                                 # now 1.5 s alone
    [(_, d)] = ctl.poll(full, NOW + 0.6)                                  # 0.6 + 1.5 > 2
    assert (d.outcome, d.reason) == (Outcome.REJECT, "queue_timeout")
    assert d.retry_after_s is not None and d.retry_after_s > 0
    assert "retry after" in str(d.error("r"))


def test_max_queue_wait_bounds_the_wait():
    ctl = controller(max_queue_wait_s=0.2)
    full = snap(prefill("p1"), decode("d1", **FULL))
    d = ctl.decide(request(prompt=1000, ttft_slo_s=60.0), full, NOW)
    assert d.outcome is Outcome.QUEUE and d.latest_start_s == pytest.approx(NOW + 0.2)
    assert ctl.poll(full, NOW + 0.1) == []
    assert ctl.poll(full, NOW + 0.2)[0][1].reason == "queue_timeout"


def test_queue_is_bounded():
    ctl = controller(max_queue=2)
    full = snap(prefill("p1"), decode("d1", **FULL))
    assert [ctl.decide(request(f"q{i}"), full, NOW).outcome for i in range(2)] == [Outcome.QUEUE] * 2
    d = ctl.decide(request("q2"), full, NOW)
    assert (d.outcome, d.reason) == (Outcome.REJECT, "queue_full")
    assert d.retry_after_s == pytest.approx(1.0)             # the soonest queued deadline
    assert ctl.cancel("q0") and not ctl.cancel("q0")
    assert ctl.decide(request("q3"), full, NOW).outcome is Outcome.QUEUE


def test_queue_is_ordered_by_lars_and_admits_in_that_order():
    ctl = controller()
    full = snap(prefill("p1"), decode("d1", **FULL))
    # (id, prompt tokens, ttft SLO): work = prompt ms; slack = SLO - work at NOW
    specs = [("relaxed", 1000, 20.0), ("tight", 1000, 1.5), ("long-tight", 8000, 9.0),
             ("medium", 4000, 10.0)]
    for rid, prompt, slo in specs:
        assert ctl.decide(request(rid, prompt=prompt, new=0, ttft_slo_s=slo), full, NOW).outcome \
            is Outcome.QUEUE
    views = [ReqView(rid, NOW, p, ttft_deadline_s=NOW + s) for rid, p, s in specs]
    expected = [v.request_id for v in order(LARS(), views, NOW, lambda v: (v.prompt_len * 1e-3,) * 2)]
    # rho: tight 0.5, long-tight 0.125, medium 1.5, relaxed 19; behind long-tight, tight would finish
    # at 9 s (due at 1.5) while long-tight has 1 s to spare: slack stealing puts tight first
    assert expected == ["tight", "long-tight", "medium", "relaxed"]
    assert ctl.queued_ids(NOW) == expected
    # room for exactly one request at a time: poll admits the head of the LARS order first
    one = snap(prefill("p1"), decode("d1", free=(64,) * 8, used=(36,) * 8))
    admitted = [r.request_id for r, d in ctl.poll(one, NOW) if d.outcome is Outcome.ADMIT]
    assert admitted[0] == expected[0]


def test_stale_instances_are_unknown_and_never_candidates():
    ctl = controller(max_staleness_s=5.0)
    stale = snap(prefill("p1", at=NOW - 10), decode("d1", at=NOW - 10))
    d = ctl.decide(request(), stale, NOW)
    assert (d.outcome, d.reason, d.retry_after_s) == (Outcome.REJECT, "no_instance", 5.0)
    # a fresh prefill but a stale decode instance: still no decode candidate
    assert ctl.decide(request(), snap(prefill("p1"), decode("d1", at=NOW - 6)), NOW).reason == "no_instance"
    # the stale one is skipped, the fresh one chosen
    d = ctl.decide(request(), snap(prefill("p1", at=NOW - 6), prefill("p2", queued=900),
                                   decode("d1")), NOW)
    assert d.outcome is Outcome.ADMIT and d.prefill_instance == "p2"
    # fail_open admits blindly only when nothing at all is known
    d = controller(fail_open=True).decide(request(), stale, NOW)
    assert (d.outcome, d.reason, d.decode_instance) == (Outcome.ADMIT, "fail_open", None)


def test_admissions_count_against_an_instance_until_its_metrics_show_them():
    ctl = controller()
    roomy = {"free": (1000,) * 8, "used": (0,) * 8}
    s = snap(prefill("p1"), prefill("p2", queued=300), decode("d1", **roomy))
    first = ctl.decide(request("a", prompt=1000), s, NOW + 0.01)
    second = ctl.decide(request("b", prompt=1000), s, NOW + 0.02)
    assert (first.prefill_instance, second.prefill_instance) == ("p1", "p2")
    # a sample taken well after the admissions includes them: no more double counting
    later = snap(prefill("p1", queued=1000, at=NOW + 1), prefill("p2", queued=1300, at=NOW + 1),
                 decode("d1", at=NOW + 1, **roomy))
    third = ctl.decide(request("c", prompt=1000, arrival=NOW + 1.1, ttft_slo_s=5.0), later, NOW + 1.1)
    assert third.prefill_instance == "p1" and third.predicted_ttft_s == pytest.approx(2.0)


def test_slow_instances_are_predicted_slower():
    """A busy instance whose iterations overrun the budget is predicted slower by that factor (plus
    half an iteration in flight); an idle one is judged by its model alone, whatever its last
    request's iterations took."""
    ctl = controller()
    fast = ctl.decide(request("a"), snap(prefill("p1", iteration_s=0.05, active_requests=1), decode("d1")), NOW)
    slow = controller().decide(request("b"), snap(prefill("p1", iteration_s=0.3, active_requests=1),
                                                  decode("d1")), NOW)
    idle = controller().decide(request("c"), snap(prefill("p1", iteration_s=0.3), decode("d1")), NOW)
    assert fast.predicted_ttft_s == pytest.approx(1.0 + 0.025)      # faster than the budget: no speed-up
    assert (slow.outcome, slow.predicted_ttft_s) == (Outcome.REJECT, pytest.approx(3.0 + 0.15))
    assert (idle.outcome, idle.predicted_ttft_s) == (Outcome.ADMIT, pytest.approx(1.0))


def test_a_decode_instance_s_recent_iterations_do_not_stretch_its_predictions():
    """A decode instance's iterations mix decode steps and short prompts' chunks: one heartbeat's
    mean of them said nothing of the next prompt (a slowdown of 2.67 seen after a prompt's first
    token predicted an 84-token prompt at 1.77 s; it took 0.45 s). A prefill instance's do."""
    slow = dict(iteration_s=0.3, active_requests=1)                     # 3x the 0.1 s budget
    d = controller().decide(request("a", prompt=100, ttft_slo_s=60.0),
                            snap(decode("d1", queued_prefill_tokens=150, **slow)), NOW)
    assert d.parts["slowdown"] == 1.0
    assert d.model_ttft_s == pytest.approx(0.3)          # 0.25 s of work, to the end of its iteration
    p = controller().decide(request("b", prompt=1000, ttft_slo_s=60.0), snap(prefill("p1", **slow), decode("d1")), NOW)
    assert p.parts["slowdown"] == pytest.approx(3.0)


def test_the_decode_share_is_what_running_decodes_add_to_a_chunk_s_iteration():
    """Decodes ride in the same iteration as a prompt's chunk: they take what they add to it, not
    their step alone (which pays the iteration's fixed cost again: with a 50 ms fixed cost one running
    decode took half of each 0.1 s iteration by it, and prompts were predicted 2-3x too slow)."""
    class Fixed(Linear):
        def predict(self, b: BatchShape) -> float:
            return 0.0 if b.is_empty else 0.05 + super().predict(b)

    ctl = AdmissionController(AdmissionConfig(slo=SLO, short_prompt_tokens=256, tbt_slo_s=0.1),
                              decode=PoolModel.build(Fixed(), 0.1), prefill=PoolModel.build(Fixed(), 0.1))
    d = ctl.decide(request("a", prompt=100, ttft_slo_s=60.0),
                   snap(decode("d1", running=1, used=(4,) + (0,) * 7)), NOW)   # one decode of 64 tokens
    assert d.parts["decode_share"] == pytest.approx((1e-3 + 64e-6) / 0.1)


def test_a_prompt_whose_first_token_came_after_the_sample_is_not_queued_work():
    """A load sample taken mid-prefill still counts the prompt's queued tokens after its first token
    came (it decodes on): the next prompt must not wait behind them (79 such tokens predicted an
    84-token prompt at 1.59 s; it took 0.57 s)."""
    def after_first_token() -> AdmissionController:
        ctl = controller()
        ctl.decide(request("a", prompt=200, ttft_slo_s=60.0), snap(decode("d1")), NOW)
        ctl.first_token("a", NOW + 0.2)
        return ctl

    new = request("b", prompt=50, arrival=NOW + 0.35, ttft_slo_s=60.0)
    mid = snap(decode("d1", at=NOW + 0.1, queued_prefill_tokens=100, active_requests=1))
    assert after_first_token().decide(new, mid, NOW + 0.35).parts["ahead_tokens"] == 0
    # a sample taken after the first token is believed: those are another router's tokens
    later = snap(decode("d1", at=NOW + 0.3, queued_prefill_tokens=100, active_requests=2))
    assert after_first_token().decide(new, later, NOW + 0.35).parts["ahead_tokens"] == 100


def test_a_decode_instance_whose_step_would_break_the_tbt_slo_has_no_room():
    ctl = controller()
    # 120 running decodes: step = 121 tokens * 1 ms > 0.1 s TBT SLO
    busy = decode("d1", used=(50, 50), running=120)
    d = ctl.decide(request(), snap(prefill("p1"), busy), NOW)
    assert (d.outcome, d.reason) == (Outcome.QUEUE, "tbt_full")
    d = ctl.decide(request("own", tbt_slo_s=0.5), snap(prefill("p1"), busy), NOW)
    assert d.outcome is Outcome.ADMIT


def test_config_and_request_validation():
    with pytest.raises(ConfigError, match="prompt classes"):
        AdmissionConfig(prompt_classes=adm.PromptClasses((("tiny", 10), ("huge", math.inf))))
    with pytest.raises(ConfigError, match="objective"):
        SLOConfig(objective=1.0)
    with pytest.raises(ConfigError, match="slo_factor"):
        SLOConfig(slo_factor=0.5)
    with pytest.raises(ConfigError, match="correction"):
        AdmissionConfig(max_correction=0.5)
    with pytest.raises(InvalidRequestError):
        request(prompt=0)
    with pytest.raises(InvalidRequestError):
        request(ttft_slo_s=-1.0)


# ---- load sources ----------------------------------------------------------------------------

def test_heartbeat_loads_age_on_the_store_clock_and_skip_instances_without_one():
    """A fake kvstore listing: each instance's last heartbeat load, with its age as Redis saw it."""
    report = LoadReport(active_requests=2, queued_prefill_tokens=700, running_decodes=3, kv_free_blocks=(89, 69),
                        kv_used_blocks=(11, 31), kv_block_size=16, kvp_tokens=1024, iteration_s=0.02,
                        model_scale=0.7)
    listing = [Instance("d1", "decode", "h:1", 16, 1024, (100, 100), load=report, load_age_s=0.5),
               Instance("p1", "prefill", "h:2", load=LoadReport(queued_prefill_tokens=5), load_age_s=9.0),
               Instance("d2", "decode", "h:3", 16, 0, (50,))]          # registered, no heartbeat load yet
    snap = heartbeat_loads(listing, NOW, pool="p")
    assert set(snap.loads) == {"d1", "p1"} and snap.taken_at == NOW and not snap.errors
    d1 = snap.loads["d1"]
    assert d1 == InstanceLoad("d1", "decode", "p", NOW - 0.5, active_requests=2, queued_prefill_tokens=700,
                              running_decodes=3, kv_free_blocks=(89, 69), kv_used_blocks=(11, 31),
                              kv_block_size=16, kvp_tokens=1024, iteration_s=0.02, model_scale=0.7, host="h")
    assert d1.kv_capacity == (100, 100) and d1.busy
    assert [l.instance_id for l in snap.fresh(NOW, 5.0)] == ["d1"]     # p1's 9 s old load is stale
    assert snap.loads["p1"].iteration_s is None


def test_heartbeat_loads_drive_decisions_like_any_load():
    """The listing's loads, as admission sees them: a decode instance whose reported KV is full
    queues the request; an empty listing leaves no candidate."""
    c = controller()
    full = Instance("d1", "decode", "h:1", 16, 0, (10,),
                    load=LoadReport(kv_free_blocks=(0,), kv_used_blocks=(10,), kv_block_size=16), load_age_s=0.1)
    req = AdmissionRequest("r", 100, 8, NOW)
    assert c.decide(req, heartbeat_loads([full], NOW), NOW).outcome is Outcome.QUEUE
    d = c.decide(AdmissionRequest("r2", 100, 8, NOW), heartbeat_loads([], NOW), NOW)
    assert (d.outcome, d.reason) == (Outcome.REJECT, "no_instance")


def test_prometheus_source_queries_are_well_formed():
    src = adm.PrometheusSource("http://127.0.0.1:9090", pool="p")
    q = src.queries()
    assert set(q) == {"gauges", "timestamps", "iteration"}
    assert 'pool="p"' in q["gauges"] and "timestamp(mnemosyne_active_requests" in q["timestamps"]
    with pytest.raises(ConfigError):
        adm.PrometheusSource("localhost:9090")
    unreachable = adm.PrometheusSource("http://127.0.0.1:9", timeout_s=0.5).scrape()
    assert unreachable.loads == {} and "gauges" in unreachable.errors
    assert math.isinf(InstanceLoad("x", "decode").observed_at)


def test_overload_simulation_admitted_requests_meet_their_ttft_and_the_rest_are_rejected():
    """One prefill instance (FCFS, 1 ms per token) offered 4x its capacity; its load is scraped every
    0.5 s. Every admitted request's TTFT is within its SLO, the rest are rejected with a retry hint,
    and the instance stays busy (admission does not throw the capacity away)."""
    ctl = controller()
    busy_until, last_scrape, snapshot = 0.0, -1.0, None
    ttfts, rejected, firsts = [], [], {}
    for i in range(120):
        t = NOW + 0.25 * i                                   # 1000-token prompts, 1 s of work each
        if t - last_scrape >= 0.5:
            backlog_tokens = int(max(busy_until - t, 0.0) * 1000)
            snapshot = snap(prefill("p1", queued=backlog_tokens, at=t), decode("d1", at=t,
                                                                             free=(10 ** 6,) * 8))
            last_scrape = t
        for rid, at in list(firsts.items()):                  # the owner reports first tokens
            if at <= t:
                ctl.first_token(rid, at)
                del firsts[rid]
        d = ctl.decide(request(f"r{i}", prompt=1000, new=0, arrival=t, ttft_slo_s=3.0), snapshot, t)
        if d.outcome is Outcome.ADMIT:
            busy_until = max(busy_until, t) + 1.0
            ttfts.append(busy_until - t)
            firsts[f"r{i}"] = busy_until
        else:
            assert d.outcome is Outcome.REJECT and d.reason == "ttft_slo" and d.retry_after_s > 0
            rejected.append(i)
    assert max(ttfts) <= 3.0 + 1e-9
    assert len(rejected) >= 80
    assert len(ttfts) >= 0.9 * 30                          # >= 90% of what 30 s of work can serve


# ---- admission on the pools' own model ---------------------------------------------------------

def _pool_engine(scheduler_cfg, model, spp: int = 1, max_model_len: int = 32768):
    """What scheduling_info reads of an engine: cfg, perf_model, max_model_len, pipeline_depth and
    iteration_budget_s (the scheduler's budget, as LLMEngine's)."""
    from types import SimpleNamespace

    from common.config import EngineConfig, ParallelConfig
    from common.kv_cache.block_pool import BlockPool
    from common.scheduler.scheduler import Scheduler
    cfg = EngineConfig(scheduler=scheduler_cfg, parallel=ParallelConfig(spp=spp))
    sched = Scheduler(scheduler_cfg, BlockPool(64, 16), perf_model=model, pipeline_depth=spp)
    return SimpleNamespace(cfg=cfg, perf_model=model, max_model_len=max_model_len, scheduler=sched,
                           pipeline_depth=spp, iteration_budget_s=sched.budget_s)


@pytest.mark.parametrize("role,spp", [("prefill", 2), ("decode", 1)])
def test_published_model_predicts_what_the_pools_own_scheduler_predicts(role, spp):
    """A pool publishes (scheduling_info -> proto -> Redis-like dict -> back); the router's
    PrefillTable from it matches the pool scheduler's own table within 1% at every length."""
    from common.config import SchedulerConfig
    from common.metadata.types import SchedulingInfo
    from common.perf_model.analytic import AnalyticModel, hardware
    from common.perf_model.online import OnlineCorrection
    from common.pool_service import scheduling_info
    from common.rpc import convert
    from tests.unit.test_perf_model import TINY
    model = OnlineCorrection(AnalyticModel(TINY, hardware("cpu-float32")))
    model.observe(BatchShape(((256, 0),)), 1.7 * model.base.predict(BatchShape(((256, 0),))))
    engine = _pool_engine(SchedulerConfig(policy="lars", chunking="adaptive", role=role), model, spp)
    info = scheduling_info(engine)
    assert (info.pipeline_depth, info.policy, info.chunking, info.tbt_slo_s, info.max_model_len) == \
        (spp, "lars", "adaptive", SchedulerConfig().tbt_slo_s, 32768)
    assert info.iteration_budget_s == pytest.approx(engine.scheduler.budget_s)
    wire = convert.instance_from_proto(convert.instance_to_proto(
        adm_instance(info))).scheduling
    assert SchedulingInfo.from_dict(wire.to_dict()) == info
    router_side = PoolModel.published(wire)
    own = engine.scheduler.table
    for n in (1, 31, 32, 100, 1000, 3000, 7500, 20000, 32767):
        assert router_side.table.time(n) == pytest.approx(own.time(n), rel=0.01), n
    assert router_side.prefill_alone_s(1000) == pytest.approx(own.time(1000) + (spp - 1) * own.budget_s, rel=0.01)


def adm_instance(info):
    from common.metadata.types import Instance
    return Instance("p1", "prefill", "127.0.0.1:1", 16, scheduling=info)


def test_fcfs_fixed_pools_publish_their_fixed_chunks():
    from common.config import SchedulerConfig
    from common.pool_service import scheduling_info
    model = Linear()
    unknown = scheduling_info(_pool_engine(SchedulerConfig(), model))   # not publishable: published as none
    assert unknown.perf_model is None and PoolModel.published(unknown) is None
    from common.perf_model.calibrated import CalibratedModel
    cm = CalibratedModel([1e-3, 0.0, 0.0, 0.0, 0.01])
    info = scheduling_info(_pool_engine(SchedulerConfig(chunk_size=256), cm))
    assert (info.chunking, info.chunk_size) == ("fixed", 256)
    # 1000 tokens in chunks of 256: 4 iterations, 1 ms per token + 10 ms each
    assert PoolModel.published(info).table.time(1024) == pytest.approx(1.024 + 0.04)


def test_online_correction_converges_on_a_biased_model():
    """The pools' model is 2.5x optimistic and misses a fixed 0.3 s per request (RPC hops, KV set-up):
    after a few measured TTFTs the corrected prediction is within 5% of what is measured."""
    ctl = controller()
    errors = []
    for i in range(30):
        prompt = (300, 1000, 4000)[i % 3]
        s = snap(prefill("p1", at=NOW + i), decode("d1", at=NOW + i))     # no pending double count
        d = ctl.decide(request(f"r{i}", prompt=prompt, arrival=NOW + i, ttft_slo_s=60.0), s, NOW + i)
        assert d.outcome is Outcome.ADMIT and d.pool == "prefill"
        actual = 0.3 + 2.5 * d.model_ttft_s * (1.02 if i % 2 else 0.98)    # a little noise
        errors.append(abs(d.predicted_ttft_s - actual) / actual)
        ctl.observe_ttft(d, actual)
        ctl.first_token(f"r{i}", NOW + i + actual)
    assert errors[0] > 0.5 and max(errors[-10:]) < 0.05
    corr = ctl.correction("prefill")
    assert (corr.ratio, corr.overhead_s) == (pytest.approx(2.5, rel=0.05), pytest.approx(0.3, abs=0.05))
    assert (ctl.correction("decode").ratio, ctl.correction("decode").overhead_s) == (1.0, 0.0)   # per pool


def test_ttft_correction_fits_and_clips():
    from common.perf_model.ttft_correction import TTFTCorrection
    c = TTFTCorrection(window=8, max_ratio=10.0, max_overhead_s=1.0)
    assert c(0.5) == 0.5                                              # identity before any measurement
    for _ in range(3):
        c.observe(0.01, 0.05)                                          # all alike: a ratio or an overhead fits
    assert c(0.01) == pytest.approx(0.05)
    for m in (0.01, 0.02, 0.01, 0.02):
        c.observe(m, 0.04 + m)                                         # pure overhead: 40 ms
    for m in (0.01, 0.02):
        assert c(m) == pytest.approx(0.04 + m, rel=0.2)
    c.observe(1e-3, 100.0)                                             # absurd: clipped
    assert c.ratio <= 10.0 and c.overhead_s <= 1.0
    c.observe(0.0, 1.0)                                                # ignored
    assert len(c.samples) == 8


def test_the_correction_fits_requests_admitted_to_an_idle_instance_once_it_has_three():
    """A request predicted on an idle instance measures the model's error; one admitted beside others
    is also slowed by later arrivals. With three idle pairs in the window only they are fitted."""
    from common.perf_model.ttft_correction import TTFTCorrection
    c = TTFTCorrection(window=16)
    c.observe(0.5, 1.5, clean=False)                                   # interference: 3x
    c.observe(0.4, 1.2, clean=False)
    assert c(0.5) == pytest.approx(1.5, rel=0.05)                      # no idle pair yet: all are fitted
    for m in (0.3, 0.6, 0.9):
        c.observe(m, 1.1 * m)                                          # idle: the model is 10% slow
    assert (c.ratio, c.overhead_s) == (pytest.approx(1.1), 0.0)
    assert c(0.5) == pytest.approx(0.55)


def test_an_idle_instances_ttft_trains_the_correction_and_a_busy_ones_does_not():
    ctl = controller()
    busy = ctl.decide(request("b", prompt=100, ttft_slo_s=60.0), snap(decode("d1", running=2)), NOW)
    assert busy.parts["running_decodes"] == 2
    ctl.ended("b", NOW + 1)
    for i in range(3):
        t = NOW + 10 * (i + 1)
        d = ctl.decide(request(f"i{i}", prompt=100 + 50 * i, arrival=t, ttft_slo_s=60.0), snap(decode("d1", at=t)), t)
        assert d.parts["ahead_tokens"] == 0 and d.parts["running_decodes"] == 0
        ctl.observe_ttft(d, 1.2 * d.model_ttft_s)
        ctl.ended(f"i{i}", t + 1)
    ctl.observe_ttft(busy, 10 * busy.model_ttft_s)                     # later arrivals slowed it: not fitted
    assert ctl.correction("decode").ratio == pytest.approx(1.2)


def test_an_admitted_prompt_counts_as_a_running_decode_only_once_its_first_token_came():
    """A short prompt admitted to a decode instance is prefilled there first: until its first token it
    is queued work ahead of the next prompt, not also a decode taking a share of every iteration
    (counted as both, a 48-token prompt behind a 192-token one was predicted 1.8 s and took 0.5 s)."""
    ctl = controller()
    ctl.decide(request("a", prompt=192, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    b = ctl.decide(request("b", prompt=48, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    assert b.parts["ahead_tokens"] == 192 and b.parts["running_decodes"] == 0 and b.parts["decode_share"] == 0
    assert b.model_ttft_s == pytest.approx(0.3)     # 0.24 s of work, to the end of its (0.1 s) iteration
    ctl.first_token("a", NOW + 0.2)
    c = ctl.decide(request("c", prompt=48, ttft_slo_s=60.0), snap(decode("d1")), NOW + 0.2)
    assert c.parts["running_decodes"] == 1 and c.parts["ahead_tokens"] == 48      # b's prompt, then c's


def test_a_prompt_prefilled_on_a_decode_instance_counts_ahead_by_its_predicted_progress():
    """Decode-only prompts report no progress: one admitted at NOW, predicted to take 0.4 s alone, is
    taken as half done at NOW + 0.2 and done at NOW + 0.4, so a prompt arriving then is not predicted
    behind all of it."""
    ctl = controller(short_prompt_tokens=1000)           # all prefilled on the decode instance
    assert ctl.decide(request("a", prompt=400, ttft_slo_s=60.0), snap(decode("d1")), NOW).decode_instance == "d1"
    b = ctl.decide(request("b", prompt=100, arrival=NOW + 0.2, ttft_slo_s=60.0), snap(decode("d1", at=NOW + 0.2)),
                   NOW + 0.2)
    assert b.parts["ahead_tokens"] == 200 and b.predicted_ttft_s == pytest.approx(0.3)
    c = ctl.decide(request("c", prompt=100, arrival=NOW + 0.4, ttft_slo_s=60.0), snap(decode("d1", at=NOW + 0.4)),
                   NOW + 0.4)
    assert c.parts["ahead_tokens"] == 100          # a is done by its prediction; b (admitted at 0.2) is not


def test_an_overdue_prompt_on_a_decode_instance_counts_whole_until_its_first_token():
    """Predicted done at NOW + 0.4 and no first token at NOW + 0.5: the instance runs slower than
    predicted and the prompt's iteration has not ended, so it is still ahead of the next prompt (taken
    as done, a burst on a slowed CI machine saw an idle instance behind 24 prompts and predicted two
    new ones 0.013 s; they took 0.67 s). Its first token takes it out."""
    ctl = controller(short_prompt_tokens=1000)
    ctl.decide(request("a", prompt=400, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    b = ctl.decide(request("b", prompt=100, arrival=NOW + 0.5, ttft_slo_s=60.0), snap(decode("d1", at=NOW + 0.5)),
                   NOW + 0.5)
    assert b.parts["ahead_tokens"] == 400
    ctl.first_token("a", NOW + 0.6)
    c = ctl.decide(request("c", prompt=100, arrival=NOW + 0.6, ttft_slo_s=60.0), snap(decode("d1", at=NOW + 0.6)),
                   NOW + 0.6)
    assert c.parts["ahead_tokens"] == 100          # b's, predicted to finish at 0.5 + 0.4 + 0.1 s
    # on a LARS pool, a sample taken before it was overdue, still holding all of it, is not read as
    # another router's work besides
    ctl = lars_decode_controller()
    ctl.decide(request("a", prompt=400, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    sample = snap(decode("d1", at=NOW + 0.3, queued_prefill_tokens=400, active_requests=1))
    d = ctl.decide(request("d", prompt=100, arrival=NOW + 0.5, ttft_slo_s=60.0), sample, NOW + 0.5)
    assert d.parts["ahead_tokens"] == 400


def test_a_prompt_prefilled_on_a_decode_instance_counts_ahead_by_its_last_progress_report():
    """A decode instance reports the progress of the prompts it prefills (DecodeProgress): the last
    report counts, less what the iteration under way computes of it at its predicted rate (one
    iteration at most), whatever its prediction said. A load sample is read against the report that
    instance had sent by then: what the prompt has done since is not another router's work (an
    admitted 170-token prompt counted 188 tokens ahead, the next prompt was predicted 1.40 s and took
    0.80)."""
    def reported():
        ctl = lars_decode_controller()
        ctl.decide(request("a", prompt=400, ttft_slo_s=60.0), snap(decode("d1")), NOW)   # predicted 0.4 s alone
        ctl.progress("a", 100, NOW + 0.25)
        ctl.progress("a", 300, NOW + 0.5)                # overdue by its prediction, 100 left by the report
        return ctl

    def ahead(ctl, now, queued, sample_at=NOW + 0.3):
        load = decode("d1", at=sample_at, queued_prefill_tokens=queued, active_requests=1, iteration_s=0.05)
        return ctl.decide(request("b", prompt=100, arrival=now, ttft_slo_s=60.0), snap(load), now).parts["ahead_tokens"]
    # the sample at NOW + 0.3 counted the 300 tokens the report before it left: none unknown
    assert ahead(reported(), NOW + 0.5, 300) == 100
    assert ahead(reported(), NOW + 0.52, 300) == 80     # 0.02 s at 1,000 tokens/s since the report
    assert ahead(reported(), NOW + 0.9, 300) == 50      # no report for 0.4 s: one iteration's worth
    # another router's 150 tokens, in the sample beside a's: ahead of everything
    assert ahead(reported(), NOW + 0.5, 450) == 250
    # a sample taken within the visibility lag of a's admission but after its first report shows it:
    # a is counted by that report, not whole again on top of the gauge (165 + 133 = 298 ahead, once)
    ctl = lars_decode_controller()
    ctl.decide(request("a", prompt=400, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    ctl.progress("a", 100, NOW + 0.1)
    assert ahead(ctl, NOW + 0.15, 300, sample_at=NOW + 0.12) == 300 - 50      # 0.05 s at 1,000 tokens/s
    # without a report, the prediction: overdue at NOW + 0.5, whole
    ctl = lars_decode_controller()
    ctl.decide(request("a", prompt=400, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    assert ahead(ctl, NOW + 0.5, 400) == 400


def lars_decode_controller() -> AdmissionController:
    """A decode pool that prefills every prompt (short_prompt_tokens 1000) in LARS order."""
    ctl = controller(short_prompt_tokens=1000)
    ctl.decode = replace(PoolModel.build(Linear(), 0.1), ordered=True)
    return ctl


def test_a_prompt_admitted_first_in_line_is_not_predicted_to_be_passed():
    """The instance starts a prompt admitted with nothing ahead at its next iteration, and its LARS
    then keeps it before a later arrival with more work wherever no deadline is lost
    (policy.finish_started): a 98-token prompt admitted 0.07 s after a 79-token one on a decode
    instance finishing an iteration was predicted to pass it by rho alone (0.44 s) and took 0.83 s
    behind it. A prompt admitted behind others has not started."""
    ctl = lars_decode_controller()
    busy = snap(decode("d1", running=1, used=(4,) + (0,) * 7, iteration_s=0.2))  # an iteration in flight
    a = ctl.decide(request("a", prompt=400), busy, NOW)
    assert a.parts["ahead_tokens"] == 0 and a.inflight_s > 0.01     # its predicted start is not yet
    b = ctl.decide(request("b", prompt=500, arrival=NOW + 0.01), busy, NOW + 0.01)
    assert b.parts["ahead_tokens"] == 400
    # by rho alone b (slack 1.5 s over 0.5 s) ranks before a (slack 1.59 s over 0.4 s)
    view = lambda rid, arrival, n: ReqView(rid, arrival, n, ttft_deadline_s=arrival + 2.0)
    alone = LARS(finish_started=False).arrange([(view("a", NOW, 400), 0.4, 0.4),
                                                (view("b", NOW + 0.01, 500), 0.5, 0.5)], NOW + 0.01)
    assert [v.request_id for v, _, _ in alone] == ["b", "a"]
    # b was admitted behind a, so it has not started: c (rho 1.4 / 0.6 = 2.3 against b's 3) passes
    # it, not a; b still meets its deadline behind c
    c = ctl.decide(request("c", prompt=600, arrival=NOW + 0.02), busy, NOW + 0.02)
    assert c.parts["ahead_tokens"] == 400


def test_a_load_sample_counts_this_router_s_prompts_as_they_were_when_it_was_taken():
    """A prompt prefilled on a (LARS) decode instance reports no progress; a sample taken 0.25 s into
    it shows its 150 tokens left then. At 0.35 s it has 50 left by its prediction: the other 100 of
    the sample's are its own, done since, not another router's work ahead of the next prompt (seen: a
    0.3 s old sample counted 101 tokens of a prompt predicted to have 30 left, and the next prompt
    was predicted 0.4 s late)."""
    ctl = lars_decode_controller()
    ctl.decide(request("a", prompt=400, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    sample = snap(decode("d1", at=NOW + 0.25, queued_prefill_tokens=150, active_requests=1))  # 150 of a's
    b = ctl.decide(request("b", prompt=100, arrival=NOW + 0.35, ttft_slo_s=60.0), sample, NOW + 0.35)
    assert b.parts["ahead_tokens"] == 50          # a has 50 left by its prediction
    # what the sample holds beyond this router's prompts is still ahead of everything
    more = snap(decode("d1", at=NOW + 0.25, queued_prefill_tokens=350, active_requests=2))
    c = controller(short_prompt_tokens=1000)
    c.decode = ctl.decode
    c.decide(request("a", prompt=400, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    d = c.decide(request("b", prompt=100, arrival=NOW + 0.35, ttft_slo_s=60.0), more, NOW + 0.35)
    assert d.parts["ahead_tokens"] == 50 + 200


def test_a_prompt_behind_others_on_a_decode_instance_is_predicted_to_the_end_of_its_iteration():
    """A decode instance packs the queued prompts into iterations of its budget (0.1 s here) and each
    gets its first token at the end of the one that finishes it: behind 150 tokens (0.15 s) a 20-token
    prompt ends with the second iteration, at 0.2 s, not at 0.17 s; alone it takes its own 0.02 s."""
    ctl = controller()
    alone = ctl.decide(request("a", prompt=20, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    assert alone.model_ttft_s == pytest.approx(0.02)
    ctl = controller()
    ctl.decide(request("a", prompt=150, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    b = ctl.decide(request("b", prompt=20, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    assert b.parts["ahead_tokens"] == 150 and b.model_ttft_s == pytest.approx(0.2)
    ctl = controller()             # on a prefill instance (no first tokens of its own) there is no rounding
    ctl.decide(request("a", prompt=350, ttft_slo_s=60.0), snap(prefill("p1"), decode("d1")), NOW)
    b = ctl.decide(request("b", prompt=420, ttft_slo_s=60.0), snap(prefill("p1"), decode("d1")), NOW)
    assert b.prefill_instance == "p1" and b.parts["ahead_tokens"] == 350
    assert b.model_ttft_s == pytest.approx(0.77)


def test_the_load_factor_learns_from_loaded_admissions_and_scales_only_loaded_predictions():
    """What a load adds beyond the model (later arrivals packed ahead, the load's own CPU) is learned
    from requests admitted behind others (the geometric mean of measured / predicted, >= 1) and
    scales the predictions of the next ones admitted behind others, never an idle instance's."""
    from common.perf_model.ttft_correction import LoadFactor
    f = LoadFactor(window=4)
    for m in (2.0, 8.0):
        f.observe(1.0, m)
    assert f.factor == 1.0                                         # fewer than MIN_SAMPLES
    f.observe(1.0, 4.0)
    assert f.factor == pytest.approx(4.0)                          # (2 x 8 x 4) ** (1/3)
    for _ in range(4):
        f.observe(1.0, 0.5)
    assert f.factor == 1.0                                         # faster than predicted: clipped at 1
    with pytest.raises(ConfigError):
        LoadFactor(window=0)

    ctl = controller()
    first = ctl.decide(request("a", prompt=150, ttft_slo_s=60.0), snap(decode("d1")), NOW)
    behind = [ctl.decide(request(f"b{i}", prompt=20, ttft_slo_s=60.0), snap(decode("d1")), NOW) for i in range(3)]
    assert first.load_factor == 1.0 and all(b.load_factor == 1.0 for b in behind)
    ctl.observe_ttft(first, 0.15)                                  # idle: the pool's correction, not the load
    for b in behind:
        ctl.observe_ttft(b, 2 * b.predicted_ttft_s)                # each took twice its prediction
    assert ctl.load["decode"].factor == pytest.approx(2.0)
    for rid in ("a", "b0", "b1", "b2"):
        ctl.ended(rid, NOW + 1)
    t = NOW + 10
    idle = ctl.decide(request("i", prompt=20, arrival=t, ttft_slo_s=60.0), snap(decode("d1", at=t)), t)
    corr = ctl.correction("decode")
    assert idle.load_factor == 1.0 and idle.predicted_ttft_s == pytest.approx(corr(0.02))
    loaded = ctl.decide(request("j", prompt=20, arrival=t, ttft_slo_s=60.0), snap(decode("d1", at=t)), t)
    assert loaded.load_factor == 2.0 and loaded.predicted_ttft_s == pytest.approx(2 * corr(0.1))


def test_host_contention_stretches_only_the_busy_window_and_fits_its_factor():
    from common.perf_model.ttft_correction import HostContention
    c = HostContention(window=16, max_factor=4.0)
    assert c(2.0, 5.0) == 2.0                                         # no effect before any measurement
    assert HostContention.stretch(1.0, 5.0, 2.0) == 2.0               # all of it within the busy window
    assert HostContention.stretch(2.0, 1.0, 2.0) == pytest.approx(2.5)  # 1 s at half speed, 1.5 s alone
    assert HostContention.stretch(2.0, 0.0, 2.0) == 2.0               # no neighbour busy
    for alone, busy in ((1.0, 10.0), (2.0, 3.0), (0.5, 0.4), (3.0, 1.0)):
        c.observe(alone, busy, HostContention.stretch(alone, busy, 1.7))
    assert c.factor == pytest.approx(1.7, abs=0.011)
    c.observe(1.0, 0.0, 5.0)                                          # no busy window: not a sample
    c.observe(1.0, 10.0, 100.0)                                       # absurd: the factor is clipped
    assert len(c.samples) == 5 and 1.0 <= c.factor <= 4.0


def test_a_neighbour_prefilling_on_the_same_host_slows_the_prediction_once_it_has_been_measured():
    """make up's layout: the prefill and the decode instance on one host. A long prompt admitted to
    the prefill instance keeps it busy for its predicted TTFT; a short prompt admitted to the decode
    instance meanwhile is measured 2x slower than its model. That sample trains the decode pool's
    contention factor, not its correction; the next short prompt in such a window is predicted 2x,
    one after the window as before, and a decode instance on another host is not affected."""
    ctl = controller()
    hosts = dict(p1="10.0.0.1", d1="10.0.0.1", d2="10.0.0.2")

    def loads(at, *ids):
        mk = {"p1": lambda: prefill("p1", at=at), "d1": lambda: decode("d1", at=at),
              "d2": lambda: decode("d2", at=at)}
        return LoadSnapshot({i: replace(mk[i](), host=hosts[i]) for i in ids}, at)
    long = ctl.decide(request("long", prompt=4000, arrival=NOW, ttft_slo_s=60.0), loads(NOW, "p1", "d1"), NOW)
    assert long.prefill_instance == "p1" and long.predicted_ttft_s == pytest.approx(4.0)   # busy until NOW + 4
    t = NOW + 0.5
    first = ctl.decide(request("s1", prompt=200, arrival=t, ttft_slo_s=60.0), loads(t, "p1", "d1"), t)
    assert first.decode_instance == "d1" and first.host_busy_s == pytest.approx(3.5)
    assert first.predicted_ttft_s == pytest.approx(0.2)                 # factor 1: nothing measured yet
    ctl.observe_ttft(first, 0.4)                                        # measured 2x its model
    assert ctl.contention["decode"].factor == pytest.approx(2.0, abs=0.011)
    assert (ctl.correction("decode").ratio, ctl.correction("decode").overhead_s) == (1.0, 0.0)
    ctl.ended("s1", t + 0.4)
    t = NOW + 1.0
    during = ctl.decide(request("s2", prompt=200, arrival=t, ttft_slo_s=60.0), loads(t, "p1", "d1"), t)
    assert during.predicted_ttft_s == pytest.approx(0.4, rel=0.02)
    elsewhere = ctl.decide(request("s3", prompt=200, arrival=t, ttft_slo_s=60.0), loads(t, "p1", "d2"), t)
    assert elsewhere.host_busy_s == 0.0 and elsewhere.predicted_ttft_s == pytest.approx(0.2)
    for rid in ("s2", "s3"):
        ctl.ended(rid, t + 0.4)
    ctl.first_token("long", NOW + 4.0)                                  # the neighbour is done
    t = NOW + 4.5
    after = ctl.decide(request("s4", prompt=200, arrival=t, ttft_slo_s=60.0), loads(t, "p1", "d1"), t)
    assert after.host_busy_s == 0.0 and after.predicted_ttft_s == pytest.approx(0.2)
    assert adm.address_host("10.0.0.7:50061") == "10.0.0.7" and adm.address_host("[::1]:5") == "::1"


def test_default_deadlines_scale_with_the_work_so_an_idle_deployment_admits_every_prompt_that_fits():
    ctl = controller(slo=SLOConfig())                                  # slo_factor 3
    max_model_len = 8 * 1024 * 4                                       # decode: 8 groups x 4096 tokens
    big = dict(kv_free_blocks=(300,) * 8, kv_used_blocks=(0,) * 8, kv_block_size=16, kvp_tokens=4096)
    idle = snap(prefill("p1"), InstanceLoad("d1", "decode", observed_at=NOW, **big))
    d = ctl.decide(request("huge", prompt=max_model_len - 1, new=1), idle, NOW)
    assert (d.outcome, d.reason) == (Outcome.ADMIT, "fits")
    assert d.ttft_slo_s == pytest.approx(3 * 32.767) and d.predicted_ttft_s == pytest.approx(32.767)
    # a short prompt keeps its class SLO; the TBT default is the decode pool's
    ctl.tbt_slo_s = 0.07
    assert ctl.slo_for(request(prompt=300)) == (2.0, 0.07)
    # a loaded deployment: the same prompt behind 60 s of queued work misses 98 s -> rejected, with a hint
    loaded = snap(prefill("p1", queued=100_000), InstanceLoad("d1", "decode", observed_at=NOW, **big))
    d = ctl.decide(request("huge2", prompt=max_model_len - 1, new=1), loaded, NOW)
    assert (d.outcome, d.reason) == (Outcome.REJECT, "ttft_slo") and d.retry_after_s > 0


def test_an_explicit_tight_slo_under_load_is_rejected_quickly_with_a_retry_hint():
    ctl = controller(slo=SLOConfig())
    loaded = snap(prefill("p1", queued=1500), decode("d1"))
    d = ctl.decide(request("tight", prompt=1000, ttft_slo_s=1.5), loaded, NOW)
    assert (d.outcome, d.reason) == (Outcome.REJECT, "ttft_slo")
    assert d.retry_after_s == pytest.approx(1.0)                       # 1.5 s queued + 1 s own - 1.5 s
    err = d.error("tight")
    assert status_for(err) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.trailing_metadata() == (("grpc-retry-pushback-ms", "1000"),)
    # the same request without its own SLO: max(2 s, 3 x 1 s) = 3 s >= 2.5 s predicted: admitted
    assert ctl.decide(request("relaxed", prompt=1000), loaded, NOW).outcome is Outcome.ADMIT


def test_instances_are_judged_by_the_model_they_published():
    ctl = controller()
    slow = PoolModel.build(type("Slow", (), {"predict": lambda self, b: 0.0 if b.is_empty else 4e-3 * b.num_tokens})(), 0.1)
    ctl.models = {"p1": slow}
    d = ctl.decide(request(prompt=500), snap(prefill("p1"), prefill("p2"), decode("d1")), NOW)
    assert d.prefill_instance == "p2" and d.predicted_ttft_s == pytest.approx(0.5)
    assert ctl.model_of(prefill("p1")) is slow and ctl.model_of(prefill("p2")) is ctl.prefill


def test_a_decode_instance_running_nothing_always_has_tbt_room():
    ctl = controller(tbt_slo_s=1e-4)
    d = ctl.decide(request(prompt=100), snap(decode("d1")), NOW)
    assert d.outcome is Outcome.ADMIT


def test_admitted_prompts_count_until_their_first_token_even_when_the_gauge_lags():
    """A long chunk keeps an engine's queued-tokens gauge stale for seconds: what this router admitted
    and has not seen a first token of still counts, less the prefill progress it has seen."""
    ctl = controller()
    first = ctl.decide(request("long", prompt=3000, ttft_slo_s=60.0), snap(prefill("p1"), decode("d1")), NOW)
    assert first.outcome is Outcome.ADMIT
    later = snap(prefill("p1", at=NOW + 2), decode("d1", at=NOW + 2))     # gauge still shows 0
    d = ctl.decide(request("next", prompt=500, arrival=NOW + 2, ttft_slo_s=60.0), later, NOW + 2)
    assert d.predicted_ttft_s == pytest.approx(3.5)                        # 3000 ahead + 500 own
    ctl.progress("long", 2000, NOW + 2)
    d = ctl.decide(request("next2", prompt=500, arrival=NOW + 2, ttft_slo_s=60.0), later, NOW + 2)
    assert d.predicted_ttft_s == pytest.approx(1000e-3 + 500e-3 + 500e-3)  # next's 500 counts too now
    ctl.first_token("long", NOW + 2)
    ctl.first_token("next", NOW + 2)
    ctl.first_token("next2", NOW + 2)
    newer = snap(prefill("p1", at=NOW + 3), decode("d1", at=NOW + 3))
    d = ctl.decide(request("idle", prompt=500, arrival=NOW + 3, ttft_slo_s=60.0), newer, NOW + 3)
    assert d.predicted_ttft_s == pytest.approx(0.5)


def test_a_busy_instance_adds_half_an_iteration_in_flight_which_the_correction_does_not_learn():
    ctl = controller()
    d = ctl.decide(request(prompt=1000), snap(prefill("p1", active_requests=1, iteration_s=0.05),
                                              decode("d1")), NOW)
    assert d.inflight_s == pytest.approx(0.025) and d.predicted_ttft_s == pytest.approx(1.025)
    ctl.observe_ttft(d, 1.025)
    assert ctl.correction("prefill")(1.0) == pytest.approx(1.0)
    idle = ctl.decide(request("b", prompt=1000), snap(prefill("p1", iteration_s=0.05), decode("d1")), NOW)
    assert idle.inflight_s == 0.0


def test_a_request_that_ended_no_longer_counts_against_its_instance():
    """A cancelled long prompt must not hold its instance's predicted queue until the pending window
    runs out: ended() drops it at once; first_token() drops its prefill but keeps its decode."""
    ctl = controller()
    roomy = {"free": (1000,) * 8, "used": (0,) * 8}
    s = snap(prefill("p1"), decode("d1", **roomy))
    alone = ctl.decide(request("probe0", prompt=1000, ttft_slo_s=60.0), s, NOW).predicted_ttft_s
    ctl.ended("probe0", NOW + 0.005)
    long = ctl.decide(request("long", prompt=8000, ttft_slo_s=60.0), s, NOW + 0.01)
    assert long.outcome is adm.Outcome.ADMIT
    behind = ctl.decide(request("b", prompt=1000, ttft_slo_s=60.0), s, NOW + 0.02).predicted_ttft_s
    ctl.ended("b", NOW + 0.025)
    assert behind == pytest.approx(alone + 8.0, rel=0.05)
    ctl.ended("long", NOW + 0.026)
    again = ctl.decide(request("c", prompt=1000, ttft_slo_s=60.0), s, NOW + 0.03).predicted_ttft_s
    assert again == pytest.approx(alone, rel=0.05)
    ctl.ended("c", NOW + 0.035)
    # a first token ends the queued prefill only: the decode instance still counts the request
    short = ctl.decide(request("s", prompt=100, ttft_slo_s=60.0), s, NOW + 0.04)
    ctl.first_token("s", NOW + 0.045)
    assert ctl._effective(decode("d1", **roomy)).running_decodes == 1
    assert ctl._effective(decode("d1", **roomy)).queued_prefill_tokens == 0
    ctl.ended("s", NOW + 0.05)
    assert ctl._effective(decode("d1", **roomy)).running_decodes == 0
    assert short.outcome is adm.Outcome.ADMIT


def test_the_router_exports_the_tbt_slo_the_decode_pool_published():
    """The SLO dashboard's TBT target line is the TBT SLO requests are judged by: the smallest a decode
    instance published, not the scheduler's default the router was started with."""
    from common.metadata.types import Instance, SchedulingInfo
    from services.router.admission import AdmissionGate
    from services.router.config import RouterConfig
    registry = new_registry()
    metrics = Metrics(registry, role="router")
    gate = AdmissionGate(RouterConfig(kvstore="127.0.0.1:1"), metrics, discovery=None)

    def tbt_target() -> float:
        return next(s.value for m in registry.collect() for s in m.samples
                    if s.name == "mnemosyne_slo_target_seconds" and s.labels.get("slo") == "tbt")
    info = SchedulingInfo(None, 0.04, 1, "lars", "adaptive", 512, 32, 8192, 0.35, 4096)
    gate.use_models([Instance("d1", "decode", "127.0.0.1:1", capacity=(10,), scheduling=info),
                     Instance("d2", "decode", "127.0.0.1:2", capacity=(10,),
                              scheduling=SchedulingInfo(None, 0.04, 1, "lars", "adaptive", 512, 32, 8192, 0.5,
                                                        4096))])
    assert gate.controller.tbt_slo_s == 0.35 and tbt_target() == 0.35


def test_the_gate_reads_the_load_from_the_kvstore_listing_asked_each_refresh():
    """The router's default load source: the listing (asked now, not the discovery cache) and the
    age Redis reported, on the router's monotonic clock. It never touches a URL."""
    import asyncio
    import time
    from services.router.admission import AdmissionGate
    from services.router.config import RouterConfig

    class FakeDiscovery:
        def __init__(self, listing):
            self.listing, self.fresh = listing, []

        async def instances(self, role=None, *, fresh=False):
            self.fresh.append(fresh)
            return [i for i in self.listing if role is None or i.role == role]

    report = LoadReport(running_decodes=1, active_requests=1, kv_free_blocks=(9,), kv_used_blocks=(1,),
                        kv_block_size=16)
    disc = FakeDiscovery([Instance("d1", "decode", "127.0.0.1:1", capacity=(10,), load=report, load_age_s=2.0),
                          Instance("d2", "decode", "127.0.0.1:2", capacity=(10,))])
    gate = AdmissionGate(RouterConfig(kvstore="127.0.0.1:1", deployment="dep"), Metrics(new_registry(), role="router"),
                         discovery=disc)
    before = time.monotonic()
    asyncio.run(gate.refresh())
    assert disc.fresh == [True]
    [load] = gate.snapshot.loads.values()
    assert (load.instance_id, load.pool, load.running_decodes) == ("d1", "dep", 1)
    assert before - 2.0 <= load.observed_at <= time.monotonic() - 2.0
    assert asyncio.run(gate._observable())
    disc.listing = disc.listing[1:]                   # only an instance that reports no load
    assert not asyncio.run(gate._observable())


def test_the_gate_rejects_a_queued_request_at_its_deadline_not_at_the_next_load_read():
    """A request queued for KV that never frees: rejected (queue_timeout, with a retry hint) at its
    latest start, though no load read comes (the watcher not started; scrape_interval_s 30 s). It
    waited for the next read before: a burst's rejections came late (tests/integration/test_overload)."""
    import asyncio
    import time
    from services.router.admission import AdmissionGate
    from services.router.config import RouterConfig

    class FakeDiscovery:
        async def instances(self, role=None, *, fresh=False):
            full = LoadReport(running_decodes=4, active_requests=4, kv_free_blocks=(0,), kv_used_blocks=(64,),
                              kv_block_size=16)
            return [Instance("d1", "decode", "127.0.0.1:1", capacity=(64,), load=full, load_age_s=0.0)]

    gate = AdmissionGate(RouterConfig(kvstore="127.0.0.1:1", deployment="dep", scrape_interval_s=30.0,
                                      max_queue_wait_s=10.0), Metrics(new_registry(), role="router"),
                         discovery=FakeDiscovery())

    async def one(rid: str, slo: float, t0: float) -> tuple[BaseException, float]:
        with pytest.raises(AdmissionRejected) as rejected:
            await asyncio.wait_for(gate.admit(AdmissionRequest(rid, 100, 4, t0, ttft_slo_s=slo)), 5.0)
        return rejected.value, time.monotonic() - t0

    async def judged() -> list[tuple[BaseException, float]]:
        await gate.refresh()
        t0 = time.monotonic()
        # the later deadline queued first: the one timer moves to the earlier one, then on to it
        return await asyncio.gather(one("late", 0.8, t0), one("q", 0.5, t0))

    (late, late_s), (error, waited) = asyncio.run(judged())
    assert "no decode instance had room" in str(error) and status_for(error) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 0.2 < waited < 0.6, waited                     # at its latest start: 0.5 s less the predicted TTFT
    assert 0.5 < late_s < 0.9 and late_s - waited > 0.2, (waited, late_s)     # at its own, 0.3 s later
    assert gate.controller.queue_length == 0 and not gate._waiting and gate._deadline is None


def test_the_slowdown_counts_only_what_the_correction_does_not_already_know():
    """A model 3x too fast: the correction learned ratio 3 from measured TTFTs, and adaptive chunks
    take 3 budgets on every instance. A busy instance at that pace is not slower than the correction
    says (no 3 x 3); one at twice that pace is (slowdown 2, on top of the ratio)."""
    def learned() -> AdmissionController:
        ctl = controller()
        for predicted in (0.5, 1.0, 2.0, 4.0):
            ctl.correction("prefill").observe(predicted, 3 * predicted)
        assert ctl.correction("prefill").ratio == pytest.approx(3.0)
        return ctl

    usual = learned().decide(request("a", ttft_slo_s=60.0),
                             snap(prefill("p1", iteration_s=0.3, active_requests=1), decode("d1")), NOW)
    assert usual.model_ttft_s == pytest.approx(1.0)
    assert usual.predicted_ttft_s == pytest.approx(3.0 + 0.15)          # 3 x 1.0 + half an iteration
    slower = learned().decide(request("b", ttft_slo_s=60.0),
                              snap(prefill("p1", iteration_s=0.6, active_requests=1), decode("d1")), NOW)
    assert slower.model_ttft_s == pytest.approx(2.0)
    assert slower.predicted_ttft_s == pytest.approx(6.0 + 0.3)


def test_a_sample_taken_before_a_request_ended_does_not_keep_its_instance_busy():
    """The request ends at the router after its instance's last load sample, which still counts it
    (active, mid-iteration at the budget's 4x): the next request is judged on an idle instance, as
    the request before it was. A sample taken after the end is used as it is."""
    ctl = controller()
    idle = snap(prefill("p1"), decode("d1"))
    first = ctl.decide(request("one", ttft_slo_s=60.0), idle, NOW)
    assert first.outcome is Outcome.ADMIT and first.predicted_ttft_s == pytest.approx(1.0)
    # seen live: the sample still has the prompt's last pipeline chunk queued (12 tokens); its
    # first token came after the sample, and its two tokens of decode after that
    stale = snap(prefill("p1", queued=12, at=NOW + 1.0, active_requests=1, iteration_s=0.4),
                 decode("d1", at=NOW + 1.0, running=1, used=(1,) * 8))
    ctl.first_token("one", NOW + 1.05)
    ctl.ended("one", NOW + 1.1)
    assert ctl._effective(stale.loads["d1"]).running_decodes == 0
    again = ctl.decide(request("two", arrival=NOW + 1.2, ttft_slo_s=60.0), stale, NOW + 1.2)
    assert again.predicted_ttft_s == pytest.approx(1.0)
    later = snap(prefill("p1", at=NOW + 1.3, active_requests=1, iteration_s=0.4), decode("d1", at=NOW + 1.3))
    busy = ctl.decide(request("three", arrival=NOW + 1.3, ttft_slo_s=60.0), later, NOW + 1.3)
    # "two" still prefills there (1,000 tokens ahead), at the sample's 4x pace; the iteration in
    # flight is one of its chunks, in the work ahead (not waited for again)
    assert busy.predicted_ttft_s == pytest.approx((1.0 + 1.0) * 4)
    assert busy.inflight_s == 0.0


def test_a_cancelled_prompt_leaves_a_stale_queue_gauge_at_once():
    ctl = controller()
    s = snap(prefill("p1"), decode("d1"))
    ctl.decide(request("long", prompt=8000, ttft_slo_s=60.0), s, NOW)
    ctl.progress("long", 1000, NOW + 1)
    gauge = snap(prefill("p1", queued=7000, at=NOW + 1, active_requests=1), decode("d1", at=NOW + 1))
    ctl.ended("long", NOW + 1.5)
    d = ctl.decide(request("next", arrival=NOW + 1.6, ttft_slo_s=60.0), gauge, NOW + 1.6)
    assert d.predicted_ttft_s == pytest.approx(1.0)


def lars_controller() -> AdmissionController:
    """A prefill pool that runs its queued prompts in LARS order (what `make up` deploys)."""
    ctl = controller()
    ctl.prefill = replace(PoolModel.build(Linear(), 0.1), ordered=True)
    return ctl


def test_on_a_lars_pool_a_tight_prompt_is_predicted_ahead_of_a_long_one_with_slack():
    """A 4,000-token prompt with 60 s to go is queued on p1; a 500-token one due in 2 s runs first
    there (least slack), so it is predicted at its own prefill time, not behind 4 s of backlog (the
    FCFS pool's prediction, which would reject it)."""
    roomy = {"free": (1000,) * 8, "used": (0,) * 8}
    s = snap(prefill("p1"), decode("d1", **roomy))
    for ctl, expected in ((lars_controller(), 0.5), (controller(), 4.5)):
        assert ctl.decide(request("long", prompt=4000, ttft_slo_s=60.0), s, NOW).outcome is Outcome.ADMIT
        d = ctl.decide(request("tight", prompt=500, ttft_slo_s=5.0), s, NOW)
        assert d.predicted_ttft_s == pytest.approx(expected), ctl.prefill.ordered
    late = controller().decide(request("t", prompt=500, ttft_slo_s=2.0), s, NOW)
    assert late.outcome is Outcome.ADMIT           # alone it fits: the FCFS rejection is the backlog
    fcfs = controller()
    fcfs.decide(request("long", prompt=4000, ttft_slo_s=60.0), s, NOW)
    assert fcfs.decide(request("t", prompt=500, ttft_slo_s=2.0), s, NOW).outcome is Outcome.REJECT
    lars = lars_controller()
    lars.decide(request("long", prompt=4000, ttft_slo_s=60.0), s, NOW)
    assert lars.decide(request("t", prompt=500, ttft_slo_s=2.0), s, NOW).outcome is Outcome.ADMIT


def test_admission_orders_a_lars_pool_at_the_level_its_scheduler_weighs_work_now():
    """A 4,000-token prompt due in 6 s is admitted on p1, then a 500-token one due in 4.8 s. At the
    model's level (4 s + 0.5 s) the short one makes it behind the long one: LARS keeps the long one
    first (less slack per work), predicted 4.5 s. The pool's load says its model runs 1.2x slow now
    (model_scale): its LARS sees the short one miss behind (5.4 s) and its slack stealing runs it
    first (the long one still makes 6 s), so admission predicts it at its own 0.5 s. With no live
    scale in the load, admission's own correction ratio is the level (1 here)."""
    roomy = {"free": (1000,) * 8, "used": (0,) * 8}
    for scale, expected in ((None, 4.5), (1.0, 4.5), (1.2, 0.5)):
        s = snap(prefill("p1", model_scale=scale), decode("d1", **roomy))
        ctl = lars_controller()
        assert ctl.decide(request("long", prompt=4000, ttft_slo_s=6.0), s, NOW).outcome is Outcome.ADMIT
        d = ctl.decide(request("short", prompt=500, ttft_slo_s=4.8), s, NOW)
        assert d.outcome is Outcome.ADMIT and d.predicted_ttft_s == pytest.approx(expected), scale
    # the level is the live scale over the one the pool published (its table's): equal, no change
    from common.perf_model.online import OnlineCorrection
    scaled = OnlineCorrection(Linear())
    scaled.start_at(1.2)
    published = lars_controller()
    published.prefill = replace(published.prefill, table=adm.PrefillTable(scaled, 0.1))
    s = snap(prefill("p1", model_scale=1.2), decode("d1", **roomy))
    published.decide(request("long", prompt=4000, ttft_slo_s=6.0 * 1.2), s, NOW)
    d = published.decide(request("short", prompt=500, ttft_slo_s=4.8 * 1.2), s, NOW)
    assert d.predicted_ttft_s == pytest.approx(4.5 * 1.2)


def test_admission_predicts_the_pools_lars_as_it_re_ranks_every_iteration():
    """A started 850-token prompt (700 left, due in 2.35 s) ranks ahead of a 500-token one due in
    1.48 s by rho at its arrival (1.94 against 1.96), but the short one's slack falls while it waits
    and the long one's does not while it runs: one iteration (0.1 s) later the short one leads, and
    having less work left it is not passed back. Predicted at 0.6 s (one iteration of the long one, then
    its own 0.5 s), not behind the long one's 0.7 s (1.2 s), which is what the pool's LARS does (the
    pair that arrived together in bench/admission.py: 192 and 117 tokens, the short one run first in
    half the runs while admission, ordering once at the arrival, predicted it behind)."""
    roomy = {"free": (1000,) * 8, "used": (0,) * 8}
    s = snap(prefill("p1"), decode("d1", **roomy))
    ctl = lars_controller()
    assert ctl.decide(request("long", prompt=850, ttft_slo_s=2.35), s, NOW).outcome is Outcome.ADMIT
    ctl.progress("long", 150, NOW)
    d = ctl.decide(request("short", prompt=500, ttft_slo_s=1.48), s, NOW)
    assert d.outcome is Outcome.ADMIT and d.predicted_ttft_s == pytest.approx(0.6), d
    assert d.parts["ahead_tokens"] == 100


def test_the_replay_behind_a_deep_queue_takes_fewer_steps(monkeypatch):
    """Each replay step arranges every prompt admitted there: behind 100 of them a decision replays
    in 2048 // 101 = 20 steps (at least 16, at most 128), so its cost stays bounded."""
    steps = []
    real = adm.replay

    def spy(policy, entries, now, step_s, max_steps=128):
        steps.append((len(entries), max_steps))
        return real(policy, entries, now, step_s, max_steps)
    monkeypatch.setattr(adm, "replay", spy)
    roomy = {"free": (100_000,) * 8, "used": (0,) * 8}
    s = snap(prefill("p1"), decode("d1", **roomy))
    ctl = lars_controller()
    for i in range(101):
        ctl.decide(request(f"r{i}", prompt=300, ttft_slo_s=3600.0), s, NOW)
    assert steps[0] == (1, 128) and steps[-1] == (101, 20)
    assert (9, 128) in steps and (64, 32) in steps and all(16 <= m <= 128 for _, m in steps)


def test_on_a_lars_pool_a_prompt_that_would_take_an_admitted_ones_time_is_predicted_late():
    """The 4,000-token prompt has 4.3 s for 4 s of work (rho = 0.3 / 4); a 500-token prompt due in
    0.52 s has rho 0.02 / 0.5 and runs first, but the pool arranges its prompts again every iteration
    (0.1 s): the long one's slack runs out while it waits, and it takes iterations back (least slack
    per work first; each would now be late behind the other, so they alternate): the short one is
    predicted an iteration past its deadline and rejected. So is one due in 1 s: the long one runs
    first, the short one passes it once its slack falls below the long one's, and the long one takes
    an iteration back. With 4.6 s the long one has room: the short one runs first, at its own 0.5 s.
    (Ordered once, at the arrival, the first was predicted at 0.5 s, the second behind the whole
    long prompt at 4.5 s.)"""
    roomy = {"free": (1000,) * 8, "used": (0,) * 8}
    s = snap(prefill("p1"), decode("d1", **roomy))
    ctl = lars_controller()
    assert ctl.decide(request("long", prompt=4000, ttft_slo_s=4.3), s, NOW).outcome is Outcome.ADMIT
    d = ctl.decide(request("tight", prompt=500, ttft_slo_s=0.52), s, NOW)
    assert (d.outcome, d.reason, d.predicted_ttft_s) == (Outcome.REJECT, "ttft_slo", pytest.approx(0.6)), d
    behind = ctl.decide(request("behind", prompt=500, ttft_slo_s=1.0), s, NOW)
    assert behind.outcome is Outcome.REJECT and behind.predicted_ttft_s == pytest.approx(1.1)
    ok = lars_controller()
    ok.decide(request("long", prompt=4000, ttft_slo_s=4.6), s, NOW)
    d = ok.decide(request("tight", prompt=500, ttft_slo_s=0.52), s, NOW)
    assert d.outcome is Outcome.ADMIT and d.predicted_ttft_s == pytest.approx(0.5)


def test_on_a_lars_pool_a_prompt_that_would_make_an_admitted_one_miss_is_rejected():
    """The pool's LARS weighs work at its model's scale (1.0 here) while its prompts take 1.5x that
    (admission's correction ratio): the 4,000-token prompt, due in 6.7 s, has room by the pool's
    numbers (4 s of work) and a 500-token prompt due in 0.76 s runs first there (rho 0.52 against
    0.675, and the long one's still 0.55 when it is done). Measured, the short one makes it (0.75 s)
    and the long one does not (6.75 s against 6.0 s without it): rejected, with the overrun as the
    retry hint. Due in 6.9 s, the long one survives it: admitted."""
    roomy = {"free": (1000,) * 8, "used": (0,) * 8}
    s = snap(prefill("p1", model_scale=1.0), decode("d1", **roomy))
    for long_slo, admitted in ((6.7, False), (6.9, True)):
        ctl = lars_controller()
        ctl.correction("prefill").ratio = 1.5
        long = ctl.decide(request("long", prompt=4000, ttft_slo_s=long_slo), s, NOW)
        assert long.outcome is Outcome.ADMIT and long.predicted_ttft_s == pytest.approx(6.0)
        d = ctl.decide(request("tight", prompt=500, ttft_slo_s=0.76), s, NOW)
        if admitted:
            assert d.outcome is Outcome.ADMIT and d.predicted_ttft_s == pytest.approx(0.75), d
            continue
        assert (d.outcome, d.reason) == (Outcome.REJECT, "ttft_slo"), d
        assert "miss its deadline by 0.05s" in d.detail and d.retry_after_s == pytest.approx(0.5)
