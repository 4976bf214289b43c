"""Where each head's (and each neuron's) weights sit inside an HF projection weight.

Problem: TransformerLens reads ``W_Q[layer, head, d_model, d_head]``; HF stores one projection weight per
layer in its own orientation and packing: Llama's ``q_proj.weight`` [heads*d_head, d_model], GPT-2's
Conv1D ``c_attn.weight`` [d_model, 3*d_model] (q, k, v side by side), GPT-NeoX's ``query_key_value``
interleaved per head ([heads, 3, d_head] rows), Phi-3's ``qkv_proj`` sliced. Per-family code for each
packing is what fxlens avoids.

Mechanism: the attention analysis (``graphs.attention``) already knows the q, k and v nodes
[batch, pos, head, d_head] and the output projection's input. Walking back from a q/k/v node through
ops that only move or select data (view, transpose, split, chunk, getitem, slice) reaches the matrix
product that made it and its weight (a ``get_attr``). Replaying that chain of ops on the feature indices
``arange(out_features)`` (with small concrete batch and sequence sizes) gives, for every (head, d), the
output feature of the projection it came from: an index map [head, d_head]. The output projection is
the same, forward from z. MLP weights are found the same way from ``mlp.hook_pre``/``hook_pre_linear``
and ``hook_post``. A map of the form ``offset + head * a + d * b`` (every packing above) lets the weight
be read as a strided view (``affine``); otherwise it is gathered (a copy).

Example::

    p = input_projection(mg.dg, mg.captured, mg.attn[0].v, "W_V")      # GPT-2 small
    p.weight, p.out_axis, p.index.shape     # ('transformer.h.0.attn.c_attn.weight', 1, (12, 64))
    p.affine                                # (1536, 64, 1): feature = 1536 + 64 * head + 1 * d

Gotchas: a projection that does not read the branch's normalised input (latent attention's second
query projection) or a chain through value-changing ops raises ``ProjectionError`` with the reason;
scalings the attention analysis undoes (OPT's q scaling, a ``scale`` layout) are undone here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import sympy
import torch
import torch.fx as fx

from .attention import View, _is_layout, _walk_back
from .nodes import op_name, scope, tensor_meta

__all__ = ["Projection", "ProjectionError", "input_projection", "output_projection", "mlp_output_projection", "reads_input"]

# ops a q/k/v chain may pass through between the projection and the per-head node
_SELECT = frozenset({"getitem", "split", "split_with_sizes", "chunk", "slice", "narrow", "select", "unbind",
                     "unsafe_split", "unsafe_chunk"})
_IDENTITY = frozenset({"to", "_to_copy", "type_as", "dropout", "detach", "clone", "contiguous", "alias", "lift_fresh_copy"})
_PROJECTIONS = frozenset({"linear", "addmm", "mm", "matmul"})
BATCH, SEQ = 2, 3  # concrete sizes the index replay runs at (not 1: a 1 hides a broadcast)


class ProjectionError(RuntimeError):
    pass


@dataclass(eq=False)
class Projection:
    """One side of a projection weight as TransformerLens indexes it.

    ``index`` holds, for each (head, d) (or each neuron), the position along the weight's ``out_axis``
    (q/k/v, MLP in) or ``in_axis`` (attention and MLP out) it sits at."""

    matmul: str  # the product node
    module: str  # HF module path of the product (``transformer.h.0.attn.c_attn``)
    weight: str  # get_attr target of the weight
    bias: str | None  # get_attr target of the bias, or None
    out_axis: int  # the weight's axis of output features (0: Linear [out, in]; 1: Conv1D / addmm [in, out])
    index: torch.Tensor  # int64, [head, d_head] or [d_mlp]

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis

    @cached_property
    def affine(self) -> tuple | None:
        """(offset, stride per index axis...) when ``index`` is affine in its coordinates, else None."""
        idx = self.index
        offset = int(idx.flatten()[0]) if idx.numel() else 0
        strides = []
        for axis in range(idx.dim()):
            step = idx.narrow(axis, 1, 1) - idx.narrow(axis, 0, 1) if idx.shape[axis] > 1 else None
            strides.append(int(step.flatten()[0]) if step is not None else 0)
        grid = torch.full_like(idx, offset)
        for axis, s in enumerate(strides):
            shape = [1] * idx.dim()
            shape[axis] = idx.shape[axis]
            grid = grid + s * torch.arange(idx.shape[axis]).view(shape)
        return (offset, *strides) if torch.equal(grid, idx) else None


def _concrete(cg, value):
    """A symbolic size (a SymInt over the batch and sequence symbols) at BATCH x SEQ."""
    if isinstance(value, torch.SymInt):
        subs = {s: v for s, v in ((cg.batch_symbol, BATCH), (cg.seq_symbol, SEQ)) if isinstance(s, sympy.Symbol)}
        return int(value.node.expr.xreplace(subs))
    return value


def sizes(cg) -> tuple[int, int]:
    """(batch, seq) the replay runs at (a length-fixing capture keeps its own length)."""
    seq = SEQ if isinstance(cg.seq_symbol, sympy.Symbol) or cg.static_seq is None else cg.static_seq
    return BATCH, seq


def _shape(cg, node: fx.Node) -> list[int]:
    return [_concrete(cg, d) for d in tensor_meta(node).shape]


def _replay(dg, cg, start: str, value: torch.Tensor, end: str) -> torch.Tensor:
    """The value ``end`` takes when ``start`` holds ``value``, through ops that only move or select data."""
    chain = dg.sorted(dg.between(start, end) | {end})
    values = {start: value}

    def arg(a):
        if isinstance(a, fx.Node):
            if a.name in values:
                return values[a.name]
            meta = tensor_meta(a)
            if isinstance(meta, (torch.SymInt, int)):
                return _concrete(cg, meta)
            raise ProjectionError(f"{end} mixes in {a.name}, which does not come from {start}")
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return a

    for name in chain:
        node = dg.node(name)
        op = op_name(node)
        if node.op != "call_function":
            raise ProjectionError(f"{name} is not an op")
        if op in _IDENTITY:
            values[name] = arg(node.args[0])
            continue
        if not (_is_layout(node) or op in _SELECT or op in ("mul", "div", "sym_size")):
            raise ProjectionError(f"{name} ({op}) changes values between {start} and {end}")
        args = [arg(a) for a in node.args]
        kwargs = {k: arg(v) for k, v in node.kwargs.items()}
        if op in ("mul", "div") and not all(isinstance(a, (int, float)) for a in args[1:]):
            raise ProjectionError(f"{name} scales by a tensor between {start} and {end}")
        values[name] = node.target(*args, **kwargs)
    return values[end]


def _product(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None, int]:
    """(data input, weight, bias or None, the weight's output-feature axis) of a projection with a constant weight."""
    op = op_name(node)
    if op == "linear":
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        axis = 0
    elif op == "addmm":
        b, x, w = node.args[0], node.args[1], node.args[2]
        axis = 1
    elif op in ("mm", "matmul"):
        x, w, b = node.args[0], node.args[1], None
        axis = 1
    else:
        raise ProjectionError(f"{node.name} is a {op}, not a projection")
    if getattr(w, "op", None) != "get_attr" or tensor_meta(w).dim() != 2:
        raise ProjectionError(f"{node.name}'s weight is not a parameter of the model (it is computed)")
    if b is not None and getattr(b, "op", None) != "get_attr":
        raise ProjectionError(f"{node.name}'s bias is not a parameter of the model")
    return x, w, b, axis


def _root(dg, name: str) -> fx.Node:
    """The projection behind ``name`` through data-moving and selecting ops."""
    node = dg.node(name)
    seen = 0
    while op_name(node) not in _PROJECTIONS:
        inputs = [n for n in node.all_input_nodes if n.op != "get_attr" and isinstance(tensor_meta(n), (torch.Tensor, tuple, list))]
        if not (_is_layout(node) or op_name(node) in _SELECT or op_name(node) in ("mul", "div")) or len(inputs) != 1 or seen > 32:
            raise ProjectionError(f"no projection behind {name}: {node.name} ({op_name(node)}) is not a reshape or split")
        node, seen = inputs[0], seen + 1
    return node


def reads_input(dg, node: fx.Node, sources: set[str]) -> bool:
    """Whether a projection's data input is one of ``sources`` (behind reshapes and casts)."""
    x = _product(node)[0]
    return bool(set(_walk_back(dg, x.name)) & sources)


def input_projection(dg, cg, view: View, what: str, trailing: int = 2) -> Projection:
    """The projection whose output features become ``view`` ([batch, pos, ...] in the user's layout): the index
    map over the view's ``trailing`` axes ([head, d_head] for q/k/v, [d_mlp] for an MLP's pre-activation, whose
    graph node may hold batch and position as one axis)."""
    mm = _root(dg, view.node)
    _, w, b, axis = _product(mm)
    shape = _shape(cg, mm)
    n_out = tensor_meta(w).shape[axis]
    if shape[-1] != n_out:
        raise ProjectionError(f"{what}: {mm.name}'s output is not its weight's {n_out} features")
    start = torch.arange(n_out, dtype=torch.float64).expand(*shape).contiguous()
    out = _replay(dg, cg, mm.name, start, view.node) if view.node != mm.name else start
    out = view.layout.apply(out, sizes(cg))
    index = out.round()
    if (out - index).abs().max() > 1e-6 or index.min() < 0 or index.max() >= n_out:
        raise ProjectionError(f"{what}: {view.node} is not a selection of {mm.name}'s output features")
    flat = index.reshape(-1, *index.shape[index.dim() - trailing:]).long()
    if not bool((flat == flat[:1]).all()):
        raise ProjectionError(f"{what}: {view.node} takes different features at different positions")
    return Projection(mm.name, scope(mm), w.target, b.target if b is not None else None, axis, flat[0])


def output_projection(dg, cg, z: View, matmul: str, n_heads: int, d_head: int) -> Projection:
    """The output projection read by head: ``index[h, d]`` is the input feature that z's (head h, d) reaches."""
    mm = dg.node(matmul)
    x, w, b, axis = _product(mm)
    n_in = tensor_meta(w).shape[1 - axis]
    batch, seq = sizes(cg)
    start = torch.arange(n_heads * d_head, dtype=torch.float64).view(n_heads, d_head).expand(batch, seq, n_heads, d_head)
    value = z.layout.invert(start.contiguous(), (batch, seq))
    out = _replay(dg, cg, z.node, value, x.name)
    cols = out.reshape(-1, out.shape[-1])
    if cols.shape[-1] != n_in or not bool((cols == cols[:1]).all()):
        raise ProjectionError(f"the output projection {matmul} does not read z's heads as its input features")
    where = cols[0].round().long()
    if not torch.equal(torch.sort(where).values, torch.arange(n_in)):
        raise ProjectionError(f"the output projection {matmul} reads z's features other than once each")
    index = torch.empty(n_in, dtype=torch.long)
    index[where] = torch.arange(n_in)
    return Projection(matmul, scope(mm), w.target, b.target if b is not None else None, axis, index.view(n_heads, d_head))


def mlp_output_projection(dg, cg, post: View, matmul: str, d_mlp: int) -> Projection:
    """The MLP's output projection: ``index[n]`` is the input feature that neuron n of ``hook_post`` reaches."""
    mm = dg.node(matmul)
    x, w, b, axis = _product(mm)
    n_in = tensor_meta(w).shape[1 - axis]
    shape = _shape(cg, dg.node(post.node))
    if shape[-1] != d_mlp or n_in != d_mlp:
        raise ProjectionError(f"the MLP's output projection {matmul} does not read {d_mlp} neurons")
    start = torch.arange(d_mlp, dtype=torch.float64).expand(*shape).contiguous()
    out = _replay(dg, cg, post.node, start, x.name) if post.node != x.name else start
    cols = out.reshape(-1, out.shape[-1])
    if not bool((cols == cols[:1]).all()):
        raise ProjectionError(f"the MLP's output projection {matmul} does not read its neurons in place")
    where = cols[0].round().long()
    index = torch.empty(n_in, dtype=torch.long)
    index[where] = torch.arange(n_in)
    return Projection(matmul, scope(mm), w.target, b.target if b is not None else None, axis, index)
