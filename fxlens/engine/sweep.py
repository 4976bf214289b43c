"""Activation-patching sweeps: cells (site + index) as rows of the layered-row engine.

Problem: an activation-patching sweep is one corrupted forward per patch (TransformerLens runs a
Python loop). Every patch shares everything before the layer it patches, and in a causal model
everything before the first position it changes; a metric usually reads a few logits.

Mechanism: ``Sweep.run`` keeps the base (corrupted) run's values of the patched sites, finds for each
cell the first position its clean value differs from the corrupted one (a cell that changes nothing
is the base run and costs nothing; in a non-causal model every row starts at 0), and makes each
remaining cell a ``Row`` joining at its site's layer with one ``SitePatch``. The row engine
(``engine/rows``) does the rest: prefix reuse, packing, pruning of the last block, read-out.

Example::

    sweep = Sweep(model)
    values = sweep.run(cells, corrupted_feed, clean_cache, metric)    # [len(cells)]

Gotchas: results equal one hooked forward per patch to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..graphs.sites import Site
from .rows import Row, RowEngine, RowError, SitePatch

__all__ = ["Cell", "Sweep", "SweepError"]


# what a sweep refuses (a cell outside a block, a clean value of the wrong shape, a metric that does not
# fit) is what the row engine refuses: one error class, under the name sweep users know
SweepError = RowError


@dataclass(frozen=True)
class Cell:
    """One patched run: ``site`` takes the clean value at ``index`` (axis name -> index).

    ``source``, when given, is this cell's own value for the site ([batch, ...] in the site's layout),
    used instead of the clean run's (edge sweeps precompute what a receiver would read).
    """

    site: Site
    index: tuple  # ((axis name, int), ...) in the site's user layout; absent axes mean "all"
    source: torch.Tensor | None = field(default=None, compare=False)


class Sweep:
    def __init__(self, model, compile: bool = False):
        self.model = model
        self.engine = RowEngine(model, compile=compile)

    @property
    def stats(self) -> dict:
        return self.engine.stats

    def run(self, cells, feed: dict, source, metric, *, memory_budget: float = 1.0, progress: bool = False,
            base=None, per_example: bool = False) -> torch.Tensor:
        """The metric for each cell (one patched corrupted run each), as a tensor [len(cells)]
        ([len(cells), batch] with ``per_example``: the metric of each prompt)."""
        cells = list(cells)
        for c in cells:
            if c.site.layer is None:
                raise SweepError(f"sweeps patch sites inside blocks; {c.site.name} is not in a block")
        engine = self.engine
        sites = list({c.site.name: c.site for c in cells}.values())
        base = base or engine.base(feed, sites=sites)
        values = self._sources(cells, source, base)
        readout = engine.readout(base, metric, per_example)
        out = torch.empty(len(cells), *readout.value_shape, dtype=torch.float32)
        rows, where, unchanged = [], [], []
        for idx, cell in enumerate(cells):
            value = cell.source if cell.source is not None else values[cell.site.name]
            start = self._first_change(cell, value, base)
            if start is None:
                unchanged.append(idx)
                continue
            rows.append(Row(cell.site.layer, start, (SitePatch(cell.site, cell.index, value),)))
            where.append(idx)
        engine.stats["cells_skipped"] += len(unchanged)
        if unchanged:
            # the clean value equals the corrupted one wherever this patch writes: the run is the base run
            out[torch.tensor(unchanged)] = readout.base_value()
        values = engine.run(rows, base, metric, memory_budget=memory_budget, progress=progress, readout=readout)
        if rows:
            out[torch.tensor(where)] = values
        return out

    def _first_change(self, cell: Cell, value: torch.Tensor, base) -> int | None:
        """The first position the patch changes (None: it changes nothing).

        In a causal model, positions before it are identical to the base run in every later layer,
        so the row starts there; a patch whose clean value equals the corrupted one is the base run.
        """
        axes = cell.site.axes
        diff = value != base.values[cell.site.name].to(value.dtype)
        offset = 0
        pos_axis = next((axes.index(a) for a in ("pos", "query_pos") if a in axes), None)
        for a, v in cell.index:
            diff = diff.narrow(axes.index(a), v, 1)
            if axes.index(a) == pos_axis:
                offset = v
        if pos_axis is None:
            return 0 if bool(diff.any()) else None
        per_pos = diff.movedim(pos_axis, 0).reshape(diff.shape[pos_axis], -1).any(-1)
        changed = per_pos.nonzero()
        if changed.numel() == 0:
            return None
        return offset + int(changed[0]) if self.engine.causal else 0

    def _sources(self, cells, source, base) -> dict:
        values = {}
        mg = self.model.graph
        for cell in cells:
            name = cell.site.name
            if name in values or cell.source is not None:
                continue
            try:
                value = source[name]
            except Exception:  # noqa: BLE001 - re-raised with the site's name
                raise SweepError(f"the clean cache holds no value for {name}; run_with_cache it on the clean tokens") from None
            want = mg.shape(cell.site, base.batch, base.seq)
            if tuple(value.shape) != tuple(want):
                raise SweepError(f"the clean value of {name} has shape {tuple(value.shape)}; the corrupted run needs {tuple(want)}")
            # on the device of the site it replaces (its block's, for a model spread over devices)
            values[name] = value.to(base.values[name].device if name in base.values else self.model.captured.device, self.model.captured.dtype)
        return values
