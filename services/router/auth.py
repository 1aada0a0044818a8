"""Who is calling the router, and what their key allows (common/auth.py: keys, files, headers).

    ring = KeyRing.from_file(path)              # None path: KeyRing.open() lets everyone in as "anonymous"
    who = ring.authenticate(presented_key(metadata))      # UnauthenticatedError
    ring.limits.acquire(who, tokens)                      # RetryLater when over its limits
    ...; ring.limits.release(who)

A presented key is hashed and compared with every stored hash with hmac.compare_digest, so the time
taken says nothing about which key, or how much of one, matched.
"""
from __future__ import annotations

import hashlib
import hmac
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from common.auth import load_keys_file
from common.errors import UnauthenticatedError


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its key's id and limits (0 = none)."""
    id: str
    max_concurrent: int = 0
    tokens_per_minute: int = 0


ANONYMOUS = Principal("anonymous")


class KeyRing:
    def __init__(self, entries: list[dict] | None, clock: Callable[[], float] = time.monotonic) -> None:
        """`entries`: a keys file's entries; None = no authentication (everyone is ANONYMOUS)."""
        self.required = entries is not None
        self._keys = [(bytes.fromhex(e["sha256"]), Principal(e["id"], e.get("max_concurrent", 0),
                                                             e.get("tokens_per_minute", 0)))
                      for e in entries or ()]
        self.limits = KeyLimits(clock)

    @classmethod
    def from_file(cls, path: str) -> "KeyRing":
        return cls(load_keys_file(path)) if path else cls(None)

    def authenticate(self, key: str | None) -> Principal:
        if not self.required:
            return ANONYMOUS
        if not key:
            raise UnauthenticatedError("an API key is required: send `authorization: Bearer <key>` (the "
                                       "mnemosyne CLI and client read $MNEMOSYNE_API_KEY or the key `make up` made)")
        digest = hashlib.sha256(key.encode(errors="replace")).digest()
        found = None
        for stored, who in self._keys:                  # all compared: no early exit
            if hmac.compare_digest(stored, digest) and found is None:
                found = who
        if found is None:
            raise UnauthenticatedError("the API key is not valid")
        return found


class KeyLimits:
    """Per-key concurrency and a token bucket of tokens_per_minute (refilled continuously, holding
    at most one minute's worth); a request's tokens are its prompt plus its max_tokens."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.running: Counter[str] = Counter()
        self._bucket: dict[str, tuple[float, float]] = {}      # key id -> (tokens, at)

    def check(self, who: Principal, tokens: int) -> None:
        """Raises RetryLater (RESOURCE_EXHAUSTED with a retry hint) when `who` is over a limit."""
        from services.router.router import RetryLater       # the router's pushback error
        if who.max_concurrent and self.running[who.id] >= who.max_concurrent:
            raise RetryLater(f"API key {who.id!r} has {self.running[who.id]} requests running (its limit is "
                             f"{who.max_concurrent}); retry when one ends", 1.0)
        if who.tokens_per_minute:
            rate = who.tokens_per_minute / 60.0
            level = self._level(who)
            if tokens > who.tokens_per_minute:
                raise RetryLater(f"request of {tokens} tokens is more than API key {who.id!r} may use in a "
                                 f"minute ({who.tokens_per_minute})", 60.0)
            if tokens > level:
                raise RetryLater(f"API key {who.id!r} is over its {who.tokens_per_minute} tokens per minute",
                                 (tokens - level) / rate)

    def acquire(self, who: Principal, tokens: int) -> None:
        """Checks, then counts the request as running and its tokens as used; release() when it ends."""
        self.check(who, tokens)
        if who.tokens_per_minute:
            self._bucket[who.id] = (self._level(who) - tokens, self.clock())
        self.running[who.id] += 1

    def release(self, who: Principal) -> None:
        self.running[who.id] -= 1
        if self.running[who.id] <= 0:
            del self.running[who.id]

    def _level(self, who: Principal) -> float:
        now = self.clock()
        level, at = self._bucket.get(who.id, (float(who.tokens_per_minute), now))
        return min(float(who.tokens_per_minute), level + (now - at) * who.tokens_per_minute / 60.0)
