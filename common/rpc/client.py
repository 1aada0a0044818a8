"""Outgoing gRPC: channels whose every call carries a deadline, and the public API's retry policy.

The rule: every outgoing RPC passes a deadline. Channels made here enforce it: a call made without
`timeout=` gets the channel's default deadline (DEFAULT_DEADLINE_S), so no call can wait forever
on a dead peer. Streams whose length depends on the request (Generate, Prefill, Decode) must pass
their own `timeout=`, derived from the request (max_tokens, SLO), since the default would cut a
long generation short. (The deadline is set by client interceptors, not by a service config
`timeout`: in grpcio a service-config timeout fires about a second early, so a 1 s timeout fails at
once — grpc/grpc#34547, #40633; tests/unit/test_rpc_status.py shows the interceptors' precision.)

`retry` (the public API's clients: PUBLIC_RETRY) gives the channel a gRPC service config with a
retry policy (gRFC A6): RESOURCE_EXHAUSTED and UNAVAILABLE are retried with exponential backoff, and
gRPC waits what the server's `grpc-retry-pushback-ms` says (the router's admission sends it; a
negative value, sent when retrying cannot help, stops the retries). A stream is retried only before
its first response message, so a request is never served twice.

    async with aio_channel("127.0.0.1:50051") as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        resp = await stub.Reserve(req)                 # DEFAULT_DEADLINE_S
        async for ev in stub2.Decode(req2, timeout=600):   # explicit
            ...
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.rpc.tls import Credentials, channel_options

#: Deadline of a call that does not pass its own timeout, seconds.
DEFAULT_DEADLINE_S = 10.0
#: Largest message either side accepts: a million-token prompt is ~5 MB of varints, over gRPC's
#: 4 MB default.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
#: Options for channels and servers alike.
MESSAGE_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy for `methods`; the server's pushback, when it sends one, replaces the backoff."""
    methods: tuple[tuple[str, str], ...]
    max_attempts: int = 3                  # the first try included (gRPC allows at most 5)
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0
    codes: tuple[str, ...] = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")

    def to_json(self) -> dict:
        return {"maxAttempts": self.max_attempts, "initialBackoff": _duration(self.initial_backoff_s),
                "maxBackoff": _duration(self.max_backoff_s), "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": list(self.codes)}


#: What clients of the public API retry: a rejected or unavailable Generate (before any response)
#: and ModelInfo.
PUBLIC_RETRY = RetryPolicy(methods=(("mnemosyne.v1.Router", "Generate"), ("mnemosyne.v1.Router", "ModelInfo")))


def _duration(seconds: float) -> str:
    """A protobuf JSON Duration ("0.500000000s")."""
    return f"{seconds:.9f}s"


def service_config(retry: RetryPolicy) -> str:
    """A service config JSON with `retry`'s policy on its methods."""
    return json.dumps({"methodConfig": [{"name": [{"service": sv, "method": me} for sv, me in retry.methods],
                                         "retryPolicy": retry.to_json()}]})


#: A peer that restarts (the supervisor brings a killed kvstore back within seconds) is reached again
#: within a second: gRPC's default reconnect backoff grows to 120 s, and meanwhile every call fails at
#: once with "connection refused" although the peer is up (a lease renewed too late is lost).
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                     ("grpc.max_reconnect_backoff_ms", 1000))


def _options(retry: RetryPolicy | None) -> list[tuple[str, Any]]:
    if retry is None:
        return [*MESSAGE_OPTIONS, *RECONNECT_OPTIONS]
    return [*MESSAGE_OPTIONS, *RECONNECT_OPTIONS, ("grpc.service_config", service_config(retry)),
            ("grpc.enable_retries", 1)]


def _with_deadline(details: Any, default_s: float) -> Any:
    if details.timeout is None:
        return details._replace(timeout=default_s)
    return details


class _AioDeadline:
    """Gives every call without a timeout the default deadline. grpc.aio files an interceptor
    object under the first call kind it implements only, so there is one subclass per kind."""

    def __init__(self, default_s: float) -> None:
        self.default_s = default_s

    async def _intercept(self, continuation, details, request):
        return await continuation(_with_deadline(details, self.default_s), request)


class _AioUnaryUnary(_AioDeadline, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AioDeadline._intercept


class _AioUnaryStream(_AioDeadline, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AioDeadline._intercept


class _AioStreamUnary(_AioDeadline, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AioDeadline._intercept


class _AioStreamStream(_AioDeadline, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AioDeadline._intercept


class _SyncDeadline(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """The same rule for blocking channels (CLI clients, threads in tests), plus `metadata` on every
    call (e.g. an API key: common/auth.py bearer)."""

    def __init__(self, default_s: float, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.default_s = default_s
        self.metadata = metadata

    def _details(self, details: Any) -> Any:
        details = _with_deadline(details, self.default_s)
        if self.metadata:
            details = details._replace(metadata=[*(details.metadata or ()), *self.metadata])
        return details

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def aio_channel(address: str, *, default_deadline_s: float = DEFAULT_DEADLINE_S,
                retry: RetryPolicy | None = None, tls: Credentials | None = None,
                peer: str = "") -> grpc.aio.Channel:
    """An asyncio channel to "host:port": mutual TLS with `tls` (our certificate; the server's must be
    of role `peer`, common/rpc/tls.py), else plaintext."""
    interceptors = [cls(default_deadline_s) for cls in
                    (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.channel(), options=_options(retry) + channel_options(peer),
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=_options(retry), interceptors=interceptors)


def blocking_channel(address: str, *, default_deadline_s: float = DEFAULT_DEADLINE_S,
                     retry: RetryPolicy | None = None, metadata: tuple[tuple[str, str], ...] = (),
                     tls: Credentials | None = None, peer: str = "") -> grpc.Channel:
    """A blocking channel to "host:port" (TLS as for aio_channel); close it (or use it as a context
    manager). `metadata` goes with every call."""
    channel = (grpc.secure_channel(address, tls.channel(), options=_options(retry) + channel_options(peer))
               if tls is not None else grpc.insecure_channel(address, options=_options(retry)))
    return grpc.intercept_channel(channel, _SyncDeadline(default_deadline_s, tuple(metadata)))


async def wait_ready(channel: grpc.aio.Channel, timeout_s: float = DEFAULT_DEADLINE_S) -> None:
    """Waits until the channel is connected; asyncio.TimeoutError after timeout_s."""
    await asyncio.wait_for(channel.channel_ready(), timeout_s)


async def health_status(channel: grpc.aio.Channel, service: str = "",
                        timeout_s: float = DEFAULT_DEADLINE_S) -> str:
    """The peer's health status for `service` ("" = the whole server): "SERVING", "NOT_SERVING"…"""
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
