"""Raw module sites: every HF module's output under its module path, one site per call.

Problem: a user who knows the HF model reaches for ``model.layers.3.mlp`` before any TransformerLens
name, and a module the forward calls several times (ALBERT's shared layer, a looped middle layer, T5's
embedding read by both stacks) has one output per call. Grouping the calls' nodes under one path
mixed them: the site was whichever call's output happened to escape last.

Mechanism: nodes are grouped by *call* (``nodes.call_scopes``, torch.export's ``@k`` keys). A call's
output is its first tensor node used outside the call, skipping a no-op cast or copy of the call's own
input (float32 RMSNorm's ``.to(float32)``). The first call is named by the plain path, later calls
``path@1``, ``path@2``: nnsight's convention (``.output`` is the first call) and torch.export's keys.

Example::

    model.run_with_cache(ids, names_filter=["albert.encoder.albert_layer_groups.0.albert_layers.0@1"])

Gotchas: canonical site names win over paths (``taken``); a module whose outputs are all non-tensors
(a cache object) gets no site.
"""

from __future__ import annotations

import torch.fx as fx

from .dataflow import DataGraph
from .nodes import is_tensor, op_name
from .structure import _escaping, _module_nodes

__all__ = ["module_outputs"]

_NO_OP_COPIES = frozenset({"to", "_to_copy", "type_as", "clone", "contiguous", "alias", "dropout"})


def module_outputs(graph: fx.Graph, dg: DataGraph, taken: set) -> list[tuple[str, str]]:
    """(site name, output node) for every call of every module, in graph order of the calls."""
    out = []
    for name, nodes in _module_nodes(graph, calls=True).items():
        if not name or name in taken:
            continue
        members = {n.name for n in nodes}
        escaping = [o for o in _escaping(members, dg) if is_tensor(dg.node(o)) and not _alias_of_input(dg, o, members)]
        if escaping:
            # a tuple output's elements escape in the order they are computed: take the first
            out.append((name, escaping[0]))
    return out


def _alias_of_input(dg: DataGraph, name: str, members: set) -> bool:
    """A no-op cast or copy of the call's own input (float32 ``.to(float32)`` inside RMSNorm)."""
    node = dg.node(name)
    if op_name(node) not in _NO_OP_COPIES:
        return False
    src = [a for a in node.all_input_nodes if a.op != "get_attr"]
    return bool(src) and src[0].name not in members
