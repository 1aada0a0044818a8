"""The router's one log line per request (event "request"), filled in as Router.generate runs and
written once when it ends, whatever the end: finished, rejected by admission, failed, cancelled.

    line = RequestLine(rid, prompt_tokens=n, max_tokens=k)
    line.admitted(decision, queued_s)        # or line.admission = "off" (no gate)
    line.route = "disaggregated"
    line.timings(ttft_s, gaps, count, e2e_s)
    line.end("stop")                         # or line.end("error", exc)
    line.emit(log)                           # INFO, one line; its fields are the record's `extra`

Fields (JSON logs show them as keys, text logs as key=value): request_id (the client's),
instance_request_id (the id the instances' and the kvstore's logs show: the client's plus a suffix
unique to this attempt), api_key (the id of the key
that sent it, "anonymous" on an open router), route (decode_only | disaggregated | none: never
routed), prompt_tokens, max_tokens, admission (admitted | rejected | unobserved: no instance to judge
| off: admission disabled | waiting: the client left before the decision | refused: invalid or
unauthenticated, never reached admission: `refused()`), admission_reason, queued_s (arrival to the decision), predicted_ttft_s, admission_detail (the prediction's terms: queued tokens ahead and their seconds, own prefill seconds, decode share, slowdown, on a LARS pool the instance's load sample's queued tokens, how many of them were not this router's prompts and the sample's age, model and corrected seconds, host_busy_s, inflight_s, the instance), ttft_s, tbt_mean_s, completion_tokens, e2e_s, outcome (stop |
length | abort | error), error_type and error_status (the gRPC status the client got). Never the
prompt's or the completion's text.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from common.rpc.status import status_for


@dataclass
class RequestLine:
    request_id: str
    prompt_tokens: int
    max_tokens: int
    route: str = "none"
    admission: str = "off"
    admission_reason: str = ""
    queued_s: float | None = None
    predicted_ttft_s: float | None = None
    admission_detail: str = ""               # the prediction's terms (ADMIT): ahead, own, decode share...
    ttft_s: float | None = None
    tbt_mean_s: float | None = None
    completion_tokens: int = 0
    e2e_s: float | None = None
    outcome: str = "error"
    error_type: str = ""
    error_status: str = ""
    api_key: str = ""
    instance_request_id: str = ""     # its id on the instances and the kvstore (their logs show this one)

    def admitted(self, decision, queued_s: float) -> None:
        """After the gate let the request through (`decision` None: no instance was observable)."""
        self.queued_s = round(queued_s, 6)
        if decision is None:
            self.admission = "unobserved"
            return
        self.admission, self.admission_reason = "admitted", decision.reason
        if decision.predicted_ttft_s is not None:
            self.predicted_ttft_s = round(decision.predicted_ttft_s, 6)
        if decision.model_ttft_s is not None:
            terms = dict(decision.parts, model_s=decision.model_ttft_s, corrected_s=decision.corrected_s,
                         host_busy_s=decision.host_busy_s, inflight_s=decision.inflight_s,
                         instance=decision.prefill_instance or decision.decode_instance)
            self.admission_detail = " ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}"
                                             for k, v in terms.items())

    def rejected(self, error: BaseException, queued_s: float) -> None:
        """The gate raised: the decision's reason (AdmissionRejected), else the error's type (the
        queue wait timed out, the prompt can never fit, the router is stopping)."""
        decision = getattr(error, "decision", None)
        self.admission = "rejected"
        self.admission_reason = decision.reason if decision is not None else type(error).__name__
        self.queued_s = round(queued_s, 6)

    def timings(self, ttft_s: float | None, gaps_s: list[float], completion_tokens: int) -> None:
        self.ttft_s = None if ttft_s is None else round(ttft_s, 6)
        self.tbt_mean_s = round(sum(gaps_s) / len(gaps_s), 6) if gaps_s else None
        self.completion_tokens = completion_tokens

    def end(self, outcome: str, error: BaseException | None = None, e2e_s: float | None = None) -> None:
        self.outcome = outcome
        self.e2e_s = None if e2e_s is None else round(e2e_s, 6)
        if error is not None:
            self.error_type = type(error).__name__
            self.error_status = status_for(error).name

    @classmethod
    def refused(cls, request_id: str, error: BaseException, api_key: str = "") -> "RequestLine":
        """The line of a request refused before Router.generate (bad input, no valid API key)."""
        line = cls(request_id, 0, 0, admission="refused", api_key=api_key)
        line.end("error", error)
        return line

    def fields(self) -> dict:
        return {"event": "request", **asdict(self)}

    def emit(self, logger: logging.Logger) -> None:
        logger.info("request", extra=self.fields())
