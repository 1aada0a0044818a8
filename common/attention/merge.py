"""The one exact log-sum-exp merge of partial attention results.

Attention of a query over a key set split into disjoint shards equals the merge of the per-shard
results: lse = log sum_i exp(lse_i), out = sum_i exp(lse_i - lse) * out_i. Every place that splits keys
(KVP groups, split-KV, cached context + chunk) merges with this function and nothing else.

Layout is [tokens, heads], lse in natural log. An empty shard (or an empty row of a shard) contributes
(out 0, lse -inf); rows empty in every shard come out as (0, -inf), never NaN.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def merge_stacked(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S stacked shards: out [S, n, H, D], lse [S, n, H] (natural log).

    Returns out [n, H, D] in out.dtype and lse [n, H] in float32 (float64 when either input is float64).
    Computes in float32 (float64 for float64 inputs). NaN and +inf lse are treated as an empty shard.
    """
    if out.dim() != 4 or lse.shape != out.shape[:3]:
        raise ValueError(f"merge_stacked wants out [S, n, H, D] and lse [S, n, H]; got {tuple(out.shape)} "
                         f"and {tuple(lse.shape)}")
    if out.shape[0] == 0:
        raise ValueError("merge_stacked needs at least one shard")
    cdt = _compute_dtype(out.dtype, lse.dtype)
    lse_f = lse.to(cdt)
    # Sanitise: NaN / +inf (some kernels' "empty row" markers) mean "no keys" -> -inf.
    lse_f = torch.where(torch.isnan(lse_f) | (lse_f == float("inf")), float("-inf"), lse_f)
    m = lse_f.amax(dim=0)                                             # [n, H]
    m = torch.where(m == float("-inf"), 0.0, m)                       # all-empty rows: avoid -inf - -inf
    w = torch.exp(lse_f - m)                                          # [S, n, H]; 0 for empty shards
    w_sum = w.sum(dim=0)                                              # [n, H]
    lse_out = m + torch.log(w_sum)                                    # log(0) = -inf for all-empty rows
    # An empty shard's output is ignored even if it holds garbage (0 * NaN would be NaN).
    out_f = torch.where((w > 0).unsqueeze(-1), out.to(cdt), 0.0)     # [S, n, H, D]
    merged = (w.unsqueeze(-1) * out_f).sum(dim=0) / w_sum.clamp_min(1e-10).unsqueeze(-1)
    return merged.to(out.dtype), lse_out


def merge_attention_states(outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N shards: outputs[i] [n, H, D], lses[i] [n, H] (natural log).

    Returns out [n, H, D] in outputs[0].dtype, lse [n, H] float32 (float64 if any input is float64).
    """
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(f"merge_attention_states needs as many lses as outputs (>= 1); got "
                         f"{len(outputs)} outputs and {len(lses)} lses")
    cdt = _compute_dtype(*(o.dtype for o in outputs), *(l.dtype for l in lses))
    shape = outputs[0].shape
    for o, l in zip(outputs, lses):
        if o.shape != shape or l.shape != shape[:2]:
            raise ValueError(f"shard shapes disagree: out {tuple(o.shape)} lse {tuple(l.shape)}, "
                             f"expected out {tuple(shape)} lse {tuple(shape[:2])}")
    out, lse = merge_stacked(torch.stack([o.to(cdt) for o in outputs]), torch.stack([l.to(cdt) for l in lses]))
    return out.to(outputs[0].dtype), lse
