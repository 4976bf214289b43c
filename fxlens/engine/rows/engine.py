"""The layered-row engine: run rows that join the base run at a layer and start, to a metric.

Problem: activation sweeps, path patching and edge sweeps each run many variants of one input that
share everything before some layer (and, in a causal model, before some position). Run as separate
forwards they repeat that shared work thousands of times; written separately, each use re-implements
prefix reuse, packing, pruning and read-out, and their bugs.

Mechanism: ``RowEngine.run(rows, base, metric)`` schedules the rows (``schedule.py``) and executes the
schedule: a chunk runs the blocks from its lowest joining layer; at layer L the rows that join at L
enter the batch with the base run's residual; each row's edits at L are placed by the chunk's layout
(``layouts.py``) and become one plan with the layout pass (KV prefix or packed rows), the site edits
(Intervene) and receiver inputs (Edges); the last block computes only the positions the metric reads
(the rest only as keys and values); the read-out (``readout.py``) turns final hidden states into
metric values. Padded chunks of a wave advance together, layer by layer, so a block's weights are
read once per layer.

Example::

    engine = RowEngine(model)
    base = engine.base(feed, keep_kv=True)
    values = engine.run([Row(2, 3, patches=(SitePatch(site, (("pos", 3),), clean),))], base, metric)

Gotchas: programs are cached per (layer, plan), and the plan holds no tensors, so a new position or a
new value never builds a new program. ``stats`` counts the work done, in (row, position, layer) units.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from ...passes import Read
from ...passes.intervene import set_to
from ...passes.pack_rows import unpack
from ..plan import PlanBuilder
from .base import Base, run_base
from .blocks import Blocks
from .exactness import UNDECIDED, suffix_mismatch
from .layouts import Packed, Padded
from .readout import Readout
from ..distributed import Shard
from .whole import base_values, run_whole
from .rows import RowError
from .schedule import CostModel, schedule

__all__ = ["RowEngine"]


class RowEngine:
    def __init__(self, model, compile: bool = False):
        self.model = model
        self.derived = model.derived
        self.graph = self.derived.graph
        self.compile = compile
        self.stats = {"token_layers": 0, "kv_token_layers": 0, "block_calls": 0, "cells_skipped": 0}

    @property
    def blocks(self) -> Blocks:
        return Blocks.of(self.derived)

    @property
    def causal(self) -> bool:
        return self.derived.captured.is_causal

    @property
    def whole(self) -> bool:
        """Whether this capture runs rows on the whole model: the layered engine failed on it, or a block
        mixes positions outside attention (a state-space or linear-attention layer keeps a running state,
        which rows that start late or read a key/value prefix would not have)."""
        told = self.derived.item("whole_model_rows", list)
        if not told and self.derived.graph.mixes_outside_attention:
            told.append("a block mixes positions outside attention")
            warnings.warn(
                "this model mixes positions outside attention (state-space or linear-attention layers, "
                "blocks.{i}.hook_mixer_out): its sweeps run as whole-model forwards, exact and slower",
                UserWarning,
                stacklevel=4,
            )
        return bool(told)

    def fall_back(self, err: Exception) -> None:
        """Run rows on the whole model from now on for this capture, and say so once, with the reason."""
        told = self.derived.item("whole_model_rows", list)
        if not told:
            told.append(f"{type(err).__name__}: {err}")
            warnings.warn(
                "the batched layer-by-layer engine cannot run this model's sweeps "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); they run as whole-model "
                "forwards instead, exact and slower. Please report this with the model's config.",
                RuntimeWarning,
                stacklevel=4,
            )

    @property
    def suffixes(self) -> bool:
        """Whether rows may start after position 0: a causal model whose blocks, run on later positions alone
        with the earlier positions' keys and values given, reproduce their full run (``exactness.py``; until
        a base run has been asked, they are taken to)."""
        verdict = self.derived.item("suffix_exact", list)
        return self.causal and not (verdict and verdict[0])

    def _ask_suffixes(self, base: Base) -> None:
        """Ask ``exactness.py`` once per capture, on the first base run that keeps keys and values and is long
        enough; where rows may not start late, every row starts at position 0 from now on, said once."""
        verdict = self.derived.item("suffix_exact", list)
        if not verdict and all(kv is not None for kv, u in zip(base.kv, self.blocks.kv_uses) if u is not None):
            why = suffix_mismatch(self, base)
            if why != UNDECIDED:
                verdict.append(why)
            if why:
                warnings.warn(
                    f"rows that start after position 0 would not be exact on this model ({why}); every row of its "
                    "sweeps starts at position 0 instead, exact and slower (the positions before each patch are "
                    "recomputed)",
                    UserWarning,
                    stacklevel=5,
                )

    def base(self, feed: dict, keep_kv: bool | None = None, sites=()) -> Base:
        """The unpatched run (keys and values kept for causal models unless ``keep_kv`` says otherwise);
        on a model the layered engine cannot run, the sites' values from one whole-model run."""
        if not self.whole:
            try:
                base = run_base(self.blocks, feed, self.causal if keep_kv is None else keep_kv, sites)
                self.stats["token_layers"] += base.batch * base.seq * self.blocks.n_layers
                base.feed = feed
                self._ask_suffixes(base)
                return base
            except RowError:
                raise
            except Exception as err:  # noqa: BLE001 - a structural failure: told once, then the exact path
                self.fall_back(err)
        batch, seq = feed["input_ids"].shape
        return Base([], [], {}, None, batch, seq, base_values(self.model, feed, sites), feed=feed)

    def readout(self, base: Base, metric, per_example: bool = False) -> Readout:
        return Readout(self.blocks if not self.whole else None, base, metric, model=self.model, suffixes=self.suffixes,
                       per_example=per_example)

    # ---- running rows ------------------------------------------------------------------------------
    def run(self, rows: list, base: Base, metric, *, memory_budget: float = 1.0, progress: bool = False,
            readout: Readout | None = None) -> torch.Tensor:
        """The metric of each row, [len(rows), *readout.value_shape] (float32, on the CPU)."""
        if self.model.persistent_hooks:
            raise RowError(
                f"this model has {len(self.model.persistent_hooks)} hook(s) kept with add_hook; sweeps, path patching and "
                "edge runs build their own programs and would run without them: call model.reset_hooks() first, or "
                "express the edit as an intervention (fxlens.Patch, Ablate, Steer, ...)"
            )
        readout = readout or self.readout(base, metric)
        self.stats["metric_reads"] = readout.reads
        for r in rows:
            if not 0 <= r.layer < self.graph.n_layers:
                raise RowError(f"a row joins at layer {r.layer}; this model has layers 0..{self.graph.n_layers - 1}")
            if r.start and not self.causal:
                raise RowError("rows start after position 0 only in a causal model")
        if not self.suffixes:  # the row computes its positions before the change too: exact on any block
            rows = [r if not r.start else dataclasses.replace(r, start=0) for r in rows]
        shard = Shard.of(len(rows))  # under torchrun: this rank's rows, then every rank's values
        try:
            mine = self._rows([rows[i] for i in shard.indices(len(rows))], base, readout, memory_budget, progress)
        finally:
            self.model.last_sweep_stats = dict(self.stats)  # what the last run of rows did (Model docs)
        return shard.gather(mine, len(rows))

    def _rows(self, rows: list, base: Base, readout: Readout, memory_budget: float, progress: bool) -> torch.Tensor:
        out = torch.empty(len(rows), *readout.value_shape, dtype=torch.float32)
        if not rows:
            return out
        if not self.whole:
            try:
                return self._run(rows, base, readout, out, memory_budget, progress)
            except RowError:
                raise
            except Exception as err:  # noqa: BLE001 - a structural failure: told once, then the exact path
                self.fall_back(err)
        return run_whole(self.model, rows, base.feed, readout)

    def _run(self, rows, base, readout, out, memory_budget, progress):
        cost = CostModel(self.blocks, base, readout.declared)
        packable = self.causal and self.blocks.packing() is not None
        sch = schedule(rows, cost, self._row_budget(memory_budget, base, cost, rows), packable)
        if sch.packed:
            steps = sum(self.blocks.n_layers - rows[c[0]].layer for c in sch.chunks)
            bar = tqdm(total=steps, desc="patching", disable=not progress, leave=False)
            for chunk in sch.chunks:
                out[torch.tensor(chunk)] = self._packed_chunk([rows[i] for i in chunk], base, readout, bar).float().cpu()
            bar.close()
            return out
        steps = sum(self.blocks.n_layers - rows[c[0]].layer for _, c in sch.chunks)
        bar = tqdm(total=steps, desc="patching", disable=not progress, leave=False)
        for wave in sch.waves:
            chunks = [sch.chunks[c] for c in wave]
            for (_, idxs), values in zip(chunks, self._wave(chunks, rows, base, readout, bar)):
                out[torch.tensor(idxs)] = values.float().cpu()
        bar.close()
        return out

    @staticmethod
    def _row_budget(memory_budget: float, base: Base, cost: CostModel, rows: list) -> int:
        """Bytes the rows' calls may use: ``memory_budget`` less what the base run keeps meanwhile."""
        total, kept = int(memory_budget * 2**30), base.nbytes
        one_row = cost.row_bytes(min(r.start for r in rows))
        if kept + one_row > total:
            warnings.warn(
                f"memory_budget={memory_budget} GiB is less than this sweep needs at the least: the unpatched run of the "
                f"input keeps {kept / 2**20:.0f} MB (each block's residual, keys and values) and one row takes up to "
                f"{one_row / 2**20:.0f} MB; running one row per call. Raise memory_budget, or split the prompts "
                "(a list of prompt pairs streams in chunks of pairs)",
                RuntimeWarning,
                stacklevel=5,
            )
        return max(1, total - kept)

    def _wave(self, chunks, rows, base, readout, bar):
        runs = [self._padded_chunk(start, [rows[i] for i in idxs], base, readout, bar) for start, idxs in chunks]
        results = [None] * len(runs)
        first = min(rows[idxs[0]].layer for _, idxs in chunks)
        for layer in range(first, self.blocks.n_layers):
            for k, run in enumerate(runs):
                if results[k] is None and rows[chunks[k][1][0]].layer <= layer:
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

    def _padded_chunk(self, start: int, rows: list, base: Base, readout: Readout, bar):
        """A generator: each ``next`` runs one more block; it returns the rows' metric values."""
        first, last = rows[0].layer, self.blocks.n_layers - 1
        h = None
        present: list = []
        read_from = readout.first_read(start)
        for layer in range(first, last + 1):
            new = [r for r in rows if r.layer == layer]
            if new:
                h_new = base.hidden[layer][:, start:].repeat(len(new), 1, 1)
                h = h_new if h is None else torch.cat([h, h_new])
                present += new
            layout = Padded(start, len(present))
            if layer == last and read_from > start and self.blocks.kv_uses[layer] is not None:
                # the metric reads positions from read_from: earlier ones are needed only as keys and values
                k, v = self._block(layer, h, base, present, layout, keys_only=True)
                cut = read_from - start
                pre = layout.prefix(self.blocks, layer, base) or (None, None)
                prefix = tuple(t[..., :cut, :] if p is None else torch.cat([p.expand(t.shape[0], *p.shape[1:]), t[..., :cut, :]], dim=-2)
                               for p, t in zip(pre, (k, v)))
                h, start = h[:, cut:], read_from
                layout = Padded(start, len(present), prefix)
            h = self._block(layer, h, base, present, layout)
            bar.update(1)
            if layer < last:
                yield layer
        return readout.padded(h, start, len(present))

    def _packed_chunk(self, rows: list, base: Base, readout: Readout, bar) -> torch.Tensor:
        """Run ``rows`` (sorted by layer) to the metric, all starts in one call per layer."""
        seq = base.seq
        first, last = rows[0].layer, self.blocks.n_layers - 1
        h, row, pos = None, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        present: list = []
        read_from = readout.first_read(0)
        work: dict = {}  # padded q, k, v workspaces shared by every layer of the chunk
        for layer in range(first, last + 1):
            new = [r for r in rows if r.layer == layer]
            if new:
                parts = [base.hidden[layer][:, r.start :] for r in new]
                h = torch.cat(([h] if h is not None else []) + parts, dim=1)
                row = torch.cat([row] + [torch.full((seq - r.start,), len(present) + k) for k, r in enumerate(new)])
                pos = torch.cat([pos] + [torch.arange(r.start, seq) for r in new])
                present += new
            layout = Packed(row, pos, len(present), seq, work=(work, len(rows)))
            if layer == last and read_from > 0 and self.blocks.kv_uses[layer] is not None:
                early = pos < read_from
                if bool(early.any()):
                    k, v = self._block(layer, h[:, early], base, present, layout.subset(early), keys_only=True)
                    grid = layout.grid
                    fills = tuple(unpack(t, row[early], pos[early], grid, full) for t, full in zip((k, v), base.kv[layer]))
                    h, row, pos = h[:, ~early], row[~early], pos[~early]
                    layout = Packed(row, pos, len(present), seq, fills=fills, work=(work, len(rows)))
            h = self._block(layer, h, base, present, layout)
            bar.update(1)
        return readout.packed(h, row, pos, len(present))

    # ---- one block call -------------------------------------------------------------------------
    def _block(self, layer: int, h: torch.Tensor, base: Base, present: list, layout, keys_only: bool = False):
        """Block ``layer`` on ``h`` laid out by ``layout``, with the edits of the rows ``present``."""
        self.stats["kv_token_layers" if keys_only else "token_layers"] += h.shape[0] * h.shape[1]
        self.stats["block_calls"] += 1
        b = PlanBuilder(self.graph)
        b.fuse_gelu()
        feed = layout.feed(b, self.blocks, layer, h, base, keys_only=keys_only)
        self._edits(b, layer, present, layout, base.batch, h)
        if keys_only:
            (k, _), (v, _) = self.blocks.kv_uses[layer]
            b.cache(reads=[Read("k", k), Read("v", v)], keep_outputs=False)
        plan, inputs = b.build()
        out = self.blocks.call(layer, plan, feed, inputs, self.compile)
        if keys_only:
            return out["cache"]["k"], out["cache"]["v"]
        return out["outputs"]["hidden"]

    def _edits(self, b: PlanBuilder, layer: int, present: list, layout, b0: int, h: torch.Tensor) -> None:
        patches, inputs = defaultdict(list), []
        for r, row in enumerate(present):
            ps, ins = row.at(layer)
            for p in ps:
                patches[p.site.name].append((r, p))
            inputs += [(r, x) for x in ins]
        for entries in patches.values():
            site = entries[0][1].site
            placed = layout.patch(site, entries, b0)
            if placed is not None:
                value, mask = placed
                b.edit(site, set_to, (value,), mask)
        if inputs:
            self._receivers(b, inputs, layout, b0, h)

    def _receivers(self, b: PlanBuilder, inputs: list, layout, b0: int, h: torch.Tensor) -> None:
        modes = {x.mode for _, x in inputs}
        if len(modes) > 1:
            raise RowError("rows in one block call must give receiver inputs of one mode (delta or absolute)")
        mode = modes.pop()
        receivers = list({x.receiver.name: x.receiver for _, x in inputs}.values())
        receivers.sort(key=lambda r: r.index)
        by_entry: dict = {}
        for rec in receivers:
            by_entry.setdefault(rec.entry, []).append(rec)
        deltas = {}
        for entry, group in by_entry.items():
            column = {rec.name: j for j, rec in enumerate(group)}
            entries = [(r, column[x.receiver.name], x.value) for r, x in inputs if x.receiver.name in column]
            if mode == "absolute":
                covered = {(r, column[x.receiver.name]) for r, x in inputs if x.receiver.name in column}
                if len(covered) != layout.n_rows * len(group):
                    raise RowError("absolute receiver inputs must be given for every row present in the call")
            deltas[entry] = layout.receivers(entries, len(group), b0, h)
        b.edges((), tuple(receivers), mode, deltas=deltas)
