"""Rows on the whole model: the exact, slower path for models the layer-by-layer engine cannot split.

Problem: the row engine runs blocks one at a time, which needs the captured graph to split into a
prelude, blocks and a head, and each block to run on a suffix of positions or on packed rows. Some
families capture exactly but do not split (a block reads a value computed inside another, a size the
engine cannot recompute) or fail inside a block call. A sweep must still answer, exactly, and never
with an internal error.

Mechanism: every row runs the whole model: the input is tiled once per row, each row's site patches
become one masked edit per site (the same placement as the padded layout at start 0) and its receiver
inputs one Edges pass, in chunks of ``max_rows`` rows; a declared metric unembeds only the vocabulary
it reads. ``base_values`` caches the sites' unpatched values with one plain run. The engine switches
to this path when the layered one fails for a structural reason, and says so once per capture.

Example::

    values = run_whole(model, rows, feed, readout)         # [len(rows), *readout.value_shape], each row a full forward
"""

from __future__ import annotations

import torch

from ...passes.intervene import set_to
from ..plan import PlanBuilder
from .layouts import Padded

__all__ = ["run_whole", "base_values"]


def base_values(model, feed: dict, sites) -> dict:
    """The unpatched values of ``sites`` on ``feed``, from one whole-model run."""
    if not sites:
        return {}
    plan, inputs = PlanBuilder(model.graph).cache(list(sites), keep_outputs=False).build()
    with torch.no_grad():
        return dict(model.programs.get(plan)(**feed, **inputs)["cache"])


def run_whole(model, rows: list, feed: dict, readout, max_rows: int = 32) -> torch.Tensor:
    """The metric of each row (``readout``'s metric, checked), each run as a whole-model forward of the
    tiled input: [len(rows), *readout.value_shape]."""
    batch, seq = feed["input_ids"].shape
    device = model.captured.device
    declared = readout.declared
    if declared:
        pos, tok = readout.pos, readout.tok
        vocab, inverse = torch.unique(tok.flatten(), return_inverse=True)
    out = []
    for first in range(0, len(rows), max_rows):
        chunk = rows[first : first + max_rows]
        n = len(chunk)
        layout = Padded(0, n)
        b = PlanBuilder(model.graph)
        patches, inputs = {}, []
        for r, row in enumerate(chunk):
            for p in row.patches:
                patches.setdefault(p.site.name, []).append((r, p))
            inputs += [(r, x) for x in row.inputs]
        for entries in patches.values():
            placed = layout.patch(entries[0][1].site, entries, batch)
            if placed is not None:
                b.edit(entries[0][1].site, set_to, (placed[0],), placed[1])
        if inputs:
            _receivers(b, inputs, layout, batch, seq, model)
        # a head that is not one unembedding (Dory scales the logits by a per-entry vector after it)
        # computes every entry, and the metric's entries are picked from them
        select = declared and model.graph.structure.unembed is not None
        if select:
            b.select_vocab(model.graph.structure.unembed, vocab.to(device))
        plan, graph_inputs = b.build()
        tiled = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in feed.items()}
        with torch.no_grad():
            logits = model._logits(model.programs.get(plan)(**tiled, **graph_inputs))
        if declared and not select:
            logits = logits[..., vocab.to(logits.device)]
        if declared:
            rows_idx = torch.arange(n * batch)[:, None, None]
            sel = logits[rows_idx, pos.repeat(n, 1)[:, :, None].to(logits.device), inverse.view(batch, 1, -1).repeat(n, 1, 1).to(logits.device)]
            out += list(readout.values(sel.view(n, batch, *sel.shape[1:])).float().cpu())
        else:
            out += list(readout.per_row(logits.view(n, batch, *logits.shape[1:])).float().cpu())
    return torch.stack(out) if out else torch.empty(0, *readout.value_shape)


def _receivers(b, inputs, layout, batch: int, seq: int, model) -> None:
    modes = {x.mode for _, x in inputs}
    receivers = sorted({x.receiver.name: x.receiver for _, x in inputs}.values(), key=lambda r: r.index)
    by_entry: dict = {}
    for rec in receivers:
        by_entry.setdefault(rec.entry, []).append(rec)
    like = torch.zeros(layout.n_rows * batch, seq, model.cfg.d_model, dtype=model.captured.dtype, device=model.captured.device)
    deltas = {}
    for entry, group in by_entry.items():
        column = {rec.name: j for j, rec in enumerate(group)}
        entries = [(r, column[x.receiver.name], x.value) for r, x in inputs if x.receiver.name in column]
        deltas[entry] = layout.receivers(entries, len(group), batch, like)
    b.edges((), tuple(receivers), modes.pop(), deltas=deltas)
