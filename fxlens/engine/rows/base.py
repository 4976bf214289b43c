"""The base run: the unpatched input, block by block, keeping what joining rows reuse.

Problem: every row of a sweep, path-patching run or edge sweep is the base run until the layer it
joins; at that layer it needs the base run's residual, and in a causal model the keys and values of
the positions before its start.

Mechanism: ``run_base`` runs the prelude, then each block (exact programs, bit-identical to a plain
forward), keeping each block's residual input, the keys and values each attention op reads, the final
residual, and the values of chosen sites (to recognise a patch that changes nothing).

Example::

    base = run_base(blocks, feed, keep_kv=True, sites=[site])
    base.hidden[3]      # [batch, seq, d_model], the residual entering block 3
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ...passes import Read
from ..plan import PlanBuilder

__all__ = ["Base", "run_base"]


@dataclass
class Base:
    hidden: list  # residual input of each block [B0, S, d]
    kv: list  # (k, v) each attention op reads, per block (None where not kept)
    context: dict
    final: torch.Tensor  # output of the last block [B0, S, d]
    batch: int
    seq: int
    values: dict  # base values of the sites asked for
    full_logits: torch.Tensor | None = None  # computed when a plain callable metric asks for them
    selected: dict = field(default_factory=dict)  # metric -> logits it reads [B0, n_pos, n_tok]
    feed: dict | None = None  # the inputs it ran on (rows on the whole model run them again)

    @property
    def nbytes(self) -> int:
        """Bytes the base run keeps for rows (residuals, keys and values, context, site values); for a model
        spread over devices, on the device that keeps the most (a call's rows live on its block's device,
        so ``memory_budget`` bounds each device)."""
        seen, total = set(), {}
        tensors = list(self.hidden) + [t for kv in self.kv if kv is not None for t in kv]
        tensors += [self.final] + list(self.context.values()) + list(self.values.values())
        for t in tensors:
            key = (t.device, t.untyped_storage().data_ptr()) if isinstance(t, torch.Tensor) else None
            if key is not None and key not in seen:
                seen.add(key)
                total[t.device] = total.get(t.device, 0) + t.untyped_storage().nbytes()
        return max(total.values(), default=0)


def run_base(blocks, feed: dict, keep_kv: bool = True, sites=()) -> Base:
    """The unpatched run of ``feed`` (see the module docstring)."""
    pre = blocks.prelude(**feed)
    context = pre["context"]
    h = pre["outputs"]["hidden"]
    hidden, kv, values = [], [], {}
    by_layer = defaultdict(list)
    for site in sites:
        by_layer[site.layer].append(site)
    for i in range(blocks.n_layers):
        hidden.append(h)
        b = PlanBuilder(blocks.graph)
        reads = []
        if keep_kv and blocks.kv_uses[i] is not None:
            (k, _), (v, _) = blocks.kv_uses[i]
            reads = [Read("fxl_k", k), Read("fxl_v", v)]
        if by_layer.get(i) or reads:
            b.cache(by_layer.get(i, ()), reads=reads)
        plan, inputs = b.build()
        out = blocks.call(i, plan, blocks.feed(i, h, context), inputs)
        cache = out.get("cache", {})
        kv.append((cache["fxl_k"], cache["fxl_v"]) if "fxl_k" in cache else None)
        values.update({k: v for k, v in cache.items() if not k.startswith("fxl_")})
        h = out["outputs"]["hidden"]
    batch, seq = feed["input_ids"].shape
    return Base(hidden, kv, context, h, batch, seq, values)
