"""Intervene pass: apply a function to a site's value where a mask says.

Problem: patching, ablation, steering, scaling and any user transform are one operation,
``x' = where(mask, fn(x, *inputs), x)`` on the site's value in the user's layout. The inputs (patch
values, steering vectors, masks) must be graph inputs, so that a sweep over positions or a new steering
vector reuses the same program.

Mechanism: each ``Edit`` inserts, right after its site node, a read through the site's layout, one
``_edit`` node calling ``fn`` on the value and the graph inputs the edit names, and a write back; every
later use of the site then sees the edited value (the site's name moves to it, so later passes and
caches see the edit too). ``fn`` is itself a graph input: any function ``fn(x, *inputs) -> tensor``
broadcastable to ``x`` (a lambda too), so edits that differ only in their function share a program. The
standard functions are below (``set_to``, ``add_to``, ``scale_by``, ``batch_mean``, ``take_rows``,
``call_fn``); an intervention of the user's own brings its own (``fxlens.Intervention``). Graph-input
names are chosen by the engine's plan builder, never here.

Example::

    gm = intervene(gm, Intervene((Edit("blocks.3.hook_resid_pre", "add_5", IDENTITY, "fxl_in0", ("fxl_in1",), "fxl_in2"),)))
    gm(input_ids=ids, attention_mask=m, fxl_in0=set_to, fxl_in1=clean_resid, fxl_in2=pos_mask)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..graphs.layout import IDENTITY, Layout
from .base import PassError, rewrite

__all__ = ["Edit", "Intervene", "intervene", "EditError", "set_to", "add_to", "scale_by", "batch_mean", "take_rows", "call_fn"]


class EditError(ValueError):
    pass


def set_to(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return value


def add_to(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return x + value


def scale_by(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return x * value


def batch_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=0, keepdim=True)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Each batch row takes row ``rows[i]`` of the same batch."""
    return x.index_select(0, rows)


def call_fn(x: torch.Tensor, fn) -> torch.Tensor:
    """A user's function of the value (``fxlens.Apply``); it must keep the shape and dtype."""
    new = fn(x)
    if not isinstance(new, torch.Tensor) or new.shape != x.shape or new.dtype != x.dtype:
        got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, torch.Tensor) else type(new).__name__
        raise EditError(f"the function returned {got}; expected {tuple(x.shape)} {x.dtype} like the site's value")
    return new


@dataclass(frozen=True)
class Edit:
    key: str  # site name, for messages
    node: str
    layout: Layout = IDENTITY
    fn: str = ""  # graph-input name of the function fn(x, *inputs) -> new value
    inputs: tuple = ()  # graph-input names passed to fn after the value
    mask: str | None = None  # graph-input name of a boolean mask broadcastable to the site; None: everywhere
    bypass: tuple = ()  # readers of the node that keep the unedited value (``Site.bypass``)


@dataclass(frozen=True)
class Intervene:
    stage: ClassVar[str] = "edit"
    edits: tuple  # of Edit


def _edit(fn, x: torch.Tensor, mask, name: str, *inputs):
    if not callable(fn):
        raise EditError(f"intervention at {name}: its function is {type(fn).__name__}, not callable")
    try:
        new = fn(x, *inputs)
    except EditError as err:
        raise EditError(f"intervention at {name}: {err}") from None
    if not isinstance(new, torch.Tensor):
        raise EditError(f"intervention at {name} produced {type(new).__name__}, not a tensor")
    if new.dtype != x.dtype:
        new = new.to(x.dtype)
    if mask is None:
        return new.expand(x.shape) if new.shape != x.shape else new
    return torch.where(mask, new, x)


def intervene(gm: fx.GraphModule, spec: Intervene) -> fx.GraphModule:
    for e in spec.edits:
        if not e.fn:
            raise PassError(f"{e.key}: an edit names no graph input for its function")
    with rewrite(gm) as rw:
        needs_sizes = any(e.layout.needs_sizes for e in spec.edits)
        sizes = rw.sizes() if needs_sizes else None
        for e in spec.edits:
            fn = rw.placeholder(e.fn)
            inputs = [rw.placeholder(name) for name in e.inputs]
            mask = rw.placeholder(e.mask) if e.mask is not None else None
            current = rw.node(e.node)
            with rw.after(current):
                read = e.layout.read(rw.graph, current, sizes)
                edited = rw.create(_edit, (fn, read, mask, e.key, *inputs))
                written = e.layout.write(rw.graph, edited, sizes)
            keep = set()
            n = read
            while n is not written:
                keep.add(n)
                n = n.next
            keep.add(written)
            keep.discard(current)
            rw.supersede(current, written, keep=keep | rw.readers(current, e.bypass))
    return rw.result
