"""Decompose one fused ``aten.layer_norm`` node so its scale and normalised value exist.

Problem: TransformerLens' ``ln.hook_scale`` and ``ln.hook_normalized`` are intermediate values of a
LayerNorm; HF's LayerNorm is a single fused node that exposes neither.

Mechanism: compute ``xc = x - mean(x)``,
``scale = sqrt(mean(xc^2) + eps)`` (named ``{ln}__scale``), ``normalized = xc / scale`` (named
``{ln}__normalized``) from the norm's input. For reading they sit beside the fused node, which still
produces the output (and, without gradients, they come from one fused pass); with ``replace=True``
the output becomes ``normalized * w + b``, so patching the scale or the normalised value changes what
the rest of the model sees, as in TransformerLens.

Example::

    gm = decompose_norm(gm, DecomposeNorm(("layer_norm_4",), replace=True))
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..graphs.sites import rewritten
from .base import PassError, rewrite

__all__ = ["DecomposeNorm", "decompose_norm"]


@dataclass(frozen=True)
class DecomposeNorm:
    stage: ClassVar[str] = "materialise"
    nodes: tuple  # layer_norm node names
    replace: bool = False


def _center(x, ndim: int):
    return x - x.mean(dim=tuple(range(-ndim, 0)), keepdim=True)


def _scale(xc, ndim: int, eps: float):
    return (xc.pow(2).mean(dim=tuple(range(-ndim, 0)), keepdim=True) + eps).sqrt()


def _normalized(xc, scale):
    return xc / scale


def _parts(x, ndim: int, eps: float):
    """(scale, normalized) of a LayerNorm's input, for reading.

    Without gradients, one fused ``native_layer_norm`` with no affine gives ``normalized`` and
    ``1 / scale`` (its rstd) in one pass: about half the cost of the decomposition. With gradients the
    decomposition runs, because autograd has no formula through rstd.
    """
    if x.requires_grad:
        xc = _center(x, ndim)
        scale = _scale(xc, ndim, eps)
        return scale, _normalized(xc, scale)
    normalized, _, rstd = torch.native_layer_norm(x, x.shape[x.dim() - ndim :], None, None, eps)
    return rstd.reciprocal().view(*x.shape[: x.dim() - ndim], *(1,) * ndim), normalized


def _affine(x, weight, bias):
    if weight is not None:
        x = x * weight
    if bias is not None:
        x = x + bias
    return x


def decompose_norm(gm: fx.GraphModule, spec: DecomposeNorm) -> fx.GraphModule:
    with rewrite(gm) as rw:
        for name in spec.nodes:
            if not rw.has(name):
                raise PassError(f"{spec}: no layer_norm node {name!r}")
            node = rw.node(name)
            args = list(node.args) + [None] * (5 - len(node.args))
            x, shape, weight, bias, eps = args[:5]
            eps = node.kwargs.get("eps", 1e-5 if eps is None else eps)
            ndim = len(shape)
            if not spec.replace:  # reading only: one fused pass gives both (see ``_parts``)
                with rw.after(node):
                    parts = rw.create(_parts, (x, ndim, eps), like=node)
                    rw.create(operator.getitem, (parts, 0), name=rewritten("decompose_norm", name, "scale"), like=node)
                    rw.create(operator.getitem, (parts, 1), name=rewritten("decompose_norm", name, "normalized"), like=node)
                continue
            with rw.graph.inserting_before(node):
                xc = rw.create(_center, (x, ndim), like=node)
                scale = rw.create(_scale, (xc, ndim, eps), name=rewritten("decompose_norm", name, "scale"), like=node)
                normalized = rw.create(
                    _normalized, (xc, scale), name=rewritten("decompose_norm", name, "normalized"), like=node
                )
                out = rw.create(_affine, (normalized, weight, bias), like=node)
            rw.replace(node, out)
    return rw.result
