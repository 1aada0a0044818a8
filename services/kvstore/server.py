"""The kvstore's gRPC servicer: proto <-> domain translation only; the logic is placement.py.

The store is blocking (Redis round trips), so each call runs in a worker thread and never blocks
the event loop.
"""
from __future__ import annotations

import asyncio
import dataclasses

from common.metrics import Metrics
from common.rpc import convert
from common.rpc.protos import kvstore_pb2, kvstore_pb2_grpc
from common.rpc.status import handles_errors
from common.rpc.tls import identity
from services.kvstore.identity import check_owner, check_registration
from services.kvstore.placement import PlacementService


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, logic: PlacementService, metrics: Metrics | None = None,
                 check_identity: bool = False) -> None:
        """`check_identity` (a mutual-TLS server): membership calls are bound to the caller's
        certificate (identity.py)."""
        self.logic = logic
        self.metrics = metrics
        self.check_identity = check_identity

    async def _check_owner(self, context, instance_id: str) -> None:
        if self.check_identity:
            who = identity(context)
            check_owner(who, await asyncio.to_thread(self.logic.store.get_instance, instance_id))

    @handles_errors
    async def RegisterInstance(self, request, context):
        # reserved, heartbeat_age, load and load_age are output-only fields.
        inst = dataclasses.replace(convert.instance_from_proto(request.instance), reserved=(),
                                   heartbeat_age_s=0.0, load=None, load_age_s=0.0)
        if self.check_identity:
            check_registration(identity(context), inst)
            await self._check_owner(context, inst.instance_id)       # replacing someone else's id
        interval = await asyncio.to_thread(self.logic.register, inst)
        return kvstore_pb2.RegisterInstanceResponse(ttl_s=self.logic.instance_ttl_s,
                                                    heartbeat_interval_s=interval)

    @handles_errors
    async def Heartbeat(self, request, context):
        load = convert.load_from_proto(request.load) if request.HasField("load") else None
        prefix = convert.prefix_report_from_proto(request.prefix) if request.HasField("prefix") else None
        await self._check_owner(context, request.instance_id)
        resync = await asyncio.to_thread(self.logic.heartbeat, request.instance_id,
                                         tuple(request.free_blocks), load, prefix)
        return kvstore_pb2.HeartbeatResponse(prefix_resync=resync)

    @handles_errors
    async def DeregisterInstance(self, request, context):
        await self._check_owner(context, request.instance_id)
        found = await asyncio.to_thread(self.logic.deregister, request.instance_id)
        return kvstore_pb2.DeregisterInstanceResponse(found=found)

    @handles_errors
    async def Reserve(self, request, context):
        try:
            p = await asyncio.to_thread(self.logic.reserve, request.request_id, request.num_tokens,
                                        request.max_new_tokens, request.instance_id or None)
        except Exception as e:
            if self.metrics is not None:
                self.metrics.observe_reservation(e)
            raise
        if self.metrics is not None:
            self.metrics.observe_reservation(None)
        return kvstore_pb2.ReserveResponse(placement=convert.placement_to_proto(p))

    @handles_errors
    async def Renew(self, request, context):
        deadline = await asyncio.to_thread(self.logic.renew, request.request_id, request.epoch)
        return kvstore_pb2.RenewResponse(lease_deadline_unix_ms=deadline)

    @handles_errors
    async def Release(self, request, context):
        await asyncio.to_thread(self.logic.release, request.request_id, request.epoch)
        return kvstore_pb2.ReleaseResponse()

    @handles_errors
    async def GetPlacement(self, request, context):
        p = await asyncio.to_thread(self.logic.get, request.request_id)
        return kvstore_pb2.GetPlacementResponse(placement=convert.placement_to_proto(p))

    @handles_errors
    async def MatchPrefix(self, request, context):
        matches = await asyncio.to_thread(self.logic.match_prefix, list(request.block_hashes))
        return kvstore_pb2.MatchPrefixResponse(matches=[
            kvstore_pb2.PrefixMatch(instance_id=i, matched_blocks=n) for i, n in sorted(matches.items())])

    @handles_errors
    async def ListInstances(self, request, context):
        role = convert.role_from_proto(request.role)
        instances = await asyncio.to_thread(self.logic.list_instances, role)
        return kvstore_pb2.ListInstancesResponse(
            instances=[convert.instance_to_proto(i) for i in instances])
