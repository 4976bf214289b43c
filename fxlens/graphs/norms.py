"""Find the scale and the normalised value inside a LayerNorm or RMSNorm module.

Problem: TransformerLens exposes ``ln1.hook_scale`` (sqrt(mean(x^2) + eps) of the centred input,
[batch, pos, 1]) and ``ln1.hook_normalized`` (the input divided by that scale, before the learned
weight and bias). HF norms compute the same quantities in different forms: RMSNorm as ``x * rsqrt``,
LayerNorm as one fused ``aten.layer_norm`` node.

Mechanism: inside the module's nodes, an ``rsqrt`` node is 1/scale (read through a reciprocal
layout) and its product with the (centred) input is the normalised value; a ``sqrt`` followed by a
division gives both directly. A fused ``layer_norm`` materialises neither: ``Norm.fused`` names it,
and the site table asks ``passes/decompose_norm.py`` to rewrite it into explicit ops on demand.

Example::

    n = find_norm(dg, "model.layers.0.input_layernorm", nodes, syms)
    n.scale       # View("rsqrt", Layout((("reciprocal",),)))
    n.normalized  # View("mul_3")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .attention import View
from .dataflow import DataGraph
from .layout import Layout
from .nodes import is_op, is_tensor, op_name, sym_dims

__all__ = ["Norm", "find_norm"]

RECIPROCAL = Layout((("reciprocal",),))


@dataclass(frozen=True)
class Norm:
    module: str
    input: str
    output: str
    kind: str  # "layernorm" or "rms"
    scale: View | None
    normalized: View | None
    fused: str | None = None  # aten.layer_norm node to decompose when scale/normalized are wanted


def find_norm(dg: DataGraph, path: str, nodes: list[fx.Node], syms) -> Norm | None:
    names = {n.name for n in nodes}
    inputs = dg.sorted(
        {src.name for n in nodes for src in n.all_input_nodes if src.op != "get_attr" and is_tensor(src) and src.name not in names}
    )
    escaping = dg.sorted(n.name for n in nodes if is_tensor(n) and any(u.name not in names for u in n.users))
    if len(inputs) != 1 or not escaping:
        return None
    inp, out = inputs[0], escaping[-1]
    fused = next((n for n in nodes if op_name(n) in ("layer_norm", "native_layer_norm")), None)
    if fused is not None:
        return Norm(path, inp, out, "layernorm", None, None, fused.name)
    centred = any(is_op(n, "sub") for n in nodes)
    kind = "layernorm" if centred else "rms"
    # pow(v, -0.5) is rsqrt written as a power (Gemma-3n)
    rsqrt = next((n for n in nodes if is_op(n, "rsqrt") or (is_op(n, "pow") and n.args[1:2] == (-0.5,))), None)
    if rsqrt is not None:
        width = sym_dims(dg.node(inp), *syms)[-1:]
        mul = next(
            (u for u in rsqrt.users if is_op(u, "mul") and sym_dims(u, *syms)[-1:] == width),
            None,
        )
        if mul is None:
            return None
        return Norm(path, inp, out, kind, View(rsqrt.name, RECIPROCAL), View(mul.name))
    sqrt = next((n for n in nodes if is_op(n, "sqrt")), None)
    if sqrt is not None:
        div = next((u for u in sqrt.users if is_op(u, "div") and u.args[1] is sqrt), None)
        if div is not None:
            return Norm(path, inp, out, kind, View(sqrt.name), View(div.name))
    return None
