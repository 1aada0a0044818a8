"""Bad requests to the public API get INVALID_ARGUMENT with a message that says what is wrong, before
any instance is involved (a real router and kvstore over the session's real Redis; no engine)."""
from __future__ import annotations

import time
import uuid

import grpc
import pytest

from common.client import KVStoreClient, RouterClient
from common.metadata.store import MetadataStore
from common.metadata.types import Instance
from common.rpc import client as rpc_client
from common.rpc.protos import router_pb2, router_pb2_grpc
from services.kvstore.config import KVStoreConfig
from services.kvstore.service import KVStoreService
from services.router.config import RouterConfig
from services.router.service import RouterService
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.loop import Loop

pytestmark = pytest.mark.timeout(120)
MAX_PROMPT = 100
VOCAB = 320


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    """(router address, kvstore service, deployment) with no instance registered."""
    model = str(write_random_hf_model(tmp_path_factory.mktemp("bad-model"), "llama", num_hidden_layers=1))
    loop = Loop()
    deployment = f"bad-{uuid.uuid4().hex[:8]}"
    kv = loop.run(KVStoreService.start(KVStoreConfig(port=0, redis_url=redis_url, deployment=deployment,
                                                     grace_s=0.5)))
    router = loop.run(RouterService.start(RouterConfig(kvstore=kv.address, port=0, model=model,
                                                       max_prompt_tokens=MAX_PROMPT, grace_s=0.5)))
    yield loop, router.address, kv, deployment
    loop.run(router.stop())
    loop.run(kv.stop())
    loop.close()


def generate_error(address: str, request: router_pb2.GenerateRequest) -> grpc.RpcError:
    with rpc_client.blocking_channel(address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(router_pb2_grpc.RouterStub(ch).Generate(request, timeout=30))
    return info.value


R = RouterClient.request


@pytest.mark.parametrize("request_, message", [
    (R(text=""), "prompt is empty: text is an empty string"),
    (R(token_ids=[]), "prompt is empty: token_ids has no ids"),
    (router_pb2.GenerateRequest(), "prompt is empty: set text or token_ids"),
    (R(text="Hello", model="gpt-9"), "unknown model 'gpt-9'; this deployment serves"),
    (R(token_ids=[5] * (MAX_PROMPT + 1)), f"prompt has {MAX_PROMPT + 1} tokens; this deployment accepts "
                                          f"at most {MAX_PROMPT}"),
    (R(text="The quick brown fox jumps over the lazy dog. " * 40), "this deployment accepts at most"),
    (R(text="Hello", max_tokens=-3), "max_tokens must be >= 1, got -3"),
    (R(text="Hello", max_tokens=0), "max_tokens must be >= 1, got 0"),
    (R(token_ids=[5, 6, -7, 8]), f"token_ids: 1 id(s) outside the vocabulary [0, {VOCAB}): -7 at position 2"),
    (R(token_ids=[5, VOCAB, 2**31 - 1]), f"token_ids: 2 id(s) outside the vocabulary [0, {VOCAB}): "
                                         f"{VOCAB} at position 1, {2**31 - 1} at position 2"),
    (R(token_ids=[5, 6], chat=True), "chat applies to a text prompt, not to token_ids"),
    (R(text="Hello", temperature=-0.5), "temperature must be a finite number >= 0, got -0.5"),
    (R(text="Hello", temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (R(text="Hello", top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (R(text="Hello", top_p=float("nan")), "top_p must be in (0, 1], got nan"),
    (R(text="Hello", top_k=-2), "top_k must be >= 0, got -2"),
    (R(text="Hello", stop_token_ids=(3, 999)), "stop_token_ids: 1 id(s) outside the vocabulary"),
    (R(text="Hello", top_logprobs=21), "top_logprobs must be an integer in [0, 20], got 21"),
    (R(text="Hello", top_logprobs=-1), "top_logprobs must be an integer in [0, 20], got -1"),
    (R(text="Hello", request_id="r" * 300), "request_id is 300 characters long (at most 256)"),
    (router_pb2.GenerateRequest(messages=router_pb2.ChatMessages()), "messages is empty"),
    (router_pb2.GenerateRequest(messages=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(
        role="robot", content="hi")])), "messages[0].role must be one of system, user, assistant"),
    (router_pb2.GenerateRequest(text="Hello", stop=["a"] * 17), "stop: at most 16 strings, got 17"),
    (router_pb2.GenerateRequest(text="Hello", stop=["ok", ""]), "stop[1] must be a non-empty string"),
    (R(text="Hello", model="m" * 10_000), "unknown model 'mmmmmmmm"),
    (R(text="x" * 4_000_000), f"more than {MAX_PROMPT} tokens can hold; this deployment accepts at most {MAX_PROMPT}"),
], ids=["empty-text", "empty-ids", "no-prompt", "unknown-model", "too-long-ids", "too-long-text",
        "negative-max-tokens", "zero-max-tokens", "negative-id", "id-beyond-vocab", "chat-with-ids",
        "negative-temperature", "nan-temperature", "zero-top-p", "nan-top-p", "negative-top-k", "bad-stop-id",
        "top-logprobs-over-20", "negative-top-logprobs", "long-request-id", "no-messages", "bad-role", "many-stops",
        "empty-stop", "long-model-name", "megabytes-of-text"])
def test_bad_request_is_invalid_argument(stack, request_, message):
    _, address, _, deployment = stack
    t0 = time.monotonic()
    err = generate_error(address, request_)
    assert time.monotonic() - t0 < 5          # a 4 MB text is refused before it is tokenized
    assert len(err.details()) < 2000          # nothing a client sent is echoed at length
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err
    assert message in err.details(), err.details()


def test_no_decode_instance_is_resource_exhausted(stack):
    _, address, _, _ = stack
    err = generate_error(address, R(text="Hello there"))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no live decode instance" in err.details()


def test_request_no_instance_could_hold_is_invalid_argument(stack, redis_url):
    loop, address, kv, deployment = stack

    async def register():
        c = KVStoreClient(kv.address)
        try:     # a registration only: the request is refused at reservation, nothing is ever sent there
            await c.register(Instance("tiny-decode", "decode", "127.0.0.1:1", block_size=16, capacity=(2,)))
        finally:
            await c.close()

    loop.run(register())
    store = MetadataStore(redis_url, deployment=deployment)
    try:
        err = generate_error(address, R(token_ids=[5] * 60, max_tokens=8))     # 68 tokens > 2 blocks of 16
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "fit on no live decode instance" in err.details()
        assert store.num_placements() == 0
    finally:
        store.deregister_instance("tiny-decode")
        store.close()
