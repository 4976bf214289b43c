"""Edge sweeps: the metric with each of many edge sets replaced, as rows of the layered-row engine.

Problem: direct path patching (one source head into every later query), ACDC's candidate removals and
circuit ablations ask for the metric with many different sets of edges replaced. One forward per set
repeats everything before the receivers.

Mechanism: with nothing upstream of its receivers changed, a set's receivers read the unpatched
residual plus the sum of their replaced edges' differences (replacement minus actual sender output),
so each set is a row joining at its receivers' layer:

- a set with one receiver becomes a cell of the activation sweep: what the receiver computes (its
  q/k/v, or the MLP's output) from that input is computed for every distinct set of senders at once,
  and the cell patches it; prefix reuse, first-change starts and last-block pruning all apply;
- a set whose receivers sit at one layer becomes a ``Row`` with ``ReceiverInput``s (delta mode),
  starting in a causal model at the first position any of its differences is non-zero;
- a set into the logits only is read out from the final residual plus its differences;
- anything else (receivers at several layers, whose senders then change too) runs the whole model,
  one batched row per set, with the Edges pass recomputing every sender (``full_rows``).

On a post-norm model (Gemma 2/3, OLMo 2/3) a receiver's input is not the residual plus a sum of
differences: each upstream branch's difference goes through that branch's norm (``edges`` module
docstring). With nothing upstream of the receivers changed, the branches keep their values of the
unpatched run, so a set's input difference is computed before the rows run: the input's difference
plus, per branch, ``post_norm(branch + D) - post_norm(branch)`` with each norm run as a program of its
own (``Blocks.post_norm_programs``) on the unpatched branch values. Sets with receivers at several
layers run as whole-model rows, where the Edges pass replays the norms.

Example::

    values = edge_sweep(model, tokens, [[("a0.h0", f"a{l}.h{h}<q>")] for l in (1, 2) for h in range(12)],
                        metric, ablation="corrupted", reference=corrupted)     # [24]
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ..engine.plan import PlanBuilder
from ..engine.rows import ReceiverInput, Row, RowEngine, RowError
from ..graphs.components import CircuitError
from ..engine.rows.readout import Readout, _checked_select, scalar
from ..engine.sweep import Cell, Sweep
from ..metrics import Metric
from .circuit import Circuit
from .edges import (alternatives, edge_mask, given_mask, post_norm_specs, receiver_specs, result_sites, sender_specs,
                    sender_values, spine_spec)

__all__ = ["edge_sweep", "full_rows", "layered"]


def edge_sweep(model, tokens, edge_sets, metric, *, ablation="zero", reference=None, attention_mask=None,
               reference_attention_mask=None, max_rows: int = 64) -> torch.Tensor:
    """The metric with each set of edges replaced, one batched row per set: [len(edge_sets)].

    The same replacement as ``run_with_edges`` (``ablation``, ``reference`` with its own mask) for
    many edge sets at once, e.g. every later head's query input patched from one source head
    (TransformerLens' direct path patching), or ACDC's candidate removals.
    """
    comp = model.derived.components
    comp.require_edges("an edge sweep")
    sets = [Circuit(e).validate(model).edges for e in edge_sets]
    feed = model._inputs(tokens, attention_mask)
    shape = tuple(feed["input_ids"].shape)
    order = {s.name: i for i, s in enumerate(comp.senders)}
    used = sorted({s for edges in sets for s, _ in edges}, key=order.__getitem__)  # only these are computed
    if not used:
        alt = None
    else:
        alt = alternatives(model, ablation, shape, reference, reference_attention_mask, used,
                           attention_mask=given_mask(tokens, attention_mask, feed)).to(model.captured.dtype)
    points = [{(comp.receiver(r).layer, comp.receiver(r).stage) for _, r in edges} for edges in sets]
    engine = RowEngine(model)
    normed_ok = all(pn.value_site for pn in comp.post_norms)
    if comp.spine is not None and any(sets):
        _told_whole(model)
    elif all(len(p) <= 1 for p in points) and layered(model) and not engine.whole and normed_ok:
        try:
            return _layered(model, comp, feed, sets, metric, alt, used)
        except (CircuitError, RowError):
            raise
        except Exception as err:  # noqa: BLE001 - a structural failure: told once, then whole-model rows
            engine.fall_back(err)
    full_alt = torch.zeros(1, shape[1], len(comp.senders), model.cfg.d_model, dtype=model.captured.dtype, device=model.captured.device)
    if used:
        full_alt = full_alt.expand(alt.shape[0], -1, -1, -1).clone()
        full_alt[:, :, [order[s] for s in used]] = alt.to(full_alt.device)
    return full_rows(model, feed, sets, metric, full_alt, max_rows)


def _told_whole(model) -> None:
    """Say once per capture that this model's edge sweeps run as whole-model rows."""
    told = model.derived.item("spine_edge_sweeps", list)
    if not told:
        told.append(True)
        warnings.warn(
            "this model normalises the residual stream itself after each branch (post-norm, as BERT does): "
            "its edge sweeps run one whole-model row per edge set, replaying the norms between each "
            "edge's sender and receiver; exact, slower than the layer-by-layer rows of other models",
            RuntimeWarning, stacklevel=3,
        )


def layered(model) -> bool:
    """Whether every MLP reads a [batch, pos, d] residual (OPT flattens it), so blocks run as rows."""
    from ..graphs.nodes import sym_dims

    mg = model.graph
    syms = (model.captured.batch_symbol, model.captured.seq_symbol)
    return all(len(sym_dims(mg.dg.node(b.mlp.entry), *syms)) == 3 for b in mg.structure.blocks)


def _layered(model, comp, feed, sets, metric, alt, used) -> torch.Tensor:
    s_index = {name: i for i, name in enumerate(used)}
    out = torch.empty(len(sets), dtype=torch.float32)
    cells_k, rows_k, logits_k, empty_k = [], [], [], []
    for k, edges in enumerate(sets):
        receivers = {r for _, r in edges}
        if not receivers:
            empty_k.append(k)
        elif receivers == {"logits"}:
            logits_k.append(k)
        elif len(receivers) == 1:
            cells_k.append(k)
        else:
            rows_k.append(k)
    sweep = Sweep(model)
    engine = sweep.engine
    with torch.no_grad():
        diff = None
        targets, entries = _cell_sites(model, comp, [sets[k] for k in cells_k])
        norms = _post_norms(model, comp, used)
        # raw sites (a module's output) name no layer: the base run reads them in the norm's block
        branch_sites = [dataclasses.replace(model.site_table[pn.value_site], layer=pn.layer) for pn in norms]
        base = engine.base(feed, sites=list({s.name: s for s in list(targets.values()) + entries + branch_sites}.values()))
        if used:
            diff = Differences(alt - sender_values(model, feed["input_ids"], feed.get("attention_mask"), used),  # [b or 1, pos, senders, d]
                               used, norms, base, engine.blocks)
        readout = engine.readout(base, metric)
        if empty_k:
            out[torch.tensor(empty_k)] = readout.base_value()
        if cells_k:
            cells = _cells(model, comp, engine, base, [sets[k] for k in cells_k], diff, s_index, targets)
            out[torch.tensor(cells_k)] = sweep.run(cells, feed, None, metric, base=base)
        if rows_k:
            out[torch.tensor(rows_k)] = _rows(model, comp, engine, base, readout, [sets[k] for k in rows_k], diff, s_index)
        if logits_k:
            deltas = torch.stack([_delta(diff, s_index, sets[k], "logits", base.batch) for k in logits_k])
            h = (base.final.unsqueeze(0) + deltas.to(base.final.dtype)).flatten(0, 1)
            out[torch.tensor(logits_k)] = readout.final(h, len(logits_k)).float().cpu()
    return out


def _post_norms(model, comp, used) -> list:
    """The norms that some of the ``used`` senders' branches pass through before the add."""
    seen = {}
    for name in used:
        pn = comp.post_norm(name)
        if pn is not None:
            seen[(pn.layer, pn.kind)] = pn
    return list(seen.values())


class Differences:
    """What replacing some senders' outputs adds to a receiver's input, computed from each sender's
    difference (replacement minus actual output, [batch or 1, pos, senders, d]) and, for senders whose
    branch is normalised before the add, the unpatched branch values and the norm programs."""

    def __init__(self, diff, used, norms, base, blocks):
        self.diff = diff
        self.branch = {}  # senders' column -> (norm program, its input's name, the unpatched branch value)
        programs = blocks.post_norm_programs() if norms else {}
        column = {name: i for i, name in enumerate(used)}
        for pn in norms:
            key = (pn.layer, pn.kind)
            value = base.values[pn.value_site]
            for name in pn.senders:
                if name in column:
                    self.branch[column[name]] = (key, programs[key], pn.input, value)
        self._normed0: dict = {}

    def of(self, columns, batch: int) -> torch.Tensor:
        """[batch, pos, d]: the sum over ``columns`` (senders), each normalised branch's inside its norm."""
        plain = [c for c in columns if c not in self.branch]
        out = self.diff[:, :, plain].sum(2)
        groups: dict = {}
        for c in columns:
            if c in self.branch:
                groups.setdefault(self.branch[c][0], []).append(c)
        for key, cols in groups.items():
            _, program, name, value = self.branch[cols[0]]
            if key not in self._normed0:
                self._normed0[key] = program(**{name: value})["outputs"]["normed"]
            d = self.diff[:, :, cols].sum(2).to(value.dtype)
            normed = program(**{name: value + d})["outputs"]["normed"]
            out = out + (normed - self._normed0[key]).to(out.dtype)
        return out.expand(batch, -1, -1)


def _delta(diff, s_index, edges, receiver: str, batch: int) -> torch.Tensor:
    """[batch, pos, d]: what replacing ``edges`` into ``receiver`` adds to its input."""
    cols = [s_index[s] for s, r in edges if r == receiver]
    return diff.of(cols, batch)


def _first_nonzero(t: torch.Tensor) -> int | None:
    """The first position (axis 1) at which ``t`` is non-zero, or None."""
    changed = t.ne(0).flatten(2).any(-1).any(0).nonzero()
    return int(changed[0]) if changed.numel() else None


def _rows(model, comp, engine: RowEngine, base, readout: Readout, sets, diff, s_index) -> torch.Tensor:
    """Sets with receivers at one layer: rows joining there, with the differences as receiver inputs."""
    specs = {r.name: r for r in receiver_specs(comp, {r for edges in sets for _, r in edges})}
    rows, where, same = [], [], []
    for k, edges in enumerate(sets):
        inputs = []
        for name in sorted({r for _, r in edges}, key=lambda n: specs[n].index):
            layer = comp.receiver(name).layer
            inputs.append(ReceiverInput(specs[name], layer, _delta(diff, s_index, edges, name, base.batch), "delta"))
        starts = [_first_nonzero(x.value) for x in inputs]
        starts = [s for s in starts if s is not None]
        if not starts:
            same.append(k)
            continue
        start = min(starts) if engine.causal else 0
        rows.append(Row(inputs[0].layer, start, inputs=tuple(inputs)))
        where.append(k)
    out = torch.empty(len(sets), dtype=torch.float32)
    if same:
        out[torch.tensor(same)] = readout.base_value()
    if rows:
        out[torch.tensor(where)] = engine.run(rows, base, readout.metric, readout=readout)
    return out


def _cell_sites(model, comp, sets):
    """The site each single-receiver set patches, and the residual sites its MLP receivers read."""
    targets, entries = {}, []
    mid = "resid_mid" if not comp.parallel else "resid_pre"
    for edges in sets:
        r = comp.receiver(next(iter(edges))[1])
        targets[r.name] = model.site_table[model.get_act_name(r.kind if r.kind != "mlp" else "mlp_out", r.layer)]
        if r.kind == "mlp":
            entries.append(model.site_table[model.get_act_name(mid, r.layer)])
    return targets, entries


def _cells(model, comp, engine, base, sets, diff, s_index, targets) -> list:
    """One activation-patching cell per set: the receiver's value computed from its replaced input."""
    batch = base.batch
    mid = "resid_mid" if not comp.parallel else "resid_pre"
    receivers = [comp.receiver(next(iter(edges))[1]) for edges in sets]
    cells = [None] * len(sets)
    # receivers of one kind in one layer read the same site: one call computes it for every distinct
    # set of replaced senders among them (each set's receiver then takes its head)
    groups: dict = {}
    for k, r in enumerate(receivers):
        senders = tuple(sorted(s_index[s] for s, _ in sets[k]))
        groups.setdefault((r.layer, r.kind), {}).setdefault(senders, []).append(k)
    blocks = engine.blocks
    for (layer, kind), by_senders in groups.items():
        site = targets[receivers[next(iter(by_senders.values()))[0]].name]
        delta = torch.stack([diff.of(list(ss), batch) for ss in by_senders]).flatten(0, 1)
        n = len(by_senders)
        if kind == "mlp":
            entry = base.values[model.get_act_name(mid, layer)]
            prog = blocks.mlp_programs(fused=False)[layer]
            value = prog(**{model.graph.structure.blocks[layer].mlp.entry: entry.repeat(n, 1, 1) + delta})["outputs"]["mlp"]
        else:
            h = base.hidden[layer].repeat(n, 1, 1) + delta
            plan, inputs = PlanBuilder(model.graph).cache([site], keep_outputs=False).build()
            value = blocks.call(layer, plan, blocks.feed(layer, h, base.context, 0, n), inputs)["cache"][site.name]
        for j, ks in enumerate(by_senders.values()):
            for k in ks:
                index = () if kind == "mlp" else (("head", receivers[k].head),)
                cells[k] = Cell(site, index, source=value[j * batch : (j + 1) * batch])
    return cells


def full_rows(model, feed: dict, sets, metric, alt: torch.Tensor, max_rows: int = 64) -> torch.Tensor:
    """The metric with each edge set replaced by ``alt`` (every sender's replacement), one row per set
    of a whole-model program in which the Edges pass recomputes every sender."""
    comp = model.derived.components
    batch, seq = feed["input_ids"].shape
    receivers = {r for edges in sets for _, r in edges}
    device = model.captured.device
    declared = isinstance(metric, Metric)
    if declared:
        vocab_size = model.graph.dims.get("d_vocab_out") or model.graph.dims.get("d_vocab")
        pos, tok = _checked_select(metric, seq, batch, vocab_size)
        vocab, inverse = torch.unique(tok.flatten(), return_inverse=True)
    out = []
    for first in range(0, len(sets), max_rows):
        chunk = sets[first : first + max_rows]
        rows = len(chunk)
        masks = torch.cat([edge_mask(comp, edges) for edges in chunk]).repeat_interleave(batch, dim=0)
        tiled = {k: v.repeat(rows, *([1] * (v.dim() - 1))) for k, v in feed.items()}
        a = alt if alt.shape[0] == 1 else alt.repeat(rows, 1, 1, 1)
        b = PlanBuilder(model.graph)
        if receivers:
            b.edges(sender_specs(model, comp), receiver_specs(comp, receivers), "edges", mask=masks.to(device),
                    alt=a.to(device, model.captured.dtype), result_sites=result_sites(model),
                    post_norms=post_norm_specs(comp), spine=spine_spec(comp))
        select = declared and model.graph.structure.unembed is not None  # else every entry, picked below
        if select:
            b.select_vocab(model.graph.structure.unembed, vocab.to(device))
        plan, inputs = b.build()
        with torch.no_grad():
            logits = model._logits(model.programs.get(plan)(**tiled, **inputs))
        if declared and not select:
            logits = logits[..., vocab.to(logits.device)]
        if declared:
            b_idx = torch.arange(batch)[:, None, None].repeat(rows, 1, 1) + torch.arange(rows).repeat_interleave(batch)[:, None, None] * batch
            sel = logits[b_idx, pos.repeat(rows, 1)[:, :, None], inverse.view(batch, 1, -1).repeat(rows, 1, 1)]
            out += list(metric.from_selected(sel.view(rows, batch, *sel.shape[1:])).float().cpu())
        else:
            out += [scalar(metric(logits[k * batch : (k + 1) * batch])).float().cpu() for k in range(rows)]
    return torch.stack(out) if out else torch.empty(0)

