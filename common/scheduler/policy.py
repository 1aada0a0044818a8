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

Slack stealing (on by default, `LARS(steal_slack=False)` is the paper's rule alone): ordering by rho
alone can make a request miss although the requests ranked ahead of it have slack to spare. In the
paper's own example (a 10 s prefill due at 16 s; at t = 5 two 0.5 s requests due 1 s later) rho ranks
the long one first (6 s slack / 10 s = 0.6 against 0.5 / 0.5 = 1.0), it keeps >= 1 - rho_max of each
iteration, and the short ones miss. So after sorting, `arrange` walks the order with each request's
predicted serial finish (now + the remaining work of everything ahead of it + its own); a request that
would miss moves forward to the latest position where it meets its deadline, provided every request it
passes still meets its own deadline afterwards (a request already late is never passed, and one
without a deadline is only ever behind). Nobody who would have met a deadline loses it, so this only
adds met deadlines to what rho ordering gives.

Finishing what started (with slack stealing): rho alone re-ranks the prefills every iteration, and
two similar prompts trade places as they run (the running one's rho stays put while the waiting
one's falls), so they share the iterations and both finish at about the sum of their times: a prompt
whose prefill was under way when another arrived ends up to twice as late as alone, with no
deadline gained (least-laxity thrashing). So a prefill already started (a chunk of it ran since it
was last queued, `ReqView.started`) moves ahead of the requests before it in the LARS order that have
at least as much work left (it would be done first anyway, were the machine shared), whenever that
costs nobody a deadline: every request that meets its deadline in the LARS order (serial finish
estimate, as above) still meets it, and none already late finishes later. A shorter prompt still
passes a long prefill under way (shortest remaining work first), and a tight one passes anything
that would make it miss. What admission predicts at a request's arrival then holds when a later,
similar one comes.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterable

from common.errors import ConfigError
from common.scheduler.types import ReqView

DEFAULT_LONG_THRESHOLD = 256 * 1024
DEFAULT_RHO_MAX = 0.4

# remaining and total predicted prefill seconds of a request
WorkFn = Callable[[ReqView], tuple[float, float]]


# (request, remaining predicted seconds, total predicted seconds)
Entry = tuple[ReqView, float, float]
DEADLINE_EPS_S = 1e-9
STEAL_WINDOW = 64            # slack stealing looks at the first this many requests of the order


class Policy:
    """Base: subclasses define `sort_key`; `arrange` is the scheduling order (the sort, by default);
    `prefill_budget` is the budget a long prefill may fill."""
    name = "base"

    def sort_key(self, req: ReqView, now: float, remaining_work_s: float, total_work_s: float) -> tuple:
        raise NotImplementedError

    def arrange(self, entries: Iterable[Entry], now: float) -> list[Entry]:
        """`entries` in scheduling order (first = scheduled first)."""
        keyed = [(self.sort_key(req, now, rem, tot), (req, rem, tot)) for req, rem, tot in entries]
        keyed.sort(key=lambda k: k[0])
        return [e for _, e in keyed]

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

    def __init__(self, rho_max: float = DEFAULT_RHO_MAX, steal_slack: bool = True,
                 finish_started: bool | None = None) -> None:
        if not 0.0 <= rho_max < 1.0:
            raise ConfigError(f"lars: rho_max must be in [0, 1), got {rho_max}")
        self.rho_max = rho_max
        self.steal_slack = steal_slack
        self.finish_started = steal_slack if finish_started is None else finish_started

    @property
    def protects_deadlines(self) -> bool:
        """The planner keeps later chunks from costing an earlier request its deadline (planner.py)."""
        return self.steal_slack

    def arrange(self, entries, now):
        ordered = super().arrange(entries, now)
        if self.steal_slack:
            ordered = steal_slack(ordered, now)
        return finish_started(ordered, now) if self.finish_started else ordered

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


def steal_slack(ordered: list[Entry], now: float, window: int = STEAL_WINDOW) -> list[Entry]:
    """Moves each request that would miss its deadline in `ordered` (serial finish estimate) forward
    to the latest position where it meets it, past requests that all still meet theirs (see the module
    docstring). Requests after the first `window` are left in place."""
    seq, rest = list(ordered[:window]), list(ordered[window:])
    ahead = 0.0                                  # remaining work of seq[:k] (moves within it keep the sum)
    for k in range(len(seq)):
        req, rem, _ = seq[k]
        start = now + ahead
        ahead += rem
        if req.ttft_deadline_s is None or start + rem <= req.ttft_deadline_s + DEADLINE_EPS_S:
            continue
        target, t = None, start                  # t: this request's start if placed before seq[p-1]
        for p in range(k, 0, -1):
            other, other_rem, _ = seq[p - 1]
            t -= other_rem
            if other.ttft_deadline_s is not None and \
                    t + other_rem + rem > other.ttft_deadline_s + DEADLINE_EPS_S:
                break                            # passing it would cost it its deadline (or it is late)
            if t + rem <= req.ttft_deadline_s + DEADLINE_EPS_S:
                target = p - 1
                break
        if target is not None:
            seq.insert(target, seq.pop(k))
    return seq + rest


def _serial_finishes(seq: list[Entry], now: float) -> dict[str, float]:
    """Each request's predicted finish when `seq` runs one after another from `now`."""
    out, t = {}, now
    for req, rem, _ in seq:
        t += rem
        out[req.request_id] = t
    return out


def finish_started(ordered: list[Entry], now: float, window: int = STEAL_WINDOW) -> list[Entry]:
    """`ordered` with each started prefill moved ahead of the requests before it that have at least
    as much work left (see the module docstring), when that costs no deadline; `ordered` itself
    otherwise. Requests after the first `window` stay in place."""
    seq, rest = list(ordered[:window]), list(ordered[window:])
    started = sorted((e for e in seq if e[0].started and e[0].in_prefill),
                     key=lambda e: (e[0].arrival_s, e[0].request_id))
    if not started:
        return ordered
    kept = list(seq)
    for entry in started:
        i = p = kept.index(entry)
        rem = entry[1]
        while p > 0 and (entry[0].ttft_deadline_s is not None or kept[p - 1][0].ttft_deadline_s is None) \
                and (kept[p - 1][1] > rem + DEADLINE_EPS_S
                     or (not kept[p - 1][0].started and kept[p - 1][1] >= rem - DEADLINE_EPS_S)):
            p -= 1
        if p < i:
            kept.insert(p, kept.pop(i))
    if [e[0].request_id for e in kept] == [e[0].request_id for e in seq]:
        return ordered
    before, after = _serial_finishes(seq, now), _serial_finishes(kept, now)
    for req, _, _ in seq:
        due, rid = req.ttft_deadline_s, req.request_id
        if due is None:
            continue
        if after[rid] > (due if before[rid] <= due + DEADLINE_EPS_S else before[rid]) + DEADLINE_EPS_S:
            return ordered
    return kept + rest


def replay(policy: Policy, entries: Iterable[Entry], now: float, step_s: float,
           max_steps: int = 128) -> list[tuple[str, dict[str, float]]]:
    """The order in which a server running `policy` finishes `entries` when, as the engine does, it
    arranges them again before every step of `step_s` seconds of work and runs the first (one request
    at a time: the serial estimate steal_slack works with). The order at `now` is not the order of
    finishing: a waiting request's rho falls as time passes while the running one's stays (its slack
    and its remaining work fall together), so a request ranked second at `now` can pass the first
    before it is done (a 117-token prompt behind a started 192-token one, ranked 2.47 against 1.93 by
    rho on arrival, led by rho 0.3 s later; finish_started keeps the started one first only while it
    has less work left). A request that ran is started from then on. Returns, for each request in the
    order they finish, the work (seconds) each request had done by then. Steps grow so that at most
    `max_steps` are taken (the work in all, `max_steps` equal parts)."""
    views, left, total = {}, {}, {}
    for view, rem, tot in entries:
        views[view.request_id], left[view.request_id], total[view.request_id] = view, max(rem, 0.0), tot
    step = max(step_s, sum(left.values()) / max_steps, 1e-9)
    done = dict.fromkeys(left, 0.0)
    out: list[tuple[str, dict[str, float]]] = []
    t = now
    while left:
        first = policy.arrange([(views[rid], left[rid], total[rid]) for rid in left], t)[0][0]
        rid = first.request_id
        dt = min(step, left[rid])
        left[rid] -= dt
        done[rid] += dt
        t += dt
        if not first.started:
            views[rid] = replace(first, started=True)
        if left[rid] <= DEADLINE_EPS_S:
            del left[rid]
            out.append((rid, dict(done)))
    return out


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


def make_policy(name: str, *, rho_max: float = DEFAULT_RHO_MAX, steal_slack: bool = True) -> Policy:
    """The policy registered under `name`; ConfigError for an unknown one. LARS finishes started
    prefills first exactly when it steals slack (both reorder only as far as no deadline is lost)."""
    cls = POLICIES.get(name.lower() if isinstance(name, str) else name)
    if cls is None:
        raise ConfigError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICIES)}")
    return cls(rho_max=rho_max, steal_slack=steal_slack) if cls is LARS else cls()


def order(policy: Policy, reqs: Iterable[ReqView], now: float, work: WorkFn) -> list[ReqView]:
    """`reqs` in the policy's scheduling order (first = scheduled first)."""
    return [r for r, _, _ in policy.arrange(((r, *work(r)) for r in reqs), now)]
