"""The bounded cache of programs built from plans.

Problem: every call names what it wants (sites to cache, hooks, interventions); rebuilding and
recompiling a graph per call would dominate small forwards, while keeping every program ever built
would leak memory in a long notebook session.

Mechanism: a *plan* is a tuple of frozen pass specs (made by ``engine.plan.PlanBuilder``, the only
place that builds them). ``Programs.get(plan)`` checks the pass order, applies the passes to the base
graph once and keeps the result in an LRU cache keyed by the plan (and the compile flag), as a
``Runner`` (the program as straight-line Python, its operator and weight lookups done once) or
compiled. Tensors are never part of a plan: they are fed as graph inputs. For a model whose weights
live on several devices (``placement``), each program is placed after its plan
(``passes.place_devices``); on one device nothing is added.

Example::

    programs = Programs(captured.module)
    gm = programs.get((ExpandAttention(("sdpa_2",)), Cache((Read("p", "sdpa_2__pattern"),))))
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
import torch.fx as fx

from .. import passes
from ..passes.place_devices import PlaceDevices, place_devices
from .runner import Runner

__all__ = ["Programs"]


class Programs:
    def __init__(self, base: fx.GraphModule, maxsize: int = 32, placement: PlaceDevices | None = None):
        self.base = base
        self.placement = placement  # a model spread over devices: every program is placed last
        self.maxsize = maxsize
        self._cache: OrderedDict = OrderedDict()
        self._compile_failed: set = set()

    def __len__(self) -> int:
        return len(self._cache)

    def build(self, plan: tuple) -> fx.GraphModule:
        passes.check_order(plan)
        gm = self.base
        for spec in plan:
            gm = passes.apply(gm, spec)
        return gm if self.placement is None else place_devices(gm, self.placement)

    def get(self, plan: tuple, compile: bool = False):
        key = (plan, compile)
        program = self._cache.get(key)
        if program is not None:
            self._cache.move_to_end(key)
            return program
        program = self.build(plan)
        program = self._compiled(program, plan) if compile else Runner(program)
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
