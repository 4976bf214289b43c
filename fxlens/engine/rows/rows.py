"""Rows: runs that join the base run at a layer and a start position, carrying edits per layer.

Problem: an activation-patching cell, a path-patching sender, an edge set and an ACDC candidate are
all the same thing: the base run, unchanged up to some layer, then changed there (and maybe later),
read out by a metric. In a causal model a row also leaves every position before its first changed one
as the base run has it.

Mechanism: a ``Row`` says where it joins (``layer``, ``start``) and what it changes: ``SitePatch``es
(a site takes a value at an index: activation patching, edge cells) and ``ReceiverInput``s (circuit
receivers read a given input, or the residual plus a given difference: path patching, edge rows),
each at its own layer. The engine (``engine.py``) schedules rows, lays them out padded or packed, and
places these edits in each block call through the layout (``layouts.py``).

Example::

    rows = [Row(layer=site.layer, start=3, patches=(SitePatch(site, (("pos", 3),), clean),))]
    values = RowEngine(model).run(rows, base, metric)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...graphs.sites import Site

__all__ = ["Row", "SitePatch", "ReceiverInput", "RowError"]


class RowError(ValueError):
    pass


@dataclass(frozen=True, eq=False)
class SitePatch:
    """``site`` takes ``value`` ([batch, ...] in the site's layout, every position) at ``index``
    (((axis name, int), ...); absent axes mean all)."""

    site: Site
    index: tuple
    value: torch.Tensor

    @property
    def layer(self) -> int:
        return self.site.layer


@dataclass(frozen=True, eq=False)
class ReceiverInput:
    """Circuit receiver ``receiver`` (a ``passes.EdgeReceiver``) at block ``layer`` reads ``value``
    ([batch, seq, d_model]): the residual plus ``value`` (``mode="delta"``) or ``value`` itself
    (``"absolute"``)."""

    receiver: object
    layer: int
    value: torch.Tensor
    mode: str = "delta"


@dataclass(frozen=True, eq=False)
class Row:
    layer: int  # joins before this block, with the base run's residual
    start: int = 0  # first position it computes (causal models; positions before are the base run's)
    patches: tuple = ()  # of SitePatch
    inputs: tuple = ()  # of ReceiverInput

    def __post_init__(self):
        for e in self.patches + self.inputs:
            if e.layer < self.layer:
                raise RowError(f"a row joining at layer {self.layer} cannot change layer {e.layer}")

    def at(self, layer: int) -> tuple[list, list]:
        """(site patches, receiver inputs) this row applies in block ``layer``."""
        return [p for p in self.patches if p.layer == layer], [r for r in self.inputs if r.layer == layer]
