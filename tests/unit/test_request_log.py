"""services/router/request_log.py: the router's one line per request, for each way a request ends."""
from __future__ import annotations

import logging

from common.admission import AdmissionRejected, Decision, Outcome
from common.errors import CapacityError, WorkerFailedError
from services.router.request_log import RequestLine


def test_an_admitted_request_that_finished():
    line = RequestLine("r1", 300, 16)
    line.admitted(Decision(Outcome.ADMIT, "ok", "p-1", "d-1", predicted_ttft_s=0.5), 0.0123456789)
    line.route = "disaggregated"
    line.timings(0.61, [0.02, 0.04], 3)
    line.end("stop", None, 0.7)
    f = line.fields()
    assert f == {"event": "request", "request_id": "r1", "prompt_tokens": 300, "max_tokens": 16,
                 "route": "disaggregated", "admission": "admitted", "admission_reason": "ok",
                 "queued_s": 0.012346, "predicted_ttft_s": 0.5, "ttft_s": 0.61, "tbt_mean_s": 0.03,
                 "completion_tokens": 3, "e2e_s": 0.7, "outcome": "stop", "error_type": "", "error_status": "",
                 "api_key": "", "instance_request_id": "", "admission_detail": ""}


def test_an_admitted_requests_line_says_what_its_prediction_was_made_of():
    line = RequestLine("r3", 120, 8)
    line.admitted(Decision(Outcome.ADMIT, "fits", None, "d-1", predicted_ttft_s=0.9, model_ttft_s=0.5,
                           corrected_s=0.6, host_busy_s=2.0, inflight_s=0.05, pool="decode",
                           parts={"ahead_tokens": 64, "own_s": 0.5, "decode_share": 0.0}), 0.0)
    assert line.fields()["admission_detail"] == ("ahead_tokens=64 own_s=0.5 decode_share=0.0 model_s=0.5 "
                                                 "corrected_s=0.6 host_busy_s=2.0 inflight_s=0.05 instance=d-1")


def test_a_request_rejected_by_admission_says_why(caplog):
    line = RequestLine("r2", 5000, 8)
    err = AdmissionRejected("r2", Decision(Outcome.REJECT, "ttft_unattainable", retry_after_s=2.0))
    line.rejected(err, 0.001)
    line.end("error", err, 0.002)
    with caplog.at_level(logging.INFO):
        line.emit(logging.getLogger("services.router.router"))
    (rec,) = caplog.records
    assert rec.levelno == logging.INFO and rec.getMessage() == "request"
    assert (rec.route, rec.admission, rec.admission_reason, rec.outcome, rec.error_type, rec.error_status) == \
           ("none", "rejected", "ttft_unattainable", "error", "AdmissionRejected", "RESOURCE_EXHAUSTED")
    assert rec.ttft_s is None and rec.completion_tokens == 0


def test_other_ends():
    queued_out = RequestLine("r3", 10, 4)
    queued_out.rejected(CapacityError("admission queue wait timed out"), 30.0)
    assert (queued_out.admission, queued_out.admission_reason) == ("rejected", "CapacityError")
    failed = RequestLine("r4", 10, 4)
    failed.admitted(None, 0.0)                     # no instance observable: the kvstore decides
    failed.end("error", WorkerFailedError("decode instance d-1: worker died"))
    assert (failed.admission, failed.error_status) == ("unobserved", "UNAVAILABLE")
    off = RequestLine("r5", 10, 4)
    off.end("abort")
    assert (off.admission, off.outcome, off.error_type) == ("off", "abort", "")


def test_a_refused_request_has_a_line_too():
    from common.errors import InvalidRequestError, UnauthenticatedError
    f = RequestLine.refused("r9", InvalidRequestError("prompt is empty"), api_key="alice").fields()
    assert (f["request_id"], f["api_key"], f["admission"], f["outcome"]) == ("r9", "alice", "refused", "error")
    assert (f["error_type"], f["error_status"]) == ("InvalidRequestError", "INVALID_ARGUMENT")
    f = RequestLine.refused("", UnauthenticatedError("no key")).fields()
    assert f["error_status"] == "UNAUTHENTICATED" and f["api_key"] == ""
