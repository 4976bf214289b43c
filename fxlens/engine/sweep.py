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
  reads the base run's keys and values for earlier positions;
- in a causal model, rows of every start share one block call per layer: their tokens are packed
  end to end into one sequence, and only the attention core sees them padded, one row each, with the
  base run's keys and values in the slots a row does not compute (``passes/pack_rows.py``). Where a
  block cannot be packed, or the packed call would be so wide that its activations no longer stay in
  cache (``pack_activation_bytes``), each start runs as its own batch (the KV-prefix pass), and starts
  a few positions apart merge where computing those positions twice costs less than another call;
- the head runs the final norm on the positions the metric reads and, for a declared metric, the
  unembedding on the vocabulary entries it reads; any other callable gets full logits per row.

Example::

    sweep = Sweep(model)
    values = sweep.run(cells, corrupted_tokens, clean_cache, metric)    # [len(cells)]

Gotchas: block programs are cached per (layer, patched sites, packed or prefixed), so a new position
or a new head never builds a new program. Results equal one hooked forward per patch to float rounding.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import passes
from ..graphs.nodes import sym_dims
from ..graphs.segments import split
from ..graphs.sites import Site
from ..metrics import Metric
from ..passes import VOCAB_INPUT, Cache, Edit, FuseGelu, Intervene, KVPrefix, PackRows, PassError, Read, SelectVocab
from ..passes.pack_rows import GRID, POS, ROW, core_contexts, unpack
from .programs import Programs, rewrites_for

__all__ = ["Cell", "Sweep", "SweepError"]


class SweepError(ValueError):
    pass


@dataclass(frozen=True)
class Cell:
    """One patched run: ``site`` takes the clean value at ``index`` (axis name -> index).

    ``source``, when given, is this cell's own value for the site ([batch, ...] in the site's layout),
    used instead of the clean run's (edge sweeps precompute what a receiver would read).
    """

    site: Site
    index: tuple  # ((axis name, int), ...) in the site's user layout; absent axes mean "all"
    source: torch.Tensor | None = field(default=None, compare=False)


@dataclass
class Base:
    hidden: list  # residual input of each block [B0, S, d]
    kv: list  # (k, v) each attention op reads, per block (None where the block has no attention)
    context: dict
    final: torch.Tensor  # output of the last block [B0, S, d]
    batch: int
    seq: int
    values: dict  # base values of the patched sites
    full_logits: torch.Tensor | None = None  # computed when a plain callable metric asks for them
    selected: dict = field(default_factory=dict)  # metric -> logits it reads [B0, n_pos, n_tok]


class Sweep:
    # rows are packed into one call per layer while that call's widest activation stays below this:
    # beyond it (long sequences, many rows) elementwise ops on fresh, uncached memory cost more than the
    # block calls packing saves (measured: GPT-2, 48 tokens, unrelated prompts: packed 12% slower)
    pack_activation_bytes = 32 * 2**20

    def __init__(self, model, compile: bool = False):
        self.model = model
        mg = model.graph
        self.mg = mg
        self.seg = getattr(model, "_segments", None)
        if self.seg is None:
            self.seg = model._segments = split(mg)
        if not hasattr(model, "_segment_programs"):
            model._segment_programs = (
                # the base run is bit-identical to a plain forward, so that a patch whose clean value
                # equals the corrupted one is recognised; patched rows run blocks whose spelled-out
                # GELU is one kernel
                [Programs(gm) for gm in self.seg.blocks],
                [Programs(passes.apply(gm, FuseGelu())) for gm in self.seg.blocks],
                Programs(self.seg.head),
                self.seg.prelude,
            )
        self.base_blocks, self.blocks, self.head, self.prelude = model._segment_programs
        self.compile = compile
        self.causal = model.captured.is_causal
        # work done, in (row, position, layer) units: full block calls and keys-and-values-only calls
        self.stats = {"token_layers": 0, "kv_token_layers": 0, "block_calls": 0, "cells_skipped": 0}
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
    def base(self, feed: dict, keep_kv: bool = True, sites=()) -> Base:
        """The unpatched run, block by block, keeping what the patched rows will reuse.

        ``sites``: sites whose base values are also kept (``Base.values``), to find where a patch
        changes nothing.
        """
        pre = self.prelude(**feed)
        context = pre["context"]
        h = pre["outputs"]["hidden"]
        hidden, kv, values = [], [], {}
        by_layer = defaultdict(list)
        for site in sites:
            by_layer[site.layer].append(site)
        for i, prog in enumerate(self.base_blocks):
            hidden.append(h)
            reads = tuple(Read(s.name, s.node, s.layout) for s in by_layer.get(i, ()))
            if keep_kv and self.kv_uses[i] is not None:
                (k, _, _), (v, _, _) = self.kv_uses[i]
                reads += (Read("fxl_k", k), Read("fxl_v", v))
            plan = rewrites_for(self.mg, by_layer.get(i, ())) + ((Cache(reads),) if reads else ())
            out = prog.get(plan)(**self._block_feed(i, h, context))
            self.stats["token_layers"] += h.shape[0] * h.shape[1]
            cache = out.get("cache", {})
            kv.append((cache["fxl_k"], cache["fxl_v"]) if "fxl_k" in cache else None)
            values.update({k: v for k, v in cache.items() if not k.startswith("fxl_")})
            h = out["outputs"]["hidden"]
        batch, seq = feed["input_ids"].shape
        return Base(hidden, kv, context, h, batch, seq, values)

    def _base_logits(self, base: Base) -> torch.Tensor:
        if base.full_logits is None:
            base.full_logits = self._head_full(base.final, base.context)
        return base.full_logits

    def _base_selected(self, base: Base, metric: Metric) -> torch.Tensor:
        """The base run's logits a declared metric reads, [B0, n_pos, n_tok], without the full unembedding."""
        key = id(metric)
        if key not in base.selected:
            pos, tok = metric.select(base.seq, base.batch)
            if base.full_logits is not None:
                sel = base.full_logits[torch.arange(base.batch)[:, None, None], pos[:, :, None], tok[:, None, :]]
            else:
                sel = self._selected(base.final[torch.arange(base.batch)[:, None], pos], base, metric, 1)
            base.selected[key] = (metric, sel)  # the metric is kept so that its id stays its own
        return base.selected[key][1]

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
        sites = list({c.site.name: c.site for c in cells}.values())
        base = base or self.base(feed, keep_kv=self.causal, sites=sites)
        values = self._sources(cells, source, base)
        out = torch.empty(len(cells), dtype=torch.float32)
        groups = defaultdict(list)
        unchanged = []
        for idx, cell in enumerate(cells):
            start = self._first_change(cell, values, base)
            if start is None:
                unchanged.append(idx)
            else:
                groups[start].append(idx)
        self.stats["cells_skipped"] += len(unchanged)
        if unchanged:
            # the clean value equals the corrupted one wherever this patch writes: the run is the base run
            out[torch.tensor(unchanged)] = self._base_metric(base, metric)
        per_row = self._row_bytes(base, declared)
        budget = int(memory_budget * 2**30)
        packing = self._packing() if len(groups) > 1 else None
        if packing is not None and self._packed_bytes(groups, base) <= self.pack_activation_bytes:
            self._run_packed(groups, cells, base, values, metric, out, budget, per_row, progress)
            return out
        if len(groups) > 1:
            groups = self._merge_starts(groups, cells, self._break_even(base))
        plan = []
        for start, idxs in sorted(groups.items()):
            idxs.sort(key=lambda i: cells[i].site.layer)
            rows = max(1, budget // max(1, per_row(start)))
            for k in range(0, len(idxs), rows):
                plan.append((start, idxs[k : k + rows]))
        steps = sum(self.mg.n_layers - cells[chunk[0]].site.layer for _, chunk in plan)
        bar = tqdm(total=steps, desc="patching", disable=not progress, leave=False)
        # chunks advance together, layer by layer, so that a block's weights are read from memory once
        # per layer rather than once per chunk (small chunks are bound by weight bandwidth)
        wave, used = [], 0
        for start, chunk in plan + [(None, None)]:
            cost = 0 if chunk is None else per_row(start) * len(chunk)
            if wave and (chunk is None or used + cost > budget):
                for idxs, res in zip([c for _, c in wave], self._wave(wave, cells, base, values, metric, bar)):
                    out[torch.tensor(idxs)] = res.float().cpu()
                wave, used = [], 0
            if chunk is not None:
                wave.append((start, chunk))
                used += cost
        bar.close()
        return out

    def _wave(self, wave, cells, base, values, metric, bar):
        runs = [self._chunk(start, [cells[i] for i in chunk], base, values, metric, bar) for start, chunk in wave]
        results = [None] * len(runs)
        for layer in range(min(cells[chunk[0]].site.layer for _, chunk in wave), self.mg.n_layers):
            for k, run in enumerate(runs):
                if results[k] is None and cells[wave[k][1][0]].site.layer <= layer:
                    try:
                        next(run)
                    except StopIteration as done:
                        results[k] = done.value
        for k, run in enumerate(runs):
            while results[k] is None:
                try:
                    next(run)
                except StopIteration as done:
                    results[k] = done.value
        return results

    def _break_even(self, base: Base) -> float:
        """How many extra (row, position) tokens one block call costs: measured once per model.

        A call reads all of a block's weights and runs its graph in Python; for small batches that,
        not the arithmetic, is the cost, so computing a few positions twice can beat another call.
        """
        cached = getattr(self.model, "_sweep_break_even", None)
        if cached is not None:
            return cached
        import time

        layer = self.mg.n_layers // 2
        prog = self.base_blocks[layer].get(())
        times = {}
        for n in (1, 64):
            h = base.hidden[layer][:1, :1].expand(n, 1, -1).contiguous()
            feed = self._block_feed(layer, h, {c: v[:1, ..., :1, :1] if len(self.seq_dims.get(c, [])) == 2 else v[:1, :1] if self.seq_dims.get(c) else v for c, v in base.context.items()})
            prog(**feed)
            prog(**feed)
            best = float("inf")
            for _ in range(7):  # best of 7: one noisy pair of timings must not decide every later sweep
                t = time.perf_counter()
                prog(**feed)
                best = min(best, time.perf_counter() - t)
            times[n] = best
        per_token = max((times[64] - times[1]) / 63, 1e-9)
        value = max(1.0, min(256.0, times[1] / per_token))
        self.model._sweep_break_even = value
        return value

    def _merge_starts(self, groups: dict, cells: list, break_even: float) -> dict:
        """Merge start groups where computing a few more positions beats making more block calls.

        Exact either way: positions before a cell's first change equal the base run's.
        """
        starts = sorted(groups, reverse=True)
        merged: dict = {}
        carry: list = []
        for i, start in enumerate(starts):
            idxs = carry + groups[start]
            nxt = starts[i + 1] if i + 1 < len(starts) else None
            if nxt is not None:
                first = min(cells[j].site.layer for j in idxs)
                calls = self.mg.n_layers - first
                extra = sum(self.mg.n_layers - cells[j].site.layer for j in idxs) * (start - nxt)
                if extra < calls * break_even:
                    carry = idxs
                    continue
            merged[start] = idxs
            carry = []
        return merged

    def _first_change(self, cell: Cell, values: dict, base: Base) -> int | None:
        """The first position the patch changes (None: it changes nothing).

        In a causal model, positions before it are identical to the base run in every later layer,
        so the row starts there; a patch whose clean value equals the corrupted one is the base run.
        """
        axes = cell.site.axes
        value = cell.source if cell.source is not None else values[cell.site.name]
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
        return offset + int(changed[0]) if self.causal else 0

    def _base_metric(self, base: Base, metric) -> float:
        if isinstance(metric, Metric):
            return float(metric.from_selected(self._base_selected(base, metric)[None])[0])
        return float(self._per_row(self._base_logits(base)[None], metric)[0])

    def _sources(self, cells, source, base: Base) -> dict:
        values = {}
        for cell in cells:
            name = cell.site.name
            if name in values or cell.source is not None:
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

    def _chunk(self, start: int, cells: list, base: Base, values: dict, metric, bar):
        """A generator: each ``next`` runs one more block; it returns the chunk's metric values."""
        b0 = base.batch
        first = cells[0].site.layer
        last = self.mg.n_layers - 1
        h = None
        joined = defaultdict(list)
        for row, cell in enumerate(cells):
            joined[cell.site.layer].append((row, cell))
        # a declared metric reads a few positions: the last block then needs keys and values at every
        # position but everything else only from the first position read
        read_from = self._first_read(metric, base, start)
        for layer in range(first, last + 1):
            new = joined.get(layer, [])
            if new:
                h_new = base.hidden[layer][:, start:].repeat(len(new), 1, 1)
                h = h_new if h is None else torch.cat([h, h_new])
            rows = h.shape[0] // b0
            prefix = self._base_prefix(layer, base, start, rows) if start else None
            if layer == last and read_from > start and self.kv_uses[layer] is not None:
                k, v = self._block(layer, h, base, values, new, start, rows, prefix, keys_only=True)
                cut = read_from - start
                prefix = tuple(
                    t[..., :cut, :] if pre is None else torch.cat([pre.expand(t.shape[0], *pre.shape[1:]), t[..., :cut, :]], dim=-2)
                    for pre, t in zip(prefix or (None, None), (k, v))
                )
                h, start = h[:, cut:], read_from
            h = self._block(layer, h, base, values, new, start, rows, prefix)
            bar.update(1)
            if layer < last:
                yield layer
        return self._metric(h, start, base, metric, h.shape[0] // b0)

    def _first_read(self, metric, base: Base, start: int) -> int:
        if not (isinstance(metric, Metric) and self.causal):
            return start
        pos, _ = metric.select(base.seq, base.batch)
        return max(start, int(pos.min()))

    def _base_prefix(self, layer: int, base: Base, start: int, rows: int):
        if self.kv_uses[layer] is None:
            return None
        k, v = base.kv[layer]
        tile = (lambda t: t.repeat(rows, *([1] * (t.dim() - 1)))) if base.batch > 1 else (lambda t: t)
        return tile(k[..., :start, :]), tile(v[..., :start, :])

    def _prefix_plan(self, layer: int, feed: dict, prefix) -> tuple:
        """The rewrite that makes block ``layer`` attend to ``prefix`` (keys, values of the positions
        before the rows' start) as well, with the prefix added to ``feed``; () without a prefix."""
        if prefix is None:
            return ()
        for (_, _, name), t in zip(self.kv_uses[layer], prefix):
            feed[name] = t
        return (KVPrefix(self.kv_uses[layer]),)

    def _block(self, layer, h, base, values, new, start, rows, prefix, keys_only: bool = False):
        """Run block ``layer`` on positions ``start..`` of ``rows`` rows (the new ones patched)."""
        self.stats["kv_token_layers" if keys_only else "token_layers"] += h.shape[0] * h.shape[1]
        self.stats["block_calls"] += 1
        feed = self._block_feed(layer, h, base.context, start, rows)
        plan = self._prefix_plan(layer, feed, prefix)
        edited = self._edits(layer, new, values, start, rows, base.batch) if new else None
        return self._call(layer, plan, feed, edited, keys_only)

    def _call(self, layer: int, plan: tuple, feed: dict, edited, keys_only: bool):
        """Run block ``layer`` with ``plan`` plus the edits ``edited`` ((edits, their inputs, sites) or
        None): its output, or with ``keys_only`` the keys and values its attention reads."""
        if edited is not None and edited[0]:
            edits, efeed, sites = edited
            plan += rewrites_for(self.mg, sites, write=sites) + (Intervene(tuple(edits), prefix="fxl_s"),)
            feed.update(efeed)
        if keys_only:
            (k, _, _), (v, _, _) = self.kv_uses[layer]
            plan += (Cache((Read("k", k), Read("v", v)), keep_outputs=False),)
            out = self.blocks[layer].get(plan, self.compile)(**feed)["cache"]
            return out["k"], out["v"]
        return self.blocks[layer].get(plan, self.compile)(**feed)["outputs"]["hidden"]

    def _edits(self, layer: int, new: list, values: dict, start: int, n_rows: int, b0: int):
        by_site = defaultdict(list)
        for row, cell in new:
            by_site[cell.site.name].append((row, cell))
        edits, feed, sites = [], {}, []
        for name, entries in by_site.items():
            site = entries[0][1].site
            axes = site.axes
            own = [c for _, c in entries if c.source is not None]
            value = values[name] if name in values else own[0].source
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
                if any(isinstance(i, int) and i < 0 for i in index):
                    continue  # a position before ``start``: it acts only through keys and values
                mask[tuple(index)] = True
            if not mask.any():
                continue
            i = len(edits)
            edits.append(Edit(name, site.node, site.layout, "replace", masked=True))
            tiled = value.repeat(n_rows, *([1] * (value.dim() - 1))) if b0 > 1 or n_rows > 1 else value
            if own:
                tiled = tiled.clone()
                for row, cell in entries:
                    if cell.source is not None:
                        src = cell.source
                        for axis in ("pos", "query_pos"):
                            if axis in axes and start:
                                src = src.narrow(axes.index(axis), start, src.shape[axes.index(axis)] - start)
                        tiled[row * b0 : (row + 1) * b0] = src
            feed[f"fxl_s{i}_value"] = tiled
            feed[f"fxl_s{i}_mask"] = mask.to(value.device)
            sites.append(site)
        return edits, feed, sites

    def _metric(self, h: torch.Tensor, start: int, base: Base, metric, n_rows: int) -> torch.Tensor:
        b0, seq = base.batch, base.seq
        if isinstance(metric, Metric):
            pos, _ = metric.select(seq, b0)  # [b0, n_pos]
            rel = (pos - start).clamp(min=0).repeat(n_rows, 1)  # [rows*b0, n_pos]
            hs = h[torch.arange(h.shape[0])[:, None], rel]  # [rows*b0, n_pos, d]
            return self._declared(hs, (pos < start).repeat(n_rows, 1), base, metric, n_rows)
        logits = self._head_full(h, base.context)
        if start:
            logits = torch.cat([self._base_logits(base)[:, :start].repeat(n_rows, 1, 1), logits], dim=1)
        return self._per_row(logits.view(n_rows, b0, *logits.shape[1:]), metric)

    def _selected(self, hs: torch.Tensor, base: Base, metric: Metric, n_rows: int) -> torch.Tensor:
        """The logits ``metric`` reads from hidden states ``hs`` [rows*B0, n_pos, d] at its positions:
        [rows*B0, n_pos, n_tok], the unembedding computed only for the vocabulary entries read."""
        _, tok = metric.select(base.seq, base.batch)
        vocab, inverse = torch.unique(tok.flatten(), return_inverse=True)
        logits = self._head_select(hs, base.context, vocab)  # [rows*b0, n_pos, |vocab|]
        return logits.gather(-1, inverse.view(base.batch, 1, -1).repeat(n_rows, hs.shape[1], 1))

    def _declared(self, hs: torch.Tensor, early: torch.Tensor, base: Base, metric: Metric, n_rows: int) -> torch.Tensor:
        """A declared metric per row from hidden states at its positions; where ``early`` [rows*B0,
        n_pos] the row never computed that position and the base run's logits stand."""
        sel = self._selected(hs, base, metric, n_rows)
        if early.any():
            sel = torch.where(early[..., None], self._base_selected(base, metric).repeat(n_rows, 1, 1), sel)
        return metric.from_selected(sel.view(n_rows, base.batch, *sel.shape[1:]))

    @staticmethod
    def _per_row(logits: torch.Tensor, metric) -> torch.Tensor:
        """A plain callable metric on each row's full logits [rows, B0, S, vocab]."""
        out = []
        for rows_logits in logits:
            value = torch.as_tensor(metric(rows_logits))
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

    # ---- packed rows: every start in one block call per layer ----------------------------------
    def _packing(self):
        """Per block, (PackRows spec or None, contexts the attention reads, contexts the rest reads);
        None where rows of different starts cannot share a call (not causal, or an unusual block)."""
        cached = getattr(self.model, "_sweep_packing", False)
        if cached is not False:
            return cached
        packing = [] if self.causal else None
        syms = (self.model.captured.batch_symbol, self.model.captured.seq_symbol)
        for i, programs in enumerate(self.blocks if self.causal else ()):
            a = self.mg.attn[i]
            contexts = frozenset(self.seg.block_context[i])
            if a is None:
                packing.append((None, frozenset(), contexts))
                continue
            spec = PackRows(((a.q_in, a.k_in, a.v_in, a.z_heads, str(i)),))
            nodes = {n.name: n for n in programs.base.graph.nodes}
            dims = [sym_dims(nodes[n], *syms) for n in (a.q_in, a.k_in, a.v_in, a.z_heads)]
            if not all(len(d) == 4 and d[0] == "B" and d[2] == "S" for d in dims):
                packing = None  # the attention's operands are not [batch, heads, seq, d]: unpack cannot place them
                break
            try:
                inside, outside = core_contexts(programs.base, spec, self.seg.hidden[i])
            except PassError:
                packing = None
                break
            if any(len(self.seq_dims.get(c, [])) > 1 for c in outside):
                packing = None  # a [q, k]-shaped input outside attention: no per-token gather exists
                break
            packing.append((spec, inside & contexts, outside & contexts))
        self.model._sweep_packing = packing
        return packing

    def _packed_bytes(self, groups: dict, base: Base) -> int:
        """Bytes of the widest activation (the MLP's hidden layer) of one call holding every row."""
        d = self.mg.dims
        d_mlp = int(d.get("d_mlp") or 4 * int(d.get("d_model", 1)))
        tokens = sum(len(idxs) * (base.seq - start) for start, idxs in groups.items()) * base.batch
        return 4 * tokens * d_mlp

    def _run_packed(self, groups: dict, cells: list, base: Base, values: dict, metric, out, budget: int, per_row, progress: bool):
        start_of = {i: start for start, idxs in groups.items() for i in idxs}
        order = sorted(start_of, key=lambda i: (cells[i].site.layer, start_of[i]))
        # padded attention holds every position of every row
        d = self.mg.dims
        padded = 4 * base.batch * base.seq * (int(d.get("n_heads") or 1) * base.seq + 4 * int(d.get("d_model", 1)))
        chunks, chunk, used = [], [], 0
        for i in order:
            cost = per_row(start_of[i]) + padded
            if chunk and used + cost > budget:
                chunks.append(chunk)
                chunk, used = [], 0
            chunk.append(i)
            used += cost
        chunks.append(chunk)
        steps = sum(self.mg.n_layers - cells[c[0]].site.layer for c in chunks)
        bar = tqdm(total=steps, desc="patching", disable=not progress, leave=False)
        for chunk in chunks:
            rows = [(cells[i], start_of[i]) for i in chunk]
            out[torch.tensor(chunk)] = self._packed_chunk(rows, base, values, metric, bar).float().cpu()
        bar.close()

    def _packed_chunk(self, rows: list, base: Base, values: dict, metric, bar) -> torch.Tensor:
        """Run ``rows`` ((cell, start) sorted by layer) to the metric, all starts in one call per layer."""
        seq = base.seq
        first, last = rows[0][0].site.layer, self.mg.n_layers - 1
        joined = defaultdict(list)
        for r, (cell, start) in enumerate(rows):
            joined[cell.site.layer].append((r, cell, start))
        h, row, pos = None, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        n_rows = 0
        read_from = self._first_read(metric, base, 0)
        work: dict = {}  # padded q, k, v workspaces shared by every layer of the chunk
        for layer in range(first, last + 1):
            new = joined.get(layer, [])
            if new:
                parts = [base.hidden[layer][:, start:] for _, _, start in new]
                h = torch.cat(([h] if h is not None else []) + parts, dim=1)
                row = torch.cat([row] + [torch.full((seq - start,), r) for r, _, start in new])
                pos = torch.cat([pos] + [torch.arange(start, seq) for _, _, start in new])
                n_rows += len(new)
            grid = torch.empty((n_rows, seq), dtype=torch.bool)
            fills = None
            if layer == last and read_from > 0 and self.kv_uses[layer] is not None:
                early = pos < read_from
                if bool(early.any()):
                    k, v = self._packed_block(layer, h[:, early], base, values, new, (row[early], pos[early], grid), keys_only=True)
                    fills = tuple(unpack(t, row[early], pos[early], grid, full) for t, full in zip((k, v), base.kv[layer]))
                    h, row, pos = h[:, ~early], row[~early], pos[~early]
            h = self._packed_block(layer, h, base, values, new, (row, pos, grid), fills=fills, work=(work, len(rows)))
            bar.update(1)
        return self._packed_metric(h, row, pos, n_rows, base, metric)

    def _packed_block(self, layer: int, h, base: Base, values: dict, new: list, packed: tuple, fills=None,
                      keys_only: bool = False, work=None):
        """Block ``layer`` on packed tokens ``h`` [batch, T, d] at (row, pos) ``packed``."""
        row, pos, grid = packed
        n_rows = grid.shape[0]
        spec, inside, _ = self._packing()[layer]
        self.stats["kv_token_layers" if keys_only else "token_layers"] += h.shape[0] * h.shape[1]
        self.stats["block_calls"] += 1
        feed = {self.seg.hidden[layer]: h}
        for c in self.seg.block_context[layer]:
            value = base.context[c]
            dims = self.seq_dims.get(c, [])
            if c in inside:
                if n_rows > 1 and value.shape[0] > 1:
                    value = value.repeat(n_rows, *([1] * (value.dim() - 1)))
            elif dims:
                value = value.index_select(dims[0], pos.to(value.device))
            feed[c] = value
        plan = ()
        if spec is not None and not keys_only:
            plan = (spec,)
            feed.update({ROW: row.to(h.device), POS: pos.to(h.device), GRID: grid})
            k, v = fills or base.kv[layer]
            feed[f"fxl_kfill_{layer}"], feed[f"fxl_vfill_{layer}"] = k, v
            a = self.mg.attn[layer]
            q_shape = (base.batch, a.n_heads, base.seq, a.d_head)
            for which, shape in zip("qkv", (q_shape, tuple(base.kv[layer][0].shape), tuple(base.kv[layer][1].shape))):
                feed[f"fxl_{which}buf_{layer}"] = self._workspace(work, which, shape, h.dtype, h.device)
        edited = self._packed_edits(new, values, row, pos, n_rows, base.batch) if new else None
        return self._call(layer, plan, feed, edited, keys_only)

    @staticmethod
    def _workspace(work, which: str, shape: tuple, dtype, device) -> torch.Tensor | None:
        if work is None:
            return None
        store, rows = work
        key = (which, shape, dtype, device)
        if key not in store:
            # q slots no token writes are read by the attention (their outputs are dropped): zeros, not garbage
            store[key] = (torch.zeros if which == "q" else torch.empty)((rows, *shape), dtype=dtype, device=device)
        return store[key]

    def _packed_edits(self, new: list, values: dict, row, pos, n_rows: int, b0: int):
        """Edits for the rows joining now: sites in the attention core (a key axis) are seen padded,
        [rows * batch, ...] over every position; every other site packed, [batch, T, ...].
        ``row`` and ``pos`` stay on the CPU (bookkeeping); what the graph reads goes to the model's device."""
        by_site = defaultdict(list)
        for r, cell, _ in new:
            by_site[cell.site.name].append((r, cell))
        padded = [(r, cell) for r, cell, _ in new if "key_pos" in cell.site.axes]
        edits, feed, sites = [], {}, []
        if padded:
            edits, feed, sites = self._edits(None, padded, values, 0, n_rows, b0)
        for name, entries in by_site.items():
            site = entries[0][1].site
            axes = site.axes
            if "key_pos" in axes:
                continue
            p_axis = next(axes.index(a) for a in ("pos", "query_pos") if a in axes)
            own = [c for _, c in entries if c.source is not None]
            clean = values[name] if name in values else own[0].source
            value = clean.index_select(p_axis, pos.to(clean.device))  # a new tensor: rows' own values can go in place
            mask_shape = [1] * value.dim()
            mask_shape[p_axis] = value.shape[p_axis]
            indexed = sorted({a for _, c in entries for a, _ in c.index})
            for a in indexed:
                mask_shape[axes.index(a)] = value.shape[axes.index(a)]
            mask = torch.zeros(mask_shape, dtype=torch.bool)
            for r, cell in entries:
                tokens = row == r
                index = dict(cell.index)
                if axes[p_axis] in index:
                    tokens = tokens & (pos == index[axes[p_axis]])
                at = tokens.nonzero().flatten()
                if at.numel() == 0:
                    continue  # a position before the row's start: it acts only through keys and values
                sel = [slice(None)] * value.dim()
                sel[p_axis] = at
                for a, v in cell.index:
                    if axes.index(a) != p_axis:
                        sel[axes.index(a)] = v
                mask[tuple(sel)] = True
                if cell.source is not None:  # this row's own value at its tokens
                    idx = [slice(None)] * value.dim()
                    idx[p_axis] = at
                    value[tuple(idx)] = cell.source.index_select(p_axis, pos[at].to(cell.source.device)).to(value.dtype)
            if not mask.any():
                continue
            i = len(edits)
            edits.append(Edit(name, site.node, site.layout, "replace", masked=True))
            feed[f"fxl_s{i}_value"] = value
            feed[f"fxl_s{i}_mask"] = mask.to(value.device)
            sites.append(site)
        return edits, feed, sites

    def _packed_metric(self, h, row, pos, n_rows: int, base: Base, metric) -> torch.Tensor:
        b0, seq = base.batch, base.seq
        if isinstance(metric, Metric):
            slot = torch.full((n_rows, seq), -1, dtype=torch.long)  # (row, position) -> packed token
            slot[row, pos] = torch.arange(row.shape[0])
            p, _ = metric.select(seq, b0)  # [b0, n_pos]
            idx = slot[:, p]  # [rows, b0, n_pos]; -1: a position before the row's start
            hs = h[torch.arange(b0)[None, :, None], idx.clamp(min=0)].reshape(n_rows * b0, p.shape[1], -1)
            return self._declared(hs, (idx < 0).reshape(n_rows * b0, -1), base, metric, n_rows)
        logits = self._head_full(h, base.context)  # [b0, T, vocab]
        full = self._base_logits(base).unsqueeze(0).repeat(n_rows, 1, 1, 1)
        full[row, :, pos] = logits.permute(1, 0, 2).to(full.dtype)
        return self._per_row(full, metric)
