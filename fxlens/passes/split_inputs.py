"""Split inputs: each head's own copy of its attention input, and the MLP's own copy of its input.

Problem: TransformerLens' ``hook_q_input``, ``hook_k_input``, ``hook_v_input`` and ``hook_attn_in``
([batch, pos, head, d_model]) are the residual stream as one head's query, key or value (or all three)
reads it, before the norm; ``hook_mlp_in`` ([batch, pos, d_model]) is the residual as the MLP reads it.
Editing one head's copy must change that head's q, k or v and nothing else, and editing the MLP's copy
must leave the residual stream's skip path alone. HF computes every head from one normalised input, so
these copies never exist.

Mechanism: for reading (``replace=False``), the copies are made beside the residual node (named
``{entry}__{kind}``) and the model is untouched. For writing (``replace=True``) the model computes
through them: each head's q (k, v) is recomputed from its own copy by replaying the nodes from the
residual to the q node (norm, projection, head split: the circuit receivers' cones,
``graphs.components``) and the head is taken from the replay, as the Edges pass does for edges into a
head; the MLP's reads of the residual (and the nodes it shares with attention) are redirected to its copy.

Example::

    gm = split_inputs(gm, SplitInputs((InputSplit("q_input", "add_3", receivers, (0, 1, 2, 3), 4),), replace=True))

Gotchas: writing a head's input replays the norm and the whole projection once per head, so a written
``hook_q_input`` costs n_heads projections where the model computes one (as TransformerLens' split
inputs do); reading costs a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..graphs.sites import rewritten
from .base import rewrite
from .edges import _chain, _given, _replay, _set_heads, redirect

__all__ = ["InputSplit", "SplitInputs", "split_inputs"]


@dataclass(frozen=True)
class InputSplit:
    kind: str  # "q_input", "k_input", "v_input", "attn_in" or "mlp_in"
    entry: str  # the residual node the copies are made of
    receivers: tuple  # of passes.EdgeReceiver: the heads' q/k/v (target, cone) or the MLP (cone, consumers)
    columns: tuple  # per receiver, the column of the copies it reads
    n: int  # number of copies ([batch, pos, n, d_model]); 0: one copy [batch, pos, d_model]


@dataclass(frozen=True)
class SplitInputs:
    stage: ClassVar[str] = "materialise"
    splits: tuple  # of InputSplit
    replace: bool = False


def _copies(x: torch.Tensor, n: int) -> torch.Tensor:
    if not n:
        return x.clone()
    return x.unsqueeze(2).expand(*x.shape[:2], n, *x.shape[2:]).clone()


def split_inputs(gm: fx.GraphModule, spec: SplitInputs) -> fx.GraphModule:
    with rewrite(gm) as rw:
        for s in spec.splits:
            entry = rw.node(s.entry)
            with rw.after(entry):
                copies = rw.create(_copies, (entry, s.n), name=rewritten("split_inputs", s.entry, s.kind), like=entry)
            if not spec.replace:
                continue
            by_target: dict = {}
            for r, j in zip(s.receivers, s.columns):
                if r.kind == "mlp":
                    redirect(rw, r, entry, copies)
                    continue
                by_target.setdefault((r.target, r.target_layout), []).append((r, j))
            for (target_name, layout), items in by_target.items():
                target = rw.node(target_name)
                with rw.after(target):
                    outs = []
                    for r, j in items:
                        xj = rw.create(_given, (copies, j))
                        outs.append(layout.read(rw.graph, _replay(rw, r.cone, entry, xj)))
                    read = layout.read(rw.graph, target)
                    merged = rw.create(_set_heads, (read, [r.head for r, _ in items], [None] * len(items), *outs))
                    written = layout.write(rw.graph, merged)
                rw.supersede(target, written, keep={read, merged, written} | _chain(read, target))
    return rw.result
