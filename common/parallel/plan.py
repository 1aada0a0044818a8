"""The driver -> worker step plan and the worker -> driver step result: the contract that crosses the
process boundary inside one instance's grid. Encoded as JSON bytes (no pickle), one function per
direction, round-trip tested.

A plan travels driver -> every stage-0 worker, then stage s -> stage s+1 together with the hidden
states, each stage appending its (start, end) timestamps so the last stage can report the timeline.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from common.errors import WorkerFailedError
from common.sampling_params import TopLogprobs


@dataclass(frozen=True)
class SeqPlan:
    request_id: str
    start: int                        # absolute position of the first token processed
    token_ids: list[int]              # tokens [start, start + n)
    sample: bool                      # the last row samples the next token
    tables: list[list[int]]           # per KVP group: that group's local block table
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    sink: dict | None = None          # KVSink.to_dict(): stream this request's KV (on its first chunk)
    output_index: int = 0             # when sampling: which output token of the request (seeded draws)
    top_logprobs: int = 0             # when sampling: report this many most likely tokens too
    table_from: list[int] | None = None   # tables[g] holds blocks [table_from[g], ...) of group g's
                                          # table, the rest as in the previous plan (TableDelta);
                                          # None: whole tables

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    seqs: list[SeqPlan]
    forget: list[str] = field(default_factory=list)    # finished/aborted requests (sampler state)
    stop: bool = False                                  # workers exit their loop
    dump: dict | None = None                            # debug: {"dir", "tables", "num_tokens"} (see worker)
    timeline: list[tuple[int, float, float]] = field(default_factory=list)  # (stage, start, end)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


@dataclass(frozen=True)
class StepResult:
    step_id: int
    tokens: dict[str, tuple[int, float]]                # request id -> (token, logprob)
    timeline: list[tuple[int, float, float]]            # (stage, start, end) monotonic seconds
    comm_s: float = 0.0                                 # reporter's time in collectives + p2p this step
    error: str | None = None
    top_logprobs: dict[str, TopLogprobs] = field(default_factory=dict)   # request id -> top tokens, if asked


def encode_plan(plan: StepPlan) -> bytes:
    # Not dataclasses.asdict: it deep-copies every block table element by element (62 ms a step for a
    # 1M-token request's 65,536 blocks, 6 ms without; the plan is encoded on the engine thread's
    # critical path every step). Every field is plain JSON data already (sink: KVSink.to_dict()).
    d = {"step_id": plan.step_id, "seqs": [vars(s) for s in plan.seqs], "forget": plan.forget,
         "stop": plan.stop, "dump": plan.dump, "timeline": plan.timeline}
    return json.dumps(d, separators=(",", ":")).encode()


def decode_plan(data: bytes) -> StepPlan:
    d = json.loads(data)
    seqs = [SeqPlan(**s) for s in d.pop("seqs")]
    timeline = [tuple(t) for t in d.pop("timeline")]
    return StepPlan(seqs=seqs, timeline=timeline, **d)


def encode_result(res: StepResult) -> bytes:
    return json.dumps(asdict(res), separators=(",", ":")).encode()


def decode_result(data: bytes) -> StepResult:
    d = json.loads(data)
    return StepResult(step_id=d["step_id"], tokens={k: (int(v[0]), float(v[1])) for k, v in d["tokens"].items()},
                      timeline=[tuple(t) for t in d["timeline"]], comm_s=float(d.get("comm_s", 0.0)),
                      error=d.get("error"),
                      top_logprobs={k: tuple((int(t), float(lp)) for t, lp in v)
                                    for k, v in d.get("top_logprobs", {}).items()})


class TableDelta:
    """Driver side: a request's block tables as what changed since the plan that last carried them.

    A table only grows while its request lives (blocks are appended; a preempted request's table is
    freed and built anew), and a 1M-token request's 65,536 block ids in every plan cost ~6 ms of JSON
    a step on each side: a long prefill's thousands of small chunks, and every decode step at that
    length. When the table carried last still starts the new one (checked, not assumed), only its new
    tail goes (SeqPlan.table_from); otherwise the whole table. Records go when the request is forgotten
    and when it was not in a plan for PRUNE_STEPS steps (it is then sent whole again)."""

    PRUNE_STEPS = 1024

    def __init__(self) -> None:
        self.sent: dict[str, tuple[int, list[list[int]]]] = {}     # rid -> (step it was sent at, tables)

    def seq(self, step_id: int, seq: SeqPlan) -> SeqPlan:
        """`seq` (whole tables) as it goes in plan `step_id`."""
        last = self.sent.get(seq.request_id)
        self.sent[seq.request_id] = (step_id, seq.tables)
        if last is None or len(last[1]) != len(seq.tables):
            return seq
        froms, tails = [], []
        for old, new in zip(last[1], seq.tables):
            n = len(old)
            if len(new) >= n and new[:n] == old:
                froms.append(n)
                tails.append(new[n:])
            else:
                froms.append(0)
                tails.append(new)
        return replace(seq, tables=tails, table_from=froms)

    def forget(self, request_id: str) -> None:
        self.sent.pop(request_id, None)

    def prune(self, step_id: int) -> None:
        if step_id % self.PRUNE_STEPS == 0:
            for rid in [r for r, (at, _) in self.sent.items() if step_id - at > self.PRUNE_STEPS]:
                del self.sent[rid]


class TableCache:
    """Worker side of TableDelta: every worker sees every plan, in order, and keeps the tables each
    request's last plan gave it; `apply` returns the plan with whole tables. It forgets a request
    with the plan's `forget` and after twice the driver's PRUNE_STEPS without it (never before the
    driver, which then sends the whole table)."""

    def __init__(self) -> None:
        self.tables: dict[str, tuple[int, list[list[int]]]] = {}

    def apply(self, plan: StepPlan) -> StepPlan:
        for rid in plan.forget:
            self.tables.pop(rid, None)
        if not plan.seqs:
            return plan
        seqs = []
        for s in plan.seqs:
            if s.table_from is None:
                tables = s.tables
            else:
                have = self.tables.get(s.request_id)
                if have is None or len(have[1]) != len(s.table_from) or any(
                        len(old) < k for old, k in zip(have[1], s.table_from)):
                    raise WorkerFailedError(f"plan {plan.step_id}: request {s.request_id}'s block tables "
                                            f"continue ones this worker does not have")
                tables = [old[:k] + tail for old, k, tail in zip(have[1], s.table_from, s.tables)]
                s = replace(s, tables=tables, table_from=None)
            self.tables[s.request_id] = (plan.step_id, tables)
            seqs.append(s)
        if plan.step_id % TableDelta.PRUNE_STEPS == 0:
            limit = 2 * TableDelta.PRUNE_STEPS
            for rid in [r for r, (at, _) in self.tables.items() if plan.step_id - at > limit]:
                del self.tables[rid]
        return replace(plan, seqs=seqs)
