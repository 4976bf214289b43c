"""Scheduling rows into block calls, apart from running them; the cost model it decides by.

Problem: thousands of rows cannot run as one batch (memory), and one call per row and layer is bound
by reading the block's weights. Rows of different starts can share a call (packed) while that call's
activations stay small enough to be cache-friendly; otherwise rows of one start share a call, starts
a few positions apart merge where computing those positions twice costs less than another call, and
chunks advance together layer by layer so that a block's weights are read once per layer.

Mechanism: ``CostModel`` estimates bytes from the model's dtype (its element size) and measures, once
per capture and device, how many extra (row, position) tokens one block call is worth (synchronising
CUDA around the timings: every device of a model spread over several). Byte estimates bound one device:
a call's rows live on its block's device, and the base run's share is counted on the device that keeps
the most (``Base.nbytes``), so ``memory_budget`` is per device. ``schedule(rows, cost, budget)`` returns a ``Schedule``: packed chunks of
row indices, or padded chunks ``(start, row indices)`` grouped into waves. ``engine.RowEngine`` runs it.

Example::

    sch = schedule(rows, CostModel(blocks, base, declared=True), budget=2**30)
    sch.packed, sch.chunks, sch.waves
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

__all__ = ["CostModel", "Schedule", "schedule"]


def widths(dims: dict) -> tuple[int, int, int, int]:
    """(d_model, d_mlp, n_heads, logits' width) of a model graph's ``dims``, with fallbacks."""
    d_model = int(dims.get("d_model", 1))
    return (d_model, int(dims.get("d_mlp") or 4 * d_model), int(dims.get("n_heads") or 1),
            int(dims.get("d_vocab_out") or dims.get("d_vocab") or 1))


def row_bytes(dims: dict, element: int, seq: int, start: int, batch: int, declared: bool) -> int:
    """Peak bytes one row of positions ``start..`` of ``batch`` prompts of ``seq`` tokens holds in a
    padded call (full logits at every position unless the metric is ``declared``)."""
    d_model, d_mlp, heads, vocab = widths(dims)
    token = 12 * d_model + 3 * d_mlp + 4 * heads * seq
    logits = 0 if declared else seq * vocab
    return element * batch * ((seq - start) * token + logits + seq * d_model)


class CostModel:
    # rows are packed into one call per layer while that call's widest activation stays below this on
    # a CPU: beyond it (long sequences, many rows) elementwise ops on fresh, uncached memory cost more
    # than the block calls packing saves (measured: GPT-2, 48 tokens, unrelated prompts: packed 12%
    # slower). On a GPU calls are launches, not cache misses: packing is always taken there.
    pack_activation_bytes = 32 * 2**20

    def __init__(self, blocks, base, declared: bool):
        self.blocks = blocks
        self.base = base
        self.declared = declared
        self.dtype = blocks.captured.dtype
        self.device = blocks.captured.device
        self.element = torch.empty((), dtype=self.dtype).element_size()
        self.dims = blocks.graph.dims
        self.d_model, self.d_mlp, self.heads, _ = widths(self.dims)

    @property
    def pack_limit(self) -> float:
        return float("inf") if self.device.type == "cuda" else self.pack_activation_bytes

    def row_bytes(self, start: int) -> int:
        """Peak bytes one row of positions ``start..`` holds in a padded call."""
        return row_bytes(self.dims, self.element, self.base.seq, start, self.base.batch, self.declared)

    def packed_bytes(self, tokens: int) -> int:
        """Bytes of the widest activation (the MLP's hidden layer) of one packed call of ``tokens``."""
        return self.element * tokens * self.base.batch * self.d_mlp

    def padded_attention_bytes(self) -> int:
        """Bytes of one row's padded attention in a packed call (every position of every row)."""
        seq = self.base.seq
        return self.element * self.base.batch * seq * (self.heads * seq + 4 * self.d_model)

    def break_even(self) -> float:
        """How many extra (row, position) tokens one block call costs: measured once per capture.

        A call reads all of a block's weights and runs its graph in Python; for small batches that,
        not the arithmetic, is the cost, so computing a few positions twice can beat another call.
        """
        blocks, base = self.blocks, self.base
        if blocks.break_even is not None:
            return blocks.break_even
        layer = blocks.n_layers // 2
        prog = blocks.programs[layer].get(())
        # every device the blocks run on (a model spread over devices synchronises each)
        cuda = [torch.device(d) for d in (blocks.placement.devices if blocks.placement is not None else (self.device,))]
        cuda = [d for d in cuda if d.type == "cuda"]

        def sync():
            for d in cuda:
                torch.cuda.synchronize(d)

        times = {}
        for n in (1, 64):
            h = base.hidden[layer][:1, :1].expand(n, 1, -1).contiguous()
            ctx = {}
            for c, v in base.context.items():
                dims = blocks.seq_dims.get(c, [])
                ctx[c] = v[:1, ..., :1, :1] if len(dims) == 2 else v[:1, :1] if dims else v[:1, ..., :1] if c in blocks.key_only else v
            feed = blocks.feed(layer, h, ctx)
            prog(**feed)
            prog(**feed)
            best = float("inf")
            for _ in range(7):  # best of 7: one noisy pair of timings must not decide every later sweep
                sync()
                t = time.perf_counter()
                prog(**feed)
                sync()
                best = min(best, time.perf_counter() - t)
            times[n] = best
        per_token = max((times[64] - times[1]) / 63, 1e-9)
        blocks.break_even = max(1.0, min(256.0, times[1] / per_token))
        return blocks.break_even


@dataclass
class Schedule:
    packed: bool
    chunks: list = field(default_factory=list)  # packed: [row index]; padded: (start, [row index])
    waves: list = field(default_factory=list)  # padded: lists of chunk indices advancing together


def schedule(rows: list, cost: CostModel, budget: int, packable: bool) -> Schedule:
    """Chunks of ``rows`` (indices into it) for calls of at most ``budget`` bytes; see the module docstring."""
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r.start].append(i)
    if packable and len(groups) > 1:
        tokens = sum(len(idxs) * (cost.base.seq - start) for start, idxs in groups.items())
        if cost.packed_bytes(tokens) <= cost.pack_limit:
            return _packed(rows, cost, budget)
    if len(groups) > 1 and cost.blocks.causal:
        groups = _merge_starts(groups, rows, cost.blocks.n_layers, cost.break_even())
    chunks = []
    for start, idxs in sorted(groups.items()):
        idxs.sort(key=lambda i: rows[i].layer)
        per = max(1, budget // max(1, cost.row_bytes(start)))
        for k in range(0, len(idxs), per):
            chunks.append((start, idxs[k : k + per]))
    waves, wave, used = [], [], 0
    for c, (start, chunk) in enumerate(chunks):
        need = cost.row_bytes(start) * len(chunk)
        if wave and used + need > budget:
            waves.append(wave)
            wave, used = [], 0
        wave.append(c)
        used += need
    if wave:
        waves.append(wave)
    return Schedule(False, chunks, waves)


def _packed(rows: list, cost: CostModel, budget: int) -> Schedule:
    order = sorted(range(len(rows)), key=lambda i: (rows[i].layer, rows[i].start))
    padded = cost.padded_attention_bytes()
    chunks, chunk, used = [], [], 0
    for i in order:
        need = cost.row_bytes(rows[i].start) + padded
        if chunk and used + need > budget:
            chunks.append(chunk)
            chunk, used = [], 0
        chunk.append(i)
        used += need
    chunks.append(chunk)
    return Schedule(True, chunks)


def _merge_starts(groups: dict, rows: list, n_layers: int, break_even: float) -> dict:
    """Merge start groups where computing a few more positions beats making more block calls.

    Exact either way: positions before a row's first change equal the base run's.
    """
    starts = sorted(groups, reverse=True)
    merged: dict = {}
    carry: list = []
    for i, start in enumerate(starts):
        idxs = carry + groups[start]
        nxt = starts[i + 1] if i + 1 < len(starts) else None
        if nxt is not None:
            first = min(rows[j].layer for j in idxs)
            calls = n_layers - first
            extra = sum(n_layers - rows[j].layer for j in idxs) * (start - nxt)
            if extra < calls * break_even:
                carry = idxs
                continue
        merged[start] = idxs
        carry = []
    return merged
