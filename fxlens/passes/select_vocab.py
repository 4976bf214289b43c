"""Select-vocabulary pass: compute only the logits a metric reads.

Problem: a logit-difference metric reads two vocabulary entries; the unembedding computes all of them
(49k for SmolLM2, more than eight transformer layers' worth of work per position).

Mechanism: the unembedding ``linear(x, W_U, b)`` becomes ``linear(x, W_U[ids], b[ids])`` with ``ids`` a
graph input named in the spec. What follows the unembedding must be elementwise (Gemma 2's soft-capping
is), which the pass checks.

Example::

    head = select_vocab(head, SelectVocab("linear_14", "fxl_in0"))
    head(**{"add_29": h, "fxl_in0": torch.tensor([9, 42])})["outputs"]["logits"]   # [..., 2]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..graphs.nodes import LAYOUT_OPS, op_name
from .base import PassError, rewrite

__all__ = ["SelectVocab", "select_vocab"]

_ELEMENTWISE = {"add", "sub", "mul", "div", "tanh", "to", "_to_copy", "type_as", "clone", "contiguous", "float", "neg", "dropout"}


@dataclass(frozen=True)
class SelectVocab:
    stage: ClassVar[str] = "output"
    unembed: str  # the linear node producing the logits
    input: str  # graph input holding the vocabulary ids to compute


def _rows(weight: torch.Tensor, bias, ids: torch.Tensor, x: torch.Tensor):
    out = torch.nn.functional.linear(x, weight.index_select(0, ids), None if bias is None else bias.index_select(0, ids))
    return out


def select_vocab(gm: fx.GraphModule, spec: SelectVocab) -> fx.GraphModule:
    with rewrite(gm) as rw:
        node = rw.node(spec.unembed)
        if op_name(node) != "linear":
            raise PassError(f"{spec}: the unembedding is a {op_name(node)}, not a linear")
        stack = list(node.users)
        while stack:
            user = stack.pop()
            if user.op == "output":
                continue
            if op_name(user) not in _ELEMENTWISE | LAYOUT_OPS - {"view", "reshape", "transpose", "permute", "expand", "flatten"}:
                raise PassError(f"{spec}: {user.name} ({op_name(user)}) after the unembedding mixes vocabulary entries")
            stack.extend(user.users)
        ids = rw.placeholder(spec.input)
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with rw.graph.inserting_before(node):
            new = rw.create(_rows, (weight, bias, ids, x), like=node)
        rw.replace(node, new)
    return rw.result
