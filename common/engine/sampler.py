"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds; logprobs of chosen tokens
and, for requests that ask (SamplingParams.top_logprobs = k > 0), the k most likely tokens.

Logprobs are those of the model's own distribution (log_softmax of the raw logits), whatever the
sampling settings, so they can be compared with a reference model. The top-k lists are read from
the same log_softmax tensor as the chosen token's logprob: when the chosen token is in its list, the
two numbers are the same float.

Seeded requests draw token i of their output from a generator seeded with mix(seed, i), not from one
generator carried along the request: the draw depends only on (seed, i, logits). So the same request
gives the same tokens on one process, on a TP x SPP x KVP grid, and disaggregated, where the prefill
instance samples token 0 and a decode instance (a fresh process) samples the rest. Unseeded requests
keep one randomly seeded generator each.
"""
from __future__ import annotations

import torch

from common.sampling_params import SamplingParams, TopLogprobs


class Sampler:
    def __init__(self) -> None:
        self.generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
               indices: list[int] | None = None) -> tuple[list[int], list[float], dict[int, TopLogprobs]]:
        """logits [B, V] float32 -> chosen token ids [B], their logprobs [B], and {row b: its
        params[b].top_logprobs most likely tokens} for the rows that ask (empty when none does).
        indices[b]: which output token of its request row b samples (0 = the first); needed by
        seeded requests."""
        logprobs = torch.log_softmax(logits, dim=-1)                    # [B, V]
        tokens = logits.argmax(dim=-1)                                  # [B]
        for i, (rid, p) in enumerate(zip(request_ids, params)):
            if not p.greedy:
                tokens[i] = self._draw(logits[i], rid, p, None if indices is None else indices[i])
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        ks = {i: p.top_logprobs for i, p in enumerate(params) if p.top_logprobs}
        return tokens.tolist(), chosen.tolist(), top_logprobs(logprobs, ks) if ks else {}

    def _draw(self, logits: torch.Tensor, rid: str, p: SamplingParams, index: int | None) -> int:
        if p.seed is not None and index is not None:
            gen = torch.Generator(device=logits.device)
            gen.manual_seed(token_seed(p.seed, index))
        else:
            gen = self.generators.get(rid)
            if gen is None:
                gen = torch.Generator(device=logits.device)
                gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item()))
                self.generators[rid] = gen
        # Shifted so the largest score is 0 (softmax does not change): a tiny temperature (1e-45 is
        # finite and valid) then sends the others to -inf instead of every score to +-inf, whose
        # softmax is NaN (a fuzzed request took a decode worker down with it).
        scores = (logits - logits.max()) / p.temperature                 # [V]
        if p.top_k > 0:
            kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
            # drop tokens once the mass before them already reaches top_p (always keep the first)
            drop = (cum - torch.softmax(sorted_scores, dim=-1)) >= p.top_p
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen).item())


def top_logprobs(logprobs: torch.Tensor, ks: dict[int, int]) -> dict[int, TopLogprobs]:
    """logprobs [B, V]; ks {row: k > 0} -> {row: its k most likely (token, logprob), most likely
    first}. One topk over the asking rows, at the largest k of them."""
    rows = list(ks)
    k = min(max(ks.values()), logprobs.shape[-1])
    values, ids = torch.topk(logprobs[rows], k, dim=-1)                 # [R, k] each, descending
    values, ids = values.tolist(), ids.tolist()
    return {b: tuple(zip(ids[r][:ks[b]], values[r][:ks[b]])) for r, b in enumerate(rows)}


def token_seed(seed: int, index: int) -> int:
    """The generator seed of output token `index` of a request seeded with `seed` (splitmix64 of both)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF
