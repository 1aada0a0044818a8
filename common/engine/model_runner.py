"""Turns a scheduled batch into one forward pass of the single-process engine.

Flat batch: the scheduled token runs of all requests are concatenated. Every sequence attends over
its cached context plus its new tokens (bottom-right causal); logits are computed only for the rows
that sample (the last token of a request's known tokens).
"""
from __future__ import annotations

import torch

from common.attention.base import AttentionBackend
from common.engine.forward_context import ForwardContext, SeqAttn
from common.kv_cache.block_pool import BlockPool
from common.kv_cache.paged import PagedKVCache
from common.model.llama import LlamaModel
from common.scheduler.scheduler import ScheduledItem


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, pool: BlockPool, backend: AttentionBackend,
                 device: str = "cpu") -> None:
        self.model = model
        self.cache = cache
        self.pool = pool
        self.backend = backend
        self.device = device
        self.scale = model.cfg.head_dim ** -0.5

    @torch.inference_mode()
    def run(self, items: list[ScheduledItem]) -> torch.Tensor:
        """Runs the batch; returns float32 logits [num sampling items, vocab] in item order."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[SeqAttn] = []
        sample_rows: list[int] = []
        for it in items:
            req, start, n = it.request, it.start, it.num_tokens
            table = self.pool.table(req.request_id)
            row0 = len(ids)
            ids += req.token_ids(start, start + n)
            positions += range(start, start + n)
            slots += self.cache.slots(table, start, start + n)
            seqs.append(SeqAttn(rows=slice(row0, row0 + n), q_start=start, kv_start=0, kv_len=start + n,
                                block_table=table))
            if it.sample:
                sample_rows.append(row0 + n - 1)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)                  # [T]
        pos = torch.tensor(positions, dtype=torch.long, device=dev)                  # [T]
        ctx = ForwardContext(self.cache, self.backend, seqs, self.scale,
                             write_rows=torch.arange(len(ids), device=dev),
                             write_slots=torch.tensor(slots, dtype=torch.long, device=dev))
        hidden = self.model(self.model.embed(input_ids), pos, ctx)                   # [T, hidden]
        rows = torch.tensor(sample_rows, dtype=torch.long, device=dev)
        return self.model.logits(hidden.index_select(0, rows))                       # [S, vocab]
