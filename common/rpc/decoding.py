"""Requests whose bytes do not parse as their message type are bad input: the caller gets
INVALID_ARGUMENT naming the type, not grpc's UNKNOWN "Unexpected DecodeError" (found by fuzzing).

grpc.aio parses a request before any servicer or interceptor code sees it, and reports a parse
error as UNKNOWN. So the method handlers are wrapped where a service is registered (RpcServer.add_service):
the request deserializer returns an `Undecodable` marker instead of raising, and the behaviour ends
such a call with INVALID_ARGUMENT before the servicer runs.

    add_KVStoreServicer_to_server(servicer, checked(server))
"""
from __future__ import annotations

from typing import Any, Callable

import grpc


class Undecodable:
    """What a request that failed to parse is replaced with: the parse error, for the message."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def details(self, method: str) -> str:
        return f"{method}: the request is not a valid protobuf message of its type ({str(self.error)[:200]})"


def checked(server: Any) -> "_CheckedRegistration":
    """A stand-in for `server` that generated `add_*Servicer_to_server` functions register with:
    every handler they add is wrapped by `checked_handler`."""
    return _CheckedRegistration(server)


def checked_handler(handler: grpc.RpcMethodHandler | None, method: str = "") -> grpc.RpcMethodHandler | None:
    """`handler` with a deserializer that never raises and a behaviour that refuses an undecodable
    request with INVALID_ARGUMENT (unary requests only; streaming requests are left as they are)."""
    if handler is None or handler.request_deserializer is None or handler.request_streaming:
        return handler
    parse: Callable[[bytes], Any] = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the caller's bad bytes
            return Undecodable(e)

    if handler.response_streaming:
        inner = handler.unary_stream

        async def unary_stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details(method))
            async for item in inner(request, context):
                yield item
        return handler._replace(request_deserializer=deserialize, unary_stream=unary_stream)

    inner_unary = handler.unary_unary

    async def unary_unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details(method))
        return await inner_unary(request, context)
    return handler._replace(request_deserializer=deserialize, unary_unary=unary_unary)


class _CheckedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self.inner = inner

    def service(self, handler_call_details):
        return checked_handler(self.inner.service(handler_call_details), handler_call_details.method)


class _CheckedRegistration:
    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_CheckedGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        self._server.add_registered_method_handlers(service_name, {
            name: checked_handler(h, f"/{service_name}/{name}") for name, h in method_handlers.items()})
