"""Split-experts pass: each expert's output of a mixture-of-experts MLP, per token.

Problem: ``blocks.{i}.mlp.hook_expert_out`` ([batch, pos, expert, d_model]) is what each expert adds to
each token's MLP output (weighted by its routing weight, zero where the token does not use it), so a
single expert can be read, patched or ablated. The graph never holds it: transformers 5 runs the experts
on tokens sorted by expert and sums each token's k weighted outputs (``contributions`` [tokens, k,
d_model], summed over k by ``combine``).

Mechanism: the per-slot contributions are scattered into expert columns by the top-k indices (a
``scatter_add`` into zeros: a token that routes to one expert twice gets the sum), and viewed as
[batch, pos, expert, d_model] with the block's batch and sequence sizes. For reading
(``replace=False``) this sits beside the graph, whose outputs stay bit-identical. For writing
(``replace=True``) the sum over slots is replaced by the sum over experts of the new node, so an
edit of one expert's output reaches the MLP output (the sums agree to float rounding).

Example::

    gm = split_experts(gm, SplitExperts((Experts("view_4", "getitem_1", "sum_2", 8),), replace=True))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..graphs.sites import rewritten
from .base import rewrite

__all__ = ["Experts", "SplitExperts", "split_experts"]


@dataclass(frozen=True)
class Experts:
    contributions: str  # [tokens, k, d_model]
    indices: str  # [tokens, k]
    combine: str  # [tokens, d_model]: the contributions summed over k
    n_experts: int


@dataclass(frozen=True)
class SplitExperts:
    stage: ClassVar[str] = "materialise"
    experts: tuple  # of Experts
    replace: bool = False


def _scatter(contributions: torch.Tensor, indices: torch.Tensor, n_experts: int, batch, seq) -> torch.Tensor:
    tokens, _, d = contributions.shape
    index = indices.to(torch.long).unsqueeze(-1).expand(tokens, indices.shape[1], d)
    out = contributions.new_zeros(tokens, n_experts, d).scatter_add(1, index, contributions)
    return out.view(batch, seq, n_experts, d)


def _combine(experts: torch.Tensor) -> torch.Tensor:
    return experts.sum(2).flatten(0, 1)


def split_experts(gm: fx.GraphModule, spec: SplitExperts) -> fx.GraphModule:
    with rewrite(gm) as rw:
        batch, seq = rw.sizes()
        for e in spec.experts:
            combine = rw.node(e.combine)
            contributions, indices = rw.node(e.contributions), rw.node(e.indices)
            where = rw.graph.inserting_before(combine) if spec.replace else rw.after(combine)
            with where:
                experts = rw.create(_scatter, (contributions, indices, e.n_experts, batch, seq),
                                    name=rewritten("split_experts", e.combine, "experts"), like=combine)
                if spec.replace:
                    total = rw.create(_combine, (experts,), like=combine)
            if spec.replace:
                rw.replace(combine, total)
    return rw.result
