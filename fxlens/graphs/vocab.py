"""The input vocabulary of a captured graph: the rows of the embedding that reads ``input_ids``.

Problem: a model's output size says nothing about which token ids it accepts. A classification head
(``ElectraForPreTraining``, ``BertForTokenClassification``) outputs ``num_labels`` values per position,
and ``config.vocab_size`` may disagree with the embedding actually used; checking token ids against
either refuses valid ids or lets invalid ones through (an out-of-range id is an index error inside
the embedding, or silently reads another row on some devices).

Mechanism: follow each ``embedding`` op's index argument back through layout ops (view, to, ...); the
one fed by the ``input_ids`` placeholder is the token embedding, and its weight's first dimension is
the number of valid ids.

Example::

    token_embedding(cg.module.graph)     # the aten.embedding node that reads input_ids
    input_vocab(cg.module.graph)         # 50257 for GPT-2; 30522 for any BERT head

Gotchas: None when no embedding reads ``input_ids`` (a model that embeds some other way); callers
then fall back to ``config.vocab_size``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .nodes import LAYOUT_OPS, is_op, op_name, tensor_meta

__all__ = ["token_embedding", "input_vocab"]


def _source(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and op_name(node) in LAYOUT_OPS and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def token_embedding(graph: fx.Graph, ids: str = "input_ids") -> fx.Node | None:
    """The first ``embedding`` node whose indices are the ``ids`` placeholder (through layout ops)."""
    for node in graph.nodes:
        if is_op(node, "embedding") and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
            src = _source(node.args[1])
            if src.op == "placeholder" and src.name == ids:
                return node
    return None


def input_vocab(graph: fx.Graph, ids: str = "input_ids") -> int | None:
    """How many token ids the model accepts: the token embedding's number of rows."""
    node = token_embedding(graph, ids)
    if node is None:
        return None
    weight = node.args[0]
    val = tensor_meta(weight) if isinstance(weight, fx.Node) else None
    if not isinstance(val, torch.Tensor) and isinstance(weight, fx.Node) and weight.op == "get_attr":
        module = graph.owning_module
        if module is not None:
            val = module
            for part in weight.target.split("."):
                val = getattr(val, part, None)
    return int(val.shape[0]) if isinstance(val, torch.Tensor) else None
