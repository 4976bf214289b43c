"""Path patching (Wang et al., "Interpretability in the Wild"), each sender a row of the row engine.

Problem: path patching asks, for each sender (a head or an MLP), what the metric becomes when only
the receivers (heads' q/k/v, or the logits) see the sender's corrupted output, every other head being
frozen at its clean value (MLPs recomputed, or frozen too). The textbook algorithm runs two forwards
per sender.

Mechanism: with heads frozen, a sender changes the residual stream by its own output difference plus
what the MLPs after it make of that difference. So the differences of all senders propagate together
as rows through the MLP programs, layer by layer (rows join at their sender's layer); then each
sender is a ``Row`` of the row engine joining at the first receiver's layer, whose receivers read
(``ReceiverInput``, absolute mode) the clean residual plus that sender's difference. In a causal model
the rows start at the first position any receiver's input changes. Logits receivers are read out
directly from the final clean residual plus the difference. ``method="rows"`` runs the literal
two-row algorithm in one whole-model program instead (any family).

Example::

    effects = path_patch(model, clean, corrupted, metric, receivers=["a9.h6<q>"])   # {sender: metric}
"""

from __future__ import annotations

import torch

from ..engine.interventions import Patch, prepare
from ..engine.plan import PlanBuilder
from ..engine.rows import ReceiverInput, Row, RowEngine, RowError
from ..engine.rows.readout import scalar
from ..graphs.components import CircuitError
from .edge_sweeps import layered
from .edges import paired_feeds, receiver_specs, sender_values

__all__ = ["path_patch"]


def path_patch(model, clean_tokens, corrupted_tokens, metric, *, receivers, senders=None, freeze_mlps: bool = False,
               attention_mask=None, corrupted_attention_mask=None, method: str = "auto") -> dict:
    """Path patching: {sender: metric} (see the module docstring).

    For each sender (a head ``a{l}.h{h}`` or an MLP ``m{l}``; default: every head upstream of the
    receivers), the metric of the clean run in which the receivers (``a{l}.h{h}<q|k|v>``, or
    ``logits``) read the residual stream as it is when the sender's output comes from the corrupted
    run and every other head is frozen at its clean value (MLPs are recomputed, or frozen too with
    ``freeze_mlps``). The corrupted run uses ``corrupted_attention_mask``, else ``attention_mask``.
    """
    if method not in ("auto", "layers", "rows"):
        raise ValueError(f"method must be 'auto', 'layers' or 'rows'; got {method!r}")
    comp = model.derived.components
    if isinstance(receivers, str):
        receivers = [receivers]
    receivers = list(receivers)
    if not receivers:
        raise CircuitError("path_patch needs at least one receiver: heads' inputs ('a9.h6<q>') or 'logits'")
    recv = [comp.receiver(r) for r in receivers]
    if any(r.kind == "logits" for r in recv) and len(recv) > 1:
        raise CircuitError("path patch to the logits alone, or to heads' q/k/v; not both in one call")
    if any(r.kind == "mlp" for r in recv):
        raise CircuitError("path patching receivers are heads' q/k/v inputs or the logits; for an MLP input use run_with_edges")
    if senders is None:  # every head upstream of every receiver
        senders = [s.name for s in comp.senders if s.kind == "head" and all(comp.reaches(s, r) for r in recv)]
    elif isinstance(senders, str):
        senders = [senders]
    senders = [comp.sender(s) for s in senders]
    for s in senders:
        if s.kind == "input":
            raise CircuitError("path patching senders are heads or MLPs; the input has no corrupted-run output to patch")
        for r in recv:
            if not comp.reaches(s, r):
                raise CircuitError(f"sender {s.name} does not reach receiver {r.name}: it writes after the receiver reads")
    feed, corrupted = paired_feeds(model, clean_tokens, corrupted_tokens, attention_mask, corrupted_attention_mask,
                                   "path patching compares them")
    if not senders:
        return {}
    if method == "layers" and comp.not_additive is not None:
        comp.require_additive("path patching by layers (method='layers')")
    engine = RowEngine(model)
    if method == "rows" or (method == "auto" and (not layered(model) or comp.not_additive is not None or engine.whole)):
        return _rows_method(model, comp, feed, corrupted, metric, recv, senders, freeze_mlps)
    try:
        return _layers_method(model, comp, feed, corrupted, metric, recv, senders, freeze_mlps)
    except (CircuitError, RowError):
        raise
    except Exception as err:  # noqa: BLE001 - a structural failure: told once, then the literal algorithm
        if method == "layers":
            raise
        engine.fall_back(err)
        return _rows_method(model, comp, feed, corrupted, metric, recv, senders, freeze_mlps)


def _first_change(delta: torch.Tensor) -> int:
    """The first position at which any row of ``delta`` [rows, pos, d_model] is non-zero (pos if none)."""
    changed = delta.ne(0).any(-1).any(0).nonzero()
    return int(changed[0]) if changed.numel() else delta.shape[1]


def _layers_method(model, comp, feed, corrupted, metric, recv, senders, freeze_mlps):
    engine = RowEngine(model)
    blocks = engine.blocks
    batch = feed["input_ids"].shape[0]
    mid = "resid_mid" if not comp.parallel else "resid_pre"
    mlp_sites = [model.site_table[model.get_act_name(mid, layer)] for layer in range(comp.n_layers)]
    with torch.no_grad():
        base = engine.base(feed, sites=mlp_sites)
        clean = sender_values(model, feed["input_ids"], feed.get("attention_mask"))
        corrupt = sender_values(model, corrupted["input_ids"], corrupted.get("attention_mask"))
    index = {s.name: i for i, s in enumerate(comp.senders)}
    mlps = blocks.mlp_programs() if not freeze_mlps else None
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
                        x = entry + delta[:, p0:].to(entry.device)  # the block's device (a model spread over devices)
                        out = mlps[layer](**{model.graph.structure.blocks[layer].mlp.entry: x})["outputs"]["mlp"]
                        m = index[f"m{layer}"]
                        delta[:, p0:] += out.to(delta.device) - clean[:, p0:, m].repeat(len(joined), 1, 1)
        join((comp.n_layers + 1, 0))
    n = len(senders)

    def by_sender(t, rows_joined):
        """Rows of ``t`` (in join order, only the first ``rows_joined`` joined) put in sender order."""
        pieces = t.view(len(rows_joined), batch, *t.shape[1:])
        pos = {k: j for j, k in enumerate(rows_joined)}
        return torch.cat([pieces[pos[k]] for k in range(n)])

    readout = engine.readout(base, metric)
    with torch.no_grad():
        if any(r.kind == "logits" for r in recv):
            h = base.final.repeat(n, 1, 1) + by_sender(delta, joined).to(base.final.device)
            values = readout.final(h, n)
            return {s.name: float(values[k]) for k, s in enumerate(senders)}
        # in a causal model, positions before the first one any receiver's input changes at keep their
        # clean values in every row: the rows start there, attending to the clean run's keys and values
        start = min(min(_first_change(snapshots[p][0]) for p in read_points), base.seq - 1) if engine.causal else 0
        specs = {r.name: r for r in receiver_specs(comp, {r.name for r in recv})}
        inputs = [[] for _ in range(n)]
        for (layer, stage) in read_points:
            d, rows_joined = snapshots[(layer, stage)]
            absolute = (base.hidden[layer].repeat(n, 1, 1) + by_sender(d, rows_joined).to(base.hidden[layer].device)).view(n, batch, base.seq, -1)
            for r in recv:
                if (r.layer, r.stage) == (layer, stage):
                    for k in range(n):
                        inputs[k].append(ReceiverInput(specs[r.name], layer, absolute[k], "absolute"))
        first = read_points[0][0]
        rows = [Row(first, start, inputs=tuple(inputs[k])) for k in range(n)]
        values = engine.run(rows, base, metric, readout=readout)
    return {s.name: float(values[k]) for k, s in enumerate(senders)}


def _rows_method(model, comp, feed, corrupted, metric, recv, senders, freeze_mlps) -> dict:
    """The literal algorithm: per sender a path row (sender corrupted, other heads frozen) and a row
    whose receivers read their q/k/v from it, all in one whole-model program."""
    batch, seq = feed["input_ids"].shape
    n = len(senders)
    names = [model.get_act_name(k, layer) for layer in range(comp.n_layers) for k in ("z", "mlp_out")]
    with torch.no_grad():
        _, clean = model.run_with_cache(feed["input_ids"], feed.get("attention_mask"), names_filter=names, return_logits=False)
        _, corrupt = model.run_with_cache(corrupted["input_ids"], corrupted.get("attention_mask"), names_filter=names, return_logits=False)
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
    prep = prepare(specs, model, total, seq, tiled.get("attention_mask"))
    b = PlanBuilder(model.graph)
    prep.add_to(b)
    plan, inputs = b.build()
    with torch.no_grad():
        logits = model._logits(model.programs.get(plan)(**tiled, **inputs))
    rows = (logits_rows if logits_rows is not None else read_rows).view(n, batch)
    return {s.name: float(scalar(metric(logits[rows[k]]))) for k, s in enumerate(senders)}
