"""The OpenAI-compatible HTTP API (services/router/http_api.py), driven by the official `openai` client:
against a real deployment (scripts/up.py's Cluster on the built-in model: Redis, kvstore, a prefill and
a decode instance, the router serving gRPC and HTTP), and against a router with no instance for the
error shapes. HTTP answers must be the gRPC API's answers: same tokens, same logprobs."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
import uuid

import grpc
import openai
import pytest

from common.rpc import client as rpc_client
from common.rpc.protos import common_pb2, decode_pb2, decode_pb2_grpc, router_pb2, router_pb2_grpc
from common.metadata.store import MetadataStore
from scripts.up import Cluster, ClusterConfig
from services.kvstore.config import KVStoreConfig
from services.kvstore.service import KVStoreService
from services.router.config import RouterConfig
from services.router.service import RouterService
from tests.fixtures.hf_models import write_random_hf_model
from tests.fixtures.loop import Loop
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.timeout(600)
RELAXED = {"tbt_slo_s": 30.0, "ttft_slo_s": 120.0}     # a loaded 2-core CI machine must not be rejected
CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = ClusterConfig(insecure=True,   # the test calls the kvstore, decode and Redis directly (plaintext)
                        kv_backend="tcp", router_port=0, prefill_spp=1, decode_kvp=1, decode_kv_tokens=2048,
                        prefill_kv_tokens=1024, short_prompt_tokens=64, deployment=f"http-{uuid.uuid4().hex[:8]}",
                        log_dir=str(tmp_path_factory.mktemp("http-logs")))
    with Cluster(cfg) as c:
        assert c.http_url.startswith("http://127.0.0.1:") and c.http_url.endswith("/v1")
        yield c


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.http_url, api_key=cluster.api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def grpc_generate(cluster: Cluster, request: router_pb2.GenerateRequest) -> tuple[list[int], list[float], str]:
    """The request's tokens, logprobs and text over gRPC, with RELAXED's SLOs unless it has its own
    (default deadlines get requests rejected on a loaded 2-core machine, as over HTTP)."""
    if not request.HasField("slo"):
        request.slo.ttft_s, request.slo.tbt_s = RELAXED["ttft_slo_s"], RELAXED["tbt_slo_s"]
    with rpc_client.blocking_channel(cluster.router_address, metadata=cluster.auth_metadata) as ch:
        ids, lps, text = [], [], []
        for ev in router_pb2_grpc.RouterStub(ch).Generate(request, timeout=300):
            if ev.HasField("delta"):
                ids += ev.delta.token_ids
                lps += ev.delta.logprobs
                text.append(ev.delta.text)
    return ids, lps, "".join(text)


def all_freed(cluster: Cluster) -> bool:
    with rpc_client.blocking_channel(cluster.services["decode"].address, default_deadline_s=2.0) as ch:
        stats = decode_pb2_grpc.DecodeStub(ch).Stats(decode_pb2.StatsRequest())
    store = MetadataStore(cluster.redis_url, deployment=cluster.config.deployment)
    try:
        placements = store.num_placements()
    finally:
        store.close()
    return placements == 0 and all(g.free_blocks == g.total_blocks for g in stats.groups)


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---- a real deployment --------------------------------------------------------------------------------
def test_models_health_and_ready(cluster, client, model):
    assert [m.id for m in client.models.list().data] == [model] and model.startswith("SmolLM2")
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-9")
    base = cluster.http_url.removesuffix("/v1")
    assert get(f"{base}/health") == (200, {"status": "ok"})
    # /ready follows the router's view of live decode instances (heartbeats, refreshed every few
    # tenths of a second): a probe, like Kubernetes', asks again. It failed once in a loaded full run,
    # the first call right after the deployment started.
    deadline = time.monotonic() + 30
    while (got := get(f"{base}/ready"))[0] != 200 and time.monotonic() < deadline:
        assert got == (503, {"ready": False, "decode_instances": 0}), got
        time.sleep(0.25)
    status, body = got
    assert status == 200 and body == {"ready": True, "decode_instances": 1}, got


def test_chat_is_the_grpc_answer_with_system_prompt_and_turns(cluster, client, model):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body=RELAXED)
    msgs = router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(**m) for m in CHAT])
    req = router_pb2.GenerateRequest(messages=msgs, return_logprobs=True)
    req.sampling.max_tokens, req.sampling.temperature = 12, 0.0
    ids, lps, text = grpc_generate(cluster, req)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text and text
    assert choice.finish_reason in ("stop", "length")
    assert [c.logprob for c in choice.logprobs.content] == pytest.approx(lps, abs=1e-4)
    for c in choice.logprobs.content:       # greedy: the chosen token is the most likely one
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob >= c.top_logprobs[2].logprob
    assert "".join(c.token for c in choice.logprobs.content).strip() in text or text.strip()
    from common.model.tokenizer import load_tokenizer
    from common.model.loader import load_checkpoint
    ckpt = load_checkpoint(None)
    prompt = load_tokenizer(None, ckpt.config).apply_chat_template(CHAT)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(ids) and r.usage.total_tokens == len(prompt) + len(ids)
    info = r.model_extra["mnemosyne"]["requests"][0]
    assert info["route"] == "decode_only" and info["ttft_s"] > 0 and info["ttft_slo_s"] == RELAXED["ttft_slo_s"]
    # the system prompt and earlier turns reach the model: another history, another prompt
    r2 = client.chat.completions.create(model=model, messages=CHAT[1:2], max_tokens=1, extra_body=RELAXED)
    assert r2.usage.prompt_tokens != r.usage.prompt_tokens


def test_streamed_completions_with_n_and_stop_match_the_unstreamed(cluster, client, model):
    prompt = "List three colours: red, green,"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, extra_body=RELAXED)
    full = whole.choices[0].text
    assert len(full) > 4, full
    stop = full[len(full) // 2:len(full) // 2 + 2]            # a string the greedy answer contains
    cut = full[:full.index(stop)]
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, n=2,
                                            stop=[stop], stream=True, stream_options={"include_usage": True},
                                            extra_body=RELAXED))
    texts, reasons = ["", ""], [None, None]
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [cut, cut] and reasons == ["stop", "stop"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == whole.usage.prompt_tokens    # once per prompt
    assert 2 <= usage.completion_tokens <= 32
    started = [ch.model_extra["mnemosyne"] for ch in chunks if ch.model_extra.get("mnemosyne", {}).get("route")]
    assert sorted(s["index"] for s in started if "ttft_s" not in s) == [0, 1]
    # the same over gRPC: the stop string ends the stream there too
    req = router_pb2.GenerateRequest(text=prompt, stop=[stop])
    req.sampling.max_tokens, req.sampling.temperature = 16, 0.0
    assert grpc_generate(cluster, req)[2] == cut


def test_a_long_prompt_streams_prefill_progress_through_the_prefill_pool(cluster, client, model):
    prompt = "The history of the printing press begins in Mainz. " * 12          # > short_prompt_tokens
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                       stream_options={"include_progress": True}, logprobs=1, extra_body=RELAXED)
    progress, text, lps = [], "", []
    for ch in stream:
        extra = ch.model_extra.get("mnemosyne") or {}
        if "prefill_progress" in extra:
            progress.append(extra["prefill_progress"])
        elif extra.get("route"):
            assert extra["route"] == "disaggregated" and extra["prefill_instance"]
        for c in ch.choices:
            text += c.text
            if c.logprobs is not None:
                lps += c.logprobs.token_logprobs
                assert all(len(t) == 1 for t in c.logprobs.top_logprobs)
    assert progress and progress[-1]["tokens_done"] == progress[-1]["tokens_total"] > 64
    req = router_pb2.GenerateRequest(text=prompt, return_logprobs=True)
    req.sampling.max_tokens, req.sampling.temperature = 4, 0.0
    ids, grpc_lps, grpc_text = grpc_generate(cluster, req)
    assert text == grpc_text and lps == pytest.approx(grpc_lps, abs=1e-4)


def test_rejections_are_openai_errors(cluster, client, model):
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=model, prompt="Hello", extra_body={"ttft_slo_s": 1e-6})
    err = info.value
    assert err.status_code == 429 and err.body["type"] == "rate_limit_error"
    assert err.body["code"] == "ttft_unattainable" and "rejected by admission" in err.body["message"]
    assert err.response.headers["x-should-retry"] == "false"        # retrying cannot help: the SDK won't
    with pytest.raises(openai.BadRequestError, match="not supported by this server: presence_penalty"):
        client.chat.completions.create(model=model, messages=CHAT, presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="temperature must be a finite number >= 0"):
        client.chat.completions.create(model=model, messages=CHAT, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="messages is empty"):
        client.chat.completions.create(model=model, messages=[])
    with pytest.raises(openai.BadRequestError, match="n: "):
        client.completions.create(model=model, prompt="x", n=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="prompt has .* tokens; this deployment accepts at most"):
        client.completions.create(model=model, prompt=[5] * 100_000)


def test_a_client_that_disconnects_mid_stream_frees_everything(cluster, client, model):
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell a long story."}],
                                            max_tokens=400, stream=True, extra_body={**RELAXED, "ignore_eos": True})
    seen = 0
    for ch in stream:
        seen += sum(1 for c in ch.choices if c.delta.content)
        if seen >= 2:
            break
    stream.close()
    wait_until(lambda: all_freed(cluster), 15, "the aborted request's KV and placement freed")
    # and the deployment serves the next request
    r = client.completions.create(model=model, prompt="Hello", max_tokens=2, extra_body=RELAXED)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_client_that_disconnects_while_waiting_for_a_whole_answer_frees_everything(cluster, model):
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 400, **RELAXED,
                       "ignore_eos": True}).encode()
    auth = f"Authorization: Bearer {cluster.api_key}\r\n".encode()
    host, port = cluster.http_url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth +
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(2.0)                     # the request is running
    wait_until(lambda: all_freed(cluster), 15, "the abandoned request's KV and placement freed")


# ---- a router with no instance ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare(tmp_path_factory, redis_url):
    """The HTTP URL of a router whose deployment has no instance."""
    model = str(write_random_hf_model(tmp_path_factory.mktemp("http-bare"), "llama", num_hidden_layers=1))
    loop = Loop()
    deployment = f"http-bare-{uuid.uuid4().hex[:8]}"
    kv = loop.run(KVStoreService.start(KVStoreConfig(port=0, redis_url=redis_url, deployment=deployment,
                                                     grace_s=0.5)))
    router = loop.run(RouterService.start(RouterConfig(kvstore=kv.address, port=0, model=model, http_port=0,
                                                       grace_s=0.5)))
    yield router.http.url
    loop.run(router.stop())
    loop.run(kv.stop())
    loop.close()


def test_no_instance_is_503_and_not_ready(bare):
    c = openai.OpenAI(base_url=bare, api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        c.completions.create(model=c.models.list().data[0].id, prompt=[5, 6, 7])
    assert info.value.status_code == 503 and info.value.body["code"] == "no_instance"
    assert info.value.response.headers["retry-after"] == "1"
    status, body = get(f"{bare.removesuffix('/v1')}/ready")
    assert status == 503 and body == {"ready": False, "decode_instances": 0}


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature: "),
    ({"prompt": "x", "stop": [""]}, 400, "stop[0] must be a non-empty string"),
    ({"prompt": "x", "stop": ["a"] * 17}, 400, "stop: at most 16 strings"),
    ({"prompt": "x", "echo": True}, 400, "not supported by this server: echo"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs: "),
    ({"prompt": "x", "seed": -1}, 400, "seed: "),
    ({}, 400, "prompt: "),
    ({"prompt": []}, 400, "prompt is empty"),
    ({"prompt": "x", "ttft_slo_s": -1}, 400, "ttft_s must be positive"),
], ids=["bad-type", "empty-stop", "many-stops", "echo", "many-logprobs", "negative-seed", "no-prompt",
        "empty-prompt", "negative-slo"])
def test_bad_completion_bodies_are_400(bare, body, status, message):
    req = urllib.request.Request(f"{bare}/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    err = json.loads(info.value.read())["error"]
    assert info.value.code == status and err["type"] == "invalid_request_error"
    assert message in err["message"], err


def test_bad_chat_messages_are_400(bare):
    c = openai.OpenAI(base_url=bare, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role must be one of"):
        c.chat.completions.create(model=c.models.list().data[0].id, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\].content: only text parts are supported"):
        c.chat.completions.create(model=c.models.list().data[0].id, messages=[
            {"role": "user", "content": "x"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}])


def test_a_port_in_use_fails_at_startup_with_a_clear_message(bare, redis_url):
    port = int(bare.removesuffix("/v1").rsplit(":", 1)[1])
    loop = Loop()
    try:
        with pytest.raises(Exception, match=f"HTTP port {port} on 127.0.0.1 is not available"):
            loop.run(RouterService.start(RouterConfig(kvstore="127.0.0.1:1", port=0, http_port=port,
                                                      model=None, grace_s=0.5)))
    finally:
        loop.close()


def test_the_default_deployment_requires_its_api_key(cluster, model):
    """`make up`'s default: a generated key (Cluster.api_key, kept where the CLI and client find it)."""
    assert cluster.api_key and cluster.api_key.startswith("mn-")
    wrong = openai.OpenAI(base_url=cluster.http_url, api_key="mn-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.completions.create(model=model, prompt="Hello", max_tokens=1)
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    assert "not valid" in info.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, body = get(f"{cluster.http_url}/models")                       # no Authorization header
    assert status == 401 and "an API key is required" in body["error"]["message"]
    base = cluster.http_url.removesuffix("/v1")
    assert get(f"{base}/health")[0] == 200 and get(f"{base}/ready")[0] == 200     # probes need no key
    for metadata, message in (((), "an API key is required"), ((("x-api-key", "mn-wrong"),), "not valid")):
        with rpc_client.blocking_channel(cluster.router_address, metadata=metadata) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            for call in (lambda: stub.ModelInfo(router_pb2.ModelInfoRequest()),
                         lambda: list(stub.Generate(router_pb2.GenerateRequest(text="Hi"), timeout=30)),
                         lambda: stub.Abort(common_pb2.AbortRequest(request_id="x"))):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED and message in err.value.details()
