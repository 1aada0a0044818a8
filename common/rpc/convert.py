"""Proto <-> domain conversions: one function per direction, each pair round-trip tested
(tests/unit/test_proto_roundtrip.py). Servicers and clients translate only through these.

Validation happens in the domain constructors (e.g. Instance raises InvalidRequestError), so a
malformed message becomes INVALID_ARGUMENT with a message naming the bad field.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

from common.errors import InvalidRequestError
from common.metadata.types import GroupRange, Instance, LoadReport, Placement, PrefixReport, SchedulingInfo
from common.rpc.protos import common_pb2, kvstore_pb2
from common.sampling_params import SamplingParams

if TYPE_CHECKING:
    from common.kv_transfer.base import KVLayout

_ROLE_TO_PB = {"prefill": kvstore_pb2.ROLE_PREFILL, "decode": kvstore_pb2.ROLE_DECODE}
_ROLE_FROM_PB = {v: k for k, v in _ROLE_TO_PB.items()}


def role_to_proto(role: str | None) -> int:
    """None = ROLE_UNSPECIFIED (e.g. "all roles" in ListInstances)."""
    return kvstore_pb2.ROLE_UNSPECIFIED if role is None else _ROLE_TO_PB[role]


def role_from_proto(role: int) -> str | None:
    if role == kvstore_pb2.ROLE_UNSPECIFIED:
        return None
    try:
        return _ROLE_FROM_PB[role]
    except KeyError:
        raise InvalidRequestError(f"unknown role {role}") from None


def instance_to_proto(inst: Instance) -> kvstore_pb2.InstanceInfo:
    return kvstore_pb2.InstanceInfo(
        instance_id=inst.instance_id, role=role_to_proto(inst.role), address=inst.address,
        block_size=inst.block_size, kvp_tokens=inst.kvp_tokens,
        capacity_blocks=inst.capacity, free_blocks=inst.free, reserved_blocks=inst.reserved,
        heartbeat_age_s=inst.heartbeat_age_s,
        scheduling=None if inst.scheduling is None else scheduling_to_proto(inst.scheduling),
        load=None if inst.load is None else load_to_proto(inst.load), load_age_s=inst.load_age_s,
        engine_epoch=inst.engine_epoch)


def instance_from_proto(msg: kvstore_pb2.InstanceInfo) -> Instance:
    """Raises InvalidRequestError for a malformed registration (missing role, bad sizes...)."""
    role = role_from_proto(msg.role)
    if role is None:
        raise InvalidRequestError(f"instance {msg.instance_id!r}: role must be set")
    return Instance(
        instance_id=msg.instance_id, role=role, address=msg.address,
        block_size=msg.block_size, kvp_tokens=msg.kvp_tokens,
        capacity=tuple(msg.capacity_blocks), free=tuple(msg.free_blocks),
        reserved=tuple(msg.reserved_blocks), heartbeat_age_s=msg.heartbeat_age_s,
        scheduling=scheduling_from_proto(msg.scheduling) if msg.HasField("scheduling") else None,
        load=load_from_proto(msg.load) if msg.HasField("load") else None, load_age_s=msg.load_age_s,
        engine_epoch=msg.engine_epoch)


def load_to_proto(load: LoadReport) -> kvstore_pb2.InstanceLoad:
    msg = kvstore_pb2.InstanceLoad(
        active_requests=load.active_requests, queued_prefill_tokens=load.queued_prefill_tokens,
        running_decodes=load.running_decodes, kv_free_blocks=load.kv_free_blocks,
        kv_used_blocks=load.kv_used_blocks, kv_block_size=load.kv_block_size, kvp_tokens=load.kvp_tokens)
    if load.iteration_s is not None:
        msg.iteration_s = load.iteration_s
    if load.model_scale is not None:
        msg.model_scale = load.model_scale
    return msg


def load_from_proto(msg: kvstore_pb2.InstanceLoad) -> LoadReport:
    """Raises InvalidRequestError for a malformed report (negative counts, mismatched groups)."""
    return LoadReport(
        active_requests=msg.active_requests, queued_prefill_tokens=msg.queued_prefill_tokens,
        running_decodes=msg.running_decodes, kv_free_blocks=tuple(msg.kv_free_blocks),
        kv_used_blocks=tuple(msg.kv_used_blocks), kv_block_size=msg.kv_block_size, kvp_tokens=msg.kvp_tokens,
        iteration_s=msg.iteration_s if msg.HasField("iteration_s") else None,
        model_scale=msg.model_scale if msg.HasField("model_scale") else None)


_SCHED_SCALARS = ("iteration_budget_s", "pipeline_depth", "policy", "chunking", "chunk_size", "min_chunk",
                  "max_chunk", "tbt_slo_s", "max_model_len")


def scheduling_to_proto(info: SchedulingInfo) -> kvstore_pb2.SchedulingInfo:
    msg = kvstore_pb2.SchedulingInfo(**{n: getattr(info, n) for n in _SCHED_SCALARS},
                                     prefix_hash_root=bytes.fromhex(info.prefix_hash_root),
                                     prefix_block_size=info.prefix_block_size)
    if info.perf_model is not None:
        pm = info.perf_model
        msg.perf_model.CopyFrom(kvstore_pb2.PerfModelSpec(kind=pm.kind, params=dict(pm.params), scale=pm.scale))
    return msg


def scheduling_from_proto(msg: kvstore_pb2.SchedulingInfo) -> SchedulingInfo:
    """Raises InvalidRequestError for a malformed one (unknown model kind, missing parameters)."""
    return SchedulingInfo.from_dict({**{n: getattr(msg, n) for n in _SCHED_SCALARS},
                                     "prefix_hash_root": msg.prefix_hash_root.hex(),
                                     "prefix_block_size": msg.prefix_block_size,
                                     "perf_model": {"kind": msg.perf_model.kind, "params": dict(msg.perf_model.params),
                                                    "scale": msg.perf_model.scale}
                                     if msg.HasField("perf_model") else None})


def prefix_report_to_proto(r: PrefixReport) -> kvstore_pb2.PrefixReport:
    return kvstore_pb2.PrefixReport(epoch=r.epoch, seq=r.seq, full=r.full, added=r.added, evicted=r.evicted)


def prefix_report_from_proto(msg: kvstore_pb2.PrefixReport) -> PrefixReport:
    """Raises InvalidRequestError for a malformed one (bad hash length, seq 0)."""
    return PrefixReport(msg.epoch, msg.seq, msg.full, tuple(msg.added), tuple(msg.evicted))


def group_to_proto(g: GroupRange) -> common_pb2.GroupRange:
    return common_pb2.GroupRange(group=g.group, token_start=g.token_start, token_end=g.token_end,
                                 num_blocks=g.num_blocks)


def group_from_proto(msg: common_pb2.GroupRange) -> GroupRange:
    return GroupRange(msg.group, msg.token_start, msg.token_end, msg.num_blocks)


def placement_to_proto(p: Placement) -> common_pb2.Placement:
    return common_pb2.Placement(
        request_id=p.request_id, instance_id=p.instance_id, address=p.address,
        groups=[group_to_proto(g) for g in p.groups], num_tokens=p.num_tokens,
        max_new_tokens=p.max_new_tokens, lease_s=p.lease_s,
        lease_deadline_unix_ms=p.lease_deadline_ms, epoch=p.epoch)


def placement_from_proto(msg: common_pb2.Placement) -> Placement:
    return Placement(
        request_id=msg.request_id, instance_id=msg.instance_id, address=msg.address,
        groups=tuple(group_from_proto(g) for g in msg.groups), num_tokens=msg.num_tokens,
        max_new_tokens=msg.max_new_tokens, lease_s=msg.lease_s,
        lease_deadline_ms=msg.lease_deadline_unix_ms, epoch=msg.epoch)


# KVLayout's domain class lives with the KV transfer, which imports torch; imported here on use
# only, so services without torch (the kvstore) can use this module.

def layout_to_proto(layout: KVLayout) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(dtype=layout.dtype, block_size=layout.block_size,
                               num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                               num_layers=layout.num_layers, model_fingerprint=layout.model)


def layout_from_proto(msg: common_pb2.KVLayout) -> KVLayout:
    """Raises ConfigError for an invalid layout (unknown dtype, non-positive sizes)."""
    from common.kv_transfer.base import KVLayout
    return KVLayout(dtype=msg.dtype, block_size=msg.block_size, num_kv_heads=msg.num_kv_heads,
                    head_dim=msg.head_dim, num_layers=msg.num_layers, model=msg.model_fingerprint)


# ---- per-request SLOs to the pools --------------------------------------------------------

def slo_to_proto(msg, ttft_remaining_s: float | None, tbt_slo_s: float | None) -> None:
    """Sets a PrefillRequest's / DecodeRequest's SLO fields (None leaves a field unset). The TTFT
    deadline travels as seconds remaining when sent: hosts' clocks differ."""
    if ttft_remaining_s is not None:
        msg.ttft_remaining_s = ttft_remaining_s
    if tbt_slo_s is not None:
        msg.tbt_slo_s = tbt_slo_s


def slo_from_proto(msg, now: float | None = None) -> dict[str, float | None]:
    """{"ttft_deadline_s": absolute on this host's time.monotonic() (now + remaining), "tbt_slo_s"};
    None where unset. A non-positive TBT SLO is INVALID_ARGUMENT (a deadline already past is not:
    the request is late, and LARS serves it first)."""
    now = time.monotonic() if now is None else now
    tbt = msg.tbt_slo_s if msg.HasField("tbt_slo_s") else None
    if tbt is not None and not tbt > 0:
        raise InvalidRequestError(f"tbt_slo_s must be positive, got {tbt}")
    return {"ttft_deadline_s": now + msg.ttft_remaining_s if msg.HasField("ttft_remaining_s") else None,
            "tbt_slo_s": tbt}


# ---- sampling parameters -------------------------------------------------------------------

_SAMPLING_OPTIONAL = ("temperature", "top_p", "top_k", "seed", "max_tokens")


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    """`p.top_logprobs` is not part of the message: it travels as the request's own `top_logprobs`
    field (GenerateRequest, DecodeRequest, PrefillRequest); see sampling_from_proto."""
    msg = common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                    max_tokens=p.max_tokens, stop_token_ids=list(p.stop_token_ids),
                                    ignore_eos=p.ignore_eos)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def sampling_from_proto(msg: common_pb2.SamplingParams, top_logprobs: int = 0) -> SamplingParams:
    """Unset fields keep the domain defaults; bad values raise InvalidRequestError. `top_logprobs`:
    the request message's own field of that name (it lives beside `sampling`, not in it)."""
    kw = {name: getattr(msg, name) for name in _SAMPLING_OPTIONAL if msg.HasField(name)}
    return SamplingParams(stop_token_ids=tuple(msg.stop_token_ids), top_logprobs=top_logprobs,
                          ignore_eos=msg.ignore_eos, **kw)


# ---- top log-probabilities of one generated position ------------------------------------------

def top_logprobs_to_proto(top: Sequence[tuple[int, float]]) -> common_pb2.TokenTopLogprobs:
    """[(token_id, logprob)], most likely first -> TokenTopLogprobs (order kept)."""
    return common_pb2.TokenTopLogprobs(entries=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in top])


def top_logprobs_from_proto(msg: common_pb2.TokenTopLogprobs) -> list[tuple[int, float]]:
    return [(e.token_id, e.logprob) for e in msg.entries]
