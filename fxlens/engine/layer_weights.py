"""Per-layer weights in TransformerLens' shapes, as views of the HF parameters.

Problem: TransformerLens code reads ``W_Q[layer, head, d_model, d_head]``, ``W_O[layer, head, d_head,
d_model]``, ``W_in[layer, d_model, d_mlp]`` and their biases. fxlens keeps HF's parameters as they are
(Linear [out, in], Conv1D [in, out], fused and interleaved q/k/v) and must not copy them: an edit to
a parameter must show in what the user reads, and what the user writes through a view must reach the
model.

Mechanism: ``graphs.projections`` finds, for each layer, the projection behind q, k, v, z, the MLP's
pre-activations and its output, and where each head's (or neuron's) features sit in it. Those index
maps depend only on the graph and are kept per capture (``Derived.item``); each read takes the current
tensors from the captured program (the HF parameters themselves, or a ``with_weight_edits`` copy's) and
views them with ``as_strided`` (every packing HF uses is affine: an offset plus a stride per head and
per feature). A bias the model does not have reads as zeros (as TransformerLens' were).

Example::

    w = attention(model, 3)
    w["W_Q"].shape                          # [n_heads, d_model, d_head], a view of q_proj.weight
    w["W_V"][0] @ w["W_O"][0]               # head 0's OV circuit, [d_model, d_model]
    stacked(model, "W_K").shape             # [n_layers, n_heads, d_model, d_head]: a copy (torch.stack)

Gotchas: stacking layers copies (the model's layers are separate tensors); per-layer reads
(``model.blocks[i].attn.W_Q``) are views. Grouped-query models: ``_W_K``/``_W_V``/``_b_K``/``_b_V`` hold
the key/value heads (views) and ``W_K``/``W_V``/``b_K``/``b_V`` repeat them to one per query head
(``repeat_interleave``, as TransformerLens: a copy). Biases a model lacks are fresh zeros, not views.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..graphs.attention import _walk_back
from ..graphs.nodes import op_name
from ..graphs.projections import (
    Projection,
    ProjectionError,
    input_projection,
    mlp_output_projection,
    output_projection,
    reads_input,
)

__all__ = ["attention", "mlp", "stacked", "positional_embedding", "ATTN_NAMES", "MLP_NAMES"]

ATTN_NAMES = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "_W_K", "_W_V", "_b_K", "_b_V")
MLP_NAMES = ("W_in", "W_gate", "W_out", "b_in", "b_out")


@dataclass(eq=False)
class _Maps:
    q: Projection | None = None
    k: Projection | None = None
    v: Projection | None = None
    o: Projection | None = None
    attn_why: str | None = None
    w_in: Projection | None = None
    w_gate: Projection | None = None
    w_out: Projection | None = None
    mlp_why: str | None = None


def _maps(model, layer: int) -> _Maps:
    n = model.cfg.n_layers
    if not -n <= layer < n:
        raise IndexError(f"layer {layer} is out of range for a model of {n} layers")
    layer %= n
    derived = model.derived
    return derived.item(("weight_maps", layer), lambda: _build(model, derived.graph, layer))


def _build(model, mg, layer: int) -> _Maps:
    dg, cg = mg.dg, mg.captured
    block = mg.structure.blocks[layer]
    maps = _Maps()
    a = mg.attn[layer]
    if a is None:
        maps.attn_why = mg.sites.left_out.get(f"blocks.{layer}.attn.hook_q") or f"block {layer} has no attention layer"
    else:
        try:
            sources = _branch_inputs(mg, block.attn)
            for which, view in (("q", a.q), ("k", a.k), ("v", a.v)):
                p = input_projection(dg, cg, view, f"W_{which.upper()}")
                if not reads_input(dg, dg.node(p.matmul), sources):
                    raise ProjectionError(f"{p.module} does not read the block's (normalised) residual stream")
                setattr(maps, which, p)
            maps.o = output_projection(dg, cg, a.z, a.o_matmul, a.n_heads, a.d_head)
        except ProjectionError as err:
            maps.attn_why = str(err)
    m = mg.mlp[layer]
    if m is None:
        maps.mlp_why = (f"block {layer}'s MLP is a mixture of experts" if layer < len(mg.moe) and mg.moe[layer] is not None
                        else f"block {layer} has no MLP that fxlens recognises")
    else:
        try:
            sources = _branch_inputs(mg, block.mlp)
            gated = m.pre_linear is not None
            maps.w_in = input_projection(dg, cg, m.pre_linear if gated else m.pre, "W_in", trailing=1)
            maps.w_gate = input_projection(dg, cg, m.pre, "W_gate", trailing=1) if gated else None
            for p in (maps.w_in, maps.w_gate):
                if p is not None and not reads_input(dg, dg.node(p.matmul), sources):
                    raise ProjectionError(f"{p.module} does not read the block's (normalised) residual stream")
            maps.w_out = mlp_output_projection(dg, cg, m.post, m.out_matmul, len(maps.w_in.index))
        except ProjectionError as err:
            maps.mlp_why = str(err)
    return maps


def _branch_inputs(mg, branch) -> set[str]:
    """The nodes a branch's projections may read: its entry norm's output (behind casts), else its entry."""
    norm = mg.norms.get(branch.norm) if branch.norm else None
    if norm is None:
        return {branch.entry}
    return set(_walk_back(mg.dg, norm.output)) | {norm.output}


def _tensor(model, target: str | None) -> torch.Tensor | None:
    if target is None:
        return None
    return functools.reduce(getattr, target.split("."), model.derived.captured.module)


def _select(t: torch.Tensor, p: Projection, side: str, pos: int) -> torch.Tensor:
    """``t`` (a weight or a bias) read along its ``side`` ("out" or "in") axis by ``p.index``; a weight's other
    axis is put at ``pos`` among the result's axes. A view when the index map is affine, else a copy."""
    axis = (p.out_axis if side == "out" else p.in_axis) if t.dim() == 2 else 0
    other = [(t.shape[1 - axis], t.stride(1 - axis))] if t.dim() == 2 else []
    affine = p.affine
    if affine is not None:
        offset, *steps = affine
        sizes, strides = list(p.index.shape), [s * t.stride(axis) for s in steps]
        for size, stride in other:
            sizes.insert(pos, size)
            strides.insert(pos, stride)
        return t.as_strided(sizes, strides, t.storage_offset() + offset * t.stride(axis))
    g = t.index_select(axis, p.index.flatten().to(t.device)).movedim(axis, 0)
    g = g.reshape(*p.index.shape, *(size for size, _ in other))
    return g.movedim(-1, pos) if other else g


def _zeros(model, *shape) -> torch.Tensor:
    return torch.zeros(*shape, dtype=model.cfg.dtype, device=model.cfg.device)


def attention(model, layer: int) -> dict:
    """{name: tensor} for ``ATTN_NAMES`` at ``layer``; raises AttributeError with the reason where they cannot be read."""
    maps = _maps(model, layer)
    if maps.attn_why is not None:
        raise AttributeError(f"attention weights of block {layer} cannot be read: {maps.attn_why}")
    out = {}
    for which in "qkv":
        p = getattr(maps, which)
        out[f"W_{which.upper()}"] = _select(_tensor(model, p.weight), p, "out", 1)
        bias = _tensor(model, p.bias)
        out[f"b_{which.upper()}"] = _select(bias, p, "out", 0) if bias is not None else _zeros(model, *p.index.shape)
    o = maps.o
    out["W_O"] = _select(_tensor(model, o.weight), o, "in", o.index.dim())
    b_o = _tensor(model, o.bias)
    out["b_O"] = b_o if b_o is not None else _zeros(model, out["W_O"].shape[-1])
    n_heads = maps.q.index.shape[0]
    for name in ("W_K", "W_V", "b_K", "b_V"):
        kv = out[name]
        out["_" + name] = kv
        if kv.shape[0] != n_heads:
            out[name] = kv.repeat_interleave(n_heads // kv.shape[0], dim=0)
    return out


def mlp(model, layer: int) -> dict:
    """{name: tensor} for ``MLP_NAMES`` at ``layer`` (``W_gate`` None for an MLP without a gate)."""
    maps = _maps(model, layer)
    if maps.mlp_why is not None:
        raise AttributeError(f"MLP weights of block {layer} cannot be read: {maps.mlp_why}")
    out = {}
    for name, p in (("in", maps.w_in), ("gate", maps.w_gate)):
        if p is None:
            out[f"W_{name}"] = out[f"b_{name}"] = None
            continue
        out[f"W_{name}"] = _select(_tensor(model, p.weight), p, "out", 0)
        bias = _tensor(model, p.bias)
        # b_gate is not a TransformerLens name (its gated MLPs had none): kept out of MLP_NAMES, used by processing
        out[f"b_{name}"] = _select(bias, p, "out", 0) if bias is not None else _zeros(model, len(p.index))
    o = maps.w_out
    out["W_out"] = _select(_tensor(model, o.weight), o, "in", 1)
    b_out = _tensor(model, o.bias)
    out["b_out"] = b_out if b_out is not None else _zeros(model, out["W_out"].shape[-1])
    return out


def stacked(model, name: str) -> torch.Tensor:
    """``name`` for every layer, stacked on a new first axis (a copy)."""
    read = attention if name in ATTN_NAMES else mlp
    layers = [read(model, i)[name] for i in range(model.cfg.n_layers)]
    if any(t is None for t in layers):
        raise AttributeError(f"{name}: the model's MLPs have no gate (W_gate exists only for gated MLPs)")
    return torch.stack(layers)


def positional_embedding(model) -> torch.Tensor:
    """The learned positional embedding [n_ctx, d_model]: the HF parameter (rows from the model's position offset
    on, for OPT's two extra rows, as TransformerLens). AttributeError for a model without one."""
    from ..graphs.vocab import token_embedding

    mg = model.derived.graph
    token = token_embedding(mg.captured.module.graph)
    for path, node in mg.structure.embed_terms:
        chain = _walk_back(mg.dg, node)
        emb = mg.dg.node(chain[-1])
        if emb is token or op_name(emb) != "embedding" or getattr(emb.args[0], "op", None) != "get_attr":
            continue
        w = _tensor(model, emb.args[0].target)
        n_ctx = model.cfg.n_ctx
        return w[2:] if n_ctx is not None and w.shape[0] == n_ctx + 2 else w
    kind = model.cfg.positional_embedding_type
    raise AttributeError(f"W_pos: {type(model.hf_model).__name__} has no learned positional embedding "
                         f"(positional_embedding_type={kind!r})")
