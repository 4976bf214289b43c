"""Intervene pass: replace, add to, scale or transform a site's value where a mask says.

Problem: patching, ablation, steering and scaling are one operation with different arithmetic:
``x' = where(mask, f(x, value), x)`` on the site's value in the user's layout. Values and masks must
be graph inputs, so that a sweep over positions or a new steering vector reuses the same program.

Mechanism: each ``Edit`` inserts, right after its site node, a read through the site's layout, one
``_edit`` node and a write back; every later use of the site then sees the edited value (the site's
name moves to it, so later passes and caches see the edit too). An edit's tensors come from the graph
inputs ``{prefix}{i}_value`` and ``{prefix}{i}_mask`` (the mask may be absent: the whole site).

Kinds: ``replace`` (x' = value), ``add`` (x + value), ``mul`` (x * value), ``batch_mean`` (the mean
of x over the batch), ``rows`` (x taken from other rows of the same batch: ``value`` holds the source
row of each row), ``fn`` (``value`` is a callable ``fn(x) -> x``).

Example::

    gm = intervene(gm, Intervene((Edit("blocks.3.hook_resid_pre", "add_5", Layout(), "replace"),)))
    gm(input_ids=ids, attention_mask=m, fxl_e0_value=clean_resid, fxl_e0_mask=pos_mask)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graphs.layout import IDENTITY, Layout
from .base import rewrite

__all__ = ["Edit", "Intervene", "intervene", "EditError", "KINDS"]

KINDS = ("replace", "add", "mul", "batch_mean", "rows", "fn")


class EditError(ValueError):
    pass


@dataclass(frozen=True)
class Edit:
    key: str  # site name, for messages
    node: str
    layout: Layout = IDENTITY
    kind: str = "replace"
    masked: bool = True  # False: the edit applies to the whole site and takes no mask input


@dataclass(frozen=True)
class Intervene:
    edits: tuple  # of Edit
    prefix: str = "fxl_e"


def _edit(kind: str, x: torch.Tensor, value, mask, name: str):
    if kind == "replace":
        new = value
    elif kind == "add":
        new = x + value
    elif kind == "mul":
        new = x * value
    elif kind == "batch_mean":
        new = x.mean(dim=0, keepdim=True)
    elif kind == "rows":
        new = x.index_select(0, value)
    elif kind == "fn":
        new = value(x)
        if not isinstance(new, torch.Tensor) or new.shape != x.shape or new.dtype != x.dtype:
            got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, torch.Tensor) else type(new).__name__
            raise EditError(f"the function applied at {name} returned {got}; expected {tuple(x.shape)} {x.dtype}")
    else:
        raise EditError(f"unknown edit kind {kind!r}")
    if new.dtype != x.dtype:
        new = new.to(x.dtype)
    if mask is None:
        return new.expand(x.shape) if new.shape != x.shape else new
    return torch.where(mask, new, x)


def intervene(gm: fx.GraphModule, spec: Intervene) -> fx.GraphModule:
    if any(e.kind not in KINDS for e in spec.edits):
        raise EditError(f"{spec}: kinds must be among {KINDS}")
    with rewrite(gm) as rw:
        needs_sizes = any(op[0] in ("expand_batch", "unflatten_bs") for e in spec.edits for op in e.layout.ops)
        sizes = rw.sizes() if needs_sizes else None
        for i, e in enumerate(spec.edits):
            value = None if e.kind == "batch_mean" else rw.placeholder(f"{spec.prefix}{i}_value")
            mask = rw.placeholder(f"{spec.prefix}{i}_mask") if e.masked else None
            current = rw.node(e.node)
            with rw.after(current):
                read = e.layout.read(rw.graph, current, sizes)
                edited = rw.create(_edit, (e.kind, read, value, mask, e.key))
                written = e.layout.write(rw.graph, edited, sizes)
            keep = set()
            n = read
            while n is not written:
                keep.add(n)
                n = n.next
            keep.add(written)
            keep.discard(current)
            rw.supersede(current, written, keep=keep)
    return rw.result
