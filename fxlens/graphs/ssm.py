"""Find the recurrent state of a state-space mixer's scan: the state after each position.

Problem: ``blocks.{i}.mixer.hook_ssm_state`` should show what a Mamba layer carries from one position
to the next (HF's ``cache.ssm_states`` after each token). No single node holds it: Mamba's torch path
(``MambaMixer.slow_forward``) runs ``ssm_state = dA[:, :, i] * ssm_state + dBu[:, :, i]`` in a Python
loop over positions, which the capture (one per sequence length, these models fix the length) unrolls
into one ``add`` node per position.

Mechanism: ``find_scan`` looks among a mixer's nodes for ``add(mul(a, s), b)`` steps whose ``s`` is the
previous step (through dtype casts) and whose first ``s`` is a ``zeros`` tensor (outside the branch: it
reads nothing of the residual), all of one shape
``[batch, *state]`` without a position axis; a chain as long as the captured sequence is the scan, and
its ``add`` nodes are the states after positions 0, 1, ... . Anything else gives None: Mamba2's chunked
scan (one state per chunk of positions, not per position), or a mixer holding several scans (Zamba's
mamba heads scan separately), whose single state would be only a part.

Example::

    find_scan(dg, block.attn.nodes, seq=5)   # ("add_2", "add_3", "add_4", "add_5", "add_6")

Gotchas: the chain is found by dataflow, not by names; a capture at another length has its own chain.
"""

from __future__ import annotations

from .dataflow import DataGraph
from .nodes import op_name, tensor_meta

__all__ = ["find_scan", "CASTS"]

CASTS = frozenset({"to", "_to_copy", "alias", "clone", "contiguous"})


def _readers(node, members: set) -> list:
    """The nodes among ``members`` that read ``node``, directly or through dtype casts."""
    out, stack = [], [node]
    while stack:
        for u in stack.pop().users:
            if u.name in members:
                (stack if op_name(u) in CASTS else out).append(u)
    return out


def _step_from(node, members: set):
    """The ``add`` node computing the next state from ``node`` (``add(mul(a, node), b)``), or None."""
    for mul in _readers(node, members):
        if op_name(mul) != "mul":
            continue
        for add in mul.users:
            if op_name(add) == "add" and add.name in members and _same_shape(add, mul):
                return add
    return None


def _same_shape(a, b) -> bool:
    va, vb = tensor_meta(a), tensor_meta(b)
    return va is not None and vb is not None and tuple(va.shape) == tuple(vb.shape)


def find_scan(dg: DataGraph, nodes, seq) -> tuple | None:
    """The state nodes (one per position) of an unrolled selective scan among ``nodes``, or None."""
    if not isinstance(seq, int) or seq < 1:
        return None  # only a capture at one length unrolls the loop
    members = set(nodes)
    # the initial state reads nothing of the residual, so it lies outside the mixer's branch: start from
    # the zeros that a step of the branch multiplies
    starts = {a.name: a for n in members if op_name(dg.node(n)) == "mul" for a in dg.node(n).all_input_nodes
              if op_name(a) == "zeros"}
    found = []
    for name in sorted(starts, key=lambda n: dg.order.get(n, 0)):
        start = starts[name]
        chain = []
        node = _step_from(start, members | {name})
        while node is not None and _same_shape(node, start):
            chain.append(node.name)
            node = _step_from(node, members)
        if chain:
            found.append((start, chain))
    if len(found) != 1:
        return None  # several scans (one per head group, Zamba's mamba heads): no single state to show
    start, chain = found[0]
    if len(chain) != seq or len(tensor_meta(start).shape) != 3:
        return None  # not one state [batch, d_inner, d_state] per position
    return tuple(chain)
