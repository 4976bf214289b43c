"""The maps a component applies, read from the captured graph: norms, output projections, the head.

Problem: the cache's analysis helpers (``apply_ln_to_stack``, ``stack_neuron_results``,
``compute_head_results``, the logit lens) need what a norm does to a vector, each MLP's output weight
and each attention's output weight, on every family and with the edits of a ``with_weight_edits``
copy. HF modules spell these differently (``nn.Linear`` [out, in], GPT-2's ``Conv1D`` [in, out],
Gemma's ``(1 + w)`` RMSNorm, soft-capped logits), and fxlens keeps the HF parameters as they are.

Mechanism: every map is read from the captured program itself. An output projection is the matmul
node the graph analysis already found (``Mlp.out_matmul``, ``Attention.o_matmul``); its weight and
bias are its ``get_attr`` operands, turned into TransformerLens' [in, out] orientation. A norm (and
the head, from the last residual to the logits) is the captured graph's own nodes between the
module's input and its output, evaluated on a tensor we choose (``subgraph``). A norm's affine part
``normalized * w + b`` is read by evaluating the norm on ``+c`` and ``-c`` times an alternating-sign
vector, whose normalised value is exactly ``+-1``: ``w`` and ``b`` are the half-difference and the
half-sum (for Gemma ``w`` is ``1 + weight``, as the model applies it).

Example::

    w, b = norm_affine(model, model.graph.structure.final_norm)   # [d_model] each
    W_out, b_out = mlp_out_weight(model, 3)                       # [d_mlp, d_model], [d_model]
    logits = head(model)(resid)                                   # final norm + unembed, as the model does

Gotchas: a subgraph that reads anything but its input and parameters (a mask, the sequence length)
cannot be evaluated alone: the error names the module. MLPs that are not one output projection
(mixtures of experts) have no ``W_out``.
"""

from __future__ import annotations

import functools

import sympy
import torch
import torch.fx as fx


__all__ = ["subgraph", "norm_affine", "norm_path", "mlp_out_weight", "attn_out_weight", "head", "ComponentError"]


class ComponentError(ValueError):
    """A component's map cannot be read from this model's graph; the message says which and why."""


def _attr(model, node: fx.Node) -> torch.Tensor:
    return functools.reduce(getattr, node.target.split("."), model.captured.module)


def subgraph(model, start: str, end: str, what: str):
    """A function evaluating the captured nodes from node ``start`` (its value replaced by the argument)
    to node ``end``, reading parameters from the captured program."""
    dg, cg = model.graph.dg, model.captured
    start_node, end_node = dg.node(start), dg.node(end)
    placement = model._active.placement  # a model spread over devices: run where the placed program runs end
    device = placement.device_of(end_node) if placement is not None else None

    def run(x: torch.Tensor) -> torch.Tensor:
        env: dict = {start_node: x if device is None else x.to(device)}
        # sizes the graph reads from its inputs: x is laid out [batch, pos, ...]
        sizes = {s: n for s, n in ((cg.batch_symbol, x.shape[0]), (cg.seq_symbol, x.shape[1]))
                 if isinstance(s, sympy.Symbol)}

        def ev(node):
            if node in env:
                return env[node]
            val = node.meta.get("val")
            if isinstance(val, torch.SymInt):
                value = val.node.expr.subs(sizes)
                if not value.is_Integer:
                    raise ComponentError(f"{what} depends on a size of the model's inputs other than batch and positions")
                env[node] = int(value)
                return env[node]
            if node.op == "get_attr":
                value = _attr(model, node)
            elif node.op == "call_function":
                args = fx.node.map_arg(node.args, ev)
                kwargs = fx.node.map_arg(node.kwargs, ev)
                value = node.target(*args, **kwargs)
            else:
                raise ComponentError(f"{what} reads the model's inputs, not only the residual stream, so it cannot be applied alone")
            env[node] = value
            return value

        return ev(end_node)

    return run


def norm_path(model, layer: int | None, mlp_input: bool = False) -> str:
    """The HF path of the norm TransformerLens calls ``ln_final`` (layer None), ``ln1`` or ``ln2``."""
    st = model.graph.structure
    if layer is None:
        path = st.final_norm
        where = "final norm"
    else:
        branch = st.blocks[layer].mlp if mlp_input else st.blocks[layer].attn
        path = branch.norm if branch is not None else None
        where = f"{'mlp' if mlp_input else 'attention'} input norm of layer {layer}"
    if path is None or path not in model.graph.norms:
        raise ComponentError(f"{type(model.hf_model).__name__} has no {where} fxlens recognises (a post-LN model "
                             "normalises after the residual add, not at a sublayer's input)")
    return path


def norm_kind(model, path: str) -> str:
    """"layernorm" (centres its input) or "rms"."""
    return model.graph.norms[path].kind


def apply_norm(model, path: str, x: torch.Tensor) -> torch.Tensor:
    """The norm at ``path`` applied to ``x`` [..., d_model] exactly as the model applies it."""
    norm = model.graph.norms[path]
    rank = len(model.graph.dg.node(norm.input).meta["val"].shape)
    flat = x.reshape(-1, x.shape[-1]) if rank == 2 else x.reshape(1, -1, x.shape[-1])
    out = subgraph(model, norm.input, norm.output, f"the norm {path}")(flat)
    return out.reshape(x.shape)


def norm_affine(model, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, b) [d_model] with ``norm(x) = normalized(x) * w + b`` (``handles.norm_affine``: Gemma's ``1 + w``)."""
    from .handles import NormFormError, norm_affine as affine

    try:
        w, b, _, _ = affine(model, path)
    except NormFormError as err:
        raise ComponentError(str(err)) from None
    return w, b


def mlp_out_weight(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_out [d_mlp, d_model], b_out [d_model]) of layer ``layer``'s MLP (``layer_weights``: views)."""
    from . import layer_weights

    mlps = model.graph.mlp
    if not 0 <= layer < len(mlps):
        raise ComponentError(f"layer {layer} is out of range: this model has layers 0..{len(mlps) - 1}")
    _post_norm(model, layer, "mlp")
    try:
        w = layer_weights.mlp(model, layer)
    except AttributeError as err:
        raise ComponentError(f"layer {layer} of {type(model.hf_model).__name__} has no MLP with one output projection "
                             f"(W_out): {err}") from None
    return w["W_out"], w["b_out"]


def attn_out_weight(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_O [n_heads, d_head, d_model], b_O [d_model]) of layer ``layer``'s attention (``layer_weights``: views)."""
    from . import layer_weights

    attns = model.graph.attn
    if not 0 <= layer < len(attns) or attns[layer] is None:
        raise ComponentError(f"layer {layer} of {type(model.hf_model).__name__} has no attention heads fxlens can address")
    _post_norm(model, layer, "attn")
    try:
        w = layer_weights.attention(model, layer)
    except AttributeError as err:
        raise ComponentError(str(err)) from None
    return w["W_O"], w["b_O"]


def _post_norm(model, layer: int, kind: str) -> None:
    branch = getattr(model.graph.structure.blocks[layer], kind)
    if branch is not None and branch.post_norm is not None:
        raise ComponentError(
            f"layer {layer}'s {kind} output passes through a norm ({branch.post_norm}) before it joins the residual "
            f"stream, so per-{'head' if kind == 'attn' else 'neuron'} contributions do not add up to it")


def head(model):
    """The function from the residual stream after the last block to the logits, as the model computes it
    (final norm, unembedding, any scaling or soft-capping)."""
    st = model.graph.structure
    if st.unembed is None:
        raise ComponentError(f"{type(model.hf_model).__name__} has no head that computes logits")
    end = model.graph.dg.node(st.unembed)
    # the unembedding's matmul may be followed by elementwise ops before the output (Gemma 2's soft-capping)
    while len(end.users) == 1 and next(iter(end.users)).op == "call_function":
        end = next(iter(end.users))
    return subgraph(model, st.blocks[-1].resid_post, end.name, "the model's head (final norm and unembedding)")
