"""Find the parts of an attention branch: q, k, v (before and after rotary), scores, pattern, z.

Problem: TransformerLens sites such as ``attn.hook_q`` [batch, pos, head, d_head] and
``attn.hook_pattern`` [batch, head, q, k] exist in every attention layer, but each HF family builds
them differently (fused QKV with split or chunk, interleaved or partial rotary, repeated KV heads,
SDPA or an explicit softmax).

Mechanism: start at the attention op, which every family has: one ``scaled_dot_product_attention``
node, or a ``softmax`` between two matmuls. Walk back from its q, k and v operands through ops that
only move data (view, transpose, expand, ...). Where the walk stops at a node that depends on the
block's positional context (rotary cos/sin, position ids), that node is the rotated q/k; the
pre-rotary value is the nearest ancestor free of that context with the same head size. The node to
show is the one furthest back on a data-moving chain whose shape is [batch, pos, heads, d_head]
(so k and v are shown before KV-head repetition); failing that, [batch, heads, pos, d_head] read
through a permute. ``z`` is found the same way going forward from the attention output.

Example::

    a = find_attention(dg, block, syms)
    a.q.node, a.q.layout      # ("view_6", Layout()) for GPT-2; ("getitem_7", permute) for NeoX
    a.kind                    # "sdpa": pattern and scores need the expand-attention rewrite

Gotchas: under SDPA the pattern is never materialised; ``kind == "sdpa"`` tells the site table to
ask for the rewrite in ``passes/expand_attention.py``.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass

import torch.fx as fx

from .dataflow import DataGraph
from .layout import IDENTITY, Layout
from .nodes import ATTENTION_OPS, LAYOUT_OPS, MATMUL_OPS, is_tensor, op_name, scope, sym_dims

__all__ = ["View", "Attention", "find_attention", "AttentionError"]

TO_TL = Layout((("permute", (0, 2, 1, 3)),))


class AttentionError(RuntimeError):
    pass


@dataclass(frozen=True)
class View:
    """A node as the user sees it: the node name and the layout that maps it to the user's axes."""

    node: str
    layout: Layout = IDENTITY


@dataclass(frozen=True)
class Attention:
    op: str  # the SDPA node, or the softmax node under eager attention
    kind: str  # "sdpa" or "eager"
    q_in: str  # operands of the attention op (rotated, heads repeated)
    k_in: str
    v_in: str
    mask: str | None
    q: View
    k: View
    v: View
    rot_q: View | None
    rot_k: View | None
    scores: View | None  # None under SDPA (materialised by a rewrite)
    pattern: View | None
    z: View
    z_heads: str  # attention output, [batch, heads, q, d_head]
    o_input: str  # the [batch, pos, heads*d_head] node the output projection reads
    o_matmul: str  # the output projection's matmul node
    o_proj: str  # HF module path of the output projection
    n_heads: int
    n_kv_heads: int
    d_head: int
    k_consumer: str = ""  # the node that reads k_in on its way to the attention op (SDPA or k's transpose)
    v_consumer: str = ""  # the node that reads v_in (SDPA or the pattern @ v product)


def _is_layout(node: fx.Node) -> bool:
    name = op_name(node)
    if name in LAYOUT_OPS:
        return True
    if name == "slice":
        # slice(x, dim, 0, maxint) is a no-op that HF emits when indexing with [:, :]
        args = list(node.args) + [None] * 5
        return args[2] in (0, None) and args[3] in (None, sys.maxsize) and args[4] in (None, 1)
    return False


def _walk_back(dg: DataGraph, name: str) -> list[str]:
    """``name`` and the nodes behind it reached through data-moving ops (first input only)."""
    chain = [name]
    node = dg.node(name)
    while _is_layout(node):
        inputs = [n for n in node.all_input_nodes if n.op != "get_attr" and is_tensor(n)]
        if len(inputs) != 1:
            break
        node = inputs[0]
        chain.append(node.name)
    return chain


def _walk_forward(dg: DataGraph, name: str) -> list[str]:
    chain = [name]
    node = dg.node(name)
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _is_layout(user):
            break
        node = user
        chain.append(node.name)
    return chain


def _pick_heads(dg: DataGraph, chain: list[str], syms, d_head: int) -> View | None:
    """The furthest-back node of ``chain`` shaped [B, S, h, d] (else [B, h, S, d] via permute)."""
    for want, layout in ((("B", "S"), IDENTITY), (("B", None, "S"), TO_TL)):
        for name in reversed(chain):
            dims = sym_dims(dg.node(name), *syms)
            if len(dims) != 4 or dims[3] != d_head:
                continue
            if want == ("B", "S") and dims[0] == "B" and dims[1] == "S" and isinstance(dims[2], int):
                return View(name, layout)
            if want == ("B", None, "S") and dims[0] == "B" and dims[2] == "S" and isinstance(dims[1], int):
                return View(name, layout)
    return None


def _heads_of(dg, view: View, syms) -> int:
    dims = view.layout.shape(sym_dims(dg.node(view.node), *syms))
    return int(dims[2])


def _operand_views(dg: DataGraph, operand: str, ctx: set[str], syms, d_head: int, norms: dict):
    """(pre-rotary view, rotated view or None) for a q or k operand."""
    chain = _walk_back(dg, operand)
    stop = chain[-1]
    if stop not in ctx:
        view = _pick_heads(dg, chain, syms, d_head)
        if view is None:
            raise AttentionError(f"no [batch, pos, head, d_head] node behind {operand}")
        return _unscaled(dg, _before_norm(dg, view, norms, syms, d_head)), None
    rot = _pick_heads(dg, chain, syms, d_head)
    # nearest context-free ancestor with the full head size
    seen = {stop}
    queue = deque([stop])
    pre = None
    while queue and pre is None:
        for src in dg.data_inputs(queue.popleft()):
            if src in seen:
                continue
            seen.add(src)
            dims = sym_dims(dg.node(src), *syms)
            if src not in ctx and len(dims) == 4 and dims[3] == d_head and "B" in dims and "S" in dims:
                pre = src
                break
            if src in ctx or not (len(dims) == 4 and dims[3] == d_head):
                queue.append(src)
    if pre is None or rot is None:
        raise AttentionError(f"could not separate rotary embedding around {operand}")
    view = _pick_heads(dg, _walk_back(dg, pre), syms, d_head)
    return _unscaled(dg, _before_norm(dg, view, norms, syms, d_head)), rot


def _unscaled(dg: DataGraph, view: View) -> View:
    """Undo a constant factor applied to a projection output (OPT scales q before splitting heads).

    TransformerLens' q is x @ W_Q + b_Q; the scale belongs to the attention scores.
    """
    root = dg.node(_walk_back(dg, view.node)[-1])
    if op_name(root) == "mul" and len(root.args) == 2 and isinstance(root.args[1], (int, float)):
        src = root.args[0]
        if hasattr(src, "op") and op_name(dg.node(_walk_back(dg, src.name)[-1])) in MATMUL_OPS:
            return View(view.node, view.layout.then(("scale", float(root.args[1]))))
    return view


def _before_norm(dg: DataGraph, view: View, norms: dict, syms, d_head: int) -> View:
    """Step back through a per-head norm (QK-norm): TransformerLens shows q and k before it."""
    norm = norms.get(scope(dg.node(view.node)))
    if norm is None or view.node != norm.output:
        return view
    return _pick_heads(dg, _walk_back(dg, norm.input), syms, d_head) or view


def find_attention(dg: DataGraph, block, branch, syms, norms: dict | None = None) -> Attention:
    norms = norms or {}
    nodes = branch.nodes
    ordered = dg.sorted(nodes)
    sdpa = [n for n in ordered if op_name(dg.node(n)) in ATTENTION_OPS]
    softmax = [n for n in ordered if op_name(dg.node(n)) in ("softmax", "_softmax")]
    ctx = dg.downstream_within(block.context, set(block.nodes))
    if sdpa:
        op = dg.node(sdpa[0])
        kind = "sdpa"
        q_in, k_in, v_in = (a.name for a in op.args[:3])
        mask = op.args[3] if len(op.args) > 3 else op.kwargs.get("attn_mask")
        mask = mask.name if isinstance(mask, fx.Node) else None
        z_heads = op.name
        scores = pattern = None
        k_consumer = v_consumer = op.name
    elif softmax:
        sm = dg.node(softmax[0])
        kind = "eager"
        scores_node = sm.args[0]
        while op_name(scores_node) in ("to", "_to_copy") and scores_node.all_input_nodes:
            scores_node = scores_node.all_input_nodes[0]
        pv = next(
            (dg.node(n) for n in ordered if op_name(dg.node(n)) in MATMUL_OPS and sm.name in dg.upstream([n])),
            None,
        )
        if pv is None:
            raise AttentionError(f"no pattern @ v product after {sm.name}")
        v_in = pv.args[1].name
        qk = [n for n in dg.sorted(dg.upstream([scores_node.name]) & nodes) if op_name(dg.node(n)) in MATMUL_OPS]
        if not qk:
            raise AttentionError(f"no q @ k product before {sm.name}")
        qk_node = dg.node(qk[-1])
        q_in = qk_node.args[0].name
        k_t = qk_node.args[1]
        if op_name(k_t) in ("transpose", "permute", "t"):
            k_in, k_consumer = k_t.all_input_nodes[0].name, k_t.name
        else:
            k_in, k_consumer = k_t.name, qk_node.name
        v_consumer = pv.name
        mask = None
        z_heads = pv.name
        op = sm
        scores = View(scores_node.name)
        pattern = View(sm.name)
    else:
        raise AttentionError(f"no attention op in {branch.module}")

    d_head = int(sym_dims(dg.node(z_heads), *syms)[-1])
    q, rot_q = _operand_views(dg, q_in, ctx, syms, d_head, norms)
    k, rot_k = _operand_views(dg, k_in, ctx, syms, d_head, norms)
    v = _pick_heads(dg, _walk_back(dg, v_in), syms, d_head)
    if v is None:
        raise AttentionError(f"no [batch, pos, head, d_head] node behind {v_in}")
    fwd = _walk_forward(dg, z_heads)
    z = None
    for name in fwd:
        dims = sym_dims(dg.node(name), *syms)
        if len(dims) == 4 and dims[:2] == ("B", "S") and dims[3] == d_head:
            z = View(name)
            break
    if z is None:
        z = View(z_heads, TO_TL)
    o_input = fwd[-1]
    o_mm = next((u for u in dg.node(o_input).users if op_name(u) in MATMUL_OPS), None)
    if o_mm is None:
        # Conv1D flattens to 2-D first: view -> addmm
        for u in dg.node(o_input).users:
            if _is_layout(u):
                o_mm = next((w for w in u.users if op_name(w) in MATMUL_OPS), None)
                if o_mm is not None:
                    break
    if o_mm is None:
        raise AttentionError(f"no output projection after {o_input}")
    return Attention(
        op=op.name,
        kind=kind,
        q_in=q_in,
        k_in=k_in,
        v_in=v_in,
        mask=mask,
        q=q,
        k=k,
        v=v,
        rot_q=rot_q,
        rot_k=rot_k,
        scores=scores,
        pattern=pattern,
        z=z,
        z_heads=z_heads,
        o_input=o_input,
        o_matmul=o_mm.name,
        o_proj=scope(o_mm),
        n_heads=_heads_of(dg, q, syms),
        n_kv_heads=_heads_of(dg, k, syms),
        d_head=d_head,
        k_consumer=k_consumer,
        v_consumer=v_consumer,
    )
