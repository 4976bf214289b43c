"""Expand one fused SDPA node into explicit scores, softmax and weighted sum.

Problem: under ``attn_implementation="sdpa"`` the attention pattern never exists as a tensor, yet
``attn.hook_pattern`` and ``attn.hook_attn_scores`` must be readable and patchable. Switching the whole
model to eager attention would slow every layer; only the layers whose pattern is asked for need it.

Mechanism: for reading (``replace=False``) the scores and pattern are computed beside the fused
node from its own inputs, so the model's outputs stay bit-identical to the fast graph. For writing
(``replace=True``) the ``scaled_dot_product_attention`` node is replaced by the same arithmetic spelled out:
``scores = q @ k^T * scale`` with the boolean mask filled with -inf (a float mask added; a causal flag
turned into a lower-triangular mask), ``pattern = softmax(scores)``, ``out = pattern @ v``. Grouped-query
attention (``enable_gqa``) repeats k and v heads first. The new nodes are named
``{sdpa}__scores`` and ``{sdpa}__pattern`` so the site table can point at them.

Example::

    gm = expand_attention(gm, ExpandAttention(("scaled_dot_product_attention_3",), replace=True))

Gotchas: results equal the fused kernel to float rounding (about 1e-7 in float32), not bit for bit. A
query row that may attend to no key (padding) has an all-zero pattern, as in TransformerLens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..graphs.sites import rewritten
from .base import PassError, rewrite

__all__ = ["ExpandAttention", "expand_attention"]

aten = torch.ops.aten


@dataclass(frozen=True)
class ExpandAttention:
    stage: ClassVar[str] = "materialise"
    nodes: tuple  # SDPA node names
    replace: bool = False  # True: the model uses the explicit pattern (needed to patch it)


def _sdpa_args(node: fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    out = dict(zip(names, node.args))
    for key in ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"):
        if key in node.kwargs:
            out[key] = node.kwargs[key]
    return out


def _scores(q, k, mask, is_causal, scale, enable_gqa):
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # in place on the fresh matmul output: none of these ops needs its input for backward
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if is_causal:
        ql, kl = q.shape[-2], k.shape[-2]
        causal = torch.ones(ql, kl, dtype=torch.bool, device=q.device).tril(diagonal=kl - ql)
        scores.masked_fill_(~causal, float("-inf"))
    if mask is not None:
        # the mask broadcasts to the scores' shape (torch.broadcast_shapes is Python and slow here)
        inplace = mask.dim() <= scores.dim() and all(m in (1, s) for m, s in zip(reversed(mask.shape), reversed(scores.shape)))
        if mask.dtype == torch.bool:
            scores = scores.masked_fill_(~mask, float("-inf")) if inplace else scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores.add_(mask) if inplace else scores + mask
    return scores


def _weighted(pattern, v, enable_gqa):
    if enable_gqa and v.shape[-3] != pattern.shape[-3]:
        v = v.repeat_interleave(pattern.shape[-3] // v.shape[-3], dim=-3)
    return torch.matmul(pattern, v)


def _softmax(scores):
    # a query that may attend to no key (a padding position's row) gets an all-zero row, as in
    # TransformerLens, not softmax's NaN: NaN would spread through the padding positions' values into
    # later layers (NaN keys times a mask still give NaN) and into any mean a user takes over the cache
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def expand_attention(gm: fx.GraphModule, spec: ExpandAttention) -> fx.GraphModule:
    with rewrite(gm) as rw:
        for name in spec.nodes:
            if not rw.has(name):
                raise PassError(f"{spec}: no attention node {name!r}")
            node = rw.node(name)
            args = _sdpa_args(node)
            if args.get("dropout_p", 0.0) not in (0, 0.0, None):
                raise PassError(f"{spec}: attention dropout is on in {name}; capture the model in eval mode")
            gqa = bool(args.get("enable_gqa", False))
            where = rw.graph.inserting_before(node) if spec.replace else rw.after(node)
            with where:
                scores = rw.create(
                    _scores,
                    (args["query"], args["key"], args.get("attn_mask"), bool(args.get("is_causal", False)), args.get("scale"), gqa),
                    name=rewritten("expand_attention", name, "scores"),
                    like=node,
                )
                pattern = rw.create(_softmax, (scores,), name=rewritten("expand_attention", name, "pattern"), like=node)
                if spec.replace:
                    out = rw.create(_weighted, (pattern, args["value"], gqa), like=node)
            if spec.replace:
                rw.replace(node, out)
    return rw.result
