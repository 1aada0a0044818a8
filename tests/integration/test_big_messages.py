"""Multi-megabyte prompts cross every gRPC hop: gRPC's default 4 MiB receive limit would refuse a
million-token prompt (token ids of a 128K-vocabulary model take 3 bytes each; its text ~4-6 MB).
Our channels and servers (common/rpc) raise the limit on both sides; here a 9 MB token-id prompt
and a 6 MB text prompt go through real servers on loopback, over the blocking channel clients use
(client -> router) and the asyncio channel the router uses (router -> prefill)."""
from __future__ import annotations

import asyncio

from common.rpc import client as rpc_client
from common.rpc.protos import prefill_pb2, prefill_pb2_grpc, router_pb2, router_pb2_grpc
from common.rpc.server import RpcServer

FOUR_MIB = 4 << 20
IDS = 3_000_000                     # ids >= 2^14 take 3 bytes: 9 MB of token ids
TEXT = "long context " * 480_000    # 6.2 MB


class Echo(prefill_pb2_grpc.PrefillServicer, router_pb2_grpc.RouterServicer):
    """Answers with what arrived: the prompt's size."""

    async def Prefill(self, request, context):
        yield prefill_pb2.PrefillResponse(progress=prefill_pb2.PrefillProgressEvent(
            tokens_done=len(request.token_ids), tokens_total=request.token_ids[-1]))

    async def Generate(self, request, context):
        n = len(request.token_ids.ids) if request.HasField("token_ids") else len(request.text)
        yield router_pb2.GenerateResponse(started=router_pb2.Started(prompt_tokens=n))


def test_multi_megabyte_prompts_cross_both_hops():
    ids = [(1 << 14) + i % 1000 for i in range(IDS)]
    preq = prefill_pb2.PrefillRequest(request_id="big", token_ids=ids)
    assert preq.ByteSize() > 2 * FOUR_MIB
    by_ids = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=ids))
    by_text = router_pb2.GenerateRequest(text=TEXT)
    assert by_ids.ByteSize() > 2 * FOUR_MIB and by_text.ByteSize() > FOUR_MIB

    async def main():
        server = RpcServer()
        server.add_service(prefill_pb2_grpc.add_PrefillServicer_to_server, Echo(), "mnemosyne.v1.Prefill")
        server.add_service(router_pb2_grpc.add_RouterServicer_to_server, Echo(), "mnemosyne.v1.Router")
        await server.start()
        try:
            async with rpc_client.aio_channel(server.address) as ch:          # router -> prefill
                events = [ev async for ev in prefill_pb2_grpc.PrefillStub(ch).Prefill(preq, timeout=60)]
            assert events[0].progress.tokens_done == IDS and events[0].progress.tokens_total == ids[-1]

            def client_side():                                                 # client -> router
                ch = rpc_client.blocking_channel(server.address)
                try:
                    stub = router_pb2_grpc.RouterStub(ch)
                    return [list(stub.Generate(r, timeout=60))[0].started.prompt_tokens for r in (by_ids, by_text)]
                finally:
                    ch.close()
            assert await asyncio.to_thread(client_side) == [IDS, len(TEXT)]
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
