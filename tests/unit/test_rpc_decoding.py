"""Bytes that do not parse as the request's message type get INVALID_ARGUMENT naming the method, for
unary and server-streaming RPCs (fuzzing found grpc's UNKNOWN "Unexpected DecodeError"); a valid
request still reaches the servicer. A real grpc.aio server on loopback (common.rpc.server.RpcServer)."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from common.rpc import protos
from common.rpc.protos import common_pb2, decode_pb2, decode_pb2_grpc
from common.rpc.server import RpcServer

pytestmark = pytest.mark.timeout(60)


class Servicer(decode_pb2_grpc.DecodeServicer):
    async def Abort(self, request, context):
        return common_pb2.AbortResponse(found=request.request_id == "known")

    async def Decode(self, request, context):
        for t in request.prompt_token_ids:
            yield decode_pb2.DecodeResponse(delta=common_pb2.TokenDelta(token_ids=[t]))


async def answers(payloads: list[bytes], method: str, streaming: bool) -> list[tuple[str, str]]:
    server = RpcServer()
    server.add_service(decode_pb2_grpc.add_DecodeServicer_to_server, Servicer(), protos.DECODE)
    await server.start()
    out = []
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            kind = ch.unary_stream if streaming else ch.unary_unary
            call = kind(f"/mnemosyne.v1.Decode/{method}", request_serializer=lambda b: b,
                        response_deserializer=lambda b: b)
            for p in payloads:
                try:
                    got = [m async for m in call(p, timeout=10)] if streaming else await call(p, timeout=10)
                    out.append(("OK", repr(got)))
                except grpc.aio.AioRpcError as e:
                    out.append((e.code().name, e.details()))
    finally:
        await server.stop(0)
    return out


CORRUPT = [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"]


@pytest.mark.parametrize("method, streaming, valid, ok", [
    ("Abort", False, common_pb2.AbortRequest(request_id="known").SerializeToString(), "found: true"),
    ("Decode", True, decode_pb2.DecodeRequest(prompt_token_ids=[7, 8]).SerializeToString(), "delta"),
])
def test_undecodable_request_is_invalid_argument(method, streaming, valid, ok):
    got = asyncio.run(answers([*CORRUPT, valid], method, streaming))
    for code, details in got[:-1]:
        assert code == "INVALID_ARGUMENT", details
        assert f"/mnemosyne.v1.Decode/{method}: the request is not a valid protobuf message" in details
    code, body = got[-1]
    assert code == "OK"
    if streaming:
        assert body.count("b'") == 2                     # one response per prompt token
    else:
        assert body == repr(common_pb2.AbortResponse(found=True).SerializeToString())
