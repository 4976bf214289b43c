"""Models that fix the sequence length: one capture per length, and labels that stay sound.

Problem: state-space and hybrid models (Mamba, Mamba2, Jamba, Bamba, Falcon-H1, ...) loop over
positions in Python or cut the sequence into chunks, so torch.export specialises the sequence length
("your code specialized it to be a constant"); no dynamic-length graph exists. Everything downstream
labels an axis as the sequence axis by comparing its size with the capture's sequence symbol
(``sym_dims``, ``CapturedGraph.seq_symbol``). In a graph captured at a static length ``L`` that
symbol is the integer ``L``, and a size of the model that happens to equal ``L`` (``d_state``,
``d_conv``, a head count, a chunk size) would be taken for the sequence axis: a cache laid out wrong,
an intervention at a "position" that indexes the state.

Mechanism: such a model is captured per input length (``capture(model, seq_len=L)``), with a dynamic
batch dimension (every tested state-space family exports with one), and each capture is cached by
its owner of derived state (``engine.derived.Derived.at_length``). Labels are made sound by
comparing two captures: a size that does not depend on the length appears in the shapes of every
capture, so ``model_sizes(a) & model_sizes(b)`` for captures at two different lengths holds every
such size (and possibly a few length-derived ones that coincide: refusing those is safe). A length
in that set is refused (``ambiguous``), with the sizes it collides with and the lengths next to it
that work; every other length labels exactly the axes that carry it. The sequence symbol stays an
integer, so nothing downstream changes.

Example::

    sizes = model_sizes(cg5.module.graph) & model_sizes(cg7.module.graph)   # {8, 16, 64, 128, ...}
    ambiguous(8, sizes)        # True: at length 8 a state axis of size 8 looks like positions

Gotchas: each new length costs a capture (seconds for a small model; cached per length for the life
of the Model). A length equal to one of the model's own sizes is refused rather than guessed; pad
the input to another length (mark the padding 0 in attention_mask).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .nodes import tensor_meta

__all__ = ["model_sizes", "ambiguous", "nearby"]


def model_sizes(graph: fx.Graph) -> set[int]:
    """Every static size in the shapes of the graph's tensors (parameters and activations)."""
    out: set[int] = set()
    for node in graph.nodes:
        val = tensor_meta(node)
        if isinstance(val, torch.Tensor):
            out.update(int(d) for d in val.shape if isinstance(d, int))
    return out


def ambiguous(length: int, sizes: set[int]) -> bool:
    """Whether an axis of ``length`` could be one of the model's own sizes in a capture at that length."""
    return length in sizes


def nearby(length: int, sizes: set[int], lo: int = 1, hi: int | None = None) -> tuple[int | None, int | None]:
    """(the next longer, the next shorter) lengths that are not ambiguous, for the refusal message."""
    top = hi if hi is not None else length + 1024
    up = next((n for n in range(length + 1, top + 1) if n not in sizes), None)
    down = next((n for n in range(length - 1, max(lo, 1) - 1, -1) if n not in sizes), None)
    return up, down
