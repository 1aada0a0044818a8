"""Contracts: every proto message survives the wire, and every proto <-> domain conversion pair
round-trips (common/rpc/convert.py)."""
from __future__ import annotations

import pytest

from common.errors import InvalidRequestError
from common.metadata.types import GroupRange, Instance, LoadReport, Placement
from common.rpc import convert, protos
from common.rpc.protos import common_pb2, decode_pb2, kvstore_pb2, prefill_pb2, router_pb2
from common.sampling_params import SamplingParams

MODULES = (common_pb2, router_pb2, prefill_pb2, decode_pb2, kvstore_pb2)


def _all_messages():
    for mod in MODULES:
        for name, desc in mod.DESCRIPTOR.message_types_by_name.items():
            yield pytest.param(getattr(mod, name), id=desc.full_name)


@pytest.mark.parametrize("cls", list(_all_messages()))
def test_every_message_is_in_the_versioned_package_and_round_trips_empty(cls):
    assert cls.DESCRIPTOR.full_name.startswith("mnemosyne.v1.")
    assert cls.FromString(cls().SerializeToString()) == cls()


def test_services():
    assert (protos.ROUTER, protos.PREFILL, protos.DECODE, protos.KVSTORE) == (
        "mnemosyne.v1.Router", "mnemosyne.v1.Prefill", "mnemosyne.v1.Decode",
        "mnemosyne.v1.KVStore")
    methods = {s.name: [m.name for m in s.methods] for mod in MODULES
               for s in mod.DESCRIPTOR.services_by_name.values()}
    assert methods["Router"] == ["Generate", "Abort", "ModelInfo"]
    assert methods["KVStore"] == ["RegisterInstance", "Heartbeat", "DeregisterInstance", "Reserve",
                                  "Renew", "Release", "GetPlacement", "ListInstances", "MatchPrefix"]
    assert methods["Decode"] == ["PrepareReceive", "Decode", "Abort", "Stats"]
    assert methods["Prefill"] == ["Prefill", "Abort"]
    assert router_pb2.DESCRIPTOR.services_by_name["Router"].methods_by_name[
        "Generate"].server_streaming


def _wire(msg):
    return type(msg).FromString(msg.SerializeToString())


def test_sampling_params_presence():
    unset = _wire(common_pb2.SamplingParams())
    assert not unset.HasField("temperature") and not unset.HasField("max_tokens")
    greedy = _wire(common_pb2.SamplingParams(temperature=0.0, max_tokens=-1, stop_token_ids=[2, 7]))
    assert greedy.HasField("temperature") and greedy.temperature == 0.0
    assert greedy.max_tokens == -1                      # negative survives, to be rejected
    assert list(greedy.stop_token_ids) == [2, 7]


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(
    max_tokens=7, temperature=0.5, top_p=0.75, top_k=3, seed=11, stop_token_ids=(2, 9), ignore_eos=True)])
def test_sampling_params_round_trip(params):
    assert convert.sampling_from_proto(_wire(convert.sampling_to_proto(params))) == params


def test_generate_request_ignore_eos_reaches_the_prompt_input():
    from services.router.server import prompt_from_proto
    assert not prompt_from_proto(_wire(router_pb2.GenerateRequest(text="x"))).ignore_eos
    assert prompt_from_proto(_wire(router_pb2.GenerateRequest(text="x", ignore_eos=True))).ignore_eos


def test_generate_request_prompt_oneof_and_events():
    req = _wire(router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=[1, -3, 5]),
                                           slo=common_pb2.SLO(ttft_s=2.0)))
    assert req.WhichOneof("prompt") == "token_ids" and list(req.token_ids.ids) == [1, -3, 5]
    assert req.HasField("slo") and not req.slo.HasField("tbt_s")
    req.text = "hello"                                  # setting one member clears the other
    assert req.WhichOneof("prompt") == "text" and not req.HasField("token_ids")

    fin = router_pb2.GenerateResponse(finished=common_pb2.Finished(
        finish_reason=common_pb2.FINISH_REASON_LENGTH,
        timings=common_pb2.Timings(ttft_s=0.5, tbt_s=[0.01, 0.03], tbt_mean_s=0.02, e2e_s=0.54,
                                   prompt_tokens=100, completion_tokens=3)))
    back = _wire(fin)
    assert back.WhichOneof("event") == "finished" and back == fin
    delta = _wire(router_pb2.GenerateResponse(delta=common_pb2.TokenDelta(token_ids=[9], text="a")))
    assert delta.WhichOneof("event") == "delta"


def test_decode_request_first_token_presence():
    assert not _wire(decode_pb2.DecodeRequest(prompt_token_ids=[1, 2])).HasField("first_token_id")
    assert _wire(decode_pb2.DecodeRequest(first_token_id=0)).HasField("first_token_id")


# ---- domain conversions ------------------------------------------------------------------------

PLACEMENT = Placement("req-1", "decode-0", "127.0.0.1:5000",
                      (GroupRange(0, 0, 4096, 256), GroupRange(1, 4096, 5000, 66)),
                      5000, 100, 10.0, 1_795_000_000_123, epoch=1_795_000_000_123_004)


def test_placement_round_trip():
    msg = convert.placement_to_proto(PLACEMENT)
    assert convert.placement_from_proto(_wire(msg)) == PLACEMENT
    assert msg.groups[1].token_end == 5000 and msg.lease_deadline_unix_ms == 1_795_000_000_123


def test_group_round_trip():
    g = GroupRange(3, 12, 40, 2)
    assert convert.group_from_proto(_wire(convert.group_to_proto(g))) == g


@pytest.mark.parametrize("inst", [
    Instance("decode-0", "decode", "10.0.0.1:50060", 16, 4096, (1000, 1000), (900, 1000),
             (100, 0), 1.5),
    Instance("prefill-0", "prefill", "10.0.0.2:50061"),
    Instance("prefill-1", "prefill", "10.0.0.2:50062", engine_epoch=3),
])
def test_instance_round_trip(inst):
    assert convert.instance_from_proto(_wire(convert.instance_to_proto(inst))) == inst


LOAD = LoadReport(active_requests=3, queued_prefill_tokens=70_000, running_decodes=2,
                  kv_free_blocks=(90, 70), kv_used_blocks=(10, 30), kv_block_size=16, kvp_tokens=4096,
                  iteration_s=0.03125, model_scale=0.8125)


@pytest.mark.parametrize("load", [LOAD, LoadReport(), LoadReport(iteration_s=0.0, kv_free_blocks=(5,))])
def test_load_report_round_trip(load):
    msg = convert.load_to_proto(load)
    assert convert.load_from_proto(_wire(msg)) == load
    assert msg.HasField("iteration_s") == (load.iteration_s is not None)   # 0.0 is not "unknown"
    assert msg.HasField("model_scale") == (load.model_scale is not None)
    assert LoadReport.from_dict(load.to_dict()) == load                    # as the store keeps it


def test_load_travels_on_heartbeats_and_in_the_listing():
    beat = _wire(kvstore_pb2.HeartbeatRequest(instance_id="d0", free_blocks=[90, 70],
                                              load=convert.load_to_proto(LOAD)))
    assert convert.load_from_proto(beat.load) == LOAD
    assert not _wire(kvstore_pb2.HeartbeatRequest(instance_id="d0")).HasField("load")
    inst = Instance("decode-0", "decode", "10.0.0.1:50060", 16, 4096, (100, 100), load=LOAD, load_age_s=0.25)
    assert convert.instance_from_proto(_wire(convert.instance_to_proto(inst))) == inst
    assert "metrics_url" not in kvstore_pb2.InstanceInfo.DESCRIPTOR.fields_by_name    # nothing to fetch


@pytest.mark.parametrize("msg, match", [
    (kvstore_pb2.InstanceLoad(running_decodes=-1), "negative"),
    (kvstore_pb2.InstanceLoad(kv_free_blocks=[1, 2], kv_used_blocks=[3]), "KVP groups"),
    (kvstore_pb2.InstanceLoad(iteration_s=-0.5), "iteration_s"),
    (kvstore_pb2.InstanceLoad(iteration_s=float("nan")), "iteration_s"),
    (kvstore_pb2.InstanceLoad(model_scale=0.0), "model_scale"),
    (kvstore_pb2.InstanceLoad(model_scale=float("inf")), "model_scale"),
])
def test_malformed_load_is_an_invalid_request(msg, match):
    with pytest.raises(InvalidRequestError, match=match):
        convert.load_from_proto(msg)


def test_role_round_trip():
    for role in (None, "prefill", "decode"):
        assert convert.role_from_proto(convert.role_to_proto(role)) == role
    with pytest.raises(InvalidRequestError, match="unknown role"):
        convert.role_from_proto(99)


@pytest.mark.parametrize("msg, match", [
    (kvstore_pb2.InstanceInfo(instance_id="d", address="a:1", capacity_blocks=[1]), "role must be set"),
    (kvstore_pb2.InstanceInfo(instance_id="", role=kvstore_pb2.ROLE_DECODE, address="a:1",
                              block_size=16, capacity_blocks=[1]), "instance_id must not be empty"),
    (kvstore_pb2.InstanceInfo(instance_id="d", role=kvstore_pb2.ROLE_DECODE, address="a:1",
                              block_size=16), "block capacity"),
    (kvstore_pb2.InstanceInfo(instance_id="d", role=kvstore_pb2.ROLE_DECODE, address="a:1",
                              block_size=0, capacity_blocks=[1]), "block_size must be positive"),
    (kvstore_pb2.InstanceInfo(instance_id="d", role=kvstore_pb2.ROLE_DECODE, address="a:1",
                              block_size=16, capacity_blocks=[1, 1]), "need kvp_tokens"),
])
def test_malformed_instance_is_an_invalid_request(msg, match):
    with pytest.raises(InvalidRequestError, match=match):
        convert.instance_from_proto(msg)


def test_kv_layout_round_trip():
    base = pytest.importorskip("common.kv_transfer.base")
    layout = base.KVLayout(dtype="bfloat16", block_size=16, num_kv_heads=4, head_dim=64,
                           num_layers=30, model="smollm2-135m@abc123")
    msg = convert.layout_to_proto(layout)
    assert msg.model_fingerprint == "smollm2-135m@abc123"
    assert convert.layout_from_proto(_wire(msg)) == layout


def _scheduling(kind: str):
    from common.metadata.types import SchedulingInfo
    from common.perf_model.calibrated import FEATURES
    from common.perf_model.published import PublishedModel
    if kind == "none":
        return SchedulingInfo(None, 0.04, 1, "fcfs", "fixed", 512, 32, 8192, 0.05, 4096)
    if kind == "calibrated":
        pm = PublishedModel("calibrated", {**{f: 1e-4 * (i + 1) for i, f in enumerate(FEATURES)},
                                           "kvp_tokens": 4096.0}, 1.25)
    else:
        pm = PublishedModel("analytic", {"vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
                                         "num_layers": 4, "num_heads": 8, "num_kv_heads": 2, "head_dim": 32,
                                         "flops": 1.9e11, "mem_bw": 5e10, "iter_overhead_s": 2e-3,
                                         "layer_overhead_s": 1e-4, "tp": 1, "spp": 2, "kvp": 1,
                                         "kvp_tokens": 0, "dtype_bytes": 4})
    return SchedulingInfo(pm, 0.1, 2, "lars", "adaptive", 512, 64, 4096, 0.07, 262144,
                          prefix_hash_root="0123456789abcdef" * 2, prefix_block_size=16)


@pytest.mark.parametrize("kind", ["none", "calibrated", "analytic"])
def test_scheduling_info_round_trips_through_proto_and_dict(kind):
    from common.metadata.types import SchedulingInfo
    info = _scheduling(kind)
    inst = Instance("prefill-0", "prefill", "10.0.0.2:50061", scheduling=info)
    assert convert.instance_from_proto(convert.instance_to_proto(inst)) == inst
    assert convert.scheduling_from_proto(kvstore_pb2.SchedulingInfo.FromString(
        convert.scheduling_to_proto(info).SerializeToString())) == info
    assert SchedulingInfo.from_dict(info.to_dict()) == info
    assert not convert.instance_to_proto(Instance("p", "prefill", "h:1")).HasField("scheduling")


def test_malformed_scheduling_info_is_an_invalid_request():
    msg = convert.instance_to_proto(Instance("p", "prefill", "h:1", scheduling=_scheduling("calibrated")))
    msg.scheduling.perf_model.kind = "oracle"
    with pytest.raises(InvalidRequestError, match="kind"):
        convert.instance_from_proto(msg)
    msg = convert.instance_to_proto(Instance("p", "prefill", "h:1", scheduling=_scheduling("none")))
    msg.scheduling.iteration_budget_s = 0
    with pytest.raises(InvalidRequestError, match="iteration_budget_s"):
        convert.instance_from_proto(msg)


@pytest.mark.parametrize("cls", [prefill_pb2.PrefillRequest, decode_pb2.DecodeRequest])
def test_per_request_slos_travel_as_seconds_remaining(cls):
    msg = cls()
    assert convert.slo_from_proto(msg, now=50.0) == {"ttft_deadline_s": None, "tbt_slo_s": None}
    convert.slo_to_proto(msg, 1.5, 0.08)
    got = convert.slo_from_proto(cls.FromString(msg.SerializeToString()), now=1000.0)
    assert got == {"ttft_deadline_s": 1001.5, "tbt_slo_s": 0.08}
    late = cls()
    convert.slo_to_proto(late, -0.2, None)           # already late: a past deadline, served first
    assert convert.slo_from_proto(late, now=10.0) == {"ttft_deadline_s": pytest.approx(9.8), "tbt_slo_s": None}
    bad = cls(tbt_slo_s=0.0)
    with pytest.raises(InvalidRequestError, match="tbt_slo_s"):
        convert.slo_from_proto(bad)


# ---- top log-probabilities ------------------------------------------------------------------

def test_top_logprobs_field_numbers_are_the_contract():
    """Other fields are being added to these messages concurrently: the numbers are fixed."""
    def number(cls, name):
        return cls.DESCRIPTOR.fields_by_name[name].number
    assert (number(common_pb2.TopLogprob, "token_id"), number(common_pb2.TopLogprob, "logprob")) == (1, 2)
    assert number(common_pb2.TokenTopLogprobs, "entries") == 1
    assert number(common_pb2.TokenDelta, "top_logprobs") == 4
    assert number(router_pb2.GenerateRequest, "top_logprobs") == 11
    assert number(decode_pb2.DecodeRequest, "top_logprobs") == 9
    assert number(prefill_pb2.PrefillRequest, "top_logprobs") == 8
    assert number(prefill_pb2.FirstToken, "top_logprobs") == 4


def test_top_logprobs_round_trip_in_a_token_delta():
    # float32 on the wire: values exactly representable there come back equal
    tops = [[(7, -0.25), (3, -1.5), (9, -4.0)], [(1, -0.125), (7, -2.75), (2, -3.0)]]
    delta = common_pb2.TokenDelta(token_ids=[7, 1], logprobs=[-0.25, -0.125],
                                  top_logprobs=[convert.top_logprobs_to_proto(t) for t in tops])
    back = _wire(delta)
    assert [convert.top_logprobs_from_proto(t) for t in back.top_logprobs] == tops
    assert convert.top_logprobs_from_proto(_wire(convert.top_logprobs_to_proto([]))) == []
    assert list(_wire(common_pb2.TokenDelta(token_ids=[5])).top_logprobs) == []    # not asked: none

    first = _wire(prefill_pb2.FirstToken(token_id=7, logprob=-0.25, top_logprobs=convert.top_logprobs_to_proto(tops[0])))
    assert convert.top_logprobs_from_proto(first.top_logprobs) == tops[0]
    assert not _wire(prefill_pb2.FirstToken(token_id=7)).HasField("top_logprobs")


@pytest.mark.parametrize("cls", [prefill_pb2.PrefillRequest, decode_pb2.DecodeRequest])
def test_top_logprobs_travel_beside_the_sampling_params(cls):
    msg = _wire(cls(sampling=common_pb2.SamplingParams(temperature=0.5, max_tokens=4), top_logprobs=5))
    p = convert.sampling_from_proto(msg.sampling, msg.top_logprobs)
    assert (p.top_logprobs, p.temperature, p.max_tokens) == (5, 0.5, 4)
    assert convert.sampling_from_proto(msg.sampling).top_logprobs == 0
    assert convert.sampling_from_proto(convert.sampling_to_proto(p), msg.top_logprobs) == p
    for bad in (-1, 21):
        with pytest.raises(InvalidRequestError, match=r"top_logprobs must be an integer in \[0, 20\]"):
            convert.sampling_from_proto(msg.sampling, bad)
