"""Layouts: how a graph node's value maps to the axis order users expect, and back.

Problem: TransformerLens shows queries as [batch, pos, head, d_head] and RMS scales as
sqrt(mean(x^2) + eps), while the HF graph may hold [batch, head, pos, d_head] and
rsqrt(mean(x^2) + eps). A site must read in the user's layout and accept writes in it.

Mechanism: a ``Layout`` is a short tuple of invertible primitive ops. ``read`` appends graph nodes
that turn the node's value into the user's layout; ``write`` appends the inverse ops in reverse order
so a user value can replace the node. ``apply``/``invert`` do the same on eager tensors.

Example::

    Layout((("permute", (0, 2, 1, 3)),))     # [b, h, s, d] in the graph, [b, s, h, d] for the user
    Layout((("reciprocal",),))               # graph holds rsqrt(var + eps); the user sees the scale
    Layout((("scale", 0.125),))              # graph holds 0.125 * q (OPT); the user sees q
    Layout((("expand_batch",),))             # graph holds [1, s, d]; the user sees [b, s, d]
    Layout((("unflatten_bs",),))             # graph holds [b*s, d] (OPT's MLP); the user sees [b, s, d]
    Layout((("unflatten_heads", 4),))        # graph holds [b*4, q, k] (bmm attention); the user sees [b, 4, q, k]

``sizes`` is the pair (batch, seq) as graph nodes (graph side) or ints (eager side); only
``expand_batch`` and ``unflatten_bs`` need it (``unflatten_heads`` knows its static head count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

__all__ = ["Layout", "IDENTITY"]

aten = torch.ops.aten


def _inverse_perm(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


@dataclass(frozen=True)
class Layout:
    ops: tuple[tuple, ...] = ()

    @property
    def is_identity(self) -> bool:
        return not self.ops

    @property
    def needs_sizes(self) -> bool:
        """Whether reading or writing needs the (batch, seq) sizes (a flattened or batch-1 node)."""
        return any(op[0] in ("expand_batch", "unflatten_bs") for op in self.ops)

    def then(self, *ops: tuple) -> "Layout":
        return Layout(self.ops + tuple(ops))

    # ---- graph side -------------------------------------------------------------------------
    def read(self, graph: fx.Graph, node: fx.Node, sizes=None) -> fx.Node:
        """Append nodes reading ``node`` in the user's layout; returns the last one."""
        out = node
        for op in self.ops:
            out = _emit(graph, op, out, sizes, inverse=False)
        return out

    def write(self, graph: fx.Graph, value: fx.Node, sizes=None) -> fx.Node:
        """Append nodes turning a user-layout ``value`` back into the node's own layout."""
        out = value
        for op in reversed(self.ops):
            out = _emit(graph, op, out, sizes, inverse=True)
        return out

    # ---- eager side -------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, sizes=None) -> torch.Tensor:
        for op in self.ops:
            x = _eager(op, x, sizes, inverse=False)
        return x

    def invert(self, x: torch.Tensor, sizes=None) -> torch.Tensor:
        for op in reversed(self.ops):
            x = _eager(op, x, sizes, inverse=True)
        return x

    def shape(self, shape: tuple, batch="B", seq="S") -> tuple:
        """The user-layout shape of a node of graph shape ``shape``."""
        shape = tuple(shape)
        for op in self.ops:
            if op[0] == "permute":
                shape = tuple(shape[i] for i in op[1])
            elif op[0] == "expand_batch":
                shape = (batch,) + shape[1:]
            elif op[0] == "unflatten_bs":
                shape = (batch, seq) + shape[1:]
            elif op[0] == "unflatten_heads":
                shape = (batch, op[1]) + shape[1:]
        return shape


def _emit(graph: fx.Graph, op: tuple, x: fx.Node, sizes, inverse: bool) -> fx.Node:
    kind = op[0]
    if kind == "permute":
        perm = _inverse_perm(op[1]) if inverse else op[1]
        return graph.call_function(aten.permute.default, (x, list(perm)))
    if kind == "reciprocal":
        return graph.call_function(aten.reciprocal.default, (x,))
    if kind == "scale":
        # the graph holds the user's value times op[1]
        return graph.call_function(aten.mul.Tensor, (x, op[1] if inverse else 1.0 / op[1]))
    if kind == "expand_batch":
        if inverse:
            return x  # a [b, s, d] value broadcasts wherever the [1, s, d] node was used
        return graph.call_function(_expand_batch, (x, sizes[0]))
    if kind == "unflatten_bs":
        if inverse:
            return graph.call_function(aten.flatten.using_ints, (x, 0, 1))
        return graph.call_function(aten.view.default, (x, [sizes[0], sizes[1], -1]))
    if kind == "unflatten_heads":
        if inverse:
            return graph.call_function(aten.flatten.using_ints, (x, 0, 1))
        return graph.call_function(aten.unflatten.int, (x, 0, [-1, op[1]]))
    raise ValueError(f"unknown layout op {op!r}")


def _eager(op: tuple, x: torch.Tensor, sizes, inverse: bool) -> torch.Tensor:
    kind = op[0]
    if kind == "permute":
        return x.permute(_inverse_perm(op[1]) if inverse else op[1])
    if kind == "reciprocal":
        return x.reciprocal()
    if kind == "scale":
        return x * op[1] if inverse else x * (1.0 / op[1])
    if kind == "expand_batch":
        return x if inverse or sizes is None else x.expand(sizes[0], *x.shape[1:])
    if kind == "unflatten_bs":
        return x.flatten(0, 1) if inverse else x.view(sizes[0], sizes[1], -1)
    if kind == "unflatten_heads":
        return x.flatten(0, 1) if inverse else x.unflatten(0, (-1, op[1]))
    raise ValueError(f"unknown layout op {op!r}")


def _expand_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.expand(batch, *x.shape[1:])


IDENTITY = Layout()
