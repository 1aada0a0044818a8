"""The KV connector's contracts: where a request's KV goes, and what a holder of KV reports.

A *holder* is one process that holds part of an instance's KV cache: the single-process engine
(holder 0), or one rank of a grid (holder = its rank; 1 .. tp*spp*kvp). Every holder streams the
part of each chunk it computed (its layers, its TP heads) and receives its KVP group's token range.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from common.config import CacheConfig, ModelConfig
from common.kv_transfer import KVLayout
from common.perf_model.calibrated import model_fingerprint


PROGRESS_PERIOD_S = 0.5         # a holder reports a request's intake progress at most this often


@dataclass(frozen=True)
class GroupSink:
    group: int                 # decode KVP group index
    token_start: int           # first token the group holds (group * kvp_tokens)
    block_table: list[int]     # the group's blocks for this request, in token order
    addresses: list[str]       # one KV receiver "host:port" per decode TP rank
    cached: int = 0            # leading tokens of the group the decode side holds already (its prefix
                               # cache; each group's own: after a lost worker a later group may hold
                               # its share while an earlier one does not): never sent; the receivers
                               # count them as arrived


@dataclass(frozen=True)
class KVSink:
    backend: str               # "tcp" | "nixl"
    kvp_tokens: int            # tokens per decode KVP group (M)
    groups: list[GroupSink]
    epoch: int = 0             # the decode placement's epoch, stamped on every chunk

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the decode side holds already (never sent), over every group."""
        return sum(g.cached for g in self.groups)

    def skip_cached(self, pos: int) -> int:
        """The first token at or after `pos` whose KV the decode side does not hold already: each
        group holds its leading `cached` tokens (a prefix cached in order, or, after a decode worker
        was replaced, the groups that kept their share while the lost one's is sent again)."""
        m = self.kvp_tokens
        while 0 <= pos // m < len(self.groups):
            gs = self.groups[pos // m]
            held = gs.token_start + gs.cached
            if pos >= held:
                return pos
            pos = held
            if held < gs.token_start + m:             # the group's tail is not held
                return pos
        return pos

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KVSink":
        return cls(d["backend"], d["kvp_tokens"], [GroupSink(**g) for g in d["groups"]], int(d.get("epoch", 0)))


@dataclass(frozen=True)
class KVEvent:
    """A holder's report on one request: its sent KV was confirmed (kind "sent") or its expected KV
    was all written (kind "recv"), or that failed (terminal, once each); or that more of it was
    confirmed / written since the last report ("progress", at most every PROGRESS_PERIOD_S). Both
    sides' KV timeouts count from the last progress, so a long transfer that keeps moving never
    times out and a stalled one fails kv_timeout_s after it stalled."""
    holder: int
    kind: str                  # "sent" | "recv"
    request_id: str
    state: str                 # "done" | "failed" | "progress"
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"type": "kv_event", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "KVEvent":
        return cls(d["holder"], d["kind"], d["request_id"], d["state"], d.get("reason"))


@dataclass(frozen=True)
class KVAck:
    """A holder's answer to `expect`: `ok` when it registered a part of the request (False when its
    group holds none of the request's tokens, or on `error`)."""
    holder: int
    request_id: str
    ok: bool
    error: str | None = None

    def to_dict(self) -> dict:
        return {"type": "kv_ack", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "KVAck":
        return cls(d["holder"], d["request_id"], d["ok"], d.get("error"))


def kv_layout(mc: ModelConfig, cache: CacheConfig, dtype: str, kv_heads: int) -> KVLayout:
    """The layout one holder's KV has on the wire (kv_heads: its TP rank's KV heads)."""
    return KVLayout(dtype=dtype, block_size=cache.block_size, num_kv_heads=kv_heads, head_dim=mc.head_dim,
                    num_layers=mc.num_layers, model=model_fingerprint(mc))
