"""Plans and the bounded cache of programs built from them.

Problem: every call names what it wants (sites to cache, hooks, interventions); rebuilding and
recompiling a graph per call would dominate small forwards, while keeping every program ever built
would leak memory in a long notebook session.

Mechanism: a *plan* is a tuple of frozen pass specs. ``Programs.get(plan)`` applies the passes in
order to the captured graph once and keeps the result in an LRU cache keyed by the plan (and the
compile flag). Tensors are never part of a plan: they are fed as graph inputs.

Example::

    programs = Programs(captured.module)
    gm = programs.get((ExpandAttention("sdpa_2"), Cache((Read("p", "sdpa_2__pattern"),))))
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
import torch.fx as fx

from .. import passes
from ..graphs.sites import ModelGraph
from ..passes import DecomposeNorm, ExpandAttention, SplitHeads
from ..passes.split_heads import Head

__all__ = ["Programs", "rewrites_for"]


def rewrites_for(mg: ModelGraph, sites, write=()) -> tuple:
    """The materialising rewrites ``sites`` need, one pass per kind, in a stable order.

    A site in ``write`` (one that is patched or hooked) gets the replacing form of its rewrite, so the
    model uses the materialised value; otherwise the value is computed beside the fused node and the
    model's outputs stay bit-identical to the captured graph.
    """
    write = {s.name for s in write}
    found: dict = {"expand_attention": {}, "decompose_norm": {}, "split_heads": {}}
    for site in sites:
        if site.rewrite is None:
            continue
        kind, target = site.rewrite
        if kind not in found:
            raise ValueError(f"unknown rewrite {kind!r} for site {site.name}")
        entry = target
        if kind == "split_heads":
            a = mg.attn[site.layer]
            entry = Head(target, a.z.node, a.z.layout, a.n_heads, a.d_head)
        found[kind][entry] = found[kind].get(entry, False) or site.name in write
    specs = []
    for kind, cls in (("expand_attention", ExpandAttention), ("decompose_norm", DecomposeNorm), ("split_heads", SplitHeads)):
        for replace in (False, True):
            entries = tuple(e for e, r in found[kind].items() if r == replace)
            if entries:
                specs.append(cls(entries, replace=replace))
    return tuple(specs)


class Programs:
    def __init__(self, base: fx.GraphModule, maxsize: int = 32):
        self.base = base
        self.maxsize = maxsize
        self._cache: OrderedDict = OrderedDict()
        self._compile_failed: set = set()

    def __len__(self) -> int:
        return len(self._cache)

    def build(self, plan: tuple) -> fx.GraphModule:
        gm = self.base
        for spec in plan:
            gm = passes.apply(gm, spec)
        return gm

    def get(self, plan: tuple, compile: bool = False):
        key = (plan, compile)
        program = self._cache.get(key)
        if program is not None:
            self._cache.move_to_end(key)
            return program
        program = self.build(plan)
        if compile:
            program = self._compiled(program, plan)
        self._cache[key] = program
        while len(self._cache) > self.maxsize:
            self._cache.popitem(last=False)
        return program

    def _compiled(self, gm: fx.GraphModule, plan: tuple):
        compiled = torch.compile(gm, dynamic=True)

        def run(**feed):
            if plan in self._compile_failed:
                return gm(**feed)
            try:
                return compiled(**feed)
            except Exception as err:  # noqa: BLE001 - told once, then the identical uncompiled program runs
                self._compile_failed.add(plan)
                warnings.warn(
                    f"torch.compile could not compile this program ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                    "running it uncompiled, with identical results",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return gm(**feed)

        run.graph_module = gm
        return run
