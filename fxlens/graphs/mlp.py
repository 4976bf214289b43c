"""Find the pre- and post-activation values of an MLP branch, gated or not.

Problem: TransformerLens shows ``mlp.hook_pre`` (the activation's input), ``mlp.hook_pre_linear`` (the
ungated linear input of a gated MLP) and ``mlp.hook_post`` (what the output projection reads). HF
families build these from Linear or Conv1D, with the activation as an aten op (gelu, silu) or
decomposed into a dozen elementwise ops (GPT-2's gelu_new).

Mechanism: ``hook_post`` is what the branch's last matrix product reads (behind reshapes).
If it is a product of two values that come from *different* matrix products, or from different parts of one
split projection (Phi-3's fused ``gate_up_proj``), the MLP is gated: the operand that is itself a projection
output (or a part of one) is ``hook_pre_linear`` and the other is the activation.
``hook_pre`` is the nearest projection output behind the activation.

Example::

    m = find_mlp(dg, branch, syms)
    m.pre.node, m.post.node       # ("view_10", "mul_11") for GPT-2; ("linear_4", "mul_19") for Llama
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch.fx as fx

from .attention import View, _is_layout, _walk_back
from .dataflow import DataGraph
from .nodes import MATMUL_OPS, is_op, is_tensor, op_name

__all__ = ["Mlp", "find_mlp"]


@dataclass(frozen=True)
class Mlp:
    pre: View
    post: View
    pre_linear: View | None
    out_matmul: str
    in_matmuls: tuple


def _projection_root(dg: DataGraph, name: str) -> str | None:
    """The matrix product behind ``name`` through data-moving ops, or None."""
    chain = _walk_back(dg, name)
    root = dg.node(chain[-1])
    return root.name if op_name(root) in MATMUL_OPS else None


def find_mlp(dg: DataGraph, branch, syms) -> Mlp | None:
    nodes = branch.nodes
    matmuls = [n for n in dg.sorted(nodes) if op_name(dg.node(n)) in MATMUL_OPS]
    if len(matmuls) < 2:
        return None
    out_mm = dg.node(matmuls[-1])
    data = [a for a in out_mm.args if hasattr(a, "op") and a.op != "get_attr" and is_tensor(a)]
    if not data:
        return None
    post = _walk_back(dg, data[0].name)
    # The user-facing post is the last node before any flattening reshape: the furthest-back node of
    # the data-moving chain that is not itself a reshape of a 3-D value into 2-D.
    post_name = post[-1]
    for name in post:
        if not _is_layout(dg.node(name)):
            post_name = name
            break
    post_node = dg.node(post_name)
    pre_linear = None
    act_root = post_name
    if is_op(post_node, "mul"):
        operands = [a for a in post_node.args[:2] if hasattr(a, "op") and is_tensor(a)]
        roots = [_projection_root(dg, a.name) for a in operands]
        ancestors = [
            {m for m in matmuls if m in (dg.upstream([a.name]) | {a.name})} for a in operands
        ]
        if len(operands) == 2 and ancestors[0] != ancestors[1]:
            lin = next((i for i, r in enumerate(roots) if r is not None), None)
            if lin is not None:
                pre_linear = View(operands[lin].name)
                act_root = operands[1 - lin].name
        elif len(operands) == 2:
            # one fused projection split in two (Phi-3's gate_up_proj): gated when one operand is a part of it and
            # the activation reads another part
            parts = [_selected_root(dg, a.name) for a in operands]
            for lin in (0, 1):
                act_part = _nearest_projection(dg, operands[1 - lin].name, set(nodes))
                other = _selected_root(dg, act_part) if act_part is not None else None
                if parts[lin] and parts[lin][1] and other and other[0] == parts[lin][0] and other[1] and other[1] != parts[lin][1]:
                    pre_linear = View(operands[lin].name)
                    act_root = operands[1 - lin].name
                    break
    pre = _nearest_projection(dg, act_root, set(nodes))
    if pre is None:
        return None
    in_mms = tuple(m for m in matmuls[:-1])
    return Mlp(pre=View(pre), post=View(post_name), pre_linear=pre_linear, out_matmul=out_mm.name, in_matmuls=in_mms)


def _nearest_projection(dg: DataGraph, start: str, within: set[str]) -> str | None:
    """Breadth-first back from ``start``: the first node that is a projection output (behind reshapes), or a part
    of one (a ``getitem`` of its split or chunk: a fused gate and up projection)."""
    queue = deque([start])
    seen = {start}
    while queue:
        name = queue.popleft()
        node = dg.node(name)
        if name != start or not (op_name(node) in MATMUL_OPS or _is_layout(node)):
            if op_name(node) in MATMUL_OPS or (_is_layout(node) and _projection_root(dg, name)):
                return name
            if op_name(node) == "getitem" and _selected_root(dg, name):
                return name
        # through tuple-valued nodes too (split, chunk): their getitems are the parts
        for src in node.all_input_nodes:
            if src.op != "get_attr" and src.name in within and src.name not in seen:
                seen.add(src.name)
                queue.append(src.name)
    return None


_SPLITS = frozenset({"split", "split_with_sizes", "chunk", "unbind", "unsafe_split", "unsafe_chunk"})


def _selected_root(dg: DataGraph, name: str) -> tuple[str, tuple] | None:
    """(projection, which part of it) behind ``name`` through reshapes and getitems of splits; the part is () for
    the whole output, None when ``name`` is not a (part of a) projection output."""
    node, part = dg.node(name), []
    for _ in range(16):
        if op_name(node) in MATMUL_OPS:
            return node.name, tuple(part)
        if op_name(node) == "getitem" and isinstance(node.args[0], fx.Node) and op_name(node.args[0]) in _SPLITS:
            split = node.args[0]
            part.append((op_name(split), tuple(a for a in split.args[1:] if not isinstance(a, fx.Node)), node.args[1]))
            node = split.args[0]
        elif _is_layout(node) and len([n for n in node.all_input_nodes if n.op != "get_attr"]) == 1:
            node = next(n for n in node.all_input_nodes if n.op != "get_attr")
        else:
            return None
    return None
