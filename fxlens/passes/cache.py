"""Cache pass: return the values of chosen sites, and drop what nothing reads.

Problem: ``run_with_cache`` should keep only the requested activations (not every intermediate) and,
when the caller wants no logits, should not compute anything after the last requested site.

Mechanism: for each requested site, insert its layout read right after its node and add it to the
graph's ``"cache"`` output. With ``keep_outputs=False`` the model outputs are removed and dead-code
elimination deletes every node that no cached value depends on; this is how ``stop_at_layer`` and
``return_logits=False`` skip the rest of the model.

Example::

    gm = cache(gm, Cache((Read("blocks.0.attn.hook_q", "view_6", Layout()),), keep_outputs=False))
    gm(input_ids=ids, attention_mask=mask)["cache"]["blocks.0.attn.hook_q"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from ..graphs.layout import IDENTITY, Layout
from .base import PassError, prune, rewrite

__all__ = ["Read", "Cache", "cache"]


@dataclass(frozen=True)
class Read:
    key: str  # the name the value is returned under
    node: str
    layout: Layout = IDENTITY


@dataclass(frozen=True)
class Cache:
    stage: ClassVar[str] = "read"
    reads: tuple  # of Read
    keep_outputs: bool = True

    def __hash__(self):
        # a plan is hashed on every call that looks up its program; hundreds of reads make that slow
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.reads, self.keep_outputs))
            object.__setattr__(self, "_hash", h)
        return h


def cache(gm: fx.GraphModule, spec: Cache) -> fx.GraphModule:
    with rewrite(gm) as rw:
        needs_sizes = any(r.layout.needs_sizes for r in spec.reads)
        sizes = rw.sizes() if needs_sizes else None
        out = dict(rw.outputs())
        bucket = dict(out.get("cache", {}))
        for read in spec.reads:
            if not rw.has(read.node):
                raise PassError(f"{read}: the site's node is not in this graph (was its rewrite applied?)")
            node = rw.node(read.node)
            with rw.after(node):
                bucket[read.key] = read.layout.read(rw.graph, node, sizes)
        out["cache"] = bucket
        if not spec.keep_outputs:
            out["outputs"] = {}
        rw.set_outputs(out)
        if not spec.keep_outputs:
            prune(rw.graph)
    return rw.result
