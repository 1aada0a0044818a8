"""The KV connector's scheduler side: one object per engine, the same for one process and a grid.

It decides and tracks; the executor's KV commands (see common/engine/executor.py: `kv_expect`,
`kv_cancel`, `kv_events`, `kv_addresses`, `kv_holders`) reach the holders of KV (worker side,
common/kv_connector/worker.py), which report terminal states as `KVEvent`s aggregated here.

Prefill role: `attach(rid, sink)` when a request is added with a KVSink. The sink travels with the
request's first chunk (`sinks_for`) to every holder, which streams each chunk it computes. The
request's `kv_status` is pending until every holder reported its part sent ("done"), or "failed"
with the first failure. A terminal answer is remembered (bounded) so that repeated queries agree.

Decode role: `prepare_receive` reserves the request's blocks in every KVP group and registers the
token ranges with the holders; given the prompt's token ids and with prefix caching on, it first
takes in each KVP group the longest cached run of that group's blocks of the prompt (e.g. the
previous turn of a chat decoded here; or, after a worker was replaced, what the other groups had
received whole of a retried request): those tokens are not transferred (GroupSink.cached, per group,
tells the sender; the holders count them as arrived), and `add_prefilled` refuses a prompt whose
tokens are not the ones prepared.
`add_prefilled` queues the request (all prompt tokens computed, the
first token sampled elsewhere). `admit_arrived`, at the start of every engine step, moves requests
whose KV arrived at every expecting holder into the Scheduler, and ends those that failed or passed
their deadline with an error output.

Block ownership:
- prepare_receive allocates the blocks, or shares cached ones (a CapacityError leaves nothing
  behind); from then on they belong to the request.
- While the request awaits its KV, this object owns them: a failure, a timeout or an abort frees
  them here, once the holders answered the cancel of their expectations; blocks a NIXL write
  granted before the cancel may still land in (the holders say which) are withheld for good
  (BlockPool.quarantine), so such a write can never reach another request's KV. The groups it had
  received whole are named in the prefix cache first (`_keep_arrived`). A cancel a dead holder
  cannot answer keeps the blocks (`unsettled`) until the engine repaired the grid (`settle`).
- Once admitted, the Scheduler owns them as for any request: it frees them when the request
  finishes, is preempted or aborted. Holders never allocate or free blocks.
- A prefill request's blocks are the Scheduler's throughout; what is in flight to the decode side are
  staging copies the transfer owns (worker.py), so freeing the blocks early is safe. A request that
  reused a cached prefix streams it too: the holders send the tokens before its first chunk that they
  never sent (worker.py KVWorker.stream), from the shared blocks, with that chunk.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from common.config import ParallelConfig
from common.errors import ConfigError, InvalidRequestError, KVTransferError, WorkerFailedError
from common.kv_cache.kvp_blocks import KVPBlockManager
from common.kv_cache.prefix import extend_hashes
from common.kv_connector.types import GroupSink, KVEvent, KVSink
from common.scheduler.request import FinishReason, Request

if TYPE_CHECKING:
    from common.engine.executor import Executor
    from common.scheduler.scheduler import ScheduledItem, Scheduler

log = logging.getLogger(__name__)

FINAL_KEPT = 4096                  # terminal kv_status answers remembered


class KVConnectorScheduler:
    def __init__(self, parallel: ParallelConfig, blocks: KVPBlockManager, scheduler: "Scheduler",
                 executor: "Executor", max_model_len: int, make_output: Callable) -> None:
        """`make_output(request, error)`: the engine's StepOutput ending a request that never joined
        the scheduler."""
        self.parallel = parallel
        self.blocks = blocks
        self.scheduler = scheduler
        self.executor = executor
        self.max_model_len = max_model_len
        self.make_output = make_output
        self.sinks: dict[str, KVSink] = {}                                # until the first token
        self.streaming: set[str] = set()                                  # attached, not yet terminal
        self.final: dict[str, tuple[str, str | None]] = {}
        self.sent: dict[str, dict[int, tuple[str, str | None]]] = {}     # rid -> holder -> state
        self.recv: dict[str, dict[int, tuple[str, str | None]]] = {}
        self.expecting: dict[str, set[int]] = {}                         # rid -> holders receiving
        self.prepared: dict[str, int] = {}                               # rid -> prompt tokens
        self.hashes: dict[str, list[bytes]] = {}                         # rid -> names of its prompt's full blocks
        self.reused: dict[str, list[int]] = {}                           # rid -> cached blocks it took, per group
        self.lost: dict[str, str] = {}                                   # rid -> why its KV was lost (bounded)
        self.unsettled: set[str] = set()     # cancels a dead holder interrupted: blocks held until `settle`
        self.holder_lost: WorkerFailedError | None = None   # such a cancel's error, for the engine
        self.awaiting: dict[str, tuple[Request, float, float]] = {}      # rid -> (request, since, timeout)
        self.progress: dict[str, float] = {}                             # rid -> last KV intake progress

    # ---- events ----------------------------------------------------------------------------------
    def poll(self) -> None:
        """Takes in the holders' reports."""
        for ev in self.executor.kv_events():
            self.on_event(ev)

    def on_event(self, ev: KVEvent) -> None:
        if ev.state == "progress":
            if ev.request_id in (self.streaming if ev.kind == "sent" else self.prepared):
                self.progress[ev.request_id] = time.monotonic()
            return
        states = self.sent if ev.kind == "sent" else self.recv
        states.setdefault(ev.request_id, {})[ev.holder] = (ev.state, ev.reason)

    # ---- prefill role ----------------------------------------------------------------------------
    def attach(self, rid: str, sink: KVSink) -> None:
        if self.parallel.kvp > 1:
            raise ConfigError("a prefill grid that streams KV must have kvp = 1")
        self.sinks[rid] = sink
        self.streaming.add(rid)
        self.final.pop(rid, None)

    def sinks_for(self, items: list["ScheduledItem"]) -> dict[str, KVSink]:
        """The sinks the holders learn with this step: those of requests starting their prompt (at 0,
        or after the prefix they reused from the cache: the holders send that prefix's KV first)."""
        if not self.sinks:
            return {}
        return {it.request.request_id: self.sinks[it.request.request_id] for it in items
                if it.start in (0, it.request.num_cached_tokens) and it.request.request_id in self.sinks}

    def sampled(self, items: list["ScheduledItem"]) -> None:
        """After a step: a request that sampled its first token has sent its whole prompt."""
        if self.sinks:
            for it in items:
                if it.sample:
                    self.sinks.pop(it.request.request_id, None)

    def failed_streams(self) -> dict[str, str]:
        """Requests still computing their prompt (no first token yet) whose KV stream already failed
        at a holder (the receiver died, refused a chunk): {rid: reason}. Computing the rest of the
        prompt cannot help; the engine ends them now, so the caller learns before any token."""
        if not self.sinks:
            return {}
        self.poll()
        out = {}
        for rid in self.sinks:
            failed = [reason for state, reason in self.sent.get(rid, {}).values() if state == "failed"]
            if failed:
                out[rid] = failed[0] or "KV transfer failed"
        return out

    def last_progress(self, rid: str) -> float | None:
        """time.monotonic() of the last KV progress a holder reported for `rid` (None: none yet)."""
        return self.progress.get(rid)

    def kv_status(self, rid: str) -> tuple[str, str | None]:
        """pending / done / failed (reason)."""
        self.poll()
        if rid in self.final:
            return self.final[rid]
        if rid not in self.streaming:
            return "failed", f"request {rid} streams no KV"
        states = self.sent.get(rid, {})
        failed = [reason for state, reason in states.values() if state == "failed"]
        if failed:
            result = ("failed", failed[0])
        elif len(states) >= self.executor.kv_holders:
            result = ("done", None)
        else:
            return "pending", None
        self.streaming.discard(rid)
        self.sent.pop(rid, None)
        self.progress.pop(rid, None)
        self.final[rid] = result
        while len(self.final) > FINAL_KEPT:
            self.final.pop(next(iter(self.final)))
        return result

    # ---- decode role -----------------------------------------------------------------------------
    def prepare_receive(self, rid: str, num_tokens: int, max_new_tokens: int, epoch: int = 0,
                        prompt_ids: list[int] | None = None) -> list[GroupSink]:
        """Reserves the blocks of a request whose `num_tokens` prompt tokens' KV will arrive; with
        `prompt_ids` (its prompt) each group's cached blocks of it are reused and not received."""
        if self.parallel.spp != 1:
            raise ConfigError("a decode grid that receives KV must have spp = 1")
        if rid in self.prepared or rid in self.scheduler.requests or rid in self.unsettled:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        if num_tokens < 1 or num_tokens + 1 > self.max_model_len:
            raise InvalidRequestError(f"cannot receive {num_tokens} prompt tokens "
                                      f"(max_model_len {self.max_model_len})")
        if prompt_ids is not None and len(prompt_ids) != num_tokens:
            raise InvalidRequestError(f"request {rid}: {len(prompt_ids)} prompt token ids for a placement "
                                      f"of {num_tokens} tokens")
        hashes = self._prompt_hashes(num_tokens, prompt_ids)
        reused = self.blocks.acquire_groups(rid, hashes) if hashes else [0] * len(self.blocks.pools)
        bs = self.blocks.block_size
        cached = [k * bs for k in reused]                      # per group: its leading tokens held
        try:
            self.blocks.allocate(rid, num_tokens)              # CapacityError leaves nothing behind
        except BaseException:
            self.blocks.free(rid)                              # the shared prefix goes back to the cache
            raise
        tables = self.blocks.table(rid)
        try:
            acks = self.executor.kv_expect(rid, tables, num_tokens, epoch, cached)
        except BaseException:
            self._undo(rid)
            raise
        errors = [a.error for a in acks if a.error]
        if errors:
            self._undo(rid)
            raise KVTransferError(f"cannot receive request {rid}: {errors[0]}")
        self.expecting[rid] = {a.holder for a in acks if a.ok}
        self.prepared[rid] = num_tokens
        self.lost.pop(rid, None)
        if hashes:
            self.hashes[rid] = hashes
            if any(reused):
                self.reused[rid] = reused
        m = self.blocks.kvp_tokens
        return [GroupSink(g, g * m, tables[g], self.executor.kv_addresses(g), min(cached[g], n))
                for g, n in enumerate(self.blocks.split(num_tokens)) if n]

    def _prompt_hashes(self, num_tokens: int, prompt_ids: list[int] | None) -> list[bytes]:
        """The names of the prompt's full blocks (none without `prompt_ids` or prefix caching)."""
        if prompt_ids is None or not self.blocks.prefix_caching:
            return []
        return extend_hashes([], self.blocks.hash_root, self.blocks.block_size, num_tokens,
                             lambda a, b: prompt_ids[a:b])

    def cached_tokens(self, rid: str) -> int:
        """Prompt tokens of a prepared request that its KV need not bring (reused from the cache)."""
        return sum(self.reused.get(rid, ())) * self.blocks.block_size

    def lose(self, rid: str, groups: set[int], why: str) -> None:
        """A worker holding part of `rid`'s KV died with KVP `groups`' share of it; the request ends:
        forgotten as by abort (what the other groups received of its prompt, complete, stays named in
        their prefix caches, so a retry prepared here receives only the lost groups' share), and a
        later add_prefilled of it fails with `why` (retryable) rather than as never prepared."""
        self.abort(rid, lost=groups)
        self.lost[rid] = why
        while len(self.lost) > FINAL_KEPT:
            self.lost.pop(next(iter(self.lost)))

    def _keep_arrived(self, rid: str, skip: set[int] = frozenset()) -> None:
        """Before a request still receiving its KV is dropped (aborted, failed, its worker lost):
        the groups (but `skip`) whose every holder received all of its share name their blocks in
        their prefix cache. That KV is whole and exact, so a retry prepared here reuses it, and
        only the rest travels again. (The prefix cache drops the names of a group whose worker is
        replaced: BlockPool.drop_names.)"""
        hashes = self.hashes.get(rid)
        if not hashes or rid not in self.prepared or rid in self.scheduler.requests:
            return
        try:
            self.poll()
        except WorkerFailedError as e:           # a holder is gone: go by the reports already in
            self.holder_lost = self.holder_lost or e
        for k, run in enumerate(self.blocks.by_group(hashes)):
            if run and k not in skip and self._received(rid, k):
                self.blocks.pools[k].register(rid, run)

    def _received(self, rid: str, group: int) -> bool:
        """Whether every holder of `group` has all of `rid`'s KV it expected (one with nothing to
        receive has)."""
        expecting, states = self.expecting.get(rid, set()), self.recv.get(rid, {})
        return all(h not in expecting or states.get(h, ("",))[0] == "done"
                   for h in self.executor.kv_group_holders(group))

    def add_prefilled(self, req: Request, kv_timeout_s: float) -> None:
        """`req`: all prompt tokens computed, the first token appended (it may already finish it).
        Its KV must then arrive with no pause longer than `kv_timeout_s`: the timeout counts from
        now or from the last progress a holder reported, whichever is later (a long tail that keeps
        moving is waited for; a stalled one fails kv_timeout_s after it stalled)."""
        if req.request_id in self.lost:
            raise KVTransferError(f"request {req.request_id}: {self.lost[req.request_id]}")
        if self.prepared.get(req.request_id) != req.prompt_len:
            raise InvalidRequestError(f"request {req.request_id!r} was not prepared to receive "
                                      f"{req.prompt_len} tokens")
        reused = self.reused.get(req.request_id)
        if reused:                                  # its cached blocks must hold this prompt's tokens
            theirs = self.hashes[req.request_id]
            mine = extend_hashes(req.block_hashes, self.blocks.hash_root, self.blocks.block_size,
                                 len(theirs) * self.blocks.block_size, req.token_ids)
            runs, names = self.blocks.by_group(theirs), self.blocks.by_group(mine)
            if any(names[k][:n] != runs[k][:n] for k, n in enumerate(reused) if n):
                raise InvalidRequestError(f"request {req.request_id!r}: its prompt differs from the one "
                                          "prepared (the KV reused from the cache is another's)")
        self.awaiting[req.request_id] = (req, time.monotonic(), kv_timeout_s)

    def admit_arrived(self) -> list:
        """Moves requests whose KV is complete into the scheduler; ends the failed and the late."""
        if not self.awaiting:
            return []
        self.poll()
        outs, now = [], time.monotonic()
        for rid, (req, since, timeout_s) in list(self.awaiting.items()):
            states = self.recv.get(rid, {})
            failed = [r for s, r in states.values() if s == "failed"]
            done = not failed and set(states) >= self.expecting.get(rid, set())
            late = now >= max(since, self.progress.get(rid, since)) + timeout_s
            if not (failed or done or late):
                continue
            del self.awaiting[rid]
            if done and req.finish_reason is None:
                self._forget(rid)                             # the Scheduler owns its blocks now
                self.scheduler.add(req)
                continue
            error = failed[0] if failed else (None if done else
                                              f"KV of request {rid} stopped arriving: nothing new for "
                                              f"{timeout_s:g} s (kv_timeout_s)")
            self._undo(rid)
            reason = req.finish_reason if error is None else FinishReason.ABORT
            outs.append(self.make_output(req, reason, error))
        return outs

    # ---- both ------------------------------------------------------------------------------------
    def abort(self, rid: str, lost: set[int] = frozenset()) -> bool:
        """Forgets the request here and on the holders; frees its blocks if it is still ours. What
        it received whole is kept in the prefix cache, but in KVP groups `lost` (their worker died)."""
        found = rid in self.prepared or rid in self.sinks or rid in self.streaming
        self.sinks.pop(rid, None)
        self.sent.pop(rid, None)
        self.streaming.discard(rid)
        self.final.pop(rid, None)
        self.progress.pop(rid, None)
        mine = rid in self.prepared and rid not in self.scheduler.requests
        self._keep_arrived(rid, lost)
        if (not found or self._cancel(rid)) and mine:
            self.blocks.free(rid)
        self._forget(rid)
        return found

    def _undo(self, rid: str) -> None:
        self._keep_arrived(rid)
        if self._cancel(rid):
            self.blocks.free(rid)
        self._forget(rid)

    def _cancel(self, rid: str) -> bool:
        """Cancels the request's intake on every holder, withholding the blocks a late write may
        land in; False when a holder is gone (a worker died): the request's blocks are kept until
        the grid is repaired (`settle`) or rebuilt, since a holder that did not answer may still
        write, and `holder_lost` tells the engine."""
        try:
            self._withhold(self.executor.kv_cancel(rid))
        except WorkerFailedError as e:
            log.warning("request %s: its KV intake could not be cancelled everywhere (%s); its blocks are "
                        "freed once the grid is repaired", rid, e)
            self.unsettled.add(rid)
            self.holder_lost = self.holder_lost or e
            return False
        return True

    def settle(self) -> None:
        """After the grid was repaired: the requests whose cancel a dead holder interrupted are
        cancelled again (every holder answers now) and their blocks freed."""
        for rid in sorted(self.unsettled):
            self._withhold(self.executor.kv_cancel(rid))
            self.unsettled.discard(rid)
            if rid not in self.scheduler.requests and rid not in self.prepared:
                self.blocks.free(rid)
        self.holder_lost = None

    def _withhold(self, poisoned: dict[int, list[int]]) -> None:
        """Blocks a late KV write may still land in (the holders' answer to a cancel) never go back
        to the pool: freed with their request, they stay out of circulation."""
        if poisoned:
            n = self.blocks.quarantine(poisoned)
            log.error("withheld %d KV blocks for good (a granted write neither finished nor was recalled): "
                      "%s; %d withheld in all", n, poisoned, self.blocks.num_quarantined)

    def _forget(self, rid: str) -> None:
        for d in (self.recv, self.expecting, self.prepared, self.awaiting, self.progress, self.reused, self.hashes):
            d.pop(rid, None)
