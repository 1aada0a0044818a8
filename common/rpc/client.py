"""Outgoing gRPC: channels whose every call carries a deadline.

The rule: every outgoing RPC passes a deadline. Channels made here enforce it: a call made without
`timeout=` gets the channel's default deadline (DEFAULT_DEADLINE_S), so no call can wait forever
on a dead peer. Streams whose length depends on the request (Generate, Prefill, Decode) must pass
their own `timeout=`, derived from the request (max_tokens, SLO), since the default would cut a
long generation short.

    async with aio_channel("127.0.0.1:50051") as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        resp = await stub.Reserve(req)                 # DEFAULT_DEADLINE_S
        async for ev in stub2.Decode(req2, timeout=600):   # explicit
            ...
"""
from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
    """The same rule for blocking channels (CLI clients, threads in tests)."""

    def __init__(self, default_s: float) -> None:
        self.default_s = default_s

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_deadline(details, self.default_s), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_deadline(details, self.default_s), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_with_deadline(details, self.default_s), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_with_deadline(details, self.default_s), request_iterator)


def aio_channel(address: str, *, default_deadline_s: float = DEFAULT_DEADLINE_S) -> grpc.aio.Channel:
    """An insecure asyncio channel to "host:port" (loopback or cluster-internal traffic)."""
    interceptors = [cls(default_deadline_s) for cls in
                    (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]
    return grpc.aio.insecure_channel(address, options=MESSAGE_OPTIONS, interceptors=interceptors)


def blocking_channel(address: str, *, default_deadline_s: float = DEFAULT_DEADLINE_S) -> grpc.Channel:
    """An insecure blocking channel to "host:port"; close it (or use it as a context manager)."""
    channel = grpc.insecure_channel(address, options=MESSAGE_OPTIONS)
    return grpc.intercept_channel(channel, _SyncDeadline(default_deadline_s))


async def wait_ready(channel: grpc.aio.Channel, timeout_s: float = DEFAULT_DEADLINE_S) -> None:
    """Waits until the channel is connected; asyncio.TimeoutError after timeout_s."""
    await asyncio.wait_for(channel.channel_ready(), timeout_s)


async def health_status(channel: grpc.aio.Channel, service: str = "",
                        timeout_s: float = DEFAULT_DEADLINE_S) -> str:
    """The peer's health status for `service` ("" = the whole server): "SERVING", "NOT_SERVING"…"""
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
