"""Pack-rows pass: run a block on rows of different lengths packed into one sequence.

Problem: in a causal model a patched sweep row only computes the positions from its first changed
one (``start``) on. Rows with different starts then have different lengths; running each start as
its own batch costs one block call per start and layer, and a call reads all of a block's weights.

Mechanism: every op outside attention acts on each token alone, so rows can be laid end to end in
one packed sequence ``[batch, T, d]`` (T = the rows' token counts summed). Only the attention core
(from its q, k, v operands to its output ``z_heads``) mixes positions; there the pass unpacks to a
padded layout ``[rows * batch, heads, seq, d_head]``:

- q, k and v are scattered to (row, position) slots by the graph inputs ``row`` and ``pos`` ([T]
  each) over ``grid`` ([rows, seq]: its shape gives the padded layout); k and v slots a row does not
  compute take the k and v fills (the base run's keys and values: [batch or rows * batch, heads, seq,
  d_head]), q slots zeros;
- the q, k and v workspaces hold the padded tensors (None: fresh ones); the engine reuses them from
  layer to layer: memory already paged in is written several times faster than fresh;
- the attention op runs on the padded layout, with the full mask tiled over rows;
- its output is gathered back to the packed layout.

The engine feeds contexts the core reads (masks) tiled over rows, and contexts the rest of the block
reads (rotary cos/sin, positions) gathered at each packed token's position. ``core_contexts`` says
which is which and refuses a block where one context is read on both sides, or where the core reads
anything else computed from the block's inputs (a size taken from the packed sequence, say).

Example::

    a = model.graph.attn[3]
    names = ("kf", "vf", "qb", "kb", "vb")
    gm = pack_rows(gm, PackRows(((a.q_in, a.k_in, a.v_in, a.z_heads, "3", names),), "r", "p", "g"))
    gm(add_8=h_packed, expand=mask_tiled, r=row, p=pos, g=grid, kf=k_base, vf=v_base, qb=None, kb=None, vb=None)

Gotchas: query slots a row does not compute hold zeros (in a reused workspace, finite values an
earlier layer wrote); their outputs are never gathered. Sites in
the core (scores, pattern) are seen in the padded layout, every other block site in the packed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from .base import PassError, rewrite

__all__ = ["PackRows", "pack_rows", "core_contexts", "unpack", "pack"]


@dataclass(frozen=True)
class PackRows:
    stage: ClassVar[str] = "layout"
    # per attention core: (q_in, k_in, v_in, z_heads, tag, inputs), inputs naming the graph inputs
    # (k fill, v fill, q workspace, k workspace, v workspace)
    attention: tuple
    row: str = ""  # graph inputs: each packed token's row and position, and the [rows, seq] grid
    pos: str = ""
    grid: str = ""


def unpack(x: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, grid: torch.Tensor, fill: torch.Tensor | None,
           buf: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, heads, T, d] packed -> [rows * batch, heads, seq, d] padded (unset slots from ``fill``).

    ``buf`` ([at least rows, batch, heads, seq, d]), when given, is written in place and returned as a
    view: a workspace reused from layer to layer is already paged in, a fresh one is not. Without a
    ``fill``, the slots no token writes keep whatever finite values the workspace holds.
    """
    rows, seq = grid.shape
    b, h, t, d = x.shape
    if t != row.shape[0]:
        raise PassError(f"packed operand has {t} tokens; the packing holds {row.shape[0]}")
    if buf is not None and tuple(buf.shape[1:]) == (b, h, seq, d) and buf.shape[0] >= rows and buf.dtype == x.dtype and buf.device == x.device:
        out = buf[:rows]
        if fill is not None:
            out.copy_(fill.reshape(-1, b, h, seq, d).expand(rows, b, h, seq, d))
    elif fill is None:
        out = x.new_zeros(rows, b, h, seq, d)
    else:
        out = fill.to(x.dtype).reshape(-1, b, h, seq, d).expand(rows, b, h, seq, d).clone()
    out[row, :, :, pos] = x.permute(2, 0, 1, 3)
    return out.view(rows * b, h, seq, d)


def pack(z: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """[rows * batch, heads, seq, d] padded -> [batch, heads, T, d] packed."""
    rows, seq = grid.shape
    _, h, _, d = z.shape
    return z.view(rows, -1, h, seq, d)[row, :, :, pos].permute(1, 2, 0, 3).contiguous()


def _ancestors(node: fx.Node, stop: set) -> set:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in stop:
            stack.extend(n.all_input_nodes)
    return seen


def _core(gm: fx.GraphModule, q_in: str, k_in: str, v_in: str, z_heads: str) -> tuple[set, dict]:
    """The nodes strictly after the operands up to and including ``z_heads``, and each operand's core users."""
    by_name = {n.name: n for n in gm.graph.nodes}
    try:
        operands = [by_name[q_in], by_name[k_in], by_name[v_in]]
        out = by_name[z_heads]
    except KeyError as err:
        raise PassError(f"attention node {err.args[0]!r} is not in this graph") from None
    upstream = _ancestors(out, set(operands))
    core, stack = set(), [u for x in operands for u in x.users if u in upstream]
    while stack:
        n = stack.pop()
        if n in core or n not in upstream:
            continue
        core.add(n)
        stack.extend(n.users)
    users = {x.name: [u for u in x.users if u in core] for x in operands}
    return core, users


def _placeholders(node: fx.Node) -> set:
    """Names of the graph inputs ``node`` is computed from."""
    return {n.name for n in _ancestors(node, set()) if n.op == "placeholder"}


def core_contexts(gm: fx.GraphModule, spec: PackRows, hidden: str) -> tuple[frozenset, frozenset]:
    """(contexts the attention cores read, contexts the rest of the block reads): disjoint, or PassError."""
    inside, outside = set(), set()
    cores = set()
    for q_in, k_in, v_in, z_heads, tag, _ in spec.attention:
        core, _ = _core(gm, q_in, k_in, v_in, z_heads)
        cores |= core
        operands = {q_in, k_in, v_in}
        for n in core:
            for x in n.all_input_nodes:
                if x in core or x.name in operands or x.op == "get_attr":
                    continue
                read = _placeholders(x)
                if hidden in read:
                    raise PassError(f"attention core {tag}: {n.name} reads {x.name}, which depends on the block's "
                                    "packed input (a size of it, say); rows cannot be packed here")
                inside |= read
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n in cores or n.op == "output":
            continue
        for x in n.all_input_nodes:
            if x.op == "placeholder" and x.name != hidden:
                outside.add(x.name)
    both = inside & outside
    if both:
        raise PassError(f"inputs {sorted(both)} are read both inside and outside attention; rows cannot be packed here")
    return frozenset(inside), frozenset(outside)


def pack_rows(gm: fx.GraphModule, spec: PackRows) -> fx.GraphModule:
    plan = [(entry, _core(gm, *entry[:4])[1]) for entry in spec.attention]
    with rewrite(gm) as rw:
        row, pos, grid = rw.placeholder(spec.row), rw.placeholder(spec.pos), rw.placeholder(spec.grid)
        for (q_in, k_in, v_in, z_heads, tag, (kfill, vfill, *bufs)), users in plan:
            for which, (name, fill_name) in enumerate(((q_in, None), (k_in, kfill), (v_in, vfill))):
                x = rw.node(name)
                core_users = [rw.node(u.name) for u in users[name]]
                if not core_users:
                    raise PassError(f"{spec}: attention core {tag} does not read {name}")
                fill = rw.placeholder(fill_name) if fill_name else None
                buf = rw.placeholder(bufs[which])
                with rw.after(x):
                    padded = rw.create(unpack, (x, row, pos, grid, fill, buf), like=x)
                for u in core_users:
                    u.replace_input_with(x, padded)
            out = rw.node(z_heads)
            with rw.after(out):
                packed = rw.create(pack, (out, row, pos, grid), like=out)
            rw.replace_uses(out, packed)
    return rw.result
