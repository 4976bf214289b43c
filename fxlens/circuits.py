"""Circuits as code: edges, edge interventions, circuit evaluation, path patching, EAP and ACDC.

Problem: a circuit is a set of edges between components (the embedding, attention heads, MLPs, the
logits) through the residual stream. Researchers evaluate, discover and test circuits with many
hand-written hooked forwards; here a circuit is an object and every operation on it is one program.

Names: senders are ``input``, ``a{layer}.h{head}`` and ``m{layer}``; receivers are
``a{layer}.h{head}<q|k|v>`` (k and v index key/value heads in grouped-query models), ``m{layer}`` and
``logits``. An edge is ``(sender, receiver)`` or the string ``"a0.h1->a1.h0<k>"``.

Example::

    from fxlens.circuits import Circuit, run_with_edges, eap_scores, acdc, path_patch
    circuit = Circuit.from_edges(["input->a0.h0<q>", "a0.h0->a1.h0<k>", "a1.h0->logits"])
    logits = model.run_with_circuit(tokens, circuit, ablation="zero")        # everything else ablated
    scores = eap_scores(model, clean, corrupted, metric)                    # {edge: score}
    found = acdc(model, clean, corrupted, threshold=0.05)                    # a Circuit
    effects = path_patch(model, clean, corrupted, metric, receivers=["a9.h6<q>"])   # {sender: metric}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import networkx as nx
import torch

from .engine.interventions import Patch, prepare
from .engine.programs import rewrites_for
from .graphs.components import CircuitError, Components, components
from . import passes
from .passes import ALT_INPUT, MASK_INPUT, EdgeReceiver, Edges, EdgeSender, FuseGelu, Intervene

__all__ = [
    "Circuit",
    "CircuitError",
    "model_components",
    "sender_values",
    "run_with_edges",
    "run_with_circuit",
    "edge_sweep",
    "eap_scores",
    "acdc",
    "path_patch",
]


def model_components(model) -> Components:
    comp = getattr(model, "_components", None)
    if comp is None:
        comp = model._components = components(model.graph)
    return comp


def _edge(e) -> tuple:
    if isinstance(e, str):
        if "->" not in e:
            raise CircuitError(f"an edge is 'sender->receiver' (e.g. 'a0.h1->a1.h0<k>'); got {e!r}")
        s, r = e.split("->", 1)
        return s.strip(), r.strip()
    s, r = e
    return str(s), str(r)


class Circuit:
    """A set of edges (sender, receiver). Immutable in spirit: operations return new circuits."""

    def __init__(self, edges: Iterable = ()):
        self.edges = frozenset(_edge(e) for e in edges)

    @classmethod
    def from_edges(cls, edges: Iterable) -> "Circuit":
        return cls(edges)

    @classmethod
    def full(cls, model) -> "Circuit":
        """Every edge of the model."""
        comp = model_components(model)
        return cls((s.name, r.name) for r in comp.receivers for s in comp.upstream(r))

    @classmethod
    def from_networkx(cls, graph: nx.DiGraph) -> "Circuit":
        return cls(graph.edges())

    def to_networkx(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_edges_from(sorted(self.edges))
        return g

    def to_json(self, path=None) -> str:
        text = json.dumps({"format": "fxlens.circuit/1", "edges": [f"{s}->{r}" for s, r in sorted(self.edges)]}, indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path) -> "Circuit":
        """A circuit from JSON text or from a file (a path string or ``pathlib.Path``)."""
        text = text_or_path
        if isinstance(text_or_path, os.PathLike) or not str(text_or_path).lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        data = json.loads(text)
        if data.get("format") != "fxlens.circuit/1":
            raise CircuitError(f"not an fxlens circuit file (format {data.get('format')!r})")
        return cls(data["edges"])

    def to_dot(self) -> str:
        """Graphviz DOT: senders and receivers as nodes, edges as arrows (render with ``dot -Tpng``)."""
        lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];']
        for s, r in sorted(self.edges):
            lines.append(f'  "{s}" -> "{r}";')
        lines.append("}")
        return "\n".join(lines)

    def validate(self, model) -> "Circuit":
        """Raise CircuitError for unknown components or edges that point backwards in depth."""
        comp = model_components(model)
        for s_name, r_name in sorted(self.edges):
            s, r = comp.sender(s_name), comp.receiver(r_name)
            if not comp.reaches(s, r):
                raise CircuitError(
                    f"edge {s_name}->{r_name} points backwards in depth: {s_name} writes at layer {s.layer}, "
                    f"after {r_name} reads the residual stream at layer {r.layer}"
                )
        return self

    def __len__(self) -> int:
        return len(self.edges)

    def __iter__(self):
        return iter(sorted(self.edges))

    def __contains__(self, edge) -> bool:
        return _edge(edge) in self.edges

    def __or__(self, other) -> "Circuit":
        return Circuit(self.edges | _circuit(other).edges)

    def __and__(self, other) -> "Circuit":
        return Circuit(self.edges & _circuit(other).edges)

    def __sub__(self, other) -> "Circuit":
        return Circuit(self.edges - _circuit(other).edges)

    def __eq__(self, other) -> bool:
        return isinstance(other, Circuit) and self.edges == other.edges

    def __hash__(self) -> int:
        return hash(self.edges)

    def __repr__(self) -> str:
        by_receiver: dict = {}
        for s, r in sorted(self.edges):
            by_receiver.setdefault(r, []).append(s)
        lines = [f"Circuit with {len(self.edges)} edges"]
        for r, ss in by_receiver.items():
            lines.append(f"  {r:14s} <- {', '.join(ss)}")
        return "\n".join(lines)


def _circuit(x) -> Circuit:
    return x if isinstance(x, Circuit) else Circuit(x)


# ---- running edge interventions ---------------------------------------------------------------------
def _sender_site(model, s):
    """The site a sender's output is read from: the embedding (resid_pre 0), per-head results, MLP out."""
    if s.kind == "input":
        return model.site_table["resid_pre", 0]
    return model.site_table["result" if s.kind == "head" else "mlp_out", s.layer]


def _sender_specs(model, comp: Components) -> tuple:
    out = []
    for s in comp.senders:
        site = _sender_site(model, s)
        out.append(EdgeSender(s.name, site.node, site.layout, s.head if s.kind == "head" else None))
    return tuple(out)


def _receiver_specs(comp: Components, names: Iterable[str]) -> tuple:
    index = {s.name: i for i, s in enumerate(comp.senders)}
    columns = {r.name: j for j, r in enumerate(comp.receivers)}
    out = []
    for r in comp.receivers:
        if r.name not in names:
            continue
        upstream = tuple(index[s.name] for s in comp.upstream(r))
        out.append(
            EdgeReceiver(
                r.name, r.kind, columns[r.name], upstream, r.entry,
                r.target.node if r.target else "", r.target.layout if r.target else None or _identity(), r.head, r.cone, r.consumers,
            )
        )
    return tuple(out)


def _identity():
    from .graphs.layout import IDENTITY

    return IDENTITY


def sender_values(model, tokens, attention_mask=None, senders=None) -> torch.Tensor:
    """Every sender's output on ``tokens``: [batch, pos, senders, d_model] (the ``alt`` of an ablation).

    ``senders``: names of the senders wanted, in that order (default: all of them); the run then
    caches only their sites and stops after the last one.
    """
    comp = model_components(model)
    wanted = comp.senders if senders is None else [comp.sender(n) for n in senders]
    names = list(dict.fromkeys(_sender_site(model, s).name for s in wanted))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask, names_filter=names, return_logits=False)
    parts = []
    for s in wanted:
        value = cache[_sender_site(model, s).name]
        parts.append(value[:, :, s.head] if s.kind == "head" else value)
    return torch.stack(parts, dim=2)


def _alt(model, ablation, tokens_shape, attention_mask, reference, senders=None):
    """The replacement sender outputs for an ablation name, tokens or a tensor (of ``senders`` only,
    in that order, where given)."""
    comp = model_components(model)
    d = model.cfg.d_model
    if isinstance(ablation, torch.Tensor):
        want = (len(comp.senders), d)
        if ablation.dim() != 4 or tuple(ablation.shape[2:]) != want or ablation.shape[1] != tokens_shape[1]:
            raise CircuitError(
                f"an ablation tensor holds every sender's output, [batch or 1, {tokens_shape[1]} positions, "
                f"{want[0]} senders, {d}] (e.g. circuits.sender_values(model, tokens)); got {tuple(ablation.shape)}"
            )
        if senders is None:
            return ablation
        index = {s.name: i for i, s in enumerate(comp.senders)}
        return ablation[:, :, [index[n] for n in senders]]
    if ablation == "zero":
        n = len(comp.senders) if senders is None else len(senders)
        return torch.zeros(1, tokens_shape[1], n, d, dtype=model.captured.dtype)
    if ablation == "mean":
        ref = reference if reference is not None else None
        if ref is None:
            raise CircuitError("ablation='mean' needs reference tokens (reference=...) to average the sender outputs over")
        return sender_values(model, ref, senders=senders).mean(0, keepdim=True)
    if ablation in ("corrupted", "resample"):
        if reference is None:
            raise CircuitError(f"ablation={ablation!r} needs the corrupted tokens (reference=...)")
        values = sender_values(model, reference, senders=senders)
        if ablation == "resample":
            g = torch.Generator().manual_seed(0)
            values = values[torch.randint(0, values.shape[0], (tokens_shape[0],), generator=g)]
        return values
    raise CircuitError(f"ablation must be 'zero', 'mean', 'corrupted', 'resample' or a tensor of sender outputs; got {ablation!r}")


def _edge_plan(model, receivers: tuple):
    comp = model_components(model)
    sites = [model.site_table["result", layer] for layer in range(comp.n_layers)]
    return rewrites_for(model.graph, sites) + (Edges(_sender_specs(model, comp), receivers),)


def _mask(comp: Components, edges: Iterable, rows: int = 1) -> torch.Tensor:
    s_index = {s.name: i for i, s in enumerate(comp.senders)}
    r_index = {r.name: j for j, r in enumerate(comp.receivers)}
    mask = torch.zeros(rows, len(comp.senders), len(comp.receivers))
    for s, r in edges:
        mask[:, s_index[s], r_index[r]] = 1.0
    return mask


def run_with_edges(model, tokens, edges, *, ablation="zero", reference=None, attention_mask=None, return_type="logits"):
    """Run with each edge in ``edges`` replaced (ablated, or patched from ``reference``'s run).

    ``ablation``: "zero", "mean" (over ``reference`` tokens), "corrupted" (the sender outputs on
    ``reference`` tokens: edge patching), "resample", or a tensor [batch or 1, pos, senders, d_model].
    """
    comp = model_components(model)
    circuit = Circuit(edges).validate(model)
    feed = model._inputs(tokens, attention_mask)
    alt = _alt(model, ablation, feed["input_ids"].shape, attention_mask, reference)
    receivers = {r for _, r in circuit.edges}
    plan = _edge_plan(model, _receiver_specs(comp, receivers)) if receivers else ()
    feed = dict(feed)
    if receivers:
        feed[MASK_INPUT] = _mask(comp, circuit.edges).to(model.captured.device)
        feed[ALT_INPUT] = alt.to(model.captured.device, model.captured.dtype)
    out = model.programs.get(plan)(**feed)
    return model._outputs(out, feed, return_type)


def run_with_circuit(model, tokens, circuit: Circuit, *, ablation="zero", reference=None, attention_mask=None, return_type="logits"):
    """Run with every edge *outside* ``circuit`` ablated: the circuit's faithfulness in one call."""
    circuit = Circuit(circuit.edges if isinstance(circuit, Circuit) else circuit).validate(model)
    outside = Circuit.full(model).edges - circuit.edges
    return run_with_edges(model, tokens, outside, ablation=ablation, reference=reference, attention_mask=attention_mask, return_type=return_type)


def edge_sweep(model, tokens, edge_sets, metric, *, ablation="zero", reference=None, attention_mask=None,
               max_rows: int = 64) -> torch.Tensor:
    """The metric with each set of edges replaced, one batched row per set: [len(edge_sets)].

    The same replacement as ``run_with_edges`` (``ablation``, ``reference``) for many edge sets at
    once, e.g. every later head's query input patched from one source head (TransformerLens'
    direct path patching), or ACDC's candidate removals.
    """
    comp = model_components(model)
    sets = [Circuit(e).validate(model).edges for e in edge_sets]
    points = {(r.layer, r.stage) for edges in sets for r in (comp.receiver(n) for _, n in edges)}
    single = all(len({(comp.receiver(n).layer, comp.receiver(n).stage) for _, n in edges}) <= 1 for edges in sets)
    if single and _layered_ok(model) and not any(p[0] == comp.n_layers for p in points):
        if all(len({r for _, r in edges}) == 1 for edges in sets):
            # one receiver per set: an activation-patching sweep of what that receiver computes
            return _edge_cells(model, comp, tokens, sets, metric, ablation, reference, attention_mask)
        # each set changes receivers at one point only: rows start there, on the unpatched run
        return _edge_rows_layered(model, comp, tokens, sets, metric, ablation, reference, attention_mask)
    return _edge_rows(model, comp, tokens, sets, metric, ablation, reference, attention_mask, max_rows)


def _edge_cells(model, comp, tokens, sets, metric, ablation, reference, attention_mask) -> torch.Tensor:
    """Sets with one receiver each, as cells of the batched patching sweep.

    With nothing upstream changed, a receiver reads the unpatched residual plus its replaced edges'
    differences; its q/k/v (or an MLP's output) on that input is computed for every set at once and
    each set becomes a cell patching that value, so the sweep's prefix sharing, first-change start
    and last-block pruning all apply.
    """
    from .engine.sweep import Cell, Sweep
    from .passes import Cache, Read

    sweep = Sweep(model)
    feed = model._inputs(tokens, attention_mask)
    batch = feed["input_ids"].shape[0]
    order = {s.name: i for i, s in enumerate(comp.senders)}
    used = sorted({s for edges in sets for s, _ in edges}, key=order.__getitem__)  # only these are computed
    alt = _alt(model, ablation, feed["input_ids"].shape, attention_mask, reference, used).to(model.captured.dtype)
    s_index = {name: i for i, name in enumerate(used)}
    receivers = [comp.receiver(next(iter(edges))[1]) for edges in sets]
    targets = {}
    for r in receivers:
        name = model.get_act_name(r.kind if r.kind != "mlp" else "mlp_out", r.layer)
        targets[r.name] = model.site_table[name]
    entries = [model.site_table[model.get_act_name("resid_mid" if not comp.parallel else "resid_pre", r.layer)]
               for r in receivers if r.kind == "mlp"]
    with torch.no_grad():
        base = sweep.base(feed, keep_kv=sweep.causal, sites=list({s.name: s for s in list(targets.values()) + entries}.values()))
        diff = alt - sender_values(model, tokens, attention_mask, used)
        cells = [None] * len(sets)
        # receivers of one kind in one layer read the same site: one call computes it for every
        # distinct set of replaced senders among them (each set's receiver then takes its head)
        groups: dict = {}
        for k, r in enumerate(receivers):
            senders = tuple(sorted(s_index[s] for s, _ in sets[k]))
            groups.setdefault((r.layer, r.kind), {}).setdefault(senders, []).append(k)
        for (layer, kind), by_senders in groups.items():
            site = targets[receivers[next(iter(by_senders.values()))[0]].name]
            delta = torch.stack([diff[:, :, list(ss)].sum(2).expand(batch, -1, -1) for ss in by_senders])
            delta = delta.flatten(0, 1)  # [distinct sender sets * batch, pos, d_model]
            n = len(by_senders)
            if kind == "mlp":
                entry = base.values[model.get_act_name("resid_mid" if not comp.parallel else "resid_pre", layer)]
                prog = _mlp_programs(model, fused=False)[layer]
                value = prog(**{model.graph.structure.blocks[layer].mlp.entry: entry.repeat(n, 1, 1) + delta})["outputs"]["mlp"]
            else:
                h = base.hidden[layer].repeat(n, 1, 1) + delta
                plan = (Cache((Read("v", site.node, site.layout),), keep_outputs=False),)
                value = sweep.base_blocks[layer].get(plan)(**sweep._block_feed(layer, h, base.context, 0, n))["cache"]["v"]
            for j, ks in enumerate(by_senders.values()):
                for k in ks:
                    index = () if kind == "mlp" else (("head", receivers[k].head),)
                    cells[k] = Cell(site, index, source=value[j * batch : (j + 1) * batch])
        return sweep.run(cells, feed, None, metric, base=base)


def _edge_rows_layered(model, comp, tokens, sets, metric, ablation, reference, attention_mask) -> torch.Tensor:
    """Edge sets whose receivers sit at one point each: a row joins the batch at that point.

    Nothing upstream of the receivers changes, so each sender's current output is its output in the
    unpatched run and a receiver reads the unpatched residual plus the sum of its replaced edges'
    differences (the Edges pass in "delta" mode; each receiver replays only the rows it changes in).
    """
    from .engine.sweep import Sweep
    from .passes import DELTA_INPUT

    sweep = Sweep(model)
    feed = model._inputs(tokens, attention_mask)
    batch = feed["input_ids"].shape[0]
    alt = _alt(model, ablation, feed["input_ids"].shape, attention_mask, reference).to(model.captured.dtype)
    s_index = {s.name: i for i, s in enumerate(comp.senders)}
    with torch.no_grad():
        base = sweep.base(feed, keep_kv=False)
        diff = alt - sender_values(model, tokens, attention_mask)  # [batch or 1, pos, senders, d_model]
        order = sorted(range(len(sets)), key=lambda k: min((comp.receiver(r).layer for _, r in sets[k]), default=comp.n_layers))
        layer_of = {k: min((comp.receiver(r).layer for _, r in sets[k]), default=comp.n_layers) for k in order}
        h, joined = None, []
        for layer in range(min(layer_of.values()), comp.n_layers):
            new = [k for k in order if layer_of[k] == layer]
            if new:
                h_new = base.hidden[layer].repeat(len(new), 1, 1)
                h = h_new if h is None else torch.cat([h, h_new])
                joined += new
            rows = len(joined)
            feed_l = sweep._block_feed(layer, h, base.context, 0, rows)
            here = sorted({r for k in new for _, r in sets[k]}, key=lambda n: [x.name for x in comp.receivers].index(n))
            plan = ()
            if here:
                specs = _receiver_specs(comp, set(here))
                plan = (Edges((), specs, mode="delta"),)
                for entry in dict.fromkeys(r.entry for r in specs):
                    group = [r for r in specs if r.entry == entry]
                    delta = torch.zeros(rows * batch, h.shape[1], len(group), model.cfg.d_model, dtype=h.dtype)
                    column = {r.name: j for j, r in enumerate(group)}
                    first_new = rows - len(new)  # rows that joined earlier change nothing here
                    for pos_k, k in enumerate(new, start=first_new):
                        for s, rn in sets[k]:
                            if rn in column:
                                delta[pos_k * batch : (pos_k + 1) * batch, :, column[rn]] += diff[:, :, s_index[s]]
                    feed_l[f"{DELTA_INPUT}_{entry}"] = delta
            h = sweep.blocks[layer].get(plan)(**feed_l)["outputs"]["hidden"]
        values = sweep._metric(h, 0, base, metric, len(joined))
    out = torch.empty(len(sets))
    out[torch.tensor(joined)] = values.float()
    return out


def _edge_rows(model, comp, tokens, sets, metric, ablation, reference, attention_mask, max_rows=64) -> torch.Tensor:
    from .metrics import Metric
    from .passes import VOCAB_INPUT, SelectVocab

    feed = model._inputs(tokens, attention_mask)
    batch, seq = feed["input_ids"].shape
    alt = _alt(model, ablation, feed["input_ids"].shape, attention_mask, reference).to(model.captured.dtype)
    receivers = {r for edges in sets for _, r in edges}
    plan = _edge_plan(model, _receiver_specs(comp, receivers))
    if isinstance(metric, Metric):
        # a declared metric reads a few vocabulary entries: unembed only those
        pos, tok = metric.select(seq, batch)
        vocab, inverse = torch.unique(tok.flatten(), return_inverse=True)
        plan += (SelectVocab(model.graph.structure.unembed),)
        feed = {**feed, VOCAB_INPUT: vocab}
    program = model.programs.get(plan)
    out = []
    for start in range(0, len(sets), max_rows):
        chunk = sets[start : start + max_rows]
        rows = len(chunk)
        masks = torch.cat([_mask(comp, edges) for edges in chunk]).repeat_interleave(batch, dim=0)
        tiled = {k: (v.repeat(rows, *([1] * (v.dim() - 1))) if k != VOCAB_INPUT else v) for k, v in feed.items()}
        a = alt if alt.shape[0] == 1 else alt.repeat(rows, 1, 1, 1)
        with torch.no_grad():
            logits = program(**tiled, **{MASK_INPUT: masks, ALT_INPUT: a})["outputs"][model.captured.outputs[0]]
        if isinstance(metric, Metric):
            b_idx = torch.arange(batch)[:, None, None].repeat(rows, 1, 1) + torch.arange(rows).repeat_interleave(batch)[:, None, None] * batch
            sel = logits[b_idx, pos.repeat(rows, 1)[:, :, None], inverse.view(batch, 1, -1).repeat(rows, 1, 1)]
            out += list(metric.from_selected(sel.view(rows, batch, *sel.shape[1:])))
        else:
            out += [torch.as_tensor(metric(logits[k * batch : (k + 1) * batch])).reshape(()) for k in range(rows)]
    return torch.stack(out)


# ---- edge attribution patching ---------------------------------------------------------------------
def eap_scores(model, clean_tokens, corrupted_tokens, metric, *, attention_mask=None, corrupted_mask=None) -> dict:
    """Edge attribution patching (Syed et al.): {(sender, receiver): score} from one forward and backward.

    score = sum over batch and positions of (corrupted_s - clean_s) . d metric / d (receiver input),
    on the clean run: the first-order change of the metric when the edge is patched from the corrupted
    run. The gradient is taken once per receiver (a zero added to each receiver's input), so the cost
    is one backward whatever the number of edges.
    """
    from .passes import DELTA_INPUT

    comp = model_components(model)
    feed = model._inputs(clean_tokens, attention_mask)
    batch, seq = feed["input_ids"].shape
    specs = _receiver_specs(comp, {r.name for r in comp.receivers})
    plan = rewrites_for(model.graph, []) + (Edges((), specs, mode="delta"),)
    groups: dict = {}
    for r in specs:
        groups.setdefault(r.entry, []).append(r)
    zeros = {
        entry: torch.zeros(batch, seq, len(group), model.cfg.d_model, dtype=model.captured.dtype, requires_grad=True)
        for entry, group in groups.items()
    }
    with torch.enable_grad():
        out = model.programs.get(plan)(**feed, **{f"{DELTA_INPUT}_{e}": z for e, z in zeros.items()})
        value = torch.as_tensor(metric(out["outputs"][model.captured.outputs[0]]))
        grads = torch.autograd.grad(value.reshape(()), list(zeros.values()))
    with torch.no_grad():
        diff = (sender_values(model, corrupted_tokens, corrupted_mask) - sender_values(model, clean_tokens, attention_mask)).to(model.captured.dtype)
        flat = diff.permute(2, 0, 1, 3).reshape(len(comp.senders), -1)  # [senders, batch*pos*d]
        scores = {}
        for (entry, group), grad in zip(groups.items(), grads):
            g = grad.permute(2, 0, 1, 3).reshape(len(group), -1)  # [receivers, batch*pos*d]
            table = flat @ g.T  # [senders, receivers]
            for j, r in enumerate(group):
                for i in r.upstream:
                    scores[(comp.senders[i].name, r.name)] = float(table[i, j])
    return scores


# ---- ACDC ------------------------------------------------------------------------------------------
def _kl_metric(reference_logits: torch.Tensor, pos: int = -1):
    ref = reference_logits[:, pos].log_softmax(-1)

    def metric(logits):
        return torch.nn.functional.kl_div(logits[:, pos].log_softmax(-1), ref, log_target=True, reduction="batchmean")

    return metric


def acdc(model, clean_tokens, corrupted_tokens, *, threshold: float, metric=None, attention_mask=None, progress: bool = False) -> Circuit:
    """ACDC (Conmy et al.): prune edges whose removal changes the metric by less than ``threshold``.

    Receivers are visited from the logits back to the input; for each, every incoming edge's removal is
    checked in one batched run (one row per candidate), then the candidates are removed in order of
    increasing effect as long as removing them together stays within the threshold (checked in a second
    batched run). Removed edges are patched from the corrupted run. The default metric is the KL
    divergence of the last position's distribution from the full model's.
    """
    comp = model_components(model)
    with torch.no_grad():
        full_logits = model(clean_tokens, attention_mask)
    metric = metric or _kl_metric(full_logits)
    alt = sender_values(model, corrupted_tokens)
    full = Circuit.full(model).edges
    current = set(full)

    def evaluate(extras: list) -> torch.Tensor:
        """The metric with the edges outside the current circuit, and each extra set, removed."""
        removed = full - current
        return _edge_rows(model, comp, clean_tokens, [removed | extra for extra in extras], metric, alt, None, attention_mask)

    score = float(evaluate([set()])[0])
    for r in sorted(comp.receivers, key=lambda r: (-r.layer, -r.stage)):
        incoming = sorted(e for e in current if e[1] == r.name)
        if not incoming:
            continue
        effects = evaluate([{e} for e in incoming]) - score
        ranked = [incoming[i] for i in torch.argsort(effects).tolist() if effects[i] < threshold]
        if ranked:
            prefixes = [set(ranked[: k + 1]) for k in range(len(ranked))]
            totals = evaluate(prefixes) - score
            ok = [k for k in range(len(ranked)) if totals[k] < threshold]
            if ok:
                k = max(ok)
                current -= prefixes[k]
                score += float(totals[k])
        if progress:
            print(f"acdc: {r.name}: kept {sum(1 for e in current if e[1] == r.name)} of {len(incoming)} edges")
    return Circuit(current)


# ---- path patching ----------------------------------------------------------------------------------
def path_patch(model, clean_tokens, corrupted_tokens, metric, *, receivers, senders=None, freeze_mlps: bool = False,
               attention_mask=None, method: str = "auto") -> dict:
    """Path patching (Wang et al., "Interpretability in the Wild"): {sender: metric}.

    For each sender (a head ``a{l}.h{h}`` or an MLP ``m{l}``; default: every head upstream of the
    receivers), the metric of the clean run in which the receivers (``a{l}.h{h}<q|k|v>``, or ``logits``)
    read the residual stream as it is when the sender's output comes from the corrupted run and every
    other head is frozen at its clean value (MLPs are recomputed, or frozen too with ``freeze_mlps``).

    With heads frozen, a sender changes the residual stream by its own output difference plus what the
    MLPs after it make of that; so all senders run as rows of batched programs: the MLPs propagate
    each row's difference layer by layer (rows join at their sender's layer), then the receivers' rows
    run from the receivers' layer with their q/k/v read from the clean residual plus that difference.
    ``method="rows"`` runs the literal two-row algorithm in one full-model program instead.
    """
    comp = model_components(model)
    recv = [comp.receiver(r) for r in receivers]
    if any(r.kind == "logits" for r in recv) and len(recv) > 1:
        raise CircuitError("path patch to the logits alone, or to heads' q/k/v; not both in one call")
    if any(r.kind == "mlp" for r in recv):
        raise CircuitError("path patching receivers are heads' q/k/v inputs or the logits; for an MLP input use run_with_edges")
    if senders is None:  # every head upstream of every receiver
        senders = [s.name for s in comp.senders if s.kind == "head" and all(comp.reaches(s, r) for r in recv)]
    senders = [comp.sender(s) for s in senders]
    for s in senders:
        if s.kind == "input":
            raise CircuitError("path patching senders are heads or MLPs; the input has no corrupted-run output to patch")
        for r in recv:
            if not comp.reaches(s, r):
                raise CircuitError(f"sender {s.name} does not reach receiver {r.name}: it writes after the receiver reads")
    if not senders:
        return {}
    if method == "rows" or (method == "auto" and not _layered_ok(model)):
        return _path_patch_rows(model, comp, clean_tokens, corrupted_tokens, metric, recv, senders, freeze_mlps, attention_mask)
    if method not in ("auto", "layers"):
        raise ValueError("method must be 'auto', 'layers' or 'rows'")
    return _path_patch_layers(model, comp, clean_tokens, corrupted_tokens, metric, recv, senders, freeze_mlps, attention_mask)


def _layered_ok(model) -> bool:
    from .graphs.nodes import sym_dims

    mg = model.graph
    syms = (model.captured.batch_symbol, model.captured.seq_symbol)
    return all(len(sym_dims(mg.dg.node(b.mlp.entry), *syms)) == 3 for b in mg.structure.blocks)


def _mlp_programs(model, fused: bool = True):
    """Each block's MLP as a program of its input. ``fused``: a spelled-out GELU runs as one kernel
    (for rows of differences); unfused, values are bit-identical to the model's own (for cells whose
    unchanged positions must be recognised as unchanged)."""
    progs = getattr(model, "_mlp_programs", None)
    if progs is None:
        from .graphs.segments import _subgraph

        mg = model.graph
        gm = mg.captured.module
        by_name = {n.name: n for n in gm.graph.nodes}
        syms = (model.captured.batch_symbol, model.captured.seq_symbol)
        plain = []
        for block in mg.structure.blocks:
            nodes = [n for n in gm.graph.nodes if n.name in block.mlp.nodes]
            sub, ctx = _subgraph(gm, nodes, by_name[block.mlp.entry], {"mlp": by_name[block.mlp.output]}, syms)
            if ctx:
                raise CircuitError(f"the MLP of {block.path} reads {ctx} besides the residual stream")
            plain.append(sub)
        progs = model._mlp_programs = {False: plain}
    if fused not in progs:
        progs[True] = [passes.apply(sub, FuseGelu()) for sub in progs[False]]
    return progs[fused]


def _path_patch_layers(model, comp, clean_tokens, corrupted_tokens, metric, recv, senders, freeze_mlps, attention_mask):
    from .engine.sweep import Sweep
    from .passes import DELTA_INPUT

    sweep = Sweep(model)
    feed = model._inputs(clean_tokens, attention_mask)
    batch = feed["input_ids"].shape[0]
    mlp_sites = [model.site_table[model.get_act_name("resid_mid" if not comp.parallel else "resid_pre", l)] for l in range(comp.n_layers)]
    with torch.no_grad():
        base = sweep.base(feed, keep_kv=sweep.causal, sites=mlp_sites)
        clean = sender_values(model, clean_tokens, attention_mask)
        corrupt = sender_values(model, corrupted_tokens, attention_mask)
    index = {s.name: i for i, s in enumerate(comp.senders)}
    mlps = _mlp_programs(model) if not freeze_mlps else None
    order = sorted(range(len(senders)), key=lambda k: (senders[k].layer, senders[k].stage))
    joined: list = []  # sender positions in the order their rows joined
    delta = None  # [rows * batch, pos, d_model]: each row's residual minus the clean one
    snapshots: dict = {}
    read_points = sorted({(r.layer, r.stage) for r in recv if r.kind != "logits"})
    last = read_points[-1] if read_points else (comp.n_layers, 0)
    pending = list(order)

    def join(upto):
        nonlocal delta
        while pending and (senders[pending[0]].layer, senders[pending[0]].stage) < upto:
            k = pending.pop(0)
            i = index[senders[k].name]
            d = corrupt[:, :, i] - clean[:, :, i]
            delta = d if delta is None else torch.cat([delta, d])
            joined.append(k)

    mlp_stage = 0 if comp.parallel else 1
    with torch.no_grad():
        for layer in range(comp.n_layers + 1):
            for stage in (0, 1):
                point = (layer, stage)
                if point > last:
                    break
                join(point)  # senders that write before this point
                if point in read_points:
                    snapshots[point] = (delta.clone(), list(joined))
                if layer < comp.n_layers and stage == mlp_stage and mlps is not None and delta is not None:
                    # the MLP of this layer recomputes on every joined row's residual, from the first
                    # position where a row differs from the clean run (an MLP works position by position)
                    p0 = _first_change(delta)
                    if p0 < delta.shape[1]:
                        entry = base.values[mlp_sites[layer].name][:, p0:].repeat(len(joined), 1, 1)
                        x = entry + delta[:, p0:]
                        out = mlps[layer](**{model.graph.structure.blocks[layer].mlp.entry: x})["outputs"]["mlp"]
                        m = index[f"m{layer}"]
                        delta[:, p0:] += out - clean[:, p0:, m].repeat(len(joined), 1, 1)
        join((comp.n_layers + 1, 0))
    n = len(senders)

    def by_sender(t, rows_joined):
        """Rows of ``t`` (in join order, only the first ``rows_joined`` joined) put in sender order."""
        pieces = t.view(len(rows_joined), batch, *t.shape[1:])
        pos = {k: j for j, k in enumerate(rows_joined)}
        return torch.cat([pieces[pos[k]] for k in range(n)])

    if any(r.kind == "logits" for r in recv):
        with torch.no_grad():
            h = _final_residual(sweep, base).repeat(n, 1, 1) + by_sender(delta, joined)
            return _per_sender(sweep, h, base, metric, senders)
    first = read_points[0][0]
    # in a causal model, positions before the first one any receiver's input changes at keep their
    # clean values in every row: the rows run from there, attending to the clean run's keys and values
    start = min(min(_first_change(snapshots[p][0]) for p in read_points), base.seq - 1) if sweep.causal else 0
    h = base.hidden[first][:, start:].repeat(n, 1, 1)
    with torch.no_grad():
        for layer in range(first, comp.n_layers):
            here = [r for r in recv if r.layer == layer]
            feed_l = sweep._block_feed(layer, h, base.context, start, n)
            plan = sweep._prefix_plan(layer, feed_l, sweep._base_prefix(layer, base, start, n) if start else None)
            if here:
                specs = _receiver_specs(comp, {r.name for r in here})
                plan += (Edges((), specs, mode="absolute"),)
                d, rows_joined = snapshots[(layer, 0)]
                absolute = (base.hidden[layer].repeat(n, 1, 1) + by_sender(d, rows_joined))[:, start:]
                for entry in {r.entry for r in here}:
                    group = [r for r in specs if r.entry == entry]
                    feed_l[f"{DELTA_INPUT}_{entry}"] = absolute[:, :, None].expand(-1, -1, len(group), -1)
            h = sweep.blocks[layer].get(plan)(**feed_l)["outputs"]["hidden"]
        values = sweep._metric(h, start, base, metric, n)
    return {s.name: float(values[k]) for k, s in enumerate(senders)}


def _first_change(delta: torch.Tensor) -> int:
    """The first position at which any row of ``delta`` [rows, pos, d_model] is non-zero (pos if none)."""
    changed = delta.ne(0).any(-1).any(0).nonzero()
    return int(changed[0]) if changed.numel() else delta.shape[1]


def _final_residual(sweep, base):
    last = len(sweep.blocks) - 1
    return sweep.blocks[last].get(())(**sweep._block_feed(last, base.hidden[last], base.context))["outputs"]["hidden"]


def _per_sender(sweep, h, base, metric, senders):
    values = sweep._metric(h, 0, base, metric, len(senders))
    return {s.name: float(values[k]) for k, s in enumerate(senders)}


def _path_patch_rows(model, comp, clean_tokens, corrupted_tokens, metric, recv, senders, freeze_mlps, attention_mask) -> dict:
    """The literal algorithm: per sender a path row (sender corrupted, other heads frozen) and a row
    whose receivers read their q/k/v from it, all in one full-model program."""
    feed = model._inputs(clean_tokens, attention_mask)
    batch, seq = feed["input_ids"].shape
    n = len(senders)
    names = [model.get_act_name(k, l) for l in range(comp.n_layers) for k in ("z", "mlp_out")]
    with torch.no_grad():
        _, clean = model.run_with_cache(clean_tokens, attention_mask, names_filter=names, return_logits=False)
        _, corrupt = model.run_with_cache(corrupted_tokens, attention_mask, names_filter=names, return_logits=False)
    total = 2 * n * batch  # rows [2k*b, (2k+1)*b): sender k's path; the next b rows: its receiver run
    path_rows = torch.arange(total).view(n, 2, batch)[:, 0].flatten()
    read_rows = torch.arange(total).view(n, 2, batch)[:, 1].flatten()

    def tile(t):
        return t.repeat(2 * n, *([1] * (t.dim() - 1)))

    def rows_of(k, which=0):
        start = (2 * k + which) * batch
        return slice(start, start + batch)

    specs = []
    for layer in range(comp.n_layers):
        z = model.get_act_name("z", layer)
        source = tile(clean[z])
        for k, s in enumerate(senders):
            if s.kind == "head" and s.layer == layer:
                source[rows_of(k), :, s.head] = corrupt[z][:, :, s.head]
        freeze = torch.zeros(total, 1, 1, 1, dtype=torch.bool)
        freeze[path_rows] = True  # every head of a path row is frozen (or, the sender, corrupted)
        specs.append(Patch(z, source=source, mask=freeze))
        mlp = model.get_act_name("mlp_out", layer)
        m_source, m_mask = tile(clean[mlp]), torch.zeros(total, 1, 1, dtype=torch.bool)
        for k, s in enumerate(senders):
            if s.kind == "mlp" and s.layer == layer:
                m_source[rows_of(k)] = corrupt[mlp]
                m_mask[rows_of(k)] = True
            elif freeze_mlps:
                m_mask[rows_of(k)] = True
        if m_mask.any():
            specs.append(Patch(mlp, source=m_source, mask=m_mask))
    logits_rows = None
    for r in recv:
        if r.kind == "logits":
            logits_rows = path_rows
            continue
        site = model.site_table[model.get_act_name(r.kind, r.layer)]
        heads = model.graph.shape(site, batch, seq)[2]
        src = torch.arange(total)
        src[read_rows] = path_rows
        mask = torch.zeros(total, 1, heads, 1, dtype=torch.bool)
        mask[read_rows, :, r.head] = True
        specs.append(Patch(site.name, from_rows=src, mask=mask))
    tiled = {k: tile(v) for k, v in feed.items()}
    prep = prepare(specs, model, total, seq)
    plan = rewrites_for(model.graph, prep.sites, write=prep.sites) + (Intervene(tuple(prep.edits)),)
    with torch.no_grad():
        logits = model.programs.get(plan)(**tiled, **prep.feed)["outputs"][model.captured.outputs[0]]
    rows = (logits_rows if logits_rows is not None else read_rows).view(n, batch)
    return {s.name: float(torch.as_tensor(metric(logits[rows[k]]))) for k, s in enumerate(senders)}
