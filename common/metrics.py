"""Every Mnemosyne metric, defined once, and the few calls the services make to record them.

One `CollectorRegistry` per process, created by `new_registry()` and passed explicitly; `Metrics`
registers every family below on it and binds the process's identity labels, so a service records a
value in one call:

    registry = new_registry()
    metrics = Metrics(registry, role="decode", pool=config.deployment, instance=instance_id,
                      model_name="SmolLM2-135M-Instruct")
    server = serve_metrics(config.metrics_port, registry, host=config.host)   # server.port, .close()
    metrics.observe_iteration(0.031, num_seqs=12, chunk_tokens=(256,), generated_tokens=11)

Identity labels on every family: `pool` (the deployment: router, pools and kvstore of one model share
it), `role` (router | prefill | decode | kvstore), `instance` (the instance id). Scrape with
`honor_labels: true` so Prometheus keeps the service's `instance` (deploy/prometheus/). The
request-level families (marked * below: per_model in their Spec) also carry `model_name`, the served
model's name (the router's Frontend.name; a pool's --model-name or its checkpoint's name).

| family                                         | type      | extra labels              | recorded by |
|------------------------------------------------|-----------|---------------------------|-------------|
| mnemosyne_time_to_first_token_seconds*         | histogram | prompt_class              | router (RequestRecorder / observe_request_done) |
| mnemosyne_time_between_tokens_seconds*         | histogram |                           | router, per streamed token after the first |
| mnemosyne_request_latency_seconds*             | histogram | prompt_class              | router, arrival to last token |
| mnemosyne_queue_time_seconds*                  | histogram |                           | router (admission queue), prefill/decode (waiting to first chunk) |
| mnemosyne_requests_finished_total*             | counter   | finish_reason             | router |
| mnemosyne_slo_requests_total*                  | counter   | slo, result               | router: ttft/tbt met or missed, per admitted request |
| mnemosyne_slo_target_seconds                   | gauge     | slo, prompt_class         | router: TTFT from its SLO config, TBT the decode pool's published one (dashboard lines) |
| mnemosyne_slo_objective_ratio                  | gauge     | slo                       | router, the objective (e.g. 0.99) for error budgets |
| mnemosyne_admission_decisions_total*           | counter   | outcome, reason           | router (common/admission.py decisions) |
| mnemosyne_request_retries_total                | counter   | reason                    | router: requests re-placed after an instance failed before their first token |
| mnemosyne_admission_queued_requests            | gauge     |                           | router, admission queue length |
| mnemosyne_router_prefix_matched_tokens_total   | counter   |                           | router: prompt tokens found cached (kvstore prefix index) where the request was sent |
| mnemosyne_router_prefix_routed_total           | counter   | target                    | router: requests by cache-aware route: decode (a decode instance holds the prefix, the rest prefilled there), prefill (the prefill instance with the longest match), miss (no cached prefix used) |
| mnemosyne_admission_ttft_correction_ratio      | gauge     | member_role               | router: a pool's online TTFT correction, its ratio ... |
| mnemosyne_admission_ttft_overhead_seconds      | gauge     | member_role               | ... and its fixed overhead (corrected = overhead + ratio x predicted) |
| mnemosyne_admission_host_contention_factor     | gauge     | member_role               | router: how much slower a pool's instance runs while a neighbour on its host computes (1 = no effect seen) |
| mnemosyne_admission_load_factor                | gauge     | member_role               | router: how much longer requests admitted to a loaded instance take than predicted (1 = no effect seen) |
| mnemosyne_active_requests*                     | gauge     |                           | every service: requests in flight here |
| mnemosyne_rpc_errors_total                     | counter   | method, code              | every gRPC server (MetricsInterceptor) |
| mnemosyne_tokens_total*                        | counter   | kind (prompt, generated)  | prefill/decode engines, tokens computed |
| mnemosyne_prefill_chunk_tokens                 | histogram |                           | prefill/decode engines, per prefill chunk |
| mnemosyne_iteration_seconds                    | histogram |                           | prefill/decode engines, per engine step |
| mnemosyne_batch_size                           | histogram |                           | prefill/decode engines, sequences per step |
| mnemosyne_scheduler_queued_prefill_tokens      | gauge     |                           | prefill/decode: prompt tokens not yet prefilled |
| mnemosyne_scheduler_running_decodes            | gauge     |                           | decode: requests in the decode phase |
| mnemosyne_scheduler_waiting_requests           | gauge     |                           | prefill/decode: requests not yet scheduled |
| mnemosyne_perf_model_scale                     | gauge     |                           | prefill/decode: the scheduler's performance model's online scale (measured / profiled); LARS weighs work at it |
| mnemosyne_worker_replacements_total            | counter   |                           | prefill/decode: grid workers that died and were replaced in place (the others kept their KV) |
| mnemosyne_kv_blocks_used / _free               | gauge     | group, tp_rank            | prefill/decode workers (group: KVP group, or SPP stage on prefill) |
| mnemosyne_kv_blocks_cached                     | gauge     | group, tp_rank            | prefill/decode: free blocks still holding a cached prefix (reclaimable, part of _free) |
| mnemosyne_kv_blocks_quarantined                | gauge     | group, tp_rank            | decode: blocks withheld for good (a granted NIXL write neither finished nor was recalled; part of _used) |
| mnemosyne_prefix_cache_query_tokens_total*     | counter   |                           | prefill/decode engines: prompt tokens of requests started here (looked up in the prefix cache) |
| mnemosyne_prefix_cache_hit_tokens_total*       | counter   |                           | ... of them, tokens whose KV came from the cache (not computed); hit rate = hit / query |
| mnemosyne_kv_block_size_tokens                 | gauge     |                           | prefill/decode (admission turns tokens into blocks) |
| mnemosyne_kvp_group_tokens                     | gauge     |                           | decode: M, tokens per KVP group (0 = one group) |
| mnemosyne_kv_transfer_bytes_total              | counter   | backend, direction        | prefill (send) / decode (recv) |
| mnemosyne_kv_transfer_seconds                  | histogram | backend, direction        | prefill / decode, per transfer |
| mnemosyne_kv_transfer_failures_total           | counter   | backend, direction        | prefill / decode |
| mnemosyne_kvstore_lease_expiries_total         | counter   |                           | kvstore (deployment-wide count from Redis: aggregate with max) |
| mnemosyne_kvstore_reservations_total           | counter   | outcome                   | kvstore Reserve |
| mnemosyne_kvstore_placements                   | gauge     |                           | kvstore: live placements |
| mnemosyne_kvstore_live_instances               | gauge     | member_role               | kvstore: instances with a live heartbeat |

Plus the standard process_* collector. Buckets: TTFT 10 ms .. 10 min, TBT 1 ms .. 2 s (see below).
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import start_http_server

from common.errors import CapacityError, ConfigError, InvalidRequestError, PlacementError
from common.rpc.handlers import run_first

log = logging.getLogger(__name__)

PREFIX = "mnemosyne_"
IDENTITY = ("pool", "role", "instance")
MODEL_LABEL = "model_name"                    # on the per_model (request-level) families
ROLES = ("router", "prefill", "decode", "kvstore")

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                300.0, 600.0)
TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
               1.0, 2.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                   1200.0, 1800.0, 3600.0)
QUEUE_BUCKETS = (0.001, 0.005) + TTFT_BUCKETS
ITERATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
CHUNK_BUCKETS = tuple(float(2 ** k) for k in range(4, 21))           # 16 .. 1Mi tokens
BATCH_BUCKETS = tuple(float(2 ** k) for k in range(0, 10))           # 1 .. 512 sequences
TRANSFER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

SLOS = ("ttft", "tbt")
SLO_RESULTS = ("met", "missed")
FINISH_REASONS = ("stop", "length", "abort", "error")
TOKEN_KINDS = ("prompt", "generated")
DIRECTIONS = ("send", "recv")
ADMISSION_OUTCOMES = ("admitted", "queued", "rejected")
PREFIX_ROUTES = ("decode", "prefill", "miss")    # mnemosyne_router_prefix_routed_total's targets
RESERVATION_OUTCOMES = ("reserved", "no_capacity", "invalid", "unknown_instance", "error")


@dataclass(frozen=True)
class Spec:
    """One metric family: its name (full, with unit and _total), type, extra labels, buckets, and
    the roles that record it (their children of enumerable labels are created at 0 up front, so
    rates and ratios exist before the first event)."""
    name: str
    kind: str                                   # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    recorded_by: tuple[str, ...] = ROLES
    per_model: bool = False                     # request-level: labelled with the served model_name


SPECS: tuple[Spec, ...] = (
    Spec("mnemosyne_time_to_first_token_seconds", "histogram",
         "Time from the router receiving a request to its first token leaving the router.",
         ("prompt_class",), TTFT_BUCKETS, ("router",), per_model=True),
    Spec("mnemosyne_time_between_tokens_seconds", "histogram",
         "Gap between consecutive streamed tokens of a request (one observation per token).",
         (), TBT_BUCKETS, ("router",), per_model=True),
    Spec("mnemosyne_request_latency_seconds", "histogram",
         "End-to-end request latency: arrival to the final message.",
         ("prompt_class",), LATENCY_BUCKETS, ("router",), per_model=True),
    Spec("mnemosyne_queue_time_seconds", "histogram",
         "Time a request waited before service: router admission queue, or an engine's waiting "
         "queue before its first scheduled chunk.", (), QUEUE_BUCKETS, per_model=True),
    Spec("mnemosyne_requests_finished_total", "counter",
         "Requests that ended, by finish reason (stop, length, abort, error).",
         ("finish_reason",), (), ("router",), per_model=True),
    Spec("mnemosyne_slo_requests_total", "counter",
         "Admitted requests judged against their own SLO: ttft (first token by the deadline) and "
         "tbt (mean time between tokens within the SLO).", ("slo", "result"), (), ("router",), per_model=True),
    Spec("mnemosyne_slo_target_seconds", "gauge",
         "Default SLO targets from the router's configuration (per prompt class for ttft).",
         ("slo", "prompt_class"), (), ("router",)),
    Spec("mnemosyne_slo_objective_ratio", "gauge",
         "Fraction of requests that must meet the SLO (the error budget is 1 - this).",
         ("slo",), (), ("router",)),
    Spec("mnemosyne_admission_decisions_total", "counter",
         "Admission decisions by outcome (admitted, queued, rejected) and reason.",
         ("outcome", "reason"), (), ("router",), per_model=True),
    Spec("mnemosyne_request_retries_total", "counter",
         "Requests the router placed again (a new attempt) because an instance failed before their first "
         "token reached the client, by reason (the failure's error class).", ("reason",), (), ("router",)),
    Spec("mnemosyne_router_prefix_matched_tokens_total", "counter",
         "Prompt tokens the router found cached (the kvstore's prefix index) on the instance it sent each "
         "request to prefill on.", (), (), ("router",)),
    Spec("mnemosyne_router_prefix_routed_total", "counter",
         "Requests by cache-aware route: decode (a decode instance holding the prefix prefills the rest), "
         "prefill (the prefill instance with the longest cached prefix), miss (no cached prefix used).",
         ("target",), (), ("router",)),
    Spec("mnemosyne_admission_queued_requests", "gauge",
         "Requests waiting in the router's admission queue.", (), (), ("router",)),
    Spec("mnemosyne_admission_ttft_correction_ratio", "gauge",
         "Admission's online correction of a pool's predicted TTFTs (corrected = overhead + ratio x "
         "predicted, fitted on measured TTFTs): the ratio (1 = the pool's own model is right).",
         ("member_role",), (), ("router",)),
    Spec("mnemosyne_admission_ttft_overhead_seconds", "gauge",
         "Admission's online correction of a pool's predicted TTFTs: the fixed overhead per request.",
         ("member_role",), (), ("router",)),
    Spec("mnemosyne_admission_host_contention_factor", "gauge",
         "Admission's online estimate of how much slower a pool's instance runs while another instance "
         "on its host is prefilling (fitted on measured TTFTs; 1 = no effect seen).",
         ("member_role",), (), ("router",)),
    Spec("mnemosyne_admission_load_factor", "gauge",
         "Admission's online estimate of how much longer a request admitted to a loaded instance (work "
         "queued ahead, decodes running) takes than its corrected prediction (1 = no effect seen).",
         ("member_role",), (), ("router",)),
    Spec("mnemosyne_active_requests", "gauge", "Requests in flight in this process.", per_model=True),
    Spec("mnemosyne_process_peak_rss_bytes", "gauge",
         "Peak resident memory (Linux VmHWM) of this service's process (process=main) and the largest "
         "of its live child processes, e.g. a pool's grid workers (process=workers; 0 without any).",
         ("process",)),
    Spec("mnemosyne_rpc_errors_total", "counter",
         "gRPC calls served by this process that ended with a non-OK status.", ("method", "code")),
    Spec("mnemosyne_tokens_total", "counter",
         "Tokens computed by the engine: prompt (prefilled, recomputation included) and generated.",
         ("kind",), (), ("prefill", "decode"), per_model=True),
    Spec("mnemosyne_prefill_chunk_tokens", "histogram", "Tokens in each scheduled prefill chunk.",
         (), CHUNK_BUCKETS, ("prefill", "decode")),
    Spec("mnemosyne_iteration_seconds", "histogram", "Wall time of one engine iteration (step).",
         (), ITERATION_BUCKETS, ("prefill", "decode")),
    Spec("mnemosyne_batch_size", "histogram", "Sequences in one engine iteration.",
         (), BATCH_BUCKETS, ("prefill", "decode")),
    Spec("mnemosyne_scheduler_queued_prefill_tokens", "gauge",
         "Prompt tokens admitted to this instance and not yet prefilled.", (), (), ("prefill", "decode")),
    Spec("mnemosyne_scheduler_running_decodes", "gauge",
         "Requests in the decode phase on this instance.", (), (), ("prefill", "decode")),
    Spec("mnemosyne_scheduler_waiting_requests", "gauge",
         "Requests on this instance not scheduled yet.", (), (), ("prefill", "decode")),
    Spec("mnemosyne_perf_model_scale", "gauge",
         "The online scale of the scheduler's performance model (measured / profiled iteration time, a moving "
         "average): the level LARS weighs prompts' work at, and admission's copy of its order.",
         (), (), ("prefill", "decode")),
    Spec("mnemosyne_worker_replacements_total", "counter",
         "Grid workers that died and were replaced in place: the other workers kept their processes and KV, "
         "the requests that lost KV computed it again (or, still receiving it, were retried).",
         (), (), ("prefill", "decode")),
    Spec("mnemosyne_kv_blocks_used", "gauge", "KV cache blocks in use, per worker.",
         ("group", "tp_rank"), (), ("prefill", "decode")),
    Spec("mnemosyne_kv_blocks_free", "gauge", "KV cache blocks free, per worker.",
         ("group", "tp_rank"), (), ("prefill", "decode")),
    Spec("mnemosyne_kv_blocks_cached", "gauge",
         "KV cache blocks free but still holding a cached prefix (reclaimable, counted as free), per worker.",
         ("group", "tp_rank"), (), ("prefill", "decode")),
    Spec("mnemosyne_kv_blocks_quarantined", "gauge",
         "KV cache blocks withheld for good: a KV write granted before their request was cancelled may still "
         "land in them (counted as used), per worker.", ("group", "tp_rank"), (), ("prefill", "decode")),
    Spec("mnemosyne_prefix_cache_query_tokens_total", "counter",
         "Prompt tokens of the requests started on this instance (each looked up in the prefix cache).",
         (), (), ("prefill", "decode"), per_model=True),
    Spec("mnemosyne_prefix_cache_hit_tokens_total", "counter",
         "Prompt tokens whose KV came from the prefix cache instead of being computed.",
         (), (), ("prefill", "decode"), per_model=True),
    Spec("mnemosyne_kv_block_size_tokens", "gauge", "Tokens per KV cache block.",
         (), (), ("prefill", "decode")),
    Spec("mnemosyne_kvp_group_tokens", "gauge",
         "Tokens one KVP group holds (M); 0 when one group holds any length.", (), (), ("decode",)),
    Spec("mnemosyne_kv_transfer_bytes_total", "counter", "KV bytes transferred between instances.",
         ("backend", "direction"), (), ("prefill", "decode")),
    Spec("mnemosyne_kv_transfer_seconds", "histogram", "Duration of one KV transfer.",
         ("backend", "direction"), TRANSFER_BUCKETS, ("prefill", "decode")),
    Spec("mnemosyne_kv_transfer_failures_total", "counter", "KV transfers that failed or timed out.",
         ("backend", "direction"), (), ("prefill", "decode")),
    Spec("mnemosyne_kvstore_lease_expiries_total", "counter",
         "Placement leases that expired (deployment-wide count kept in Redis).", (), (), ("kvstore",)),
    Spec("mnemosyne_kvstore_reservations_total", "counter", "Reserve calls by outcome.",
         ("outcome",), (), ("kvstore",)),
    Spec("mnemosyne_kvstore_placements", "gauge", "Live placements (not released, not reaped).",
         (), (), ("kvstore",)),
    Spec("mnemosyne_kvstore_live_instances", "gauge", "Registered instances with a live heartbeat.",
         ("member_role",), (), ("kvstore",)),
)

SPEC_BY_NAME = {s.name: s for s in SPECS}

# Label values known in advance: children created at 0 for the roles that record the family.
_KNOWN_VALUES: dict[str, tuple[str, ...]] = {
    "slo": SLOS, "result": SLO_RESULTS, "finish_reason": FINISH_REASONS, "kind": TOKEN_KINDS,
    "outcome": RESERVATION_OUTCOMES, "member_role": ("prefill", "decode"), "target": PREFIX_ROUTES,
}
_PREINIT = {"mnemosyne_slo_requests_total", "mnemosyne_requests_finished_total",
            "mnemosyne_worker_replacements_total", "mnemosyne_tokens_total", "mnemosyne_kvstore_reservations_total",
            "mnemosyne_kvstore_live_instances", "mnemosyne_time_to_first_token_seconds",
            "mnemosyne_request_latency_seconds", "mnemosyne_active_requests",
            "mnemosyne_admission_queued_requests", "mnemosyne_scheduler_queued_prefill_tokens",
            "mnemosyne_scheduler_running_decodes", "mnemosyne_scheduler_waiting_requests",
            "mnemosyne_kvstore_lease_expiries_total", "mnemosyne_kvstore_placements",
            "mnemosyne_prefix_cache_query_tokens_total", "mnemosyne_prefix_cache_hit_tokens_total",
            "mnemosyne_router_prefix_matched_tokens_total", "mnemosyne_router_prefix_routed_total"}


def exposed_names(spec: Spec) -> tuple[str, ...]:
    """The sample names a family shows in the exposition (and so in PromQL)."""
    if spec.kind == "histogram":
        return tuple(spec.name + s for s in ("_bucket", "_sum", "_count"))
    return (spec.name,)


@dataclass(frozen=True)
class PromptClasses:
    """Prompt-length classes (the `prompt_class` label; TTFT SLOs are per class): a prompt of n
    tokens is in the first class whose upper bound exceeds n; the last bound is infinite."""
    bounds: tuple[tuple[str, float], ...] = (("short", 8192), ("medium", 131072),
                                             ("long", 1048576), ("xlong", math.inf))

    def __post_init__(self) -> None:
        uppers = [b for _, b in self.bounds]
        if not self.bounds or uppers != sorted(uppers) or uppers[-1] != math.inf:
            raise ConfigError(f"prompt classes must have increasing bounds ending with inf, "
                              f"got {self.bounds}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.bounds)

    def of(self, prompt_tokens: int) -> str:
        return next(n for n, b in self.bounds if prompt_tokens < b)


DEFAULT_PROMPT_CLASSES = PromptClasses()


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size of process `pid` in bytes (Linux: VmHWM from /proc; elsewhere this
    process's ru_maxrss); 0 when it cannot be read (the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if pid == "self":
        import resource
        import sys
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
    return 0


def child_pids(parent: int | None = None) -> list[int]:
    """Live child processes of `parent` (default: this process), from /proc (empty elsewhere)."""
    import os
    parent = os.getpid() if parent is None else parent
    try:           # per thread: a child belongs to the thread that started it (e.g. an engine thread)
        tasks = os.listdir(f"/proc/{parent}/task")
        found = []
        for task in tasks:
            with contextlib.suppress(OSError), open(f"/proc/{parent}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
        if os.path.exists(f"/proc/{parent}/task/{parent}/children"):
            return sorted(set(found))
    except OSError:
        pass
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == parent:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def new_registry(process_collector: bool = True) -> CollectorRegistry:
    """A fresh per-process registry (with the process_* collector unless disabled)."""
    registry = CollectorRegistry(auto_describe=True)
    if process_collector:
        ProcessCollector(registry=registry)
    return registry


@dataclass(frozen=True)
class RequestTiming:
    """What the router knows when a request ends (seconds on one clock; None = did not happen).

    ttft_slo_s / tbt_slo_s: the SLO this request was admitted under (its own or the default);
    None = not judged. token_times: when each token left the router (for TBT); may be omitted when
    the gaps were already observed live (RequestRecorder)."""
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    latency_s: float
    ttft_s: float | None = None
    queue_s: float | None = None
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    mean_tbt_s: float | None = None
    token_gaps_s: tuple[float, ...] = ()


class Metrics:
    """All families on one registry, with this process's identity labels bound. Thread-safe (the
    prometheus-client primitives are). Attribute `family[name]` gives the raw family."""

    def __init__(self, registry: CollectorRegistry, *, role: str, pool: str = "default",
                 instance: str = "", model_name: str = "",
                 prompt_classes: PromptClasses = DEFAULT_PROMPT_CLASSES) -> None:
        """`model_name`: the served model (label of the per_model families; empty: the kvstore's,
        which serves none, and Prometheus then shows no model_name label)."""
        if role not in ROLES:
            raise ConfigError(f"metrics: role must be one of {ROLES}, got {role!r}")
        if not pool:
            raise ConfigError("metrics: pool must not be empty")
        self.registry = registry
        self.identity = {"pool": pool, "role": role, "instance": instance or role}
        self.model_name = model_name
        self._per_model = {s.name for s in SPECS if s.per_model}
        self.prompt_classes = prompt_classes
        self.family: dict[str, Any] = {}
        for spec in SPECS:
            self.family[spec.name] = _make(spec, registry)
        for spec in SPECS:
            if spec.name in _PREINIT and role in spec.recorded_by:
                for values in self._known_combinations(spec):
                    self._child(spec.name, **values)
        self._child("mnemosyne_process_peak_rss_bytes", process="main").set_function(peak_rss_bytes)
        self._child("mnemosyne_process_peak_rss_bytes", process="workers").set_function(
            lambda: max((peak_rss_bytes(pid) for pid in child_pids()), default=0))

    def _known_combinations(self, spec: Spec) -> list[dict[str, str]]:
        combos: list[dict[str, str]] = [{}]
        for label in spec.labels:
            values = self.prompt_classes.names if label == "prompt_class" else _KNOWN_VALUES[label]
            combos = [{**c, label: v} for c in combos for v in values]
        return combos

    def _child(self, name: str, **labels: str) -> Any:
        if name in self._per_model:
            return self.family[name].labels(**self.identity, model_name=self.model_name, **labels)
        return self.family[name].labels(**self.identity, **labels)

    # ---- every service ---------------------------------------------------------------------

    @contextlib.contextmanager
    def track_active(self) -> Iterator[None]:
        """`with metrics.track_active(): ...` counts a request in flight for the block."""
        g = self._child("mnemosyne_active_requests")
        g.inc()
        try:
            yield
        finally:
            g.dec()

    def observe_rpc_error(self, method: str, code: grpc.StatusCode | str) -> None:
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        self._child("mnemosyne_rpc_errors_total", method=method, code=name).inc()

    def observe_queue_time(self, seconds: float) -> None:
        self._child("mnemosyne_queue_time_seconds").observe(max(seconds, 0.0))

    # ---- router: requests, SLOs, admission -------------------------------------------------

    def request(self, prompt_tokens: int, *, ttft_slo_s: float | None = None,
                tbt_slo_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                arrival_s: float | None = None) -> "RequestRecorder":
        """A recorder for one request from its arrival (see RequestRecorder)."""
        return RequestRecorder(self, prompt_tokens, ttft_slo_s, tbt_slo_s, clock, arrival_s)

    def observe_first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        self._child("mnemosyne_time_to_first_token_seconds",
                    prompt_class=self.prompt_classes.of(prompt_tokens)).observe(ttft_s)

    def observe_token_gap(self, seconds: float) -> None:
        self._child("mnemosyne_time_between_tokens_seconds").observe(seconds)

    def observe_request_done(self, t: RequestTiming, *, live: bool = False) -> None:
        """Records a finished request in one call: latency, finish reason, SLO results, and (unless
        `live`, i.e. a RequestRecorder already observed them as they happened) TTFT, token gaps and
        queue time. SLO rules: ttft met iff a first token came within ttft_slo_s; a request that
        failed before its first token missed it; a client abort before the first token is not
        judged. tbt met iff the mean gap (mean_tbt_s, else the mean of token_gaps_s) is within
        tbt_slo_s; judged only with >= 2 tokens."""
        cls = self.prompt_classes.of(t.prompt_tokens)
        if not live:
            if t.ttft_s is not None:
                self.observe_first_token(t.ttft_s, t.prompt_tokens)
            for gap in t.token_gaps_s:
                self.observe_token_gap(gap)
            if t.queue_s is not None:
                self.observe_queue_time(t.queue_s)
        self._child("mnemosyne_request_latency_seconds", prompt_class=cls).observe(t.latency_s)
        reason = t.finish_reason if t.finish_reason in FINISH_REASONS else "error"
        self._child("mnemosyne_requests_finished_total", finish_reason=reason).inc()
        if t.ttft_slo_s is not None:
            if t.ttft_s is not None:
                self._slo("ttft", t.ttft_s <= t.ttft_slo_s)
            elif reason != "abort":
                self._slo("ttft", False)
        mean_tbt = t.mean_tbt_s
        if mean_tbt is None and t.token_gaps_s:
            mean_tbt = sum(t.token_gaps_s) / len(t.token_gaps_s)
        if t.tbt_slo_s is not None and t.generated_tokens >= 2 and mean_tbt is not None:
            self._slo("tbt", mean_tbt <= t.tbt_slo_s)

    def _slo(self, slo: str, met: bool) -> None:
        self._child("mnemosyne_slo_requests_total", slo=slo,
                    result="met" if met else "missed").inc()

    def set_tbt_target(self, tbt_s: float) -> None:
        """The default TBT SLO requests are judged by (the router: what the decode pool publishes)."""
        self._child("mnemosyne_slo_target_seconds", slo="tbt", prompt_class="all").set(tbt_s)

    def set_slo_targets(self, ttft_s: Mapping[str, float], tbt_s: float,
                        objective: float | Mapping[str, float]) -> None:
        """Publishes the configured default SLOs: ttft per prompt class, tbt, and the objective."""
        for cls, seconds in ttft_s.items():
            self._child("mnemosyne_slo_target_seconds", slo="ttft", prompt_class=cls).set(seconds)
        self.set_tbt_target(tbt_s)
        for slo in SLOS:
            obj = objective if isinstance(objective, (int, float)) else objective[slo]
            self._child("mnemosyne_slo_objective_ratio", slo=slo).set(obj)

    def observe_admission(self, outcome: str, reason: str) -> None:
        if outcome not in ADMISSION_OUTCOMES:
            raise ValueError(f"admission outcome must be one of {ADMISSION_OUTCOMES}, got {outcome!r}")
        self._child("mnemosyne_admission_decisions_total", outcome=outcome, reason=reason).inc()

    def observe_prefix_route(self, target: str, matched_tokens: int) -> None:
        """A request routed: how (PREFIX_ROUTES) and the prompt tokens found cached where it went."""
        self._child("mnemosyne_router_prefix_routed_total", target=target).inc()
        if matched_tokens > 0:
            self._child("mnemosyne_router_prefix_matched_tokens_total").inc(matched_tokens)

    def observe_retry(self, reason: str) -> None:
        self._child("mnemosyne_request_retries_total", reason=reason).inc()

    def set_ttft_correction(self, member_role: str, ratio: float, overhead_s: float) -> None:
        self._child("mnemosyne_admission_ttft_correction_ratio", member_role=member_role).set(ratio)
        self._child("mnemosyne_admission_ttft_overhead_seconds", member_role=member_role).set(overhead_s)

    def set_host_contention(self, member_role: str, factor: float) -> None:
        self._child("mnemosyne_admission_host_contention_factor", member_role=member_role).set(factor)

    def set_load_factor(self, member_role: str, factor: float) -> None:
        self._child("mnemosyne_admission_load_factor", member_role=member_role).set(factor)

    def set_admission_queue(self, length: int) -> None:
        self._child("mnemosyne_admission_queued_requests").set(length)

    # ---- engines (prefill / decode) --------------------------------------------------------

    def observe_iteration(self, seconds: float, num_seqs: int, *, chunk_tokens: Iterable[int] = (),
                          generated_tokens: int = 0) -> None:
        """One engine step: its time, batch size, each prefill chunk, and the tokens it computed
        (prompt = the chunks' tokens, generated = tokens sampled for decoding sequences)."""
        self._child("mnemosyne_iteration_seconds").observe(seconds)
        self._child("mnemosyne_batch_size").observe(num_seqs)
        chunks = self._child("mnemosyne_prefill_chunk_tokens")
        prompt = 0
        for n in chunk_tokens:
            chunks.observe(n)
            prompt += n
        if prompt:
            self._child("mnemosyne_tokens_total", kind="prompt").inc(prompt)
        if generated_tokens:
            self._child("mnemosyne_tokens_total", kind="generated").inc(generated_tokens)

    def set_scheduler_load(self, *, queued_prefill_tokens: int, running_decodes: int,
                           waiting_requests: int, model_scale: float | None = None) -> None:
        """The load the router's admission reads (call after every step, or on change);
        `model_scale` None: the scheduler has no online-corrected model (the gauge is not set)."""
        self._child("mnemosyne_scheduler_queued_prefill_tokens").set(queued_prefill_tokens)
        self._child("mnemosyne_scheduler_running_decodes").set(running_decodes)
        self._child("mnemosyne_scheduler_waiting_requests").set(waiting_requests)
        if model_scale is not None:
            self._child("mnemosyne_perf_model_scale").set(model_scale)

    def observe_worker_replacements(self, count: int) -> None:
        """Grid workers replaced in place since the last call."""
        if count > 0:
            self._child("mnemosyne_worker_replacements_total").inc(count)

    def set_kv_blocks(self, group: int, tp_rank: int, *, used: int, free: int, cached: int = 0,
                      quarantined: int = 0) -> None:
        """`free` includes the `cached` blocks (reclaimable: an allocation evicts them), `used` the
        `quarantined` ones (withheld for good)."""
        labels = {"group": str(group), "tp_rank": str(tp_rank)}
        self._child("mnemosyne_kv_blocks_used", **labels).set(used)
        self._child("mnemosyne_kv_blocks_free", **labels).set(free)
        self._child("mnemosyne_kv_blocks_cached", **labels).set(cached)
        self._child("mnemosyne_kv_blocks_quarantined", **labels).set(quarantined)

    def observe_prefix_cache(self, prompt_tokens: int, hit_tokens: int) -> None:
        """A request started here: its prompt tokens, and how many of them the prefix cache held."""
        self._child("mnemosyne_prefix_cache_query_tokens_total").inc(prompt_tokens)
        if hit_tokens:
            self._child("mnemosyne_prefix_cache_hit_tokens_total").inc(hit_tokens)

    def set_kv_layout(self, block_size: int, kvp_tokens: int = 0) -> None:
        self._child("mnemosyne_kv_block_size_tokens").set(block_size)
        self._child("mnemosyne_kvp_group_tokens").set(kvp_tokens)

    def observe_kv_transfer(self, backend: str, direction: str, nbytes: int, seconds: float,
                            ok: bool = True) -> None:
        """One finished transfer (direction: send | recv). A failed one counts its bytes moved."""
        if direction not in DIRECTIONS:
            raise ValueError(f"kv transfer direction must be send or recv, got {direction!r}")
        labels = {"backend": backend, "direction": direction}
        if nbytes:
            self._child("mnemosyne_kv_transfer_bytes_total", **labels).inc(nbytes)
        if ok:
            self._child("mnemosyne_kv_transfer_seconds", **labels).observe(seconds)
        else:
            self._child("mnemosyne_kv_transfer_failures_total", **labels).inc()

    # ---- kvstore ---------------------------------------------------------------------------

    def observe_reservation(self, error: BaseException | None) -> None:
        """A Reserve call's outcome, from the error it raised (None = reserved)."""
        if error is None:
            outcome = "reserved"
        elif isinstance(error, CapacityError):
            outcome = "no_capacity"
        elif isinstance(error, InvalidRequestError):
            outcome = "invalid"
        elif isinstance(error, PlacementError):
            outcome = "unknown_instance"
        else:
            outcome = "error"
        self._child("mnemosyne_kvstore_reservations_total", outcome=outcome).inc()

    def add_lease_expiries(self, n: int) -> None:
        if n > 0:
            self._child("mnemosyne_kvstore_lease_expiries_total").inc(n)

    def set_placements(self, n: int) -> None:
        self._child("mnemosyne_kvstore_placements").set(n)

    def set_live_instances(self, member_role: str, n: int) -> None:
        self._child("mnemosyne_kvstore_live_instances", member_role=member_role).set(n)


def _make(spec: Spec, registry: CollectorRegistry) -> Any:
    labels = IDENTITY + ((MODEL_LABEL,) if spec.per_model else ()) + spec.labels
    if spec.kind == "counter":
        # prometheus-client appends _total itself
        return Counter(spec.name.removesuffix("_total"), spec.help, labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, labels, registry=registry)
    return Histogram(spec.name, spec.help, labels, registry=registry, buckets=spec.buckets)


class RequestRecorder:
    """One request as the router streams it: observes TTFT at the first token and each gap after,
    then the rest at `done`. Also counts the request as active from creation to `done`.

        rec = metrics.request(len(prompt_ids), ttft_slo_s=slo.ttft_s, tbt_slo_s=slo.tbt_s)
        rec.admitted()                   # after admission: records the queue time
        for each token: rec.token()
        rec.done("stop")                 # or "length" / "abort" / "error"; idempotent
    """

    def __init__(self, metrics: Metrics, prompt_tokens: int, ttft_slo_s: float | None,
                 tbt_slo_s: float | None, clock: Callable[[], float],
                 arrival_s: float | None) -> None:
        self.metrics = metrics
        self.prompt_tokens = prompt_tokens
        self.ttft_slo_s, self.tbt_slo_s = ttft_slo_s, tbt_slo_s
        self.clock = clock
        self.arrival_s = clock() if arrival_s is None else arrival_s
        self.queue_s: float | None = None
        self.first_s: float | None = None
        self.last_s: float | None = None
        self.tokens = 0
        self._done = False
        self._active = metrics._child("mnemosyne_active_requests")
        self._active.inc()
        self._lock = threading.Lock()

    def admitted(self) -> None:
        self.queue_s = self.clock() - self.arrival_s
        self.metrics.observe_queue_time(self.queue_s)

    def token(self, count: int = 1) -> None:
        """`count` tokens left the router now (a message may carry several: one gap, the rest 0)."""
        now = self.clock()
        with self._lock:
            if self.first_s is None:
                self.first_s = now
                self.metrics.observe_first_token(now - self.arrival_s, self.prompt_tokens)
            else:
                self.metrics.observe_token_gap(now - self.last_s)
            for _ in range(count - 1):
                self.metrics.observe_token_gap(0.0)
            self.last_s = now
            self.tokens += count

    def done(self, finish_reason: str) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        now = self.clock()
        mean_tbt = None
        if self.tokens >= 2 and self.first_s is not None:
            mean_tbt = (self.last_s - self.first_s) / (self.tokens - 1)
        self.metrics.observe_request_done(RequestTiming(
            prompt_tokens=self.prompt_tokens, generated_tokens=self.tokens,
            finish_reason=finish_reason, latency_s=now - self.arrival_s,
            ttft_s=None if self.first_s is None else self.first_s - self.arrival_s,
            queue_s=self.queue_s, ttft_slo_s=self.ttft_slo_s, tbt_slo_s=self.tbt_slo_s,
            mean_tbt_s=mean_tbt), live=True)
        self._active.dec()


def kv_transfer_bytes(layout: Any, num_tokens: int, tp: int = 1) -> int:
    """Bytes of the KV of `num_tokens` tokens over all `tp` ranks (K and V, every layer) for a
    common.kv_transfer.KVLayout (num_layers, num_kv_heads per rank, head_dim, dtype)."""
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(layout.dtype), 4)
    return num_tokens * layout.num_layers * 2 * layout.num_kv_heads * tp * layout.head_dim * dtype_bytes


# ---- gRPC: errors by status code -----------------------------------------------------------

class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC that ends with a non-OK status in mnemosyne_rpc_errors_total{method, code}.

        grpc.aio.server(interceptors=[MetricsInterceptor(metrics)])
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def observe(context: grpc.aio.ServicerContext) -> None:
            code = context.code()
            if context.cancelled() and code is None:
                code = grpc.StatusCode.CANCELLED
            if code is not None and code != grpc.StatusCode.OK:
                self.metrics.observe_rpc_error(method, code)

        async def watch(context: grpc.aio.ServicerContext) -> None:
            context.add_done_callback(observe)

        return run_first(handler, watch)


# ---- the /metrics endpoint -----------------------------------------------------------------

@dataclass
class MetricsServer:
    """A running /metrics HTTP endpoint (daemon thread). close() stops it."""
    host: str
    port: int
    _httpd: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def serve_metrics(port: int, registry: CollectorRegistry, host: str = "127.0.0.1") -> MetricsServer:
    """Serves `registry` on http://host:port/metrics (port 0 = a free one)."""
    if not 0 <= port < 65536:
        raise ConfigError(f"metrics: port must be in [0, 65535], got {port}")
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ConfigError(f"metrics: cannot bind {host}:{port}: {e}") from e
    server = MetricsServer(host, httpd.server_address[1], httpd, thread)
    log.info("metrics on %s", server.url)
    return server


def start_metrics_server(port: int, registry: CollectorRegistry, host: str = "127.0.0.1") -> int:
    """Starts the endpoint for the life of the process; returns the bound port."""
    return serve_metrics(port, registry, host).port


# ---- reading an endpoint back (benchmarks, tests) ------------------------------------------------
Samples = dict[tuple[str, frozenset], float]


def scrape(url: str, timeout_s: float = 10.0) -> Samples:
    """Every sample a /metrics endpoint exposes: {(name, frozenset(labels.items())): value}."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
