"""The router's admission gate: common/admission.py's decisions, driven by live load.

    gate = AdmissionGate(config, metrics, discovery)
    gate.start()                                  # the load watcher (a task)
    d = await gate.admit(request)                 # ADMIT decision, or raises (RESOURCE_EXHAUSTED)
    ...
    await gate.stop()

Load comes from the kvstore's listing of the instances: each sends its load with its heartbeats
(every heartbeat_interval_s, 0.25 s by default; common/pool_load.py), and the listing gives it with
its age on Redis's clock (common.admission.heartbeat_loads), read every scrape_interval_s. With
--prometheus-url it comes from that Prometheus server instead. The gate never fetches a URL an
instance registered (registrations hold none). The models come from the registrations too: every
instance publishes the performance model, budget, chunking and TBT SLO its scheduler runs with
(Instance.scheduling); the decode pool's TBT SLO is the default one. A queued request waits for a
poll() that admits or rejects it (after each load read, when a request ends, and at the request's own
latest start, so a rejection is never later than its deadline plus the loop's delay); every wait is
bounded by the controller (max_queue_wait_s, the request's TTFT SLO). `observe_ttft` feeds each
admitted request's measured TTFT back (the online correction, exported as
mnemosyne_admission_ttft_correction_ratio and _overhead_seconds, the host contention factor,
mnemosyne_admission_host_contention_factor, and the load factor, mnemosyne_admission_load_factor).
"""
from __future__ import annotations

import asyncio
import logging
import time

from common.admission import (AdmissionConfig, AdmissionController, AdmissionRequest, Decision,
                              LoadSnapshot, Outcome, PoolModel, PrometheusSource, heartbeat_loads)
from common.config import SchedulerConfig
from common.errors import CapacityError
from common.metadata.types import Instance, SchedulingInfo
from common.metrics import Metrics
from common.perf_model.calibrated import CalibratedModel
from services.router.config import RouterConfig
from services.router.discovery import Discovery

log = logging.getLogger(__name__)

#: The deadline poll runs this long after the earliest queued request's latest start (asyncio may run a
#: timer up to its clock's resolution early; the controller rejects a request only once its time has come).
DEADLINE_SLACK_S = 0.002


def admission_config(config: RouterConfig) -> AdmissionConfig:
    """The router's SLO defaults (config.slo) and queue bounds."""
    return AdmissionConfig(slo=config.slo, short_prompt_tokens=config.short_prompt_tokens,
                           max_queue=config.max_queue, max_queue_wait_s=config.max_queue_wait_s,
                           max_staleness_s=config.max_staleness_s)


def fallback_model() -> PoolModel:
    """For instances that published no performance model (an older build): a linear guess, 20 ms
    per iteration plus 0.5 ms per token, under the scheduler's default budget. The online
    correction (observe_ttft) and the observed slowdown pull it toward what is measured."""
    return PoolModel.build(CalibratedModel([5e-4, 0.0, 0.0, 0.0, 0.02]), SchedulerConfig().iteration_budget())


class AdmissionGate:
    def __init__(self, config: RouterConfig, metrics: Metrics, discovery: Discovery) -> None:
        self.config = config
        self.metrics = metrics
        self.discovery = discovery
        model = fallback_model()
        self._prefill_model = model
        self.controller = AdmissionController(admission_config(config), decode=model, prefill=model)
        self._published: dict[str, tuple[SchedulingInfo, PoolModel]] = {}
        for role in ("prefill", "decode"):
            metrics.set_ttft_correction(role, 1.0, 0.0)
            metrics.set_host_contention(role, 1.0)
            metrics.set_load_factor(role, 1.0)
        self.snapshot = LoadSnapshot({}, -1e9)
        self._waiting: dict[str, asyncio.Future[Decision]] = {}
        self._source: PrometheusSource | None = None      # None: the kvstore's heartbeat loads
        self._task: asyncio.Task[None] | None = None
        self._fresh = asyncio.Event()
        self._deadline: asyncio.TimerHandle | None = None   # a poll at the queue's earliest latest start

    def start(self) -> None:
        if self.config.prometheus_url:
            self._source = PrometheusSource(self.config.prometheus_url, pool=self.config.deployment,
                                            timeout_s=min(2.0, self.config.rpc_timeout_s))
        self._task = asyncio.create_task(self._watch(), name="admission-load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(CapacityError("the router is shutting down"))

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - the load goes stale; admission then rejects
                log.warning("admission load: %s", e)
            await asyncio.sleep(self.config.scrape_interval_s)

    async def refresh(self, fresh: bool = False) -> None:
        """Reads the load once now: the kvstore's listing, always asked now (it carries the
        heartbeats' loads; the discovery cache is refreshed with it), or, with a Prometheus source,
        that server (the registrations from the discovery cache, or asked now when `fresh`)."""
        instances = await self.discovery.instances(fresh=fresh or self._source is None)
        self.use_models(instances)
        if self._source is None:
            snap = heartbeat_loads(instances, time.monotonic(), self.config.deployment)
        else:
            snap = await asyncio.to_thread(self._source.scrape)
        for where, err in snap.errors.items():
            log.debug("load source %s: %s", where, err)
        self._on_snapshot(snap)

    async def _observable(self, fresh: bool = False) -> bool:
        """Whether admission can see any instance: from the heartbeats, only instances that sent a
        load can be judged; with none (none registered, or none that reports its load) the
        kvstore's placement is the only check."""
        if self._source is not None:
            return True
        return any(i.load is not None for i in await self.discovery.instances(fresh=fresh))

    def use_models(self, instances: list[Instance]) -> None:
        """Judges each instance by the model it published (rebuilt only when its publication
        changes); each pool's default model (deadlines, instances without one) is that of its
        first instance by id; the default TBT SLO is the smallest a decode instance published."""
        models: dict[str, PoolModel] = {}
        for inst in sorted(instances, key=lambda i: i.instance_id):
            if inst.scheduling is None:
                continue
            cached = self._published.get(inst.instance_id)
            if cached is None or cached[0] != inst.scheduling:
                built = PoolModel.published(inst.scheduling, inst.kvp_tokens)
                if built is None:
                    continue
                cached = self._published[inst.instance_id] = (inst.scheduling, built)
            models[inst.instance_id] = cached[1]
        self._published = {k: v for k, v in self._published.items() if k in models}
        ctl = self.controller
        ctl.models = models
        firsts = {}
        for inst in sorted(instances, key=lambda i: i.instance_id):
            if inst.instance_id in models:
                firsts.setdefault(inst.role, models[inst.instance_id])
        if "decode" in firsts:
            ctl.decode = firsts["decode"]
        if "prefill" in firsts:
            self._prefill_model = firsts["prefill"]
        tbts = [i.scheduling.tbt_slo_s for i in instances if i.role == "decode" and i.scheduling is not None]
        ctl.tbt_slo_s = min(tbts) if tbts else ctl.config.tbt_slo_s
        self.metrics.set_tbt_target(ctl.tbt_slo_s)      # the dashboard's TBT line: what requests get

    def progress(self, request_id: str, tokens_done: int) -> None:
        """An admitted request's prefill progress (the prefill instance's stream, or the decode
        instance's when it prefills the prompt itself)."""
        self.controller.progress(request_id, tokens_done, time.monotonic())

    def first_token(self, request_id: str) -> None:
        """An admitted request got its first token."""
        self.controller.first_token(request_id, time.monotonic())

    def ended(self, request_id: str) -> None:
        """An admitted request ended (finished, failed or cancelled)."""
        self.controller.ended(request_id, time.monotonic())

    def observe_ttft(self, decision: Decision | None, ttft_s: float) -> None:
        """An admitted request's measured TTFT (seconds from arrival): the online correction learns."""
        if decision is None or decision.pool == "":
            return
        self.controller.observe_ttft(decision, ttft_s)
        corr = self.controller.correction(decision.pool)
        self.metrics.set_ttft_correction(decision.pool, corr.ratio, corr.overhead_s)
        self.metrics.set_host_contention(decision.pool, self.controller.contention[decision.pool].factor)
        self.metrics.set_load_factor(decision.pool, self.controller.load[decision.pool].factor)

    def _on_snapshot(self, snap: LoadSnapshot) -> None:
        self.snapshot = snap
        self._fresh.set()
        self.poll()

    def _select_prefill(self) -> None:
        """Long prompts take the prefill pool only while a prefill instance is seen; otherwise they
        are judged as prefilled by the decode instance (the router's decode-only fallback)."""
        seen = any(l.role == "prefill" for l in self.snapshot.loads.values())
        self.controller.prefill = self._prefill_model if seen else None

    def poll(self) -> None:
        """Admits or rejects queued requests against the latest load (also when a request ends)."""
        self._select_prefill()
        for req, d in self.controller.poll(self.snapshot, time.monotonic()):
            fut = self._waiting.pop(req.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(d)
        self.metrics.set_admission_queue(self.controller.queue_length)
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        """One timer for the whole queue, at its earliest latest start (where the controller rejects a
        request still queued): a rejection at its deadline, not at the next load read (up to
        scrape_interval_s and the listing's round trip later, which a burst that fills the event loop
        stretches). The poll it runs arms it again for the next deadline."""
        when = self.controller.next_expiry()
        if when is None:
            return                                      # a timer already armed fires once, harmlessly
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:                            # polled outside the event loop (tests)
            return
        at = loop.time() + max(0.0, when - time.monotonic()) + DEADLINE_SLACK_S
        if self._deadline is not None:
            if self._deadline.when() <= at:             # an earlier poll re-arms it after it runs
                return
            self._deadline.cancel()
        self._deadline = loop.call_at(at, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        self.poll()

    async def admit(self, req: AdmissionRequest) -> Decision | None:
        """An ADMIT decision (instances chosen), after queueing if needed; None when no instance is
        observable (the kvstore decides alone); raises the rejection's error (AdmissionRejected:
        RESOURCE_EXHAUSTED with a retry hint; or INVALID_ARGUMENT)."""
        if not await self._observable() and not await self._observable(fresh=True):
            self.metrics.observe_admission("admitted", "unobserved")
            return None
        if not self._fresh.is_set():       # first load read after start: wait for it (bounded)
            try:
                await asyncio.wait_for(self._fresh.wait(), self.config.max_staleness_s)
            except asyncio.TimeoutError:
                pass
        self.use_models(await self.discovery.instances())
        self._select_prefill()
        d = self.controller.decide(req, self.snapshot, time.monotonic())
        if d.outcome is Outcome.REJECT and d.reason == "no_instance":
            # An instance that (re)joined since the last read: read the load now, decide again.
            try:
                await asyncio.wait_for(self.refresh(fresh=True), self.config.rpc_timeout_s)
            except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - keep the rejection
                log.debug("admission refresh: %s", e)
            self._select_prefill()
            d = self.controller.decide(req, self.snapshot, time.monotonic())
        self.metrics.observe_admission(d.outcome.value, d.reason)
        if d.outcome is Outcome.QUEUE:
            fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
            self._waiting[req.request_id] = fut
            self.metrics.set_admission_queue(self.controller.queue_length)
            self._arm_deadline()                         # judged again at its latest start at the latest
            try:
                # The controller bounds the wait (latest_start_s); the timeout is a safety net.
                d = await asyncio.wait_for(fut, self.config.max_queue_wait_s + 5 * self.config.scrape_interval_s)
            except asyncio.TimeoutError:
                self.controller.cancel(req.request_id)
                raise CapacityError(f"request {req.request_id}: admission queue wait timed out") from None
            finally:
                if self._waiting.pop(req.request_id, None) is not None:
                    self.controller.cancel(req.request_id)       # the client gave up
                self.metrics.set_admission_queue(self.controller.queue_length)
            self.metrics.observe_admission(d.outcome.value, d.reason)
        if d.outcome is Outcome.REJECT:
            raise d.error(req.request_id)
        return d
