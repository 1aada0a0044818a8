"""An engine on its own thread, with an asyncio API for the gRPC servicers.

The engine (common/engine/engine.py LLMEngine, any executor) is a single-threaded object: every call
goes through ONE thread, which owns the engine from construction to shutdown. AsyncEngine uses only
the engine's typed interface: add_request, add_prefilled, prepare_receive, abort, step,
has_unfinished, check_alive, kv_status, kv_backend, kv_layout, stats(), shutdown(). The loop of that thread is:

    run queued commands (add_request, prepare_receive, abort, ...)   # in submission order
    step() if anything is unfinished, deliver each StepOutput to its request's asyncio queue
    check the KV-transfer watches (prefill role)
    otherwise block on the command queue (short timeout while KV transfers are pending)

Outputs cross to asyncio with `loop.call_soon_threadsafe`; commands come back as
`concurrent.futures.Future`s awaited with a timeout. Every wait has a timeout.

Ownership: a request's stream (`generate`, `add_prefilled`) owns the request: leaving the stream
early (consumer cancelled, stream closed) aborts it in the engine. A grid worker that dies
is replaced in place where the grid can do that (a decode grid: LLMEngine._recover): its requests
go on (those that lost KV compute it again; those still receiving it end with a retryable error).
A step that raises (e.g. a worker of a pipeline died:
WorkerFailedError) fails the engine: every open stream and watch gets that error, the engine is
shut down, and later calls raise WorkerFailedError. The owner may then build a new one.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from common.engine.engine import EngineStats, LLMEngine, StepOutput
from common.errors import InvalidRequestError, KVTransferError, MnemosyneError, WorkerFailedError, kv_transfer_error
from common.scheduler.request import FinishReason

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Default deadline of a command (prepare_receive on a grid waits for its workers' acks).
COMMAND_TIMEOUT_S = 60.0
#: How long a stream may go without any output before it is failed (the engine is stuck).
STALL_TIMEOUT_S = 600.0
#: How often the thread looks at pending KV transfers / awaiting requests when it has no step to do.
POLL_S = 0.005
#: A grid's kv_status can say "failed" for a moment between a request's last chunk and the workers'
#: first reports (the driver forgets the sink before they arrive); a failure is believed once it
#: persisted this long. Real failures stay failed, so they are only reported this much later.
FAILURE_CONFIRM_S = 1.0


def _settle(fut: concurrent.futures.Future, outcome: BaseException | None) -> None:
    """Sets a watch's future from the engine thread. Its waiter may have left (cancelled, timed
    out) at any moment, which cancels the future from the loop thread: that is not an engine fault."""
    try:
        if outcome is None:
            fut.set_result(None)
        else:
            fut.set_exception(outcome)
    except concurrent.futures.InvalidStateError:
        pass


class StepRecorder:
    """Turns the engine thread's steps into metrics (common/metrics.py), from the StepOutputs alone:
    a request's prefill chunk is the growth of its num_computed within the prompt, a generated
    token is an output with a token, the batch is the requests that advanced. Engine thread only.

    `track(request_id, computed)` when a request is added (computed = prompt tokens whose KV it
    already has: 0, or the whole prompt for a prefilled request arriving on a decode instance)."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self._computed: dict[str, int] = {}
        self._fresh: set[str] = set()            # started with nothing computed: a prefix-cache lookup
        # (seconds, count) of the iterations mnemosyne_iteration_seconds observed, for the load the
        # instance heartbeats (common/pool_load.py): one tuple, replaced whole, read from any thread.
        self.iterations: tuple[float, int] = (0.0, 0)
        self.replacements = 0                    # the engine's worker replacements counted so far

    def track(self, request_id: str, computed: int) -> None:
        self._computed[request_id] = computed
        if computed == 0:
            self._fresh.add(request_id)

    def forget(self, request_id: str) -> None:
        self._computed.pop(request_id, None)
        self._fresh.discard(request_id)

    def step(self, seconds: float, outs: list, stats: EngineStats) -> None:
        chunks, generated, seqs = [], 0, 0
        for o in outs:
            prev = self._computed.get(o.request_id)
            advanced = o.token_id is not None
            if prev is not None:
                if o.request_id in self._fresh:       # its first step: the cached prefix was not computed
                    self._fresh.discard(o.request_id)
                    self.metrics.observe_prefix_cache(o.prompt_len, o.num_cached_tokens)
                    prev = max(prev, o.num_cached_tokens)
                if o.num_computed < prev:             # preempted: recomputes from the start
                    prev = 0
                chunk = min(o.num_computed, o.prompt_len) - min(prev, o.prompt_len)
                if chunk > 0:
                    chunks.append(chunk)
                    advanced = True
                self._computed[o.request_id] = o.num_computed
            if o.token_id is not None:
                generated += 1
            seqs += advanced
            if o.finish_reason is not None or o.error is not None:
                self._computed.pop(o.request_id, None)
                self._fresh.discard(o.request_id)
        if seqs:
            self.metrics.observe_iteration(seconds, seqs, chunk_tokens=chunks, generated_tokens=generated)
            total, count = self.iterations
            self.iterations = (total + seconds, count + 1)
        self.load(stats)

    def load(self, stats: EngineStats) -> None:
        self.metrics.observe_worker_replacements(stats.worker_replacements - self.replacements)
        self.replacements = max(self.replacements, stats.worker_replacements)
        self.metrics.set_scheduler_load(queued_prefill_tokens=stats.queued_prefill_tokens,
                                        running_decodes=stats.running_decodes,
                                        waiting_requests=stats.waiting, model_scale=stats.model_scale)
        zeros = (0,) * len(stats.total_blocks)
        for g, (total, free, c, q) in enumerate(zip(stats.total_blocks, stats.free_blocks,
                                                    stats.cached_blocks or zeros, stats.quarantined_blocks or zeros)):
            self.metrics.set_kv_blocks(g, 0, used=total - free, free=free, cached=c, quarantined=q)


class _Stream:
    """One request's outputs, consumed in the event loop."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.done = False                   # set in the loop when the final output was queued


class AsyncEngine:
    """Owns an engine and the thread that drives it.

        ae = await AsyncEngine.start(lambda: LLMEngine(cfg))      # built on the engine thread
        async for out in ae.generate(prompt_ids, params, "r1"):   # StepOutput, last one finished
            ...
        await ae.shutdown()
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str = "engine",
                 command_timeout_s: float = COMMAND_TIMEOUT_S,
                 stall_timeout_s: float = STALL_TIMEOUT_S, metrics: Any = None) -> None:
        """`metrics`: a common.metrics.Metrics the engine thread records every step on (None = none)."""
        self._loop = loop
        self.metrics = metrics
        self._recorder = StepRecorder(metrics) if metrics is not None else None
        self.name = name
        self.command_timeout_s = command_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._commands: queue.Queue[tuple[Callable[[Any], Any], concurrent.futures.Future] | None] = \
            queue.Queue()
        self._streams: dict[str, _Stream] = {}          # loop-side registry (touched in the loop)
        self._routes: set[str] = set()                  # thread-side: requests whose outputs we deliver
        self._watches: dict[str, tuple[concurrent.futures.Future, float, float]] = {}   # thread-side:
                                                        # rid -> (future, since, timeout_s)
        self._failing: dict[str, float] = {}            # thread-side: watch -> first "failed" seen
        self._engine: LLMEngine | None = None
        self.perf_model: Any = None           # the closed engine's performance model (None while it runs)
        self._thread: threading.Thread | None = None
        self._failure: MnemosyneError | None = None
        self._stopping = False
        self.stats = EngineStats()

    @property
    def iteration_totals(self) -> tuple[float, int]:
        """(seconds, count) of the engine iterations that advanced a request, since this engine
        started ((0.0, 0) without metrics): what mnemosyne_iteration_seconds observes."""
        return self._recorder.iterations if self._recorder is not None else (0.0, 0)

    # ---- lifecycle ---------------------------------------------------------------------------
    @classmethod
    async def start(cls, factory: Callable[[], LLMEngine], *, name: str = "engine",
                    load_timeout_s: float = 600.0, **kwargs: Any) -> "AsyncEngine":
        """Builds the engine with `factory()` on the new thread (so it is created where it runs)."""
        self = cls(asyncio.get_running_loop(), name, **kwargs)
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(factory, ready), name=name, daemon=True)
        self._thread.start()
        try:
            await asyncio.wait_for(asyncio.wrap_future(ready), load_timeout_s)
        except asyncio.TimeoutError:
            self._stopping = True
            raise WorkerFailedError(f"{name}: the engine did not load within {load_timeout_s:.0f} s") from None
        return self

    @property
    def engine(self) -> LLMEngine:
        """The engine object; touch it only through `call` (it belongs to the engine thread)."""
        return self._engine

    @property
    def failed(self) -> MnemosyneError | None:
        """The error that stopped the engine, or None while it runs."""
        return self._failure

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Aborts what runs, shuts the engine down on its thread and joins it. Idempotent."""
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(None)
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join, timeout_s)
        if thread.is_alive():
            log.warning("%s: the engine thread did not stop within %.0f s", self.name, timeout_s)
        self._fail_streams(WorkerFailedError(f"{self.name} is shut down"))

    # ---- commands ----------------------------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], T], timeout_s: float | None = None) -> T:
        """Runs `fn(engine)` on the engine thread, between two steps; returns its result or raises
        its error. WorkerFailedError when the engine failed or the call timed out."""
        self._check()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        timeout = self.command_timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except asyncio.TimeoutError:
            raise WorkerFailedError(f"{self.name}: no answer from the engine within {timeout:.0f} s") from None

    async def abort(self, request_id: str) -> bool:
        """Aborts a request (frees its blocks, pending KV expectations included); False if unknown.
        Its stream, if open, ends with an output whose finish_reason is ABORT."""
        if self._failure is not None:
            return False
        return await self.call(lambda e: self._abort(e, request_id))

    async def prepare_receive(self, request_id: str, num_prompt_tokens: int,
                              max_new_tokens: int, epoch: int = 0, prompt_ids: list[int] | None = None) -> list:
        """Decode role: reserves the request's blocks in every KVP group; list[GroupSink]. `epoch`:
        its placement's; the receivers take only chunks that carry it. `prompt_ids`: the prompt,
        whose cached prefix is then reused (GroupSink.cached: not sent)."""
        def prepare(e: Any) -> list:
            groups = e.prepare_receive(request_id, num_prompt_tokens, max_new_tokens, epoch, prompt_ids)
            # The reservation shows in the load (Stats, heartbeats, admission) as soon as the caller
            # has its answer, not after the engine's next iteration.
            self.stats = e.stats()
            if self._recorder is not None:
                self._recorder.load(self.stats)
            return groups
        return await self.call(prepare)

    async def kv_info(self) -> tuple[str, Any]:
        """(backend, KVLayout) of this engine's KV receivers / senders."""
        return await self.call(lambda e: (e.kv_backend, e.kv_layout))

    # ---- request streams ---------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: Any, request_id: str, *, kv_sink: Any = None,
                 ttft_deadline_s: float | None = None, tbt_slo_s: float | None = None) -> AsyncIterator[Any]:
        """Adds a request and yields its StepOutputs; the last has finish_reason (or error) set.
        ttft_deadline_s: absolute time.monotonic() deadline of the first token; tbt_slo_s: the time
        between tokens promised (both passed to the engine's scheduler)."""
        return self._stream(request_id, lambda e: e.add_request(
            prompt_ids, params, request_id=request_id, kv_sink=kv_sink, ttft_deadline_s=ttft_deadline_s,
            tbt_slo_s=tbt_slo_s), computed=0)

    def add_prefilled(self, prompt_ids: list[int], params: Any, request_id: str, first_token: int,
                      first_logprob: float, kv_timeout_s: float,
                      tbt_slo_s: float | None = None) -> AsyncIterator[Any]:
        """Decode role: the request decodes once its KV (prepared by prepare_receive) arrived.
        Yields StepOutputs from the second token on; a failed intake ends with `error` set."""
        return self._stream(request_id, lambda e: e.add_prefilled(
            prompt_ids, params, request_id, first_token, first_logprob, kv_timeout_s, tbt_slo_s=tbt_slo_s),
            computed=len(prompt_ids))

    async def _stream(self, request_id: str, add: Callable[[Any], Any], computed: int = 0) -> AsyncIterator[Any]:
        self._check()
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        stream = _Stream()
        self._streams[request_id] = stream

        def start(e: Any) -> None:
            add(e)
            self._routes.add(request_id)          # only once accepted: a failed add leaves nothing
            if self._recorder is not None:
                self._recorder.track(request_id, computed)

        try:
            await self.call(start)
            while True:
                try:
                    item = await asyncio.wait_for(stream.queue.get(), self.stall_timeout_s)
                except asyncio.TimeoutError:
                    raise WorkerFailedError(f"{self.name}: request {request_id} produced nothing for "
                                            f"{self.stall_timeout_s:.0f} s") from None
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None or item.error is not None:
                    stream.done = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not stream.done and self._failure is None and self._thread is not None:
                # Left early (cancelled, closed, failed): the request must not keep its blocks.
                self._commands.put((lambda e: self._abort(e, request_id), concurrent.futures.Future()))

    def _abort(self, engine: Any, request_id: str) -> bool:
        """On the engine thread. An open stream ends with a finish_reason ABORT output."""
        watch = self._watches.pop(request_id, None)
        self._failing.pop(request_id, None)
        if watch is not None:
            _settle(watch[0], KVTransferError(f"request {request_id} was aborted"))
        found = engine.abort(request_id)
        if found:
            self.stats = engine.stats()       # the load admission reads drops it now, not after the
                                              # next step (an idle engine has none)
        if self._recorder is not None:
            self._recorder.forget(request_id)
            if found:
                self._recorder.load(self.stats)
        if request_id in self._routes:
            self._routes.discard(request_id)
            self._loop.call_soon_threadsafe(self._deliver, request_id, StepOutput(
                request_id, None, None, 0, 0, FinishReason.ABORT))
            found = True
        return found

    async def wait_kv(self, request_id: str, timeout_s: float) -> None:
        """Prefill role: returns once every KV chunk of the request is confirmed written by the
        receivers; KVTransferError when a transfer failed or stalled: no chunk confirmed for
        `timeout_s` (counted from this call or the last confirmation, whichever is later, so a long
        tail that keeps moving is waited for). The engine thread judges; this side only checks
        every `timeout_s` that the thread still runs."""
        self._check()
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def watch(e: Any) -> None:
            self._watches[request_id] = (fut, time.monotonic(), timeout_s)

        await self.call(watch)
        waiting = asyncio.wrap_future(fut)
        try:
            while not (await asyncio.wait({waiting}, timeout=timeout_s + 5.0))[0]:
                self._check()                 # the thread ended: no verdict will come
            await waiting
        finally:
            if not waiting.done():
                waiting.cancel()              # (cancels `fut` too: the engine never sets it)
            if not fut.done() or fut.cancelled():
                # The waiter left (cancelled, timed out): drop its watch on the engine thread. The
                # future is cancelled by then, so the engine never sets it.
                self._commands.put((lambda e: self._unwatch(request_id, fut), concurrent.futures.Future()))

    def _unwatch(self, request_id: str, fut: concurrent.futures.Future) -> None:
        watch = self._watches.get(request_id)
        if watch is not None and watch[0] is fut:
            del self._watches[request_id]
            self._failing.pop(request_id, None)

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self, factory: Callable[[], LLMEngine], ready: concurrent.futures.Future) -> None:
        try:
            self._engine = factory()
            self.stats = self._engine.stats()
            if self._recorder is not None:
                self._recorder.load(self.stats)
        except BaseException as e:  # noqa: BLE001 - reported to start(); the thread ends
            ready.set_exception(e)
            return
        ready.set_result(None)
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - any step failure fails the whole engine
            err = e if isinstance(e, MnemosyneError) else WorkerFailedError(f"{self.name} failed: {e!r}")
            if not isinstance(e, MnemosyneError):
                log.exception("%s: engine failure", self.name)
            else:
                log.error("%s: engine failure: %s", self.name, e)
            self._failure = err
            self._loop.call_soon_threadsafe(self._fail_streams, err)
            self._fail_commands(err)
        finally:
            self._close_engine()
            self._fail_commands(WorkerFailedError(f"{self.name} is shut down"))

    def _serve(self) -> None:
        e = self._engine
        while True:
            busy = e.has_unfinished()
            if not self._drain_commands(block=not busy and not self._watches):
                return
            # A lost worker is replaced now (or fails the engine), not at the next request.
            lost = e.check_alive() if not busy else []
            t0 = time.perf_counter()
            outs = lost + (e.step() if e.has_unfinished() else [])
            seconds = time.perf_counter() - t0
            for o in outs:
                if o.request_id in self._routes:
                    if o.finish_reason is not None or o.error is not None:
                        self._routes.discard(o.request_id)
                    self._loop.call_soon_threadsafe(self._deliver, o.request_id, o)
            self._check_watches(e)
            self.stats = e.stats()
            if self._recorder is not None:
                self._recorder.step(seconds, outs, self.stats)
            if not outs and (busy or self._watches):
                # Waiting for KV to arrive / be confirmed: do not spin.
                if not self._drain_commands(block=True, timeout_s=POLL_S):
                    return

    def _drain_commands(self, block: bool, timeout_s: float = 0.5) -> bool:
        """Runs queued commands; blocks for the first one (up to timeout_s) when `block`.
        False when shutdown was requested."""
        first = True
        while True:
            try:
                item = self._commands.get(block=block and first, timeout=timeout_s if block and first else None)
            except queue.Empty:
                return not self._stopping
            first = False
            if item is None:
                return False
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self._engine))
            except MnemosyneError as exc:
                fut.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 - a bug in a command must not kill the engine
                log.exception("%s: command failed", self.name)
                fut.set_exception(exc)

    def _check_watches(self, e: Any) -> None:
        now = time.monotonic()
        for rid, (fut, since, timeout_s) in list(self._watches.items()):
            state, reason = e.kv_status(rid)
            deadline = max(since, e.kv_progress(rid) or since) + timeout_s
            if state == "failed" and now < deadline:
                if now - self._failing.setdefault(rid, now) < FAILURE_CONFIRM_S:
                    continue
            elif state == "pending" and now < deadline:
                self._failing.pop(rid, None)
                continue
            del self._watches[rid]
            self._failing.pop(rid, None)
            if state == "done":
                _settle(fut, None)
            else:
                _settle(fut, kv_transfer_error(reason or f"KV of request {rid} stopped being confirmed: nothing "
                                                       f"new for {timeout_s:g} s (kv_timeout_s)"))

    def _fail_commands(self, err: MnemosyneError) -> None:
        for fut, *_ in self._watches.values():
            _settle(fut, err)
        self._watches.clear()
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(err)

    def _close_engine(self) -> None:
        e, self._engine = self._engine, None
        if e is None:
            return
        self.perf_model = getattr(e, "perf_model", None)   # outlives the engine: a restart reuses it
        try:
            e.shutdown()                                # aborts what runs, then stops the executor
        except Exception:  # noqa: BLE001 - shutting down a failed grid must not raise
            log.exception("%s: engine shutdown", self.name)
        self.stats = EngineStats(total_blocks=self.stats.total_blocks, free_blocks=self.stats.total_blocks)
        if self._recorder is not None:
            self._recorder.load(self.stats)

    # ---- loop side ---------------------------------------------------------------------------
    def _deliver(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.queue.put_nowait(item)

    def _fail_streams(self, err: BaseException) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(err)

    def _check(self) -> None:
        if self._failure is not None:
            raise WorkerFailedError(f"{self.name} failed: {self._failure}")
        if self._thread is None or self._stopping:
            raise WorkerFailedError(f"{self.name} is not running")


async def keep_alive(holder: Any, factory: Callable[["AsyncEngine"], LLMEngine], *, name: str,
                     on_down: Callable[[MnemosyneError], Awaitable[None]], on_up: Callable[[], Awaitable[None]],
                     restart: bool = True, poll_s: float = 0.2) -> None:
    """Supervises `holder.engine` (an AsyncEngine) until cancelled. When it fails: `on_down(error)`
    (leave the pool: its requests have already failed), shut it down, then, if `restart`, build a
    fresh one with `factory(the failed AsyncEngine)` on its own thread (it may reuse what did not die
    with the workers: its `perf_model`), put it in `holder.engine` and `on_up()`."""
    while True:
        await asyncio.sleep(poll_s)
        err = holder.engine.failed
        if err is None:
            continue
        t0 = time.monotonic()
        log.error("%s failed (%s): leaving the pool", name, err)
        await on_down(err)
        old = holder.engine
        await old.shutdown()
        t_down = time.monotonic()
        if not restart:
            return
        try:
            holder.engine = await AsyncEngine.start(lambda: factory(old), name=name, metrics=old.metrics)
            await on_up()
        except Exception:  # noqa: BLE001 - stay out of the pool; the process stays up to be inspected
            log.exception("%s: restart failed", name)
            return
        log.info("%s restarted in %.1f s (%.1f s to leave and shut down, %.1f s to build and rejoin)", name,
                 time.monotonic() - t0, t_down - t0, time.monotonic() - t_down)
