"""Clients of the Mnemosyne services, speaking domain types (conversions in common/rpc/convert.py).

- `KVStoreClient` (asyncio): membership, placements and leases, for the router and the instances.
- `Membership` (asyncio): registers an instance and keeps it alive with heartbeats.
- `RouterClient` (blocking): the public Generate API, for `mnemosyne generate --server ADDR`;
  `router_target` reads its address (HOST, HOST:PORT, [IPv6]:PORT; the port defaults to 50051).

Every call carries a deadline (common/rpc/client.py); failed calls raise the typed error of the peer
(common/rpc/status.error_from_rpc).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import grpc

from common.auth import bearer, resolve_api_key
from common.errors import InvalidRequestError, MnemosyneError, PlacementError, StalePlacementError, UnreachableError
from common.metadata.types import Instance, LoadReport, Placement, PrefixReport
from common.rpc import client as rpc_client
from common.rpc import convert
from common.rpc.protos import common_pb2, kvstore_pb2, kvstore_pb2_grpc, router_pb2, router_pb2_grpc
from common.rpc.status import ERROR_KEY, error_from_rpc, retry_after_s
from common.rpc.tls import Credentials

if TYPE_CHECKING:
    from common.prefix_report import PrefixReporter

log = logging.getLogger(__name__)


class KVStoreClient:
    """The kvstore service over one asyncio channel. Methods raise typed errors (PlacementError for
    an unknown placement or instance, CapacityError when nothing has room, WorkerFailedError when
    the kvstore does not answer)."""

    def __init__(self, address: str, timeout_s: float = 5.0, tls: Credentials | None = None) -> None:
        """`tls`: our certificate for mutual TLS (common/rpc/tls.py); None = plaintext."""
        self.address = address
        self.timeout_s = timeout_s
        self._channel = rpc_client.aio_channel(address, default_deadline_s=timeout_s, tls=tls, peer="kvstore")
        self._stub = kvstore_pb2_grpc.KVStoreStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None

    async def register(self, inst: Instance) -> float:
        """Returns the heartbeat interval the kvstore asks for."""
        resp = await self._call("RegisterInstance", kvstore_pb2.RegisterInstanceRequest(
            instance=convert.instance_to_proto(inst)))
        return resp.heartbeat_interval_s

    async def heartbeat(self, instance_id: str, free: tuple[int, ...], load: LoadReport | None = None,
                        prefix: PrefixReport | None = None) -> bool:
        """`load`: the instance's load now, for the router's admission (None = none); `prefix`: what
        changed in its prefix cache (common/prefix_report.py). Returns whether the kvstore asks for a
        full prefix report next (prefix_resync)."""
        resp = await self._call("Heartbeat", kvstore_pb2.HeartbeatRequest(
            instance_id=instance_id, free_blocks=free,
            load=None if load is None else convert.load_to_proto(load),
            prefix=None if prefix is None else convert.prefix_report_to_proto(prefix)))
        return resp.prefix_resync

    async def match_prefix(self, block_hashes: list[bytes]) -> dict[str, int]:
        """Live instance id -> leading blocks of the chain `block_hashes` it holds in its prefix cache
        (the kvstore's index; instances holding not even the first block are absent)."""
        if not block_hashes:
            return {}
        resp = await self._call("MatchPrefix", kvstore_pb2.MatchPrefixRequest(block_hashes=block_hashes))
        return {m.instance_id: m.matched_blocks for m in resp.matches}

    async def deregister(self, instance_id: str) -> None:
        await self._call("DeregisterInstance", kvstore_pb2.DeregisterInstanceRequest(instance_id=instance_id))

    async def list_instances(self, role: str | None = None) -> list[Instance]:
        resp = await self._call("ListInstances", kvstore_pb2.ListInstancesRequest(
            role=convert.role_to_proto(role)))
        return [convert.instance_from_proto(i) for i in resp.instances]

    async def reserve(self, request_id: str, num_tokens: int, max_new_tokens: int,
                      instance_id: str = "") -> Placement:
        resp = await self._call("Reserve", kvstore_pb2.ReserveRequest(
            request_id=request_id, num_tokens=num_tokens, max_new_tokens=max_new_tokens,
            instance_id=instance_id))
        return convert.placement_from_proto(resp.placement)

    async def renew(self, request_id: str, epoch: int = 0) -> int:
        """`epoch`: the placement's (0 = unchecked); StalePlacementError when the live one has another."""
        resp = await self._call("Renew", kvstore_pb2.RenewRequest(request_id=request_id, epoch=epoch))
        return resp.lease_deadline_unix_ms

    async def release(self, request_id: str, epoch: int = 0) -> bool:
        """False when the placement was already gone (released or expired); StalePlacementError when
        the live placement has another `epoch` (0 = unchecked) than the caller's."""
        try:
            await self._call("Release", kvstore_pb2.ReleaseRequest(request_id=request_id, epoch=epoch))
        except StalePlacementError:
            raise
        except PlacementError:
            return False
        return True

    async def get_placement(self, request_id: str) -> Placement | None:
        try:
            resp = await self._call("GetPlacement", kvstore_pb2.GetPlacementRequest(request_id=request_id))
        except PlacementError:
            return None
        return convert.placement_from_proto(resp.placement)


class Membership:
    """Keeps one instance registered: register at start (retrying until the kvstore answers), then
    heartbeat at once and every interval with `free_blocks()` and `load()` (the load the router's
    admission judges the instance by: keep it cheap, it runs every `interval_s`) and `prefix`'s report
    of its prefix cache (common/prefix_report.py; None = no reports), register again after a NOT_FOUND
    (the registration expired, e.g. the kvstore restarted), deregister at stop. `beat_now()` sends a
    heartbeat now and returns once the kvstore has it (an instance awaits it when a request ends,
    before the stream's end reaches the router: the router sees the freed load, and the kvstore's
    prefix index the newly cached blocks, before the client has its answer, so a follow-up turn sent
    right away finds its prefix). Heartbeats never overlap (one lock); a beat_now asked before a
    heartbeat began shares that one.

    The interval is `max_interval_s` (the pool's heartbeat_interval_s, the admission's cadence) or
    the kvstore's asked interval (a third of the registration TTL) when that is shorter."""

    def __init__(self, kvstore: KVStoreClient, info: Callable[[], Instance],
                 free_blocks: Callable[[], tuple[int, ...]] = tuple,
                 load: Callable[[], LoadReport | None] = lambda: None, max_interval_s: float = 2.0,
                 prefix: "PrefixReporter | None" = None) -> None:
        if not max_interval_s > 0:
            raise ValueError(f"max_interval_s must be positive, got {max_interval_s}")
        self.kvstore = kvstore
        self.info = info
        self.free_blocks = free_blocks
        self.load = load
        self.prefix = prefix
        self.max_interval_s = max_interval_s
        self.interval_s = max_interval_s
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._began = -math.inf                   # when the last heartbeat began (monotonic)

    async def beat_now(self, timeout_s: float = 1.0) -> None:
        """A heartbeat that began after this call, done (or `timeout_s` passed, or it failed: that is
        logged, never raised into the request that ended, and the next regular one carries the
        same); a no-op before start and after stop."""
        if self._task is None:
            return
        asked = time.monotonic()
        try:
            await asyncio.wait_for(self._send_after(asked), timeout_s)
        except asyncio.TimeoutError:
            log.warning("heartbeat at a request's end: no answer from the kvstore within %.1fs", timeout_s)
        except Exception:                       # noqa: BLE001 - never fail the request it ended
            log.exception("heartbeat at a request's end failed; the next regular one carries the same")

    async def _send_after(self, asked: float) -> None:
        async with self._lock:
            if self._began < asked:
                await self._send(self.info().instance_id)

    async def start(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.interval_s = min(await self.kvstore.register(self.info()), self.max_interval_s)
                if self.prefix is not None:
                    self.prefix.reset()
                break
            except MnemosyneError as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("kvstore at %s: %s; retrying", self.kvstore.address, e)
                await asyncio.sleep(0.5)
        await self._send(self.info().instance_id)     # the load is known before the instance serves
        self._task = asyncio.create_task(self._beat(), name="membership-heartbeat")

    async def _beat(self) -> None:
        inst_id = self.info().instance_id
        while True:
            await asyncio.sleep(self.interval_s)
            async with self._lock:
                await self._send(inst_id)

    async def _send(self, inst_id: str) -> None:
        self._began = time.monotonic()
        report = self.prefix.report() if self.prefix is not None else None
        try:
            resync = await self.kvstore.heartbeat(inst_id, self.free_blocks(), self.load(), report)
            if self.prefix is not None:
                self.prefix.ack(report, resync)
        except PlacementError:
            log.warning("registration of %s expired; registering again", inst_id)
            try:
                if self.prefix is not None:
                    self.prefix.reset()
                await self.kvstore.register(self.info())
            except MnemosyneError as e:
                log.warning("register %s: %s", inst_id, e)
        except MnemosyneError as e:
            log.warning("heartbeat of %s: %s", inst_id, e)

    async def stop(self) -> None:
        """Stops heartbeating and deregisters (best effort: the registration expires anyway)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            try:
                await self.kvstore.deregister(self.info().instance_id)
            except MnemosyneError as e:
                log.warning("deregister: %s", e)


# ---- the public API, blocking -------------------------------------------------------------------

@dataclass
class Completion:
    """What one Generate stream produced, with latencies measured by the client."""
    request_id: str = ""
    route: str = ""
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)   # per token, when asked
    finish_reason: str = ""
    ttft_s: float = 0.0
    tbt_s: list[float] = field(default_factory=list)
    predicted_ttft_s: float | None = None    # the router's admission (Started), from arrival
    cached_prompt_tokens: int | None = None  # the router's prefix match where it prefills (Started)
    ttft_slo_s: float | None = None          # the deadlines it was served under
    tbt_slo_s: float | None = None


DEFAULT_ROUTER_PORT = 50051          # the router's default --port (services/router/config.py)


def router_target(address: str, default_port: int = DEFAULT_ROUTER_PORT) -> str:
    """The gRPC target of a router address: "HOST" or "HOST:PORT" -> "HOST:PORT", "[::1]:PORT",
    "[::1]" or "::1" -> "[::1]:PORT" (the port defaults to `default_port`, not to 443 as a bare host
    would in gRPC). InvalidRequestError names what is wrong with a malformed one."""
    text = address.strip()
    host, port = text, ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise InvalidRequestError(f"bad router address {address!r}: expected [IPv6]:PORT")
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host:
        raise InvalidRequestError(f"bad router address {address!r}: no host (expected HOST[:PORT])")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidRequestError(f"bad router address {address!r}: port must be 1..65535")
    else:
        port = str(default_port)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _unreachable(err: grpc.RpcError) -> str | None:
    """Why nothing answered (for a call that failed before any response), or None when a peer
    answered: a Mnemosyne service always names its error in the trailers."""
    if not hasattr(err, "code") or err.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    if any(key == ERROR_KEY for key, _ in (err.trailing_metadata() or ())):
        return None
    details = (err.details() or "").lower()
    if "resolv" in details or "lookup" in details:
        return "unknown host"
    return ("connection refused" if "refused" in details else "unavailable") + "; is `make up` running?"


FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                  common_pb2.FINISH_REASON_ABORTED: "abort"}
ROUTES = {router_pb2.ROUTE_DECODE_ONLY: "decode_only", router_pb2.ROUTE_DISAGGREGATED: "disaggregated"}


class RouterClient:
    """`with RouterClient("127.0.0.1:50051") as c: c.complete(text="Hi", max_tokens=8)`.

    `address` as for `router_target` ("localhost" is localhost:50051). A router that is not there
    raises UnreachableError; any other failed call the typed error of the router's status, whose
    message is "CODE: the router's message" (RESOURCE_EXHAUSTED with its retry hint)."""

    def __init__(self, address: str, timeout_s: float = 600.0, retries: int = 0,
                 api_key: str | None = None) -> None:
        """`retries`: how often a Generate or ModelInfo the router rejected (RESOURCE_EXHAUSTED) or
        could not serve (UNAVAILABLE) before its first response is sent again, after the router's
        pushback (gRPC's retry policy, rpc/client.py PUBLIC_RETRY); at most 4. `api_key`: the key
        presented to the router (common/auth.py resolve_api_key: else $MNEMOSYNE_API_KEY, else the key
        `make up` generated, else none)."""
        if not 0 <= retries <= 4:
            raise ValueError(f"retries must be in [0, 4], got {retries}")
        self.address = router_target(address)
        self.timeout_s = timeout_s
        retry = dataclasses.replace(rpc_client.PUBLIC_RETRY, max_attempts=retries + 1) if retries else None
        self._channel = rpc_client.blocking_channel(self.address, retry=retry)
        self.metadata = bearer(resolve_api_key(api_key))
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RouterClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def request(*, text: str | None = None, token_ids: list[int] | None = None, chat: bool = False,
                max_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                stop_token_ids: tuple[int, ...] = (), logprobs: bool = True, model: str = "",
                request_id: str = "", ttft_slo_s: float | None = None,
                tbt_slo_s: float | None = None, top_logprobs: int = 0,
                ignore_eos: bool = False) -> router_pb2.GenerateRequest:
        """One GenerateRequest; `ttft_slo_s` / `tbt_slo_s`: the request's own SLO (None = the
        deployment's default); `top_logprobs`: the k most likely tokens per position (0..20);
        `ignore_eos`: generate past the model's EOS tokens."""
        sampling = common_pb2.SamplingParams(stop_token_ids=list(stop_token_ids))
        for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                            ("top_k", top_k), ("seed", seed)):
            if value is not None:
                setattr(sampling, name, value)
        req = router_pb2.GenerateRequest(request_id=request_id, chat=chat, sampling=sampling,
                                         model=model, return_logprobs=logprobs, top_logprobs=top_logprobs,
                                         ignore_eos=ignore_eos)
        if ttft_slo_s is not None:
            req.slo.ttft_s = ttft_slo_s
        if tbt_slo_s is not None:
            req.slo.tbt_s = tbt_slo_s
        if token_ids is not None:
            req.token_ids.ids.extend(token_ids)
        else:
            req.text = text or ""
        return req

    def stream(self, request: router_pb2.GenerateRequest) -> Iterator[router_pb2.GenerateResponse]:
        """The raw event stream; a failed call raises the peer's typed error (UnreachableError when
        no router answered)."""
        answered = False
        try:
            for ev in self._stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata):
                answered = True
                yield ev
        except grpc.RpcError as e:
            why = None if answered else _unreachable(e)
            if why is not None:
                raise UnreachableError(f"cannot reach the router at {self.address} ({why})") from None
            err = error_from_rpc(e)
            hint = retry_after_s(e)
            if hint is not None and "retry" not in str(err):
                err = type(err)(f"{err}; retry after {hint:.1f}s")
            raise err from None

    def complete(self, on_text: Callable[[str], None] | None = None,
                 on_progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> Completion:
        """Runs one request to its end (kwargs as for `request`); `on_text(delta)` as text arrives,
        `on_progress(tokens_done, tokens_total)` for each PrefillProgress (a prompt's prefill, a chunk
        at a time, on either route)."""
        t0 = time.monotonic()
        last = t0
        out = Completion()
        for ev in self.stream(self.request(**kwargs)):
            kind = ev.WhichOneof("event")
            if kind == "started":
                out.request_id, out.prompt_tokens = ev.started.request_id, ev.started.prompt_tokens
                out.route = ROUTES.get(ev.started.route, "")
                for name in ("predicted_ttft_s", "ttft_slo_s", "tbt_slo_s", "cached_prompt_tokens"):
                    if ev.started.HasField(name):
                        setattr(out, name, getattr(ev.started, name))
            elif kind == "progress":
                if on_progress is not None:
                    on_progress(ev.progress.tokens_done, ev.progress.tokens_total)
            elif kind == "delta":
                now = time.monotonic()
                if ev.delta.token_ids:
                    if not out.token_ids:
                        out.ttft_s = now - t0
                    else:
                        out.tbt_s.append(now - last)
                    last = now
                out.token_ids.extend(ev.delta.token_ids)
                out.logprobs.extend(ev.delta.logprobs)
                out.top_logprobs.extend(convert.top_logprobs_from_proto(t) for t in ev.delta.top_logprobs)
                out.text += ev.delta.text
                if on_text is not None and ev.delta.text:
                    on_text(ev.delta.text)
            elif kind == "finished":
                out.finish_reason = FINISH_REASONS.get(ev.finished.finish_reason, "")
        return out
