"""Find the router and the experts of a mixture-of-experts MLP branch.

Problem: in a mixture-of-experts block the MLP is a router (a linear map to one logit per expert,
a softmax or sigmoid, a top-k) and experts that each process the tokens routed to them, their
outputs weighted and summed. Researchers read and patch the routing (which experts a token uses,
with what weight) and single experts' outputs; none of these is a module output in HF's graph, and
transformers 5 runs all experts as grouped matrix products over tokens sorted by expert.

Mechanism: from the branch's dataflow: the ``topk`` node is the routing decision; behind it (through
layout ops) a softmax or sigmoid gives the routing probabilities and behind those a linear map gives
the router logits (GPT-OSS takes the top-k of the logits and normalises after, so it has no
all-expert probabilities). Each token's k expert outputs, weighted, are summed by a ``sum`` over an
axis of size k: its input is the per-slot contributions ``[tokens, k, d_model]``, which together with
the top-k indices give each expert's output per token (``passes.split_experts``). Shared experts that
every token uses (Qwen2-MoE) are added after that sum and belong to ``hook_mlp_out`` only.

Example::

    moe = find_moe(dg, block.mlp, syms)
    moe.router.node, moe.indices.node, moe.n_experts, moe.top_k   # "linear_4", "getitem_1", 8, 2

Gotchas: router sites are [batch, pos, experts] and [batch, pos, k] views of the graph's flattened
[batch * pos, ...] tensors; patching ``hook_expert_indices`` re-routes tokens, patching
``hook_expert_weights`` (the probabilities the top-k reads) may too.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from .attention import View
from .dataflow import DataGraph
from .layout import Layout
from .nodes import LAYOUT_OPS, MATMUL_OPS, op_name, tensor_meta

__all__ = ["Moe", "find_moe"]

_FLAT = Layout((("unflatten_bs",),))


@dataclass(frozen=True)
class Moe:
    router: View  # router logits, [batch, pos, experts]
    probs: View | None  # routing probabilities over every expert (the top-k's input), [batch, pos, experts]
    indices: View  # the experts each token uses, [batch, pos, k]
    contributions: str  # weighted expert outputs per slot, [tokens, k, d_model]
    combine: str  # their sum over the slots, [tokens, d_model]
    n_experts: int
    top_k: int


def _behind(dg: DataGraph, name: str, within: set) -> str:
    """Walk back through layout ops and casts (one data input each) inside ``within``."""
    node = dg.node(name)
    while op_name(node) in LAYOUT_OPS and len(dg.data_inputs(node.name)) == 1 and dg.data_inputs(node.name)[0] in within:
        node = dg.node(dg.data_inputs(node.name)[0])
    return node.name


def find_moe(dg: DataGraph, branch, syms) -> Moe | None:
    nodes = set(branch.nodes)
    ordered = dg.sorted(nodes)
    topk = next((n for n in ordered if op_name(dg.node(n)) == "topk"), None)
    if topk is None:
        return None
    node = dg.node(topk)
    k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
    if not isinstance(k, int):
        return None
    indices = next((u.name for u in node.users if u.target is operator.getitem and u.args[1] == 1), None)
    if indices is None:
        return None
    scores = _behind(dg, dg.data_inputs(topk)[0], nodes)
    probs = None
    logits = scores
    if op_name(dg.node(scores)) in ("softmax", "_softmax", "sigmoid"):
        probs = scores
        logits = _behind(dg, dg.data_inputs(scores)[0], nodes)
    if op_name(dg.node(logits)) not in MATMUL_OPS:
        return None
    val = tensor_meta(dg.node(logits))
    if val is None or val.dim() != 2:
        return None
    n_experts = int(val.shape[-1])
    combine = contributions = None
    for n in ordered:
        cand = dg.node(n)
        if op_name(cand) != "sum" or not dg.data_inputs(n):
            continue
        src = tensor_meta(dg.node(dg.data_inputs(n)[0]))
        dims = cand.args[1] if len(cand.args) > 1 else cand.kwargs.get("dim")
        if src is not None and src.dim() == 3 and src.shape[1] == k and list(dims or []) in ([1], [-2]):
            combine, contributions = n, dg.data_inputs(n)[0]
    if combine is None:
        return None
    return Moe(
        router=View(logits, _FLAT),
        probs=View(probs, _FLAT) if probs is not None else None,
        indices=View(indices, _FLAT),
        contributions=contributions,
        combine=combine,
        n_experts=n_experts,
        top_k=k,
    )
