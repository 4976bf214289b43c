"""Hooks pass: splice user callables into the graph at chosen sites.

Problem: ``run_with_hooks`` must behave like TransformerLens' forward hooks (a function sees the
site's value in TransformerLens layout and may return a replacement), without leaving anything on
the model and without recompiling when the user passes a new function.

Mechanism: one graph input (``spec.input``, named by the engine) receives a list of ``(fn, hook_point)`` pairs at call time.
For each hook spec, a ``_call_hook(fxl_hooks, index, value)`` node is inserted right after the site
(reading it through the site's layout); its result, written back through the layout, replaces the
site's value for every later node. Several hooks on one site chain in the order given.

Example::

    gm = hooks(gm, Hooks((HookAt("blocks.2.attn.hook_pattern", "softmax", Layout(), 0),), "fxl_in0"))
    gm(input_ids=ids, attention_mask=mask, fxl_in0=[(fn, point)])

A backward hook (``HookAt.dir == "bwd"``) inserts ``_call_grad_hook`` instead: the identity in the forward
(the value itself, no copy), whose backward calls ``fn(grad, hook_point)`` on the gradient of the site in
TransformerLens layout; a returned tensor replaces that gradient for everything before the site. The
hook is part of this run's autograd graph, so it fires on the backward of this run's outputs only.

Gotchas: a hook that returns a tensor of another shape or dtype raises ``HookError`` naming the site.
A site read as a broadcast view (``hook_pos_embed``, held as [1, pos, d]) reaches the hook as a copy
[batch, pos, d], so in-place edits may differ per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..graphs.layout import IDENTITY, Layout
from .base import rewrite

__all__ = ["HookAt", "Hooks", "hooks", "HookError"]


class HookError(ValueError):
    pass


@dataclass(frozen=True)
class HookAt:
    key: str  # site name, for messages
    node: str
    layout: Layout = IDENTITY
    index: int = 0  # position of (fn, hook_point) in the fxl_hooks list
    dir: str = "fwd"  # "bwd": called on the site's gradient in the backward pass
    bypass: tuple = ()  # readers of the node that keep the unhooked value (``Site.bypass``)


@dataclass(frozen=True)
class Hooks:
    stage: ClassVar[str] = "edit"
    hooks: tuple  # of HookAt
    input: str  # graph input receiving the [(fn, hook_point), ...] list


def _checked(out, value: torch.Tensor, name: str, what: str = "site"):
    """``out`` (a hook's return) as the replacement of ``value``: None keeps ``value``."""
    if out is None:
        return value
    if not isinstance(out, torch.Tensor):
        raise HookError(f"hook on {name} returned {type(out).__name__}; return a tensor or None")
    if out.shape != value.shape:
        raise HookError(
            f"hook on {name} returned shape {tuple(out.shape)}, but the {what} has shape {tuple(value.shape)}; "
            f"return a tensor of the {what}'s shape (or None to keep the value)"
        )
    if out.dtype != value.dtype:
        raise HookError(
            f"hook on {name} returned dtype {out.dtype}, but the {what} has dtype {value.dtype}; "
            f"cast with .to({value.dtype})"
        )
    return out


class _GradHook(torch.autograd.Function):
    """The identity whose backward hands the incoming gradient to a user hook."""

    @staticmethod
    def forward(ctx, value, anchor, fn, point, name):
        ctx.hook = (fn, point, name)
        ctx.anchor = None if anchor is None else (anchor.dtype, anchor.device)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        fn, point, name = ctx.hook
        anchor_grad = None if ctx.anchor is None else torch.zeros((), dtype=ctx.anchor[0], device=ctx.anchor[1])
        return _checked(fn(grad, point), grad, name, "gradient"), anchor_grad, None, None, None


def _call_grad_hook(fns, index: int, value: torch.Tensor, name: str):
    fn, point, *anchor = fns[index]
    anchor = anchor[0] if anchor else None
    if not torch.is_grad_enabled() or not (value.requires_grad or anchor is not None):
        return value  # no backward will run through this value: nothing to hook
    # ``anchor`` (a scalar leaf that requires grad, given by run_with_cache(incl_bwd=True)) puts every
    # hooked site on a path to one tensor: differentiating with respect to it runs the backward from the
    # output down to the earliest hooked site and no further, parameters' gradients untouched.
    return _GradHook.apply(value, anchor, fn, point, name)


def _call_hook(fns, index: int, value: torch.Tensor, name: str):
    fn, point = fns[index]
    broadcast = any(st == 0 and n > 1 for st, n in zip(value.stride(), value.shape))
    if broadcast or (value.requires_grad and value._is_view() and torch.is_grad_enabled()):
        # A broadcast view (a [1, pos, d] positional embedding read as [batch, pos, d]) has one memory
        # location per batch row, which an in-place edit cannot write; autograd refuses in-place edits
        # of some views (GPT-2's q, k and v are outputs of one split). The hook gets its own copy, as
        # TransformerLens' hooks do, and the copy (edited or not) goes on.
        value = value.clone(memory_format=torch.contiguous_format)
    return _checked(fn(value, point), value, name)


def hooks(gm: fx.GraphModule, spec: Hooks) -> fx.GraphModule:
    with rewrite(gm) as rw:
        fns = rw.placeholder(spec.input)
        needs_sizes = any(h.layout.needs_sizes for h in spec.hooks)
        sizes = rw.sizes() if needs_sizes else None
        for h in spec.hooks:
            value = rw.node(h.node)  # after an earlier hook on this site, the hooked value
            with rw.after(value):
                read = h.layout.read(rw.graph, value, sizes)
                called = rw.create(_call_grad_hook if h.dir == "bwd" else _call_hook, (fns, h.index, read, h.key))
                written = h.layout.write(rw.graph, called, sizes)
            rw.supersede(value, written, keep=_between(read, written, value) | rw.readers(value, h.bypass))
    return rw.result


def _between(first: fx.Node, last: fx.Node, value: fx.Node) -> set:
    """The nodes from ``first`` to ``last`` in graph order (the inserted read/call/write chain)."""
    out = set()
    node = first
    while True:
        out.add(node)
        if node is last:
            break
        node = node.next
    if first is value:
        out.discard(value)
    return out
