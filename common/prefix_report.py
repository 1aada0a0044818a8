"""The instance's side of the kvstore's prefix-cache index (common/metadata/prefix_index.py): what its
heartbeats report about its prefix cache.

Each heartbeat diffs the engine's named blocks now (`snapshot`: every full block the block pools hold
a name for, in use or cached) against the set the index last acknowledged, and sends the difference
as a numbered delta (a PrefixReport). When the kvstore answers prefix_resync (a report it missed,
a restart, a new registration) the next report is a full one (it replaces the index's entries). A heartbeat that failed leaves the
acknowledged set as it was: if the kvstore did apply that report, the next delta's number no longer
follows the index's and the kvstore asks for a resync, so a lost reply never leaves the index wrong.
Every heartbeat carries a report (an empty delta when nothing changed), so a kvstore that lost the
index asks for a resync within one heartbeat. A report carries at most `max_blocks` hashes (evictions
first): the kvstore applies each in one Redis script, which blocks Redis meanwhile, so a large cache is
indexed over a few heartbeats (what was not sent stays in the next diff). `version()` (optional) is a cheap fingerprint of the
cache's names: while it is the one of the last acknowledged report, the snapshot is not even taken
(a pool's names change only by a registration, which grows their number, or an eviction, which is counted).

Plain Python, used on the instance's event loop (common/client.py Membership).
"""
from __future__ import annotations

import secrets
from typing import Callable

from common.metadata.types import PrefixReport

#: Hashes per report: about 20 ms of Redis time each; 16,384 per second at 4 heartbeats a second.
MAX_REPORT_BLOCKS = 4096


class PrefixReporter:
    """`snapshot()`: the block hashes the instance's cache names now, or None when it has no engine
    (restarting) or prefix caching is off (then no report is sent)."""

    def __init__(self, snapshot: Callable[[], set[bytes] | None], epoch: int | None = None,
                 version: Callable[[], object] | None = None, max_blocks: int = MAX_REPORT_BLOCKS) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.snapshot = snapshot
        self.max_blocks = max_blocks
        self.version = version
        self._acked_version: object = None
        self.epoch = secrets.randbits(63) if epoch is None else epoch
        self.seq = 0                            # the last report the index applied
        self.acked: set[bytes] = set()          # what it holds for us after it
        self.full = True                        # the next report is the whole cache
        self._sent: tuple[int, set[bytes], object] | None = None

    def report(self) -> PrefixReport | None:
        v = self.version() if self.version is not None else None
        if v is not None and not self.full and v == self._acked_version:
            r = PrefixReport(self.epoch, self.seq + 1, False)
            self._sent = (r.seq, self.acked, v)
            return r
        now = self.snapshot()
        if now is None:
            return None
        base = set() if self.full else self.acked
        evicted = sorted(base - now)[:self.max_blocks]
        added = sorted(now - base)[:self.max_blocks - len(evicted)]
        r = PrefixReport(self.epoch, self.seq + 1, self.full, tuple(added), tuple(evicted))
        held = (base - set(evicted)) | set(added)            # what the index holds once it applies r
        self._sent = (r.seq, held, v if held == now else None)
        return r

    def ack(self, report: PrefixReport | None, resync: bool) -> None:
        """The kvstore answered the heartbeat that carried `report`: applied, or asks for a resync."""
        if report is None or self._sent is None or self._sent[0] != report.seq:
            return
        if resync:
            self.full = True
        else:
            self.seq, self.acked, self._acked_version, self.full = report.seq, self._sent[1], self._sent[2], False
        self._sent = None

    def reset(self) -> None:
        """The instance registered again: its entries were dropped, send everything next."""
        self.full = True
