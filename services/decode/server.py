"""gRPC servicer of a decode instance: proto <-> domain only (logic in instance.py)."""
from __future__ import annotations

from common.errors import InvalidRequestError
from common.rpc import convert
from common.rpc.protos import common_pb2, decode_pb2, decode_pb2_grpc
from common.rpc.status import handles_errors
from common.tracing import parent_from
from common.scheduler.request import FinishReason
from services.decode.instance import DecodeInstance, DecodeJob, Destination

FINISH = {FinishReason.STOP: common_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
          FinishReason.ABORT: common_pb2.FINISH_REASON_ABORTED}



def destination_to_proto(d: Destination) -> common_pb2.KVDestination:
    return common_pb2.KVDestination(
        request_id=d.request_id, layout=convert.layout_to_proto(d.layout), backend=d.backend, epoch=d.epoch,
        groups=[common_pb2.GroupReceiver(
            group=g.group, token_start=g.token_start, token_end=end, block_ids=g.block_table,
            cached_tokens=g.cached,
            workers=[common_pb2.WorkerEndpoint(tp_rank=t, address=a) for t, a in enumerate(g.addresses)])
            for g, end in zip(d.groups, d.token_ends)])


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, instance: DecodeInstance) -> None:
        self.instance = instance

    @handles_errors
    async def PrepareReceive(self, request, context):
        if not request.HasField("placement"):
            raise InvalidRequestError("PrepareReceive needs the request's placement")
        placement = convert.placement_from_proto(request.placement)
        if request.request_id and request.request_id != placement.request_id:
            raise InvalidRequestError(f"request_id {request.request_id!r} differs from the placement's "
                                      f"{placement.request_id!r}")
        layout = convert.layout_from_proto(request.sender_layout) if request.HasField("sender_layout") else None
        dest = await self.instance.prepare_receive(placement, layout, request.backend, parent_from(context),
                                                   prompt_ids=list(request.prompt_token_ids) or None)
        return decode_pb2.PrepareReceiveResponse(destination=destination_to_proto(dest))

    @handles_errors
    async def Decode(self, request, context):
        job = DecodeJob(
            request_id=request.request_id, prompt_ids=list(request.prompt_token_ids),
            params=convert.sampling_from_proto(request.sampling, request.top_logprobs),
            placement=convert.placement_from_proto(request.placement) if request.HasField("placement") else None,
            first_token=request.first_token_id if request.HasField("first_token_id") else None,
            **convert.slo_from_proto(request))
        if not job.request_id:
            raise InvalidRequestError("request_id must not be empty")
        reason = None
        count = 0
        done = -1                  # a prompt prefilled here: its tokens computed, last reported (a
                                   # preempted prompt's count goes back)
        async for out in self.instance.decode(job, parent_from(context)):
            if out.token_id is None and not count and out.finish_reason is None \
                    and job.first_token is None and done != out.num_computed < out.prompt_len:
                done = out.num_computed          # its prefill's progress (the router's admission reads it)
                yield decode_pb2.DecodeResponse(progress=decode_pb2.DecodeProgress(
                    tokens_done=out.num_computed, tokens_total=out.prompt_len))
            if out.token_id is not None:
                count += 1
                delta = common_pb2.TokenDelta(token_ids=[out.token_id])
                if request.return_logprobs:
                    delta.logprobs.append(out.logprob)
                if out.top_logprobs:
                    delta.top_logprobs.append(convert.top_logprobs_to_proto(out.top_logprobs))
                yield decode_pb2.DecodeResponse(delta=delta)
            reason = out.finish_reason
        yield decode_pb2.DecodeResponse(finished=common_pb2.Finished(
            finish_reason=FINISH.get(reason, common_pb2.FINISH_REASON_UNSPECIFIED),
            timings=common_pb2.Timings(prompt_tokens=len(job.prompt_ids), completion_tokens=count)))

    @handles_errors
    async def Abort(self, request, context):
        return common_pb2.AbortResponse(found=await self.instance.abort(request.request_id))

    @handles_errors
    async def Stats(self, request, context):
        s = self.instance.stats()
        return decode_pb2.StatsResponse(
            instance_id=self.instance.instance_id, running=s.running, waiting=s.waiting,
            groups=[decode_pb2.GroupBlocks(group=g, total_blocks=t, free_blocks=f)
                    for g, (t, f) in enumerate(zip(s.total_blocks, s.free_blocks))])
