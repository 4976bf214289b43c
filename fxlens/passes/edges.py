"""Edges pass: intervene on circuit edges (sender -> receiver) through the residual stream.

Problem: an edge is the part of a receiver's input that one sender wrote. Patching or ablating an edge
changes what that receiver reads and nothing else; every other reader of the residual stream still
sees the sender's actual output. Heads read their own q, k and v inputs, so edges into different
heads of one layer need different inputs to the same norm and projection.

Mechanism: the sender outputs of the current run are gathered from the graph (per-head results, MLP
outputs, the embedding). Each receiver reads ``entry + delta``, where
``delta = sum_s mask[b, s, r] * (alt[b, s] - current[b, s])``: ``mask`` (a graph input, [batch or 1,
senders, receivers]) says which edges are replaced and ``alt`` ([batch or 1, pos, senders, d_model])
what each sender's output becomes (another run's, zero, a mean).
A sender whose branch passes through a norm before it is added (Gemma 2/3's and OLMo 2/3's sandwich
norms; ``post_norms``, one ``EdgePostNorm`` per such branch) is not added as it is: its layer l writes
``post_norm_l(branch_l)``, ``branch_l`` being the sum of its head results (+ bias) or its MLP output,
and the receiver reads instead ``entry + sum_l [post_norm_l(branch_l + D_l) - post_norm_l(branch_l)]``
with ``D_l = sum_{s in l} mask[b, s, r] * (alt[b, s] - current[b, s])`` (sender values before the
norm). Several edges from one layer into one receiver are combined inside the norm. The norm's nodes
are replayed once per branch and receiver group on [batch, pos * receivers, d_model] (a norm works
position by position), for the receiver columns with a replaced edge from that branch only.
A model that normalises the residual stream itself after each branch (BERT: ``spine``, an
``EdgeSpine``) has no such sum: the residual a receiver reads is a chain of steps from the embedding,
``x <- x + branch`` and ``x <- norm(x)``. With every other component's output frozen at this run's
value, the receiver reads that chain recomputed with the replaced edges' differences added where their
senders' outputs are added; in difference form ``Delta <- Delta + D_step`` at each sum and
``Delta <- norm(x + Delta) - norm(x)`` at each norm (``x``: this run's value there), every norm between
a sender and the receiver replayed (once per receiver group, on [batch, pos * receivers, d_model],
for the columns with a replaced edge upstream).
For an MLP or the logits the receiver's own reads of ``entry`` are redirected. For q, k and v the
nodes from ``entry`` to the q/k/v node (norm, projection, head split) are replayed on the receiver's
input, and the receiver's head is taken from the replay. Only receivers named in the spec are rebuilt,
so the cost grows with the receivers a request touches. The mask is differentiable: its gradient at
zero is each edge's attribution score.

Example::

    gm = edges(gm, Edges(senders=(...), receivers=(...)))
    gm(input_ids=ids, attention_mask=m, fxl_edge_mask=mask, fxl_edge_alt=alt)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..graphs.layout import IDENTITY, Layout
from ..graphs.spine import steps_upto
from .base import PassError, rewrite

__all__ = ["EdgeSender", "EdgeReceiver", "EdgePostNorm", "EdgeSpineStep", "EdgeSpine", "Edges", "edges", "receiver_specs"]


@dataclass(frozen=True)
class EdgeSender:
    name: str
    node: str  # [batch, pos, d_model], or [batch, pos, head, d_model] in the user's layout
    layout: Layout = IDENTITY
    head: int | None = None


@dataclass(frozen=True)
class EdgeReceiver:
    name: str
    kind: str  # "q", "k", "v", "mlp", "logits"
    index: int  # column of the mask
    upstream: tuple  # indices of the senders this receiver reads
    entry: str
    target: str = ""
    target_layout: Layout = IDENTITY
    head: int | None = None
    cone: tuple = ()
    consumers: tuple = ()
    entry_layout: Layout = IDENTITY  # how entry is held ([batch*pos, d]: OPT's MLP input); the delta is [batch, pos, d]


@dataclass(frozen=True)
class EdgePostNorm:
    """A norm between a branch's sum and the residual stream: ``senders`` (indices) sum into ``input``,
    the node the norm reads; ``cone`` holds the nodes from there to what is added, in graph order."""

    senders: tuple
    input: str
    cone: tuple


@dataclass(frozen=True)
class EdgeSpineStep:
    """One step of a residual stream normalised itself (``graphs.spine``): "add" sums the outputs of
    ``senders`` (indices) into ``input``, giving ``output``; "map" computes ``output`` from ``input``
    alone through ``cone`` (a norm)."""

    kind: str
    output: str
    input: str
    senders: tuple = ()
    cone: tuple = ()


@dataclass(frozen=True)
class EdgeSpine:
    """The residual stream as steps from ``start``, the value of the senders ``senders`` (the embedding)."""

    start: str
    senders: tuple
    steps: tuple  # of EdgeSpineStep

    def upto(self, node: str) -> tuple:
        found = steps_upto(self.start, self.steps, node)
        if found is None:
            raise PassError(f"receivers read {node}, which is not on the residual stream's chain of steps")
        return found


@dataclass(frozen=True)
class Edges:
    stage: ClassVar[str] = "edit"
    senders: tuple  # of EdgeSender
    receivers: tuple  # of EdgeReceiver
    # "edges": inputs from the mask and the alternative sender outputs (above). "delta" / "absolute":
    # each group of receivers reading one residual node gets, from its graph input [batch, pos,
    # receivers, d_model], what to add to the residual it reads / the input itself (path patching;
    # gradients with respect to receiver inputs for EAP)
    mode: str = "edges"
    mask: str | None = None  # graph-input names ("edges" mode), chosen by the engine
    alt: str | None = None
    deltas: tuple = ()  # ((entry node, graph-input name), ...) for "delta" and "absolute"
    post_norms: tuple = ()  # of EdgePostNorm ("edges" mode): senders whose branch is normalised before the add
    spine: EdgeSpine | None = None  # ("edges" mode) the residual stream's steps, where it is normalised itself



def _gather(values: list, heads: list) -> torch.Tensor:
    """Stack sender outputs as [batch, pos, senders, d_model]."""
    parts = [v[:, :, h] if h is not None else v for v, h in zip(values, heads)]
    return torch.stack(parts, dim=2)


def _delta(values: list, heads: list, alt: torch.Tensor, mask: torch.Tensor, upstream: list, columns: list) -> torch.Tensor:
    """[batch, pos, receivers, d_model]: what replacing the masked edges adds to each receiver's input.

    Only senders with a replaced edge into one of these receivers are gathered, so a request that
    touches a few edges costs a few sender tensors, not every sender upstream.
    """
    m = mask[:, upstream][:, :, columns]
    if mask.requires_grad:  # attribution: the gradient at zero reaches every sender
        used = list(range(len(upstream)))
    else:
        used = m.ne(0).any(0).any(-1).nonzero().flatten().tolist()
    ref = values[0]
    if not used:
        return ref.new_zeros(ref.shape[0], ref.shape[1], len(columns), ref.shape[-1])
    current = _gather([values[i] for i in used], [heads[i] for i in used])
    diff = alt[:, :, [upstream[i] for i in used]].to(current.dtype) - current
    return torch.einsum("bpsd,bsr->bprd", diff, m[:, used].to(current.dtype))


def _normed_columns(mask: torch.Tensor, upstream: list, columns: list) -> torch.Tensor:
    """The receiver columns (of ``columns``) with a replaced edge from one of ``upstream``: those whose
    post-norm is replayed (all of them while the mask requires grad)."""
    if mask.requires_grad:
        return torch.arange(len(columns), device=mask.device)
    return mask[:, upstream][:, :, columns].ne(0).any(0).any(0).nonzero().flatten()


def _widen(branch: torch.Tensor, d: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """[batch, pos * used, d_model]: the branch's sum plus each used receiver's ``D``, for the norm."""
    return (branch.unsqueeze(2) + d.index_select(2, used).to(branch.dtype)).flatten(1, 2)


def _norm_change(normed: torch.Tensor, written: torch.Tensor, used: torch.Tensor, dtype) -> torch.Tensor:
    """[batch, pos, used, d_model]: the norm replayed for the used receiver columns (``_widen``) minus this
    run's value of it."""
    return (normed.unflatten(1, (written.shape[1], used.numel())) - written.unsqueeze(2)).to(dtype)


def _add_normed(delta: torch.Tensor, normed: torch.Tensor, written: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """``delta`` plus, at the used receiver columns, the replayed norm minus what the branch added."""
    change = _norm_change(normed, written, used, delta.dtype)
    if used.numel() == delta.shape[2]:
        return delta + change
    return delta.index_add(2, used, change)


def _renormed(delta: torch.Tensor, normed: torch.Tensor, written: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """The difference after a norm on the residual stream: at the used receiver columns, the replayed norm
    minus this run's value; elsewhere zero (no replaced edge upstream, so no difference before the norm)."""
    change = _norm_change(normed, written, used, delta.dtype)
    if used.numel() == delta.shape[2]:
        return change
    return torch.zeros_like(delta).index_copy(2, used, change)


def _input(entry: torch.Tensor, delta: torch.Tensor, j: int) -> torch.Tensor:
    return entry + delta[:, :, j]


def _given(inputs: torch.Tensor, j: int) -> torch.Tensor:
    return inputs[:, :, j]


def _changed(source: torch.Tensor, upstream, column: int, x: torch.Tensor) -> torch.Tensor:
    """Per batch row: does this receiver's input change? ``source`` is the edge mask (with
    ``upstream``) or, with ``upstream=None``, the receivers' deltas. A source that requires grad
    changes every row: its gradient at zero must flow through every replay (attribution)."""
    if source.requires_grad:
        return torch.ones(x.shape[0], dtype=torch.bool, device=source.device)
    if upstream is None:
        m = source[:, :, column].ne(0).flatten(1).any(-1)
    else:
        m = source[:, upstream, column].ne(0).any(-1)
    return m.expand(x.shape[0]) if m.shape[0] == 1 else m


def _active_rows(source: torch.Tensor, upstream, column: int, x: torch.Tensor) -> torch.Tensor:
    """Batch rows whose input to this receiver changes (all rows for a shared mask).

    Never empty: with no such row, row 0 is replayed (reshapes cannot infer sizes of empty tensors)
    and ``_set_heads`` writes nothing back, because ``_written`` is empty.
    """
    rows = _changed(source, upstream, column, x).nonzero().flatten().to(x.device)
    return rows if rows.numel() else torch.zeros(1, dtype=torch.long, device=x.device)


def _written(source: torch.Tensor, upstream, column: int, x: torch.Tensor) -> torch.Tensor:
    return _changed(source, upstream, column, x).nonzero().flatten().to(x.device)


def _set_heads(value: torch.Tensor, heads: list, rows: list, *replayed: torch.Tensor) -> torch.Tensor:
    out = value.clone()
    for h, r, new in zip(heads, rows, replayed):
        if r is None:
            out[:, :, h] = new[:, :, h]
        elif r.numel():
            out[r, :, h] = new[: r.numel(), :, h]
    return out


def edges(gm: fx.GraphModule, spec: Edges) -> fx.GraphModule:
    with rewrite(gm) as rw:
        if spec.mode not in ("edges", "delta", "absolute"):
            raise PassError(f"{spec.mode!r} is not an Edges mode")
        if spec.mode == "edges":
            if spec.mask is None or spec.alt is None:
                raise PassError("edges mode needs graph-input names for the edge mask and the alternative sender outputs")
            mask = rw.placeholder(spec.mask)
            alt = rw.placeholder(spec.alt)
        delta_names = dict(spec.deltas)
        by_entry: dict = {}
        for r in spec.receivers:
            by_entry.setdefault((r.entry, r.upstream), []).append(r)
        for (entry_name, upstream), group in by_entry.items():
            entry = rw.node(entry_name)
            # insert before the first node that reads this entry for one of these receivers
            readers = [rw.node(c) for r in group for c in (r.consumers or r.cone[:1])]
            if not readers:
                raise PassError(f"receivers {[r.name for r in group]} read nothing from {entry_name}")
            first = min(readers, key=lambda n: _order(rw.graph, n))
            if spec.mode != "edges":
                if entry_name not in delta_names:
                    raise PassError(f"{spec.mode} mode needs a graph input for the receivers reading {entry_name}")
                delta = rw.placeholder(delta_names[entry_name])
            with rw.graph.inserting_before(first):
                if spec.mode == "edges" and spec.spine is not None:
                    delta = _spine_delta(rw, spec, entry_name, list(upstream), [r.index for r in group], alt, mask)
                elif spec.mode == "edges":
                    delta = _edge_delta(rw, spec, list(upstream), [r.index for r in group], alt, mask)
                held = group[0].entry_layout  # the same entry node: one layout ([batch*pos, d] before OPT's MLP)
                if spec.mode == "absolute":
                    inputs = [rw.write(held, rw.create(_given, (delta, j))) for j in range(len(group))]
                elif held.is_identity:
                    inputs = [rw.create(_input, (entry, delta, j)) for j in range(len(group))]
                else:
                    inputs = [rw.create(torch.add, (entry, rw.write(held, rw.create(_given, (delta, j)))))
                              for j in range(len(group))]
            replays: dict = {}
            for r, x in zip(group, inputs):
                if r.kind in ("mlp", "logits"):
                    redirect(rw, r, entry, x)
                else:
                    replays.setdefault((r.target, r.target_layout), []).append((r, x))
            for (target_name, layout), items in replays.items():
                target = rw.node(target_name)
                with rw.after(target):  # one insertion point: the replays, then the merge, in order
                    outs, rows = [], []
                    for r, x in items:
                        if spec.mode != "absolute":
                            # replay only the rows whose input to this receiver changes
                            key = (mask, list(upstream), r.index) if spec.mode == "edges" else (delta, None, group.index(r))
                            active = rw.create(_active_rows, (*key, x))
                            written = rw.create(_written, (*key, x))
                            x = rw.create(torch.index_select, (x, 0, active))
                        else:
                            written = None
                        outs.append(layout.read(rw.graph, _replay(rw, r.cone, entry, x)))
                        rows.append(written)
                    read = layout.read(rw.graph, target)
                    merged = rw.create(_set_heads, (read, [r.head for r, _ in items], rows, *outs))
                    written = layout.write(rw.graph, merged)
                keep = {read, merged, written}
                rw.supersede(target, written, keep=keep | _chain(read, target))
    return rw.result


def _part(rw, spec: Edges, indices: list, columns: list, alt: fx.Node, mask: fx.Node) -> fx.Node:
    """The node computing what replacing the edges from senders ``indices`` adds, as they are."""
    senders = [spec.senders[i] for i in indices]
    values = [rw.read(s.layout, rw.node(s.node)) for s in senders]
    return rw.create(_delta, (values, [s.head for s in senders], alt, mask, list(indices), columns))


def _spine_delta(rw, spec: Edges, entry: str, upstream: list, columns: list, alt: fx.Node, mask: fx.Node) -> fx.Node:
    """[batch, pos, receivers, d_model]: the difference the replaced edges make to the receivers ``columns``
    reading ``entry``, the residual stream's steps replayed from the embedding (module docstring)."""
    up = set(upstream)
    seen = [i for i in spec.spine.senders if i in up]
    delta = _part(rw, spec, seen, columns, alt, mask)
    for step in spec.spine.upto(entry):
        if step.kind == "add":
            new = [i for i in step.senders if i in up]
            if new:
                delta = rw.create(torch.add, (delta, _part(rw, spec, new, columns, alt, mask)))
                seen += new
        elif seen:
            used = rw.create(_normed_columns, (mask, list(seen), columns))
            x = rw.create(_widen, (rw.node(step.input), delta, used))
            replayed = _replay(rw, step.cone, rw.node(step.input), x)
            delta = rw.create(_renormed, (delta, replayed, rw.node(step.output), used))
    return delta


def _edge_delta(rw, spec: Edges, upstream: list, columns: list, alt: fx.Node, mask: fx.Node) -> fx.Node:
    """The node computing [batch, pos, receivers, d_model]: what the receivers ``columns`` read on top
    of their entry. Senders added as they are contribute ``mask * (alt - current)``; each normalised
    branch contributes its norm replayed on its sum plus ``D`` minus what it added (module docstring)."""

    def part(indices):
        return _part(rw, spec, indices, columns, alt, mask)

    normed = {i for pn in spec.post_norms for i in pn.senders}
    delta = part([i for i in upstream if i not in normed])
    for pn in spec.post_norms:
        inside = [i for i in upstream if i in set(pn.senders)]
        if not inside:
            continue
        used = rw.create(_normed_columns, (mask, inside, columns))
        branch = rw.node(pn.input)
        x = rw.create(_widen, (branch, part(inside), used))
        replayed = _replay(rw, pn.cone, branch, x)
        delta = rw.create(_add_normed, (delta, replayed, rw.node(pn.cone[-1]), used))
    return delta


def redirect(rw, r: EdgeReceiver, entry: fx.Node, x: fx.Node) -> None:
    """An MLP or logits receiver reads ``x`` where it read ``entry``: its own reads are redirected, and the
    nodes it shares with the attention branch (``r.cone``) are replayed for it."""
    env = {entry: x}
    if r.cone:
        with rw.graph.inserting_before(rw.node(r.consumers[0])):
            env = _replay(rw, r.cone, entry, x, env=True)
    for c in r.consumers:
        for old, new in env.items():
            rw.node(c).replace_input_with(old, new)


def _chain(node: fx.Node, stop: fx.Node) -> set:
    out = set()
    while node is not stop and node.op != "placeholder":
        out.add(node)
        ins = node.all_input_nodes
        if not ins:
            break
        node = ins[0]
    return out


def _order(graph: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    return -1


def _replay(rw, cone: tuple, entry: fx.Node, x: fx.Node, env: bool = False):
    """Copy the nodes of ``cone`` (entry's descendants up to a target) with ``entry`` read as ``x``;
    the copy of the last node, or with ``env`` the map from each original node to its copy.

    Reshapes in the cone name the batch size; the copies read it from ``x``, which may hold only
    some of the rows.
    """
    copies = {entry: x}
    batch = []

    def arg(n):
        if n in copies:
            return copies[n]
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int and n.args[1] == 0:
            if not batch:
                batch.append(rw.graph.call_function(torch.ops.aten.sym_size.int, (x, 0)))
            return batch[0]
        return n

    last = None
    for name in cone:
        node = rw.node(name)
        last = rw.graph.node_copy(node, arg)
        copies[node] = last
    return copies if env else last


def receiver_specs(comp, names) -> tuple:
    """The Edges pass's view of the receivers ``names`` of ``comp`` (``graphs.components``), in the
    components' order."""
    names = set(names)
    index = {s.name: i for i, s in enumerate(comp.senders)}
    out = []
    for j, r in enumerate(comp.receivers):
        if r.name not in names:
            continue
        upstream = tuple(index[s.name] for s in comp.upstream(r))
        out.append(
            EdgeReceiver(
                r.name, r.kind, j, upstream, r.entry, r.target.node if r.target else "",
                r.target.layout if r.target else IDENTITY, r.head, r.cone, r.consumers, r.entry_layout,
            )
        )
    return tuple(out)
