"""Split a captured graph into a prelude, one graph per block, and a head.

Problem: a patching sweep adds rows to the batch at the layer each row patches, and for causal models
runs only the positions at and after the patched one. That needs the blocks as separate programs
whose inputs are the residual stream and the positional context (masks, rotary tables), not the tokens.

Mechanism: block i's graph holds the nodes of the block's module scope, with the residual input as a
placeholder named like the node it replaces (so every site name still finds its node) and each
context tensor (attention mask, cos/sin, position ids) as a placeholder of the same name. The batch and
sequence sizes, which the full graph reads from the token input, are read from the residual input
instead, so a block runs on any batch and any number of positions. The prelude computes the first
residual and every context tensor; the head maps the last residual to the model outputs.

Example::

    seg = split(mg)
    pre = seg.prelude(input_ids=ids, attention_mask=mask)
    h = pre["outputs"]["hidden"]
    for i, block in enumerate(seg.blocks):
        h = block(**{seg.hidden[i]: h, **{c: pre["context"][c] for c in seg.block_context[i]}})["outputs"]["hidden"]
    logits = seg.head(**{seg.head_input: h})["outputs"]["logits"]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import sympy
import torch
import torch.utils._sympy.functions as symfn
import torch.fx as fx
from torch.fx.graph import CodeGen

from .nodes import is_tensor, tensor_meta
from .sites import ModelGraph

__all__ = ["Segments", "split", "SegmentError", "HIDDEN_ROLE"]

HIDDEN_ROLE = "fxl_hidden"


class SegmentError(RuntimeError):
    pass


# torch's shape expressions use its own Min/Max (torch.utils._sympy.functions), not sympy's
_MIN_MAX = {sympy.Min: "min", sympy.Max: "max", symfn.Min: "min", symfn.Max: "max"}


@dataclass
class Segments:
    prelude: fx.GraphModule
    blocks: list  # of fx.GraphModule
    head: fx.GraphModule
    hidden: list  # per block: name of its residual-input placeholder
    block_context: list  # per block: names of its context placeholders
    head_input: str
    head_context: tuple
    outputs: tuple  # names of the model outputs the head returns


def _subgraph(root: fx.GraphModule, nodes: list[fx.Node], hidden: fx.Node, outputs: dict, syms) -> tuple[fx.GraphModule, tuple]:
    """A graph of ``nodes`` (in order) reading ``hidden`` and external tensors as placeholders."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    members = set(nodes)
    ph = g.placeholder(hidden.name)
    ph.meta = dict(hidden.meta)
    ph.meta["fxl_role"] = HIDDEN_ROLE
    env[hidden] = ph
    context = []
    sizes: dict = {}

    def size(expr):
        """A size the block reads from outside, recomputed from its own input: the batch and sequence
        sizes, or an expression of them (a mixture-of-experts block reads 2 * batch * seq, computed once
        by an earlier block and shared)."""
        if expr in syms:
            dim = syms.index(expr)
            if dim not in sizes:
                sizes[dim] = g.call_function(torch.ops.aten.sym_size.int, (ph, dim))
            return sizes[dim]
        if expr.is_Integer:
            return int(expr)
        if (expr.is_Mul or expr.is_Add) and expr.free_symbols <= set(syms):
            op = operator.mul if expr.is_Mul else operator.add
            terms = [size(a) for a in expr.args]
            out = terms[0]
            for t in terms[1:]:
                out = g.call_function(op, (out, t))
            return out
        if expr.is_Pow and expr.exp.is_Integer and int(expr.exp) > 0 and expr.free_symbols <= set(syms):
            base = size(expr.base)
            out = base
            for _ in range(int(expr.exp) - 1):
                out = g.call_function(operator.mul, (out, base))
            return out
        if expr.func in _MIN_MAX and expr.free_symbols <= set(syms):
            # a top-k width capped by the length (DeepSeek's sparse-attention indexer: Min(2048, seq))
            pick = torch.sym_min if _MIN_MAX[expr.func] == "min" else torch.sym_max
            out = size(expr.args[0])
            for a in expr.args[1:]:
                out = g.call_function(pick, (out, size(a)))
            return out
        raise SegmentError(f"a block reads the size {expr} from outside; only sizes computed from the batch and sequence sizes are supported")

    def lookup(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "get_attr":
            env[n] = g.get_attr(n.target)
            env[n].meta = dict(n.meta)
            return env[n]
        val = tensor_meta(n)
        if isinstance(val, torch.SymInt):
            env[n] = size(val.node.expr)
            return env[n]
        if is_tensor(n):
            p = g.placeholder(n.name)
            p.meta = dict(n.meta)
            env[n] = p
            context.append(n.name)
            return p
        raise SegmentError(f"a block reads {n.name} ({type(val).__name__}) from outside")

    # placeholders first: collect external inputs before copying
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in members and a is not hidden and a.op != "get_attr" and is_tensor(a):
                lookup(a)
    for n in nodes:
        env[n] = g.node_copy(n, lookup)
    g.output({"outputs": {k: env[v] for k, v in outputs.items()}})
    g.set_codegen(CodeGen())
    g.lint()
    return fx.GraphModule(root, g), tuple(context)


def split(mg: ModelGraph) -> Segments:
    gm = mg.captured.module
    graph = gm.graph
    syms = (mg.captured.batch_symbol, mg.captured.seq_symbol)
    by_name = {n.name: n for n in graph.nodes}
    blocks = mg.structure.blocks
    for a, b in zip(blocks, blocks[1:]):
        if b.resid_pre != a.resid_post:
            raise SegmentError(f"block {b.index} does not read block {a.index}'s output directly")
    block_gms, hidden, contexts = [], [], []
    for block in blocks:
        nodes = [n for n in graph.nodes if n.name in block.nodes]
        sub, ctx = _subgraph(gm, nodes, by_name[block.resid_pre], {"hidden": by_name[block.resid_post]}, syms)
        block_gms.append(sub)
        hidden.append(block.resid_pre)
        contexts.append(ctx)

    last = by_name[blocks[-1].resid_post]
    outputs = graph.output_node().args[0]["outputs"]
    after = _descendants(last)
    head_nodes = [n for n in graph.nodes if n in after and n.op == "call_function" and _feeds(n, set(outputs.values()))]
    # outputs computed before the last block (XLNet's memories: detached earlier layers' states) are no head's
    # to return; rows read the head's logits
    head_outputs = {k: v for k, v in outputs.items() if v is last or v in after}
    head, head_ctx = _subgraph(gm, head_nodes, last, head_outputs, syms)

    # prelude: the first residual and every context tensor, nothing else
    need = {blocks[0].resid_pre, *(c for ctx in contexts for c in ctx), *head_ctx}
    pg = fx.Graph()
    out = pg.graph_copy(graph, {})
    pg.output(out)
    pnodes = {n.name: n for n in pg.nodes}
    pg.output_node().args = (
        {"outputs": {"hidden": pnodes[blocks[0].resid_pre]}, "context": {c: pnodes[c] for c in sorted(need - {blocks[0].resid_pre})}},
    )
    pg.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    pg.set_codegen(CodeGen())
    prelude = fx.GraphModule(gm, pg)
    return Segments(prelude, block_gms, head, hidden, contexts, last.name, head_ctx, tuple(outputs))


def _descendants(node: fx.Node) -> set:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _feeds(node: fx.Node, targets: set) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return False
