"""Run thousands of activation patches as batched programs that share the common prefix.

Problem: an activation-patching sweep is one corrupted forward per patch (TransformerLens runs a
Python loop). Every patch shares everything before the layer it patches, and in a causal model
everything before the position it patches; a metric usually reads a few logits.

Mechanism (``Sweep.run``):
- one *base* run of the corrupted input, block by block, keeps each block's residual input and the
  keys and values each attention op reads;
- cells (one patch each) are grouped by the first position they can change (``start``: the patched
  position in a causal model, else 0) and cut into chunks under a memory budget;
- a chunk runs the blocks from its lowest patched layer; at layer L the rows that patch layer L join
  the batch (their residual is the base run's), and block L's program replaces the patched values
  with ``where(row mask, clean value, value)``. Rows only compute positions ``start..``; the attention
  reads the base run's keys and values for earlier positions (the KV-prefix pass);
- the head runs the final norm on the positions the metric reads and, for a declared metric, the
  unembedding on the vocabulary entries it reads; any other callable gets full logits per row.

Example::

    sweep = Sweep(model)
    values = sweep.run(cells, corrupted_tokens, clean_cache, metric)    # [len(cells)]

Gotchas: block programs are cached per (layer, patched sites, prefix or not), so a new position or a
new head never builds a new program. Results equal one hooked forward per patch to float rounding.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..graphs.nodes import sym_dims
from ..graphs.segments import split
from ..graphs.sites import Site
from ..metrics import Metric
from ..passes import VOCAB_INPUT, Cache, Edit, Intervene, KVPrefix, PassError, Read, SelectVocab
from .programs import Programs, rewrites_for

__all__ = ["Cell", "Sweep", "SweepError"]


class SweepError(ValueError):
    pass


@dataclass(frozen=True)
class Cell:
    """One patched run: ``site`` takes the clean value at ``index`` (axis name -> index)."""

    site: Site
    index: tuple  # ((axis name, int), ...) in the site's user layout; absent axes mean "all"

    def start(self, causal: bool) -> int:
        if not causal:
            return 0
        for axis in ("pos", "query_pos"):
            for name, value in self.index:
                if name == axis:
                    return value
        return 0


@dataclass
class Base:
    hidden: list  # residual input of each block [B0, S, d]
    kv: list  # (k, v) each attention op reads, per block (None where the block has no attention)
    context: dict
    logits: torch.Tensor | None
    batch: int
    seq: int


class Sweep:
    def __init__(self, model, compile: bool = False):
        self.model = model
        mg = model.graph
        self.mg = mg
        self.seg = getattr(model, "_segments", None)
        if self.seg is None:
            self.seg = model._segments = split(mg)
        if not hasattr(model, "_segment_programs"):
            model._segment_programs = (
                [Programs(gm) for gm in self.seg.blocks],
                Programs(self.seg.head),
                self.seg.prelude,
            )
        self.blocks, self.head, self.prelude = model._segment_programs
        self.compile = compile
        self.causal = model.captured.is_causal
        syms = (model.captured.batch_symbol, model.captured.seq_symbol)
        nodes = {n.name: n for n in self.seg.prelude.graph.nodes}
        self.seq_dims = {}
        for names in list(self.seg.block_context) + [self.seg.head_context]:
            for c in names:
                dims = sym_dims(nodes[c], *syms)
                self.seq_dims[c] = [i for i, d in enumerate(dims) if d == "S"]
        self.kv_uses = []
        for i, a in enumerate(mg.attn):
            self.kv_uses.append(None if a is None else ((a.k_in, a.k_consumer, f"fxl_kpre_{i}"), (a.v_in, a.v_consumer, f"fxl_vpre_{i}")))

    # ---- the base run ---------------------------------------------------------------------------
    def base(self, feed: dict, keep_kv: bool = True, keep_logits: bool = True) -> Base:
        pre = self.prelude(**feed)
        context = pre["context"]
        h = pre["outputs"]["hidden"]
        hidden, kv = [], []
        for i, prog in enumerate(self.blocks):
            hidden.append(h)
            reads = ()
            if keep_kv and self.kv_uses[i] is not None:
                (k, _, _), (v, _, _) = self.kv_uses[i]
                reads = (Read("k", k), Read("v", v))
            out = prog.get((Cache(reads),) if reads else ())(**self._block_feed(i, h, context))
            kv.append((out["cache"]["k"], out["cache"]["v"]) if reads else None)
            h = out["outputs"]["hidden"]
        logits = None
        if keep_logits:
            logits = self._head_full(h, context)
        batch, seq = feed["input_ids"].shape
        return Base(hidden, kv, context, logits, batch, seq)

    def _block_feed(self, i: int, h: torch.Tensor, context: dict, start: int = 0, rows: int = 1) -> dict:
        feed = {self.seg.hidden[i]: h}
        for c in self.seg.block_context[i]:
            feed[c] = self._context(c, context[c], start, rows)
        return feed

    def _context(self, name: str, value: torch.Tensor, start: int, rows: int) -> torch.Tensor:
        dims = self.seq_dims.get(name, [])
        if start and dims:
            # a [.., q, k] mask keeps every key; every other positional tensor is sliced to the suffix
            axis = dims[-2] if len(dims) == 2 else dims[0]
            value = value.narrow(axis, start, value.shape[axis] - start)
        if rows > 1 and value.shape[0] > 1:
            value = value.repeat(rows, *([1] * (value.dim() - 1)))
        return value

    def _head_full(self, h: torch.Tensor, context: dict) -> torch.Tensor:
        feed = {self.seg.head_input: h, **{c: context[c] for c in self.seg.head_context}}
        out = self.head.get(())(**feed)["outputs"]
        return out[self.seg.outputs[0]]

    # ---- the sweep ------------------------------------------------------------------------------
    def run(self, cells, feed: dict, source, metric, *, memory_budget: float = 1.0, progress: bool = False,
            base: Base | None = None) -> torch.Tensor:
        """The metric for each cell (one patched corrupted run each), as a tensor [len(cells)]."""
        cells = list(cells)
        for c in cells:
            if c.site.layer is None:
                raise SweepError(f"sweeps patch sites inside blocks; {c.site.name} is not in a block")
        declared = isinstance(metric, Metric)
        base = base or self.base(feed, keep_kv=self.causal, keep_logits=not declared or True)
        values = self._sources(cells, source, base)
        out = torch.empty(len(cells), dtype=torch.float32)
        groups = defaultdict(list)
        for idx, cell in enumerate(cells):
            groups[cell.start(self.causal)].append(idx)
        per_row = self._row_bytes(base, declared)
        budget = int(memory_budget * 2**30)
        plan = []
        for start, idxs in sorted(groups.items()):
            idxs.sort(key=lambda i: cells[i].site.layer)
            rows = max(1, budget // max(1, per_row(start)))
            for k in range(0, len(idxs), rows):
                plan.append((start, idxs[k : k + rows]))
        steps = sum(self.mg.n_layers - cells[chunk[0]].site.layer for _, chunk in plan)
        bar = tqdm(total=steps, desc="patching", disable=not progress, leave=False)
        for start, chunk in plan:
            res = self._chunk(start, [cells[i] for i in chunk], base, values, metric, bar)
            out[torch.tensor(chunk)] = res.float().cpu()
        bar.close()
        return out

    def _sources(self, cells, source, base: Base) -> dict:
        values = {}
        for cell in cells:
            name = cell.site.name
            if name in values:
                continue
            try:
                value = source[name]
            except Exception:  # noqa: BLE001 - re-raised with the site's name
                raise SweepError(f"the clean cache holds no value for {name}; run_with_cache it on the clean tokens") from None
            want = self.mg.shape(cell.site, base.batch, base.seq)
            if tuple(value.shape) != tuple(want):
                raise SweepError(f"the clean value of {name} has shape {tuple(value.shape)}; the corrupted run needs {tuple(want)}")
            values[name] = value.to(self.model.captured.device, self.model.captured.dtype)
        return values

    def _row_bytes(self, base: Base, declared: bool):
        d = self.mg.dims
        d_model, d_mlp = int(d.get("d_model", 1)), int(d.get("d_mlp", 4 * int(d.get("d_model", 1))))
        heads = int(d.get("n_heads") or 1)
        vocab = int(d.get("d_vocab") or 1)
        seq, batch = base.seq, base.batch

        def per_row(start: int) -> int:
            n = seq - start
            token = 12 * d_model + 3 * d_mlp + 4 * heads * seq
            logits = 0 if declared else seq * vocab
            return 4 * batch * (n * token + logits + seq * d_model)

        return per_row

    def _chunk(self, start: int, cells: list, base: Base, values: dict, metric, bar) -> torch.Tensor:
        b0, seq = base.batch, base.seq
        first = cells[0].site.layer
        h = None
        n_rows = 0
        joined = defaultdict(list)
        for row, cell in enumerate(cells):
            joined[cell.site.layer].append((row, cell))
        for layer in range(first, self.mg.n_layers):
            new = joined.get(layer, [])
            if new:
                h_new = base.hidden[layer][:, start:].repeat(len(new), 1, 1)
                h = h_new if h is None else torch.cat([h, h_new])
            n_rows = h.shape[0] // b0
            feed = self._block_feed(layer, h, base.context, start, n_rows)
            plan = ()
            if start and self.kv_uses[layer] is not None:
                plan += (KVPrefix(self.kv_uses[layer]),)
                k, v = base.kv[layer]
                for (_, _, name), t in zip(self.kv_uses[layer], (k, v)):
                    pre = t[..., :start, :]
                    feed[name] = pre.repeat(n_rows, *([1] * (pre.dim() - 1))) if b0 > 1 else pre
            if new:
                edits, efeed, sites = self._edits(layer, new, values, start, n_rows, b0)
                plan += rewrites_for(self.mg, sites, write=sites) + (Intervene(tuple(edits), prefix="fxl_s"),)
                feed.update(efeed)
            out = self.blocks[layer].get(plan, self.compile)(**feed)
            h = out["outputs"]["hidden"]
            bar.update(1)
        return self._metric(h, start, base, metric, n_rows)

    def _edits(self, layer: int, new: list, values: dict, start: int, n_rows: int, b0: int):
        by_site = defaultdict(list)
        for row, cell in new:
            by_site[cell.site.name].append((row, cell))
        edits, feed, sites = [], {}, []
        for i, (name, entries) in enumerate(by_site.items()):
            site = entries[0][1].site
            value = values[name]
            axes = site.axes
            for axis in ("pos", "query_pos"):
                if axis in axes and start:
                    value = value.narrow(axes.index(axis), start, value.shape[axes.index(axis)] - start)
            mask_shape = [n_rows * b0] + [1] * (value.dim() - 1)
            indexed = sorted({a for _, c in entries for a, _ in c.index})
            for a in indexed:
                mask_shape[axes.index(a)] = value.shape[axes.index(a)]
            mask = torch.zeros(mask_shape, dtype=torch.bool)
            for row, cell in entries:
                index = [slice(row * b0, (row + 1) * b0)] + [slice(None)] * (value.dim() - 1)
                for a, v in cell.index:
                    index[axes.index(a)] = v - start if a in ("pos", "query_pos") else v
                mask[tuple(index)] = True
            edits.append(Edit(name, site.node, site.layout, "replace", masked=True))
            feed[f"fxl_s{i}_value"] = value.repeat(n_rows, *([1] * (value.dim() - 1))) if b0 > 1 or n_rows > 1 else value
            feed[f"fxl_s{i}_mask"] = mask.to(value.device)
            sites.append(site)
        return edits, feed, sites

    def _metric(self, h: torch.Tensor, start: int, base: Base, metric, n_rows: int) -> torch.Tensor:
        b0, seq = base.batch, base.seq
        if isinstance(metric, Metric):
            pos, tok = metric.select(seq, b0)  # [b0, n_pos], [b0, n_tok]
            rel = (pos - start).clamp(min=0).repeat(n_rows, 1)  # [rows*b0, n_pos]
            hs = h[torch.arange(h.shape[0])[:, None], rel]  # [rows*b0, n_pos, d]
            vocab, inverse = torch.unique(tok.flatten(), return_inverse=True)
            logits = self._head_select(hs, base.context, vocab)  # [rows*b0, n_pos, |vocab|]
            sel = logits.gather(-1, inverse.view(b0, 1, -1).repeat(n_rows, pos.shape[1], 1))
            early = pos < start
            if early.any():
                full = base.logits[torch.arange(b0)[:, None, None], pos[:, :, None], tok[:, None, :]]
                sel = torch.where(early.repeat(n_rows, 1)[..., None], full.repeat(n_rows, 1, 1), sel)
            return metric.from_selected(sel.view(n_rows, b0, *sel.shape[1:]))
        logits = self._head_full(h, base.context)
        if start:
            logits = torch.cat([base.logits[:, :start].repeat(n_rows, 1, 1), logits], dim=1)
        out = []
        for r in range(n_rows):
            value = torch.as_tensor(metric(logits[r * b0 : (r + 1) * b0]))
            if value.numel() != 1:
                raise SweepError(f"the patching metric must return a scalar; it returned shape {tuple(value.shape)}")
            out.append(value.reshape(()))
        return torch.stack(out)

    def _head_select(self, hs: torch.Tensor, context: dict, vocab: torch.Tensor) -> torch.Tensor:
        feed = {self.seg.head_input: hs, **{c: context[c] for c in self.seg.head_context}}
        unembed = self.mg.structure.unembed
        try:
            prog = self.head.get((SelectVocab(unembed),))
        except PassError:
            return self.head.get(())(**feed)["outputs"][self.seg.outputs[0]][..., vocab]
        feed[VOCAB_INPUT] = vocab.to(hs.device)
        return prog(**feed)["outputs"][self.seg.outputs[0]]
