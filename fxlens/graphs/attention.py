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
ask for the rewrite in ``passes/expand_attention.py``. Families that compute attention as
``bmm`` over [batch*heads, q, k] (XGLM, MVP, TrOCR) get an ``unflatten_heads`` layout, checked to be
batch-major; a flat axis that is not batch x query heads leaves pattern and scores out with the reason.
Where the block's residual sum does not isolate attention (Gemma-3n's stacked AltUp streams), the
caller passes a branch built from the attention module's own nodes (``attention_module_branch``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch.fx as fx

from .dataflow import DataGraph
from .layout import IDENTITY, Layout
from .nodes import ATTENTION_OPS, LAYOUT_OPS, MATMUL_OPS, is_tensor, op_name, scope, sym_dims, tensor_meta

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
    d_head_qk: int = 0  # head size of q and k (differs from d_head, v's and z's, in latent attention)
    missing: tuple = ()  # (site suffix, reason) for sites this attention cannot show


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


def _mm_operands(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The two matrix operands of a product (``baddbmm(bias, a, b)`` adds a bias first: Bloom's ALiBi)."""
    name = op_name(node)
    if name in ("baddbmm", "addmm", "addbmm"):
        return node.args[1], node.args[2]
    if name == "einsum":
        return node.args[1][0], node.args[1][1]
    return node.args[0], node.args[1]


def _scalar_input(node: fx.Node) -> fx.Node | None:
    """The tensor that ``node`` multiplies or divides by a scalar (a number or a 0-d tensor), else None."""
    if op_name(node) not in ("mul", "div") or len(node.args) != 2:
        return None
    a, b = node.args
    tensors = [x for x in (a, b) if isinstance(x, fx.Node) and is_tensor(x) and len(tensor_meta(x).shape) > 0]
    scalars = [x for x in (a, b) if isinstance(x, (int, float)) or (isinstance(x, fx.Node) and is_tensor(x) and len(tensor_meta(x).shape) == 0)]
    if len(tensors) != 1 or len(scalars) != 1 or (op_name(node) == "div" and tensors[0] is not a):
        return None
    return tensors[0]


def _swaps_last_two(node: fx.Node) -> bool:
    """A transpose or permute that only swaps the last two axes (k -> k^T)."""
    if op_name(node) not in ("transpose", "permute", "t") or not node.all_input_nodes:
        return False
    shape, src = tuple(tensor_meta(node).shape), tuple(tensor_meta(node.all_input_nodes[0]).shape)
    if len(shape) < 2 or len(shape) != len(src):
        return False
    if op_name(node) == "permute":
        perm = [p % len(shape) for p in node.args[1]]
        return perm == list(range(len(shape) - 2)) + [len(shape) - 1, len(shape) - 2]
    if op_name(node) == "t":
        return True
    dims = sorted(d % len(shape) for d in node.args[1:3])
    return dims == [len(shape) - 2, len(shape) - 1]


def _strip(node: fx.Node, consumer: fx.Node, transposes: bool) -> tuple[fx.Node, fx.Node]:
    """Step back from a product's operand over scalar scales (and k's transpose): (operand, its reader)."""
    while True:
        inner = _scalar_input(node)
        if inner is None and transposes and _swaps_last_two(node):
            inner = node.all_input_nodes[0]
        if inner is None:
            return node, consumer
        node, consumer = inner, node


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


def _operand_views(dg: DataGraph, operand: str, ctx: set[str], syms, d_head: int, norms: dict, entry: str, within: set[str]):
    """(pre-rotary view or None, rotated view or None) for a q or k operand."""
    chain = _walk_back(dg, operand)
    stop = chain[-1]
    if stop not in ctx:
        view = _pick_heads(dg, chain, syms, d_head)
        if view is None:
            raise AttentionError(f"no [batch, pos, head, d_head] node behind {operand}")
        return _unscaled(dg, _before_norm(dg, view, norms, syms, d_head)), None
    rot = _pick_heads(dg, chain, syms, d_head)
    if rot is None:
        raise AttentionError(f"no [batch, pos, head, d_head] node behind the rotated {operand}")
    pre = _pre_rotary(dg, stop, ctx, syms, d_head, entry, within)
    if pre is None:
        return None, rot
    view = _pick_heads(dg, _walk_back(dg, pre), syms, d_head)
    return _unscaled(dg, _before_norm(dg, view, norms, syms, d_head)), rot


def _pre_rotary(dg: DataGraph, rotated: str, ctx: set[str], syms, d_head: int, entry: str, within: set[str]) -> str | None:
    """The per-head value the rotation is applied to: the nearest dominator of ``rotated`` (every path from
    the branch's input passes through it) that is [batch, pos, head, d_head] up to order and free of the
    positional context. None when the rotated value joins parts from different sources (latent attention's
    key: a per-head part and a rotary part shared by all heads), so no per-head value exists before rotary."""
    region = (dg.upstream([rotated]) & within) | {entry, rotated}
    idom = dg.dominators(entry, region)
    name = rotated
    while name in idom and idom[name] != name:
        name = idom[name]
        if name == entry:
            return None
        dims = sym_dims(dg.node(name), *syms)
        if name not in ctx and len(dims) == 4 and dims[3] == d_head and "B" in dims and "S" in dims:
            return name
    return None


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
    missing = []
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
        pv = next(
            (dg.node(n) for n in ordered if op_name(dg.node(n)) in MATMUL_OPS and sm.name in dg.upstream([n])),
            None,
        )
        if pv is None:
            raise AttentionError(f"no pattern @ v product after {sm.name}")
        weights, v_node = _mm_operands(pv)
        v_in, v_consumer = v_node.name, pv.name
        pattern_node = _pattern_node(dg, weights.name, sm.name, syms)
        if pattern_node is None:
            raise AttentionError(f"no [batch, head, query_pos, key_pos] attention weights before {pv.name}")
        # the content product: shaped like the weights (DeBERTa's relative terms multiply by position embeddings)
        qk = [n for n in dg.sorted(dg.upstream([sm.name]) & nodes)
              if op_name(dg.node(n)) in MATMUL_OPS and _weights_shape(sym_dims(dg.node(n), *syms))]
        if not qk:
            raise AttentionError(f"no q @ k product before {sm.name}")
        qk_node = dg.node(qk[-1])
        q_node, k_node = _mm_operands(qk_node)
        q_in = _strip(q_node, qk_node, transposes=False)[0].name
        k_node, k_reader = _strip(k_node, qk_node, transposes=True)
        k_in, k_consumer = k_node.name, k_reader.name
        mask = None
        z_heads = pv.name
        op = sm
        scores_node = _scores_node(dg, sm, qk_node, pattern_node, nodes, syms)
        if scores_node is None:
            missing.append(("hook_attn_scores", "no node holds the scores over the real keys alone"))
        pattern = View(pattern_node)
        scores = View(scores_node) if scores_node is not None else None
    else:
        raise AttentionError("no softmax or scaled_dot_product_attention in what the block adds to its residual stream")

    d_head = int(sym_dims(dg.node(z_heads), *syms)[-1])
    d_qk = int(sym_dims(dg.node(q_in), *syms)[-1])
    within = set(nodes)
    q, rot_q = _operand_views(dg, q_in, ctx, syms, d_qk, norms, branch.entry, within)
    k, rot_k = _operand_views(dg, k_in, ctx, syms, d_qk, norms, branch.entry, within)
    if q is None:
        raise AttentionError(f"no per-head query before its rotary embedding behind {q_in}")
    if k is None:
        # latent attention (DeepSeek's MLA): the key joins a per-head part and a rotary part shared by
        # every head, so only the rotated key exists per head; receivers read that
        k = rot_k
        missing.append(("hook_k", "the key is joined from a per-head part and a rotary part shared by all heads "
                                  "(latent attention), so no per-head key exists before rotary; hook_rot_k holds it"))
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
    n_heads = _heads_of(dg, q, syms)
    for suffix, view in (("hook_pattern", pattern), ("hook_attn_scores", scores)):
        if view is not None and _heads_first(dg, view, n_heads, syms) is None:
            missing.append((suffix, f"the graph holds it as one axis of batch x head that is not batch x {n_heads} heads"))
    pattern = pattern and _heads_first(dg, pattern, n_heads, syms)
    scores = scores and _heads_first(dg, scores, n_heads, syms)
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
        n_heads=n_heads,
        n_kv_heads=_heads_of(dg, k, syms),
        d_head=d_head,
        k_consumer=k_consumer,
        v_consumer=v_consumer,
        d_head_qk=d_qk,
        missing=tuple(missing),
    )


def _weights_shape(dims: tuple) -> bool:
    """[batch, head, q, k] or [batch*head, q, k] (bmm attention), with q and k the sequence."""
    if len(dims) == 4:
        return dims[0] == "B" and isinstance(dims[1], int) and dims[2:] == ("S", "S")
    return len(dims) == 3 and dims[0] not in ("B", "S") and not isinstance(dims[0], int) and dims[1:] == ("S", "S")


def _pattern_node(dg: DataGraph, weights: str, softmax: str, syms) -> str | None:
    """The attention weights the model multiplies v by: the furthest-back node behind the pattern @ v
    operand (through casts, dropout and reshapes) shaped like a pattern. Usually the softmax; with
    attention sinks (GPT-OSS) the softmax runs over one extra column and this is its slice to the real keys."""
    found = None
    for name in _walk_back(dg, weights):
        if _weights_shape(sym_dims(dg.node(name), *syms)):
            found = name
    if found is None:
        return None
    if found != softmax and softmax not in dg.upstream([found]):
        return None
    return found


def _scores_node(dg: DataGraph, sm: fx.Node, qk: fx.Node, pattern: str, nodes, syms) -> str | None:
    """The scores over the real keys that the softmax normalises: its input (behind casts) when shaped like
    the pattern, else the last pattern-shaped node between the q @ k product and the softmax (before an
    attention sink's column is joined on, or a max subtracted)."""
    want = sym_dims(dg.node(pattern), *syms)
    node = sm.args[0]
    while op_name(node) in ("to", "_to_copy") and node.all_input_nodes:
        node = node.all_input_nodes[0]
    if sym_dims(node, *syms) == want:
        return node.name
    between = (dg.upstream([sm.name]) & dg.downstream([qk.name]) & set(nodes)) | {qk.name}
    fits = [n for n in dg.sorted(between) if sym_dims(dg.node(n), *syms) == want]
    return fits[-1] if fits else None


def _heads_first(dg: DataGraph, view: View, n_heads: int, syms) -> View | None:
    """A [batch*head, q, k] pattern or scores node read as [batch, head, q, k] (batch-major, as a reshape of
    [batch, head, ...] makes it); None when the flat axis is not batch times the query heads."""
    dims = sym_dims(dg.node(view.node), *syms)
    if len(dims) != 3:
        return view
    if dims[0] - n_heads * syms[0] != 0:
        return None
    return View(view.node, view.layout.then(("unflatten_heads", n_heads)))
