"""Split an attention output projection into per-head results (``attn.hook_result``).

Problem: TransformerLens' ``hook_result`` [batch, pos, head, d_model] is each head's contribution to
the residual stream. HF multiplies the concatenated heads by W_O in one matmul, so per-head results
never exist; computing them for every layer on every forward would cost memory nobody asked for.

Mechanism: compute ``result = einsum("bphd,hdm->bphm", z, W_O.view(h, d, m))`` (named
``{matmul}__result``) from z and the projection weight of ``linear(z_flat, W_O, b_O)`` (or Conv1D's
``addmm``). For reading it sits beside the fused projection; with ``replace=True`` the projection
becomes ``result.sum(2) + b_O`` so that patching a head's result changes the model. The bias belongs
to no head, as in TransformerLens.

Example::

    gm = split_heads(gm, SplitHeads((Head("linear_3", "transpose_3", Layout(), 12, 64),), replace=True))

Gotchas: the sum over heads differs from the fused matmul by float rounding (about 1e-7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..graphs.layout import IDENTITY, Layout
from ..graphs.nodes import LAYOUT_OPS, op_name, tensor_meta
from ..graphs.sites import rewritten
from .base import PassError, rewrite

__all__ = ["Head", "SplitHeads", "split_heads"]


@dataclass(frozen=True)
class Head:
    matmul: str  # the output projection's linear/addmm node
    z: str  # the z node
    z_layout: Layout = IDENTITY  # reads z as [batch, pos, head, d_head]
    n_heads: int = 1
    d_head: int = 1


@dataclass(frozen=True)
class SplitHeads:
    stage: ClassVar[str] = "materialise"
    projections: tuple  # of Head
    replace: bool = False


def _per_head(z, weight, transposed: bool, n_heads: int, d_head: int):
    w = weight.t() if transposed else weight  # [h*d, m]
    return torch.einsum("bphd,hdm->bphm", z, w.reshape(n_heads, d_head, w.shape[-1]))


def _sum_heads(result, bias):
    out = result.sum(dim=2)
    return out if bias is None else out + bias


def _projection_output(node: fx.Node) -> fx.Node:
    """The [batch, pos, d_model] node the projection produces (after Conv1D's reshape back to 3-D)."""
    out = node
    while tensor_meta(out) is not None and tensor_meta(out).dim() != 3 and len(out.users) == 1:
        user = next(iter(out.users))
        if op_name(user) not in LAYOUT_OPS:
            break
        out = user
    return out


def split_heads(gm: fx.GraphModule, spec: SplitHeads) -> fx.GraphModule:
    with rewrite(gm) as rw:
        for head in spec.projections:
            mm = rw.node(head.matmul)
            name = op_name(mm)
            if name == "linear":
                weight, bias, transposed = mm.args[1], (mm.args[2] if len(mm.args) > 2 else None), True
            elif name == "addmm":
                bias, weight, transposed = mm.args[0], mm.args[2], False
            else:
                raise PassError(f"{spec}: cannot split a {name} projection into heads")
            out = _projection_output(mm)
            z = rw.node(head.z)
            where = rw.graph.inserting_before(out) if spec.replace else rw.after(out)
            with where:
                zr = head.z_layout.read(rw.graph, z)
                result = rw.create(
                    _per_head,
                    (zr, weight, transposed, head.n_heads, head.d_head),
                    name=rewritten("split_heads", head.matmul, "result"),
                    like=mm,
                )
                if spec.replace:
                    total = rw.create(_sum_heads, (result, bias), like=mm)
            if spec.replace:
                inputs = list(out.all_input_nodes)
                rw.replace(out, total)
                for n in inputs:
                    rw.erase_dead(n)
    return rw.result
