"""gRPC servicer of a prefill instance: proto <-> domain only (logic in instance.py)."""
from __future__ import annotations

from common.kv_connector.types import GroupSink, KVSink
from common.errors import InvalidRequestError, StalePlacementError
from common.rpc import convert
from common.rpc.protos import common_pb2, prefill_pb2, prefill_pb2_grpc
from common.rpc.status import handles_errors
from common.tracing import parent_from
from services.prefill.instance import Done, FirstToken, PrefillInstance, PrefillJob, Progress

#: kvp_tokens of a destination with a single group: any token index stays in group 0.
ONE_GROUP = 1 << 40



def sink_from_proto(dest: common_pb2.KVDestination, num_tokens: int) -> KVSink:
    """The engine's KVSink for a decode instance's KVDestination. Groups must be 0..n-1 in order and
    cover the prompt; group k starts at k*M. The sink carries the destination's placement epoch."""
    groups = sorted(dest.groups, key=lambda g: g.group)
    if not groups or [g.group for g in groups] != list(range(len(groups))):
        raise InvalidRequestError(f"KV destination groups must be 0..n-1, got {[g.group for g in dest.groups]}")
    if groups[-1].token_end != num_tokens or groups[0].token_start != 0:
        raise InvalidRequestError(f"KV destination covers tokens [{groups[0].token_start}, "
                                  f"{groups[-1].token_end}), the prompt has {num_tokens}")
    m = groups[1].token_start if len(groups) > 1 else ONE_GROUP
    sinks = []
    for g in groups:
        if g.token_start != g.group * m or not g.workers:
            raise InvalidRequestError(f"KV destination group {g.group}: starts at {g.token_start} (expected "
                                      f"{g.group * m}), {len(g.workers)} receivers")
        addrs = [w.address for w in sorted(g.workers, key=lambda w: w.tp_rank)]
        if not 0 <= g.cached_tokens <= g.token_end - g.token_start:
            raise InvalidRequestError(f"KV destination group {g.group}: {g.cached_tokens} cached tokens of "
                                      f"[{g.token_start}, {g.token_end})")
        sinks.append(GroupSink(g.group, g.token_start, list(g.block_ids), addrs, g.cached_tokens))
    return KVSink(dest.backend or "tcp", m, sinks, dest.epoch)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, instance: PrefillInstance) -> None:
        self.instance = instance

    @handles_errors
    async def Prefill(self, request, context):
        if not request.request_id:
            raise InvalidRequestError("request_id must not be empty")
        if request.cache_only:
            if request.HasField("destination") or request.HasField("placement"):
                raise InvalidRequestError("a cache_only Prefill sends no KV: it takes no destination or placement")
        elif not request.HasField("destination"):
            raise InvalidRequestError("Prefill needs a KV destination (decode.PrepareReceive)")
        if request.HasField("placement") and request.placement.epoch != request.destination.epoch:
            raise StalePlacementError(f"request {request.request_id}: placement epoch {request.placement.epoch} "
                                      f"but the KV destination was prepared for epoch {request.destination.epoch}")
        layout = convert.layout_from_proto(request.destination.layout) \
            if request.destination.HasField("layout") else None
        job = PrefillJob(request.request_id, list(request.token_ids),
                         convert.sampling_from_proto(request.sampling, request.top_logprobs),
                         None if request.cache_only else sink_from_proto(request.destination, len(request.token_ids)),
                         layout, **convert.slo_from_proto(request))
        async for ev in self.instance.prefill(job, parent_from(context)):
            if isinstance(ev, Progress):
                yield prefill_pb2.PrefillResponse(progress=prefill_pb2.PrefillProgressEvent(
                    tokens_done=ev.tokens_done, tokens_total=ev.tokens_total))
            elif isinstance(ev, FirstToken):
                first = prefill_pb2.FirstToken(token_id=ev.token_id, logprob=ev.logprob, prefill_s=ev.prefill_s)
                if ev.top_logprobs:
                    first.top_logprobs.CopyFrom(convert.top_logprobs_to_proto(ev.top_logprobs))
                yield prefill_pb2.PrefillResponse(first_token=first)
            elif isinstance(ev, Done):
                yield prefill_pb2.PrefillResponse(done=prefill_pb2.PrefillDone(
                    kv_bytes=ev.kv_bytes, transfer_tail_s=ev.transfer_tail_s))

    @handles_errors
    async def Abort(self, request, context):
        return common_pb2.AbortResponse(found=await self.instance.abort(request.request_id))
