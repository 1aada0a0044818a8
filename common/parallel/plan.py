"""The driver -> worker step plan and the worker -> driver step result: the contract that crosses the
process boundary inside one instance's grid. Encoded as JSON bytes (no pickle), one function per
direction, round-trip tested.

A plan travels driver -> every stage-0 worker, then stage s -> stage s+1 together with the hidden
states, each stage appending its (start, end) timestamps so the last stage can report the timeline.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

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
