"""The OpenAI error shape and HTTP status of each typed error (services/router/http_api.py http_error),
and the request-body helpers; the endpoints themselves are tested against real servers in
tests/integration/test_http_api.py."""
from __future__ import annotations

import pytest

from common.admission import AdmissionRejected, Decision, Outcome
from common.errors import (CapacityError, InvalidRequestError, KVTransferError, PlacementError,
                           WorkerFailedError)
from services.router.http_api import _content, _prompts, http_error
from services.router.router import RetryLater


def test_an_admission_rejection_with_a_hint_is_429_with_retry_after():
    e = http_error(AdmissionRejected("r1", Decision(Outcome.REJECT, "kv_full", retry_after_s=2.2, detail="full")))
    assert e.status == 429 and e.code == "kv_full" and e.type == "rate_limit_error"
    assert e.headers == {"Retry-After": "3", "retry-after-ms": "2200"}
    assert e.body()["error"]["message"].startswith("request r1 rejected by admission (kv_full): full")


def test_a_rejection_retrying_cannot_fix_tells_the_sdk_not_to_retry():
    e = http_error(AdmissionRejected("r1", Decision(Outcome.REJECT, "ttft_unattainable", detail="too long")))
    assert e.status == 429 and e.headers == {"x-should-retry": "false"}


def test_capacity_without_admission_still_has_a_hint():
    e = http_error(RetryLater("no room", 0.5))
    assert e.status == 429 and e.headers["Retry-After"] == "1" and e.headers["retry-after-ms"] == "500"
    assert http_error(CapacityError("x")).code == "capacity"


@pytest.mark.parametrize("exc, status, type_", [
    (InvalidRequestError("bad"), 400, "invalid_request_error"),
    (WorkerFailedError("died"), 503, "service_unavailable"),
    (KVTransferError("late"), 503, "service_unavailable"),
    (PlacementError("lost"), 503, "service_unavailable"),
    (RuntimeError("bug"), 500, "server_error"),
])
def test_status_of_each_error(exc, status, type_):
    e = http_error(exc)
    assert (e.status, e.type) == (status, type_)
    body = e.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    if status == 500:
        assert body["message"] == "internal error: RuntimeError"      # no internals beyond the type


def test_prompt_forms():
    assert _prompts("hi") == ["hi"]
    assert _prompts([1, 2]) == [[1, 2]]
    assert _prompts(["a", "b"]) == ["a", "b"]
    assert _prompts([[1], [2, 3]]) == [[1], [2, 3]]
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        _prompts([])
    with pytest.raises(InvalidRequestError, match="at most 64 prompts"):
        _prompts(["a"] * 65)


def test_message_content_forms():
    assert _content(None, 0) == "" and _content("x", 0) == "x"
    assert _content([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], 0) == "ab"
    with pytest.raises(InvalidRequestError, match=r"messages\[3\].content: only text parts"):
        _content([{"type": "image_url"}], 3)
