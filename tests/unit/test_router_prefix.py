"""Cache-aware routing's pure parts: the router names a prompt's blocks exactly as an engine names the
blocks it caches (services/router/prefix.py over common/kv_cache/prefix.py, the root the instance
publishes), the instance's reporter reads the engine's names, and the router's choice of instances from
the matches (Router._place) with and without admission's decision."""
from __future__ import annotations

import asyncio
import collections
import random

import pytest

from common.admission import Decision, Outcome
from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.engine.engine import LLMEngine
from common.errors import CapacityError
from common.metadata.types import Instance, Placement, SchedulingInfo
from common.model.loader import load_checkpoint
from common.pool_service import cache_version, cached_blocks, prefix_chain
from common.prefix_report import PrefixReporter
from common.sampling_params import SamplingParams
from services.router.config import RouterConfig
from services.router.prefix import chains, prompt_hashes
from services.router.router import Router
from tests.fixtures.hf_models import write_random_hf_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_random_hf_model(tmp_path_factory.mktemp("router-prefix") / "llama", seed=3, tokenizer=False)
    cfg = EngineConfig(model="(preloaded)", cache=CacheConfig(block_size=16, num_blocks=64),
                       scheduler=SchedulerConfig(chunk_size=32))
    return LLMEngine(cfg, load_checkpoint(str(path)))


def test_the_router_names_a_prompts_blocks_as_the_engine_caches_them(engine):
    rng = random.Random(5)
    doc = [rng.randrange(4, 300) for _ in range(100)]
    assert cached_blocks(engine) == set()
    v0 = cache_version(engine)
    engine.generate([doc], SamplingParams(max_tokens=4, ignore_eos=True))
    root_hex, block_size = prefix_chain(engine)
    assert (root_hex, block_size) == (engine.blocks.hash_root.hex(), 16)
    question = doc + [7, 8, 9]
    hashes = prompt_hashes(question, bytes.fromhex(root_hex), block_size)
    assert len(hashes) == (len(question) - 1) // 16 == 6
    held = cached_blocks(engine)
    assert set(hashes) <= held                                   # every full block of the document
    assert engine.blocks.lookup(hashes) == 6
    assert prompt_hashes(doc, bytes.fromhex(root_hex), block_size) == hashes[:(len(doc) - 1) // 16]
    assert not set(prompt_hashes(question, b"\0" * 16, block_size)) & held       # another chain: no match
    assert cache_version(engine) != v0
    rep = PrefixReporter(lambda: cached_blocks(engine), epoch=1, version=lambda: cache_version(engine))
    assert set(rep.report().added) == held


def test_instances_are_grouped_by_the_chain_they_publish():
    def inst(iid, root="", bs=0):
        return Instance(iid, "prefill", "h:1", scheduling=SchedulingInfo(prefix_hash_root=root, prefix_block_size=bs))
    a, b = "ab" * 16, "cd" * 16
    got = chains([inst("p1", a, 16), inst("p2", a, 16), inst("p3", b, 16), inst("p4"), inst("p5", a, 32),
                  Instance("d1", "decode", "h:2", capacity=(4,))])
    assert got == {(a, 16): ["p1", "p2"], (b, 16): ["p3"], (a, 32): ["p5"]}


# ---- Router._place ----------------------------------------------------------------------------

PREFILLS = [Instance("p1", "prefill", "h:1"), Instance("p2", "prefill", "h:2")]
DECODES = [Instance("d1", "decode", "h:3", capacity=(100,)), Instance("d2", "decode", "h:4", capacity=(100,))]


class FakeKVStore:
    def __init__(self, full=()):
        self.full = set(full)
        self.reserved: list[str] = []

    async def reserve(self, request_id, num_tokens, max_new_tokens, instance_id=""):
        self.reserved.append(instance_id)
        if instance_id in self.full:
            raise CapacityError(f"{instance_id} is full")
        return Placement(request_id, instance_id or "d1", "h:3", (), num_tokens, max_new_tokens, 5.0)


class FakeDiscovery:
    def __init__(self):
        self.inflight = collections.Counter()

    async def instances(self, role=None, *, fresh=False):
        return [i for i in PREFILLS + DECODES if role is None or i.role == role]

    async def pick_prefill(self):
        return min(PREFILLS, key=lambda i: (self.inflight[i.instance_id], i.instance_id))


def place(n, matches, decision=None, full=()):
    kv = FakeKVStore(full)
    router = Router(RouterConfig(kvstore="127.0.0.1:1", short_prompt_tokens=64), None, kv, discovery=FakeDiscovery())
    prefill, placement, target = asyncio.run(router._place("r~1", n, 8, decision, matches))
    return (prefill.instance_id if prefill else None), placement.instance_id, target, kv.reserved


def test_without_admission_a_short_rest_goes_to_the_decode_instance_holding_the_prefix():
    assert place(1000, {"d2": 960, "p1": 992}) == (None, "d2", "decode", ["d2"])
    # a rest that is not short: the prefill instance with the longest match
    assert place(1000, {"d2": 800, "p2": 992, "p1": 16}) == ("p2", "d1", "prefill", [""])
    # the holder has no room now: the prefill pool, and any decode instance
    assert place(1000, {"d2": 960, "p1": 960}, full={"d2"}) == ("p1", "d1", "prefill", ["d2", ""])
    # nothing cached: the least loaded prefill instance
    assert place(1000, {}) == ("p1", "d1", "miss", [""])
    # a short prompt: the decode instance holding most of it
    assert place(40, {"d2": 32}) == (None, "d2", "decode", ["d2"])
    assert place(40, {}) == (None, "d1", "miss", [""])


def test_with_admission_its_choice_is_kept():
    admit = lambda p, d: Decision(Outcome.ADMIT, "fits", p, d)      # noqa: E731
    assert place(1000, {"p2": 992}, admit("p2", "d1")) == ("p2", "d1", "prefill", ["d1"])
    assert place(1000, {"d2": 960}, admit(None, "d2")) == (None, "d2", "decode", ["d2"])
    assert place(1000, {}, admit("p1", "d2")) == ("p1", "d2", "miss", ["d2"])
    # fail_open (no instances chosen): the router's own choice
    assert place(1000, {"d2": 960}, Decision(Outcome.ADMIT, "fail_open")) == (None, "d2", "decode", ["d2"])
