"""Server interceptors that act before every call of a method: one wrapper for all four call kinds."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

import grpc


def run_first(handler: grpc.RpcMethodHandler, hook: Callable[[Any], Awaitable[None]]) -> grpc.RpcMethodHandler:
    """`handler` whose every behaviour first awaits `hook(context)` (which may abort the call)."""
    def wrap(behavior, streaming_response: bool):
        if behavior is None:
            return None
        if streaming_response:
            async def stream(request_or_iterator, context):
                await hook(context)
                async for item in behavior(request_or_iterator, context):
                    yield item
            return stream

        async def unary(request_or_iterator, context):
            await hook(context)
            return await behavior(request_or_iterator, context)
        return unary

    return handler._replace(
        unary_unary=wrap(handler.unary_unary, False),
        unary_stream=wrap(handler.unary_stream, True),
        stream_unary=wrap(handler.stream_unary, False),
        stream_stream=wrap(handler.stream_stream, True))
