"""No lease expires because the kvstore or Redis was away, with a real redis-server (its append-only
file, as `make up` runs it): the kvstore's placement logic gives every live placement a full lease
again on its first call after it started and after Redis did not answer; a placement nobody renews
afterwards still expires one lease later."""
from __future__ import annotations

import time
import uuid

import pytest

from common.metadata.redis_server import RedisServer
from common.metadata.store import MetadataStore, StoreUnavailableError
from common.metadata.types import Instance
from services.kvstore.placement import PlacementService

pytestmark = pytest.mark.timeout(60)

LEASE_S = 0.5


def placements(store: MetadataStore) -> PlacementService:
    return PlacementService(store, lease_s=LEASE_S, instance_ttl_s=60.0)


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(data_dir=tmp_path / "aof").start()
    yield server
    server.stop()


def test_a_restarted_kvstore_lets_the_holders_renew_what_expired_while_it_was_down(redis):
    store = MetadataStore(redis.url, deployment=f"outage-{uuid.uuid4().hex[:8]}")
    try:
        first = placements(store)
        first.register(Instance("decode-a", "decode", "127.0.0.1:1", 16, 0, (64,), (64,)))
        p = first.reserve("req-1", 32, 8)
        time.sleep(LEASE_S * 3)                          # the kvstore "down": nobody renewed
        restarted = placements(store)
        restarted.renew("req-1", p.epoch)                # its holder's next renewal is still in time
        assert store.num_placements() == 1
        time.sleep(LEASE_S * 3)                          # from now on nobody renews: it expires
        assert restarted.expire() == ["req-1"]
        assert store.num_placements() == 0
    finally:
        store.close()


def test_a_redis_outage_longer_than_a_lease_loses_no_placement(redis):
    store = MetadataStore(redis.url, deployment=f"outage-{uuid.uuid4().hex[:8]}", timeout_s=0.5)
    try:
        svc = placements(store)
        svc.register(Instance("decode-a", "decode", "127.0.0.1:1", 16, 0, (64,), (64,)))
        p = svc.reserve("req-2", 32, 8)
        for _ in range(8):                               # renewed, and on disk (appendfsync everysec)
            time.sleep(0.15)
            svc.renew("req-2", p.epoch)
        port = redis.port
        redis.kill()
        with pytest.raises(StoreUnavailableError):
            svc.renew("req-2", p.epoch)                  # the holder tried, Redis did not answer
        redis.stop()                                     # reaps it; the append-only file stays
        time.sleep(LEASE_S * 3)
        back = RedisServer(port=port, data_dir=redis.data_dir).start()
        try:
            svc.renew("req-2", p.epoch)                  # still there, still renewable
            assert store.get_placement("req-2") is not None
            assert svc.expire() == []
        finally:
            back.stop()
    finally:
        store.close()
