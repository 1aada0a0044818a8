"""common/rpc: the error <-> status mapping (both directions), and through a real grpc.aio server on
loopback, the servicer decorator, the deadline rule of client channels and the server bootstrap
(health, reflection, binding)."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common import errors
from common.metadata.store import StoreUnavailableError
from common.rpc import client, status
from common.rpc.server import RpcServer
from tests.fixtures.rpc_errors import FakeRpcError

SERVICE = "test.Echo"


@pytest.mark.parametrize("exc, code", [
    (errors.InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.CapacityError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.KVTransferError("x"), grpc.StatusCode.UNAVAILABLE),
    (errors.WorkerFailedError("x"), grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailableError("x"), grpc.StatusCode.UNAVAILABLE),       # subclasses follow their base
    (errors.RequestAbortedError("x"), grpc.StatusCode.CANCELLED),
    (errors.PlacementError("x"), grpc.StatusCode.NOT_FOUND),
    (errors.StalePlacementError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.KVCorruptedError("x"), grpc.StatusCode.DATA_LOSS),
    (errors.kv_transfer_error(f"refused: {errors.CHECKSUM_MISMATCH} in chunk 3"), grpc.StatusCode.DATA_LOSS),
    (errors.kv_transfer_error("receiver connection lost"), grpc.StatusCode.UNAVAILABLE),
    (errors.ModelLoadError("x"), grpc.StatusCode.INTERNAL),
    (errors.MnemosyneError("x"), grpc.StatusCode.INTERNAL),
    (ValueError("x"), grpc.StatusCode.INTERNAL),
    (KeyError("x"), grpc.StatusCode.INTERNAL),
])
def test_status_for(exc, code):
    assert status.status_for(exc) is code


def test_details():
    assert status.details_for(errors.CapacityError("no room on d0")) == "no room on d0"
    assert status.details_for(KeyError("k")) == "internal error: KeyError: 'k'"


def test_error_from_rpc_prefers_the_named_class():
    e = status.error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "peer gone",
                                           ((status.ERROR_KEY, "KVTransferError"),)))
    assert type(e) is errors.KVTransferError and str(e) == "UNAVAILABLE: peer gone"


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidRequestError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.CapacityError),
    (grpc.StatusCode.UNAVAILABLE, errors.WorkerFailedError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.WorkerFailedError),
    (grpc.StatusCode.CANCELLED, errors.RequestAbortedError),
    (grpc.StatusCode.NOT_FOUND, errors.PlacementError),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.StalePlacementError),
    (grpc.StatusCode.DATA_LOSS, errors.KVCorruptedError),
    (grpc.StatusCode.INTERNAL, errors.MnemosyneError),
])
def test_error_from_rpc_falls_back_to_the_code(code, cls):
    e = status.error_from_rpc(FakeRpcError(code, "d", ((status.ERROR_KEY, "NoSuchClass"),)))
    assert type(e) is cls


# ---- through a real server ---------------------------------------------------------------------

RAISES = {
    b"capacity": errors.CapacityError("no room on d0"),
    b"transfer": errors.KVTransferError("layout mismatch: dtype"),
    b"bug": ZeroDivisionError("oops"),
    b"echoes": errors.InvalidRequestError(f"negative free blocks {tuple([-1] * 100_000)}"),
    b"emoji": errors.InvalidRequestError(f"unknown dtype {'🦙' * 2000!r}"),   # 12 bytes each on the wire
}


class Echo:
    """unary Echo (sleeps `sleep:<s>` seconds, raises per RAISES) and streaming Count."""

    @status.handles_errors
    async def Echo(self, request, context):
        if request in RAISES:
            raise RAISES[request]
        if request.startswith(b"sleep:"):
            await asyncio.sleep(float(request[6:]))
        return request

    @status.handles_errors
    async def Count(self, request, context):
        for i in range(int(request)):
            yield str(i).encode()
        raise errors.RequestAbortedError("stopped after the items")


def _add_echo(servicer: Echo, server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(servicer.Echo),
        "Count": grpc.unary_stream_rpc_method_handler(servicer.Count),
    }),))


async def _with_server(body, **client_kw):
    server = RpcServer("127.0.0.1", 0, grace_s=0.5)
    server.add_service(_add_echo, Echo(), SERVICE)
    port = await server.start()
    try:
        async with client.aio_channel(f"127.0.0.1:{port}", **client_kw) as ch:
            await body(server, ch)
    finally:
        await server.stop()


def test_typed_errors_cross_the_wire():
    async def body(server, ch):
        echo = ch.unary_unary(f"/{SERVICE}/Echo")
        assert await echo(b"hi") == b"hi"
        for req, code, cls in [(b"capacity", grpc.StatusCode.RESOURCE_EXHAUSTED, errors.CapacityError),
                               (b"transfer", grpc.StatusCode.UNAVAILABLE, errors.KVTransferError),
                               (b"bug", grpc.StatusCode.INTERNAL, errors.MnemosyneError)]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await echo(req)
            assert info.value.code() is code
            assert type(status.error_from_rpc(info.value)) is cls
        assert "ZeroDivisionError: oops" in info.value.details()

        # A message quoting a huge input overflowed gRPC's 16 KB metadata limit: the caller got
        # RESOURCE_EXHAUSTED and no message (found by fuzzing). It is cut, and keeps its code.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo(b"echoes")
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("negative free blocks (-1, -1")
        assert len(info.value.details()) <= status.MAX_DETAILS
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo(b"emoji")
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("unknown dtype '🦙🦙")

        count = ch.unary_stream(f"/{SERVICE}/Count")
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for item in count(b"3"):
                got.append(item)
        assert got == [b"0", b"1", b"2"]
        assert info.value.code() is grpc.StatusCode.CANCELLED
        assert info.value.details() == "stopped after the items"

    asyncio.run(_with_server(body))


def test_calls_without_a_timeout_get_the_default_deadline():
    async def body(server, ch):
        echo = ch.unary_unary(f"/{SERVICE}/Echo")
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo(b"sleep:5")
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2
        assert await echo(b"sleep:0.3", timeout=5) == b"sleep:0.3"   # an explicit one wins
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in ch.unary_stream(f"/{SERVICE}/Count")(b"10000000"):
                pass
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(_with_server(body, default_deadline_s=0.2))


class Flaky:
    """mnemosyne.v1.Router: ModelInfo fails RESOURCE_EXHAUSTED (with `pushback` ms) `fails` times, then
    answers; Generate yields one item, then fails UNAVAILABLE (a stream that already answered)."""

    def __init__(self, fails: int, pushback: str | None) -> None:
        self.fails, self.pushback, self.calls, self.streams = fails, pushback, [], 0

    async def ModelInfo(self, request, context):
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.fails:
            trailers = (("grpc-retry-pushback-ms", self.pushback),) if self.pushback is not None else ()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", trailing_metadata=trailers)
        return b"ok"

    async def Generate(self, request, context):
        self.streams += 1
        yield b"0"
        await context.abort(grpc.StatusCode.UNAVAILABLE, "instance failed")


def _flaky(fails: int, pushback: str | None, retry) -> tuple[Flaky, list]:
    flaky = Flaky(fails, pushback)
    out = []

    async def main():
        server = RpcServer("127.0.0.1", 0, grace_s=0)
        server.add_service(lambda s, srv: srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "mnemosyne.v1.Router", {"ModelInfo": grpc.unary_unary_rpc_method_handler(s.ModelInfo),
                                    "Generate": grpc.unary_stream_rpc_method_handler(s.Generate)}),)),
            flaky, "mnemosyne.v1.Router")
        port = await server.start()
        try:
            async with client.aio_channel(f"127.0.0.1:{port}", default_deadline_s=5, retry=retry) as ch:
                try:
                    out.append(await ch.unary_unary("/mnemosyne.v1.Router/ModelInfo")(b""))
                except grpc.aio.AioRpcError as e:
                    out.append(e.code())
                got = []
                try:
                    async for x in ch.unary_stream("/mnemosyne.v1.Router/Generate")(b""):
                        got.append(x)
                except grpc.aio.AioRpcError as e:
                    got.append(e.code())
                out.append(got)
        finally:
            await server.stop()

    asyncio.run(main())
    return flaky, out


def test_the_public_retry_policy_waits_what_the_server_pushes_back():
    flaky, out = _flaky(2, "300", client.PUBLIC_RETRY)
    assert out[0] == b"ok" and len(flaky.calls) == 3
    gaps = [b - a for a, b in zip(flaky.calls, flaky.calls[1:])]
    assert all(0.25 <= g < 1.5 for g in gaps), gaps              # the pushback, not the 0.5 s backoff
    assert out[1] == [b"0", grpc.StatusCode.UNAVAILABLE] and flaky.streams == 1   # answered: never re-sent


def test_a_negative_pushback_or_no_policy_means_no_retry():
    flaky, out = _flaky(2, "-1", client.PUBLIC_RETRY)
    assert out[0] is grpc.StatusCode.RESOURCE_EXHAUSTED and len(flaky.calls) == 1
    flaky, out = _flaky(2, "300", None)
    assert out[0] is grpc.StatusCode.RESOURCE_EXHAUSTED and len(flaky.calls) == 1


def test_blocking_channel_has_the_same_rule():
    async def main():
        server = RpcServer("127.0.0.1", 0, grace_s=0)
        server.add_service(_add_echo, Echo(), SERVICE)
        port = await server.start()

        def call():
            with client.blocking_channel(f"127.0.0.1:{port}", default_deadline_s=0.2) as ch:
                echo = ch.unary_unary(f"/{SERVICE}/Echo")
                assert echo(b"x") == b"x"
                with pytest.raises(grpc.RpcError) as info:
                    echo(b"sleep:5")
                with pytest.raises(grpc.RpcError) as info2:
                    for _ in ch.unary_stream(f"/{SERVICE}/Count")(b"10000000"):
                        pass
                return info.value.code(), info2.value.code()

        try:
            assert await asyncio.to_thread(call) == (grpc.StatusCode.DEADLINE_EXCEEDED,) * 2
        finally:
            await server.stop()

    asyncio.run(main())


def test_health_reflection_and_serving_switch():
    async def body(server, ch):
        assert await client.health_status(ch) == "SERVING"
        assert await client.health_status(ch, SERVICE) == "SERVING"
        await server.set_serving(False)
        assert await client.health_status(ch, SERVICE) == "NOT_SERVING"
        await server.set_serving(True)

        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        async for resp in stub.ServerReflectionInfo(iter([req]), timeout=5):
            names = {s.name for s in resp.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names

    asyncio.run(_with_server(body))


def test_start_not_serving_then_binding_conflict():
    async def main():
        a = RpcServer("127.0.0.1", 0)
        a.add_service(_add_echo, Echo(), SERVICE)
        port = await a.start(serving=False)
        try:
            async with client.aio_channel(a.address) as ch:
                assert await client.health_status(ch) == "NOT_SERVING"
            b = RpcServer("127.0.0.1", port)
            with pytest.raises(errors.ConfigError, match="cannot bind"):
                await b.start()
        finally:
            await a.stop()
            await a.stop()                                  # idempotent

    asyncio.run(main())
