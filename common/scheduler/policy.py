"""Ordering policies for prefills: FCFS, EDF and LARS, plus LARS's budget share for long prefills.

Every policy answers `sort_key(req, now, remaining_work_s, total_work_s)`; requests run in ascending
key order. Work figures are predicted prefill seconds (see common/perf_model/prefill_table.py).
Keys end with (arrival, request_id) so the order is total and deterministic.

LARS (paper, "LARS scheduling"): slack s = deadline - now - remaining work, priority rho = s / total
work, lowest first. For the same slack a long job is riskier (it must survive many more scheduling
decisions), so dividing by its total work ranks it earlier. Requests without a deadline come after
every request with one, in arrival order. A *long* prefill (>= long_threshold prompt tokens already
processed) yields part of the iteration budget to the others in proportion to its slack:
effective budget = t_target * (1 - clip(rho, 0, rho_max)).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

from common.errors import ConfigError
from common.scheduler.types import ReqView

DEFAULT_LONG_THRESHOLD = 256 * 1024
DEFAULT_RHO_MAX = 0.4

# remaining and total predicted prefill seconds of a request
WorkFn = Callable[[ReqView], tuple[float, float]]


class Policy:
    """Base: subclasses define `sort_key`; `prefill_budget` is the budget a long prefill may fill."""
    name = "base"

    def sort_key(self, req: ReqView, now: float, remaining_work_s: float, total_work_s: float) -> tuple:
        raise NotImplementedError

    def prefill_budget(self, t_target_s: float, req: ReqView, now: float, remaining_work_s: float,
                       total_work_s: float) -> float:
        """Predicted-time limit for a batch that takes a chunk of this long prefill."""
        return t_target_s


class FCFS(Policy):
    name = "fcfs"

    def sort_key(self, req, now, remaining_work_s, total_work_s):
        return (req.arrival_s, req.request_id)


class EDF(Policy):
    name = "edf"

    def sort_key(self, req, now, remaining_work_s, total_work_s):
        if req.ttft_deadline_s is None:
            return (1, math.inf, req.arrival_s, req.request_id)
        return (0, req.ttft_deadline_s, req.arrival_s, req.request_id)


class LARS(Policy):
    name = "lars"

    def __init__(self, rho_max: float = DEFAULT_RHO_MAX) -> None:
        if not 0.0 <= rho_max < 1.0:
            raise ConfigError(f"lars: rho_max must be in [0, 1), got {rho_max}")
        self.rho_max = rho_max

    @staticmethod
    def rho(req: ReqView, now: float, remaining_work_s: float, total_work_s: float) -> float | None:
        """Slack over total work; None without a deadline. Negative when the deadline is lost."""
        if req.ttft_deadline_s is None:
            return None
        slack = req.ttft_deadline_s - now - remaining_work_s
        return slack / max(total_work_s, 1e-9)

    def sort_key(self, req, now, remaining_work_s, total_work_s):
        rho = self.rho(req, now, remaining_work_s, total_work_s)
        if rho is None:
            return (1, 0.0, req.arrival_s, req.request_id)
        return (0, rho, req.arrival_s, req.request_id)

    def prefill_budget(self, t_target_s, req, now, remaining_work_s, total_work_s):
        return effective_budget(t_target_s, self.rho(req, now, remaining_work_s, total_work_s),
                                self.rho_max)


def effective_budget(t_target_s: float, rho: float | None, rho_max: float = DEFAULT_RHO_MAX) -> float:
    """t_target * (1 - clip(rho, 0, rho_max)); the whole budget when there is no deadline."""
    if rho is None:
        return t_target_s
    return t_target_s * (1.0 - min(max(rho, 0.0), rho_max))


def is_long_prefill(req: ReqView, long_threshold: int = DEFAULT_LONG_THRESHOLD) -> bool:
    """A prefill that has already processed >= long_threshold prompt tokens (its chunks are
    attention-bound; at most one such chunk goes in a batch)."""
    return req.in_prefill and req.num_computed >= long_threshold


POLICIES: dict[str, type[Policy]] = {"fcfs": FCFS, "edf": EDF, "lars": LARS}


def make_policy(name: str, *, rho_max: float = DEFAULT_RHO_MAX) -> Policy:
    """The policy registered under `name`; ConfigError for an unknown one."""
    cls = POLICIES.get(name.lower() if isinstance(name, str) else name)
    if cls is None:
        raise ConfigError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICIES)}")
    return cls(rho_max=rho_max) if cls is LARS else cls()


def order(policy: Policy, reqs: Iterable[ReqView], now: float, work: WorkFn) -> list[ReqView]:
    """`reqs` sorted by the policy (first = scheduled first)."""
    keyed = []
    for r in reqs:
        remaining, total = work(r)
        keyed.append((policy.sort_key(r, now, remaining, total), r))
    keyed.sort(key=lambda kr: kr[0])
    return [r for _, r in keyed]
