"""gRPC servicer of the router (the public API): proto <-> domain only (logic in frontend.py and
router.py)."""
from __future__ import annotations

import asyncio
import logging
import time

from common.auth import presented_key
from common.errors import MnemosyneError
from common.rpc import convert
from common.rpc.protos import common_pb2, router_pb2, router_pb2_grpc
from common.rpc.status import handles_errors
from services.router.auth import Principal
from services.router.frontend import Frontend, PromptInput
from services.router.request_log import RequestLine
from services.router.router import Delta, Finished, Progress, Router, Started

log = logging.getLogger("services.router.router")      # the request lines' logger

ROUTES = {"decode_only": router_pb2.ROUTE_DECODE_ONLY, "disaggregated": router_pb2.ROUTE_DISAGGREGATED}
FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH,
          "abort": common_pb2.FINISH_REASON_ABORTED}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "max_tokens")


def prompt_from_proto(req: router_pb2.GenerateRequest) -> PromptInput:
    which = req.WhichOneof("prompt")
    sampling = {name: getattr(req.sampling, name) for name in SAMPLING_FIELDS if req.sampling.HasField(name)}
    if req.sampling.stop_token_ids:
        sampling["stop_token_ids"] = tuple(req.sampling.stop_token_ids)
    slo = req.slo if req.HasField("slo") else None
    messages = ([{"role": m.role, "content": m.content} for m in req.messages.messages]
                if which == "messages" else None)
    return PromptInput(request_id=req.request_id, text=req.text if which == "text" else None,
                       token_ids=list(req.token_ids.ids) if which == "token_ids" else None,
                       chat=req.chat, model=req.model, sampling=sampling, return_logprobs=req.return_logprobs,
                       ttft_slo_s=slo.ttft_s if slo is not None and slo.HasField("ttft_s") else None,
                       tbt_slo_s=slo.tbt_s if slo is not None and slo.HasField("tbt_s") else None,
                       messages=messages, stop=tuple(req.stop), top_logprobs=req.top_logprobs,
                       ignore_eos=req.ignore_eos)


def event_to_proto(ev: Started | Progress | Delta | Finished) -> router_pb2.GenerateResponse:
    if isinstance(ev, Delta):
        return router_pb2.GenerateResponse(delta=common_pb2.TokenDelta(
            token_ids=ev.token_ids, text=ev.text, logprobs=ev.logprobs,
            top_logprobs=[convert.top_logprobs_to_proto(t) for t in ev.top_logprobs]))
    if isinstance(ev, Progress):
        return router_pb2.GenerateResponse(progress=router_pb2.PrefillProgress(
            tokens_done=ev.tokens_done, tokens_total=ev.tokens_total))
    if isinstance(ev, Started):
        started = router_pb2.Started(
            request_id=ev.request_id, prompt_tokens=ev.prompt_tokens, route=ROUTES[ev.route],
            prefill_instance=ev.prefill_instance, decode_instance=ev.decode_instance)
        for name in ("predicted_ttft_s", "ttft_slo_s", "tbt_slo_s", "cached_prompt_tokens"):
            if getattr(ev, name) is not None:
                setattr(started, name, getattr(ev, name))
        return router_pb2.GenerateResponse(started=started)
    t = ev.timings
    tbt_mean = sum(t.tbt_s) / len(t.tbt_s) if t.tbt_s else 0.0
    return router_pb2.GenerateResponse(finished=common_pb2.Finished(
        finish_reason=FINISH[ev.reason],
        timings=common_pb2.Timings(ttft_s=t.ttft_s, tbt_s=t.tbt_s, tbt_mean_s=tbt_mean, e2e_s=t.e2e_s,
                                   queue_s=t.queue_s, prompt_tokens=t.prompt_tokens,
                                   completion_tokens=t.completion_tokens)))


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, frontend: Frontend, router: Router) -> None:
        self.frontend = frontend
        self.router = router

    def _caller(self, context) -> Principal:
        """The API key in the call's metadata (UnauthenticatedError when the router requires one)."""
        return self.router.keys.authenticate(presented_key(context.invocation_metadata() or ()))

    @handles_errors
    async def Generate(self, request, context):
        t0 = time.monotonic()
        who = None
        try:
            who = self._caller(context)
            job = await asyncio.to_thread(self.frontend.prepare, prompt_from_proto(request))  # tokenizing is CPU
        except MnemosyneError as e:
            RequestLine.refused(request.request_id, e, who.id if who else "").emit(log)
            raise
        async for ev in self.router.generate(job, t0, who):
            yield event_to_proto(ev)

    @handles_errors
    async def Abort(self, request, context):
        return common_pb2.AbortResponse(found=self.router.abort(request.request_id, self._caller(context)))

    @handles_errors
    async def ModelInfo(self, request, context):
        self._caller(context)
        i = self.frontend.info
        resp = router_pb2.ModelInfoResponse(name=i.name, max_model_len=i.max_model_len, vocab_size=i.vocab_size,
                                            eos_token_ids=list(i.eos_token_ids))
        if i.bos_token_id is not None:
            resp.bos_token_id = i.bos_token_id
        return resp
