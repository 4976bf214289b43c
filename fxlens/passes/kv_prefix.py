"""KV-prefix pass: let a block attend to keys and values of earlier positions it does not compute.

Problem: in a causal model, a patch at position p changes nothing before p. A sweep therefore runs a
patched row only on positions p.. ; the attention at those positions still needs the keys and values
of positions < p, which are the unpatched (base) run's.

Mechanism: for each attention op, the k and v operands are replaced, for the attention op only, by
``cat([prefix, x], dim=-2)`` where ``prefix`` is a new graph input ``{name}`` holding the base run's
keys or values for the earlier positions ([batch or 1, heads, p, d_head], as the attention op sees
them). Everything else in the block (projections, rotary, MLP) runs on the suffix positions only; the
engine feeds the block its positional context (mask rows, cos/sin) sliced to those positions.

The joined keys (values) are the node ``joined(operand)``. A ``KVBuffer`` fed as the prefix is a static
cache: the new keys are written into it after the prefix, in place, and the joined node is a view of it
(generation: one position written per step instead of the whole cache copied).

Example::

    gm = kv_prefix(gm, KVPrefix((("reshape", "scaled_dot_product_attention", "fxl_kpre_3"),
                                 ("reshape_1", "scaled_dot_product_attention", "fxl_vpre_3"))))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from .base import PassError, rewrite

__all__ = ["KVPrefix", "kv_prefix", "joined", "KVBuffer"]


def joined(operand: str) -> str:
    """Name of the node holding the prefix and ``operand`` joined (what the attention reads): a caller that
    keeps a key/value cache reads it as the cache's next state."""
    return f"{operand}__with_prefix"


@dataclass(frozen=True)
class KVPrefix:
    stage: ClassVar[str] = "layout"
    uses: tuple  # of (operand node, consumer node, input name)


class KVBuffer:
    """A growing key (or value) cache held in one preallocated tensor (a static cache): the prefix is its
    first ``length`` positions, and the new positions are written after them in place, with no copy of
    the prefix. The owner calls ``advance(n)`` once a step's positions are final."""

    def __init__(self, first: torch.Tensor, capacity: int):
        capacity = max(capacity, first.shape[-2])
        self.data = first.new_empty(*first.shape[:-2], capacity, first.shape[-1])
        self.data[..., : first.shape[-2], :] = first
        self.length = first.shape[-2]

    @property
    def shape(self) -> torch.Size:
        return self.view().shape

    def view(self) -> torch.Tensor:
        return self.data.narrow(-2, 0, self.length)

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """The prefix joined with ``x`` (written after it; the buffer doubles when full)."""
        end = self.length + x.shape[-2]
        if end > self.data.shape[-2]:
            grown = self.data.new_empty(*self.data.shape[:-2], max(end, 2 * self.data.shape[-2]), self.data.shape[-1])
            grown[..., : self.length, :] = self.view()
            self.data = grown
        self.data.narrow(-2, self.length, x.shape[-2]).copy_(x)  # narrow + copy_: no indexing parse per step
        return self.data.narrow(-2, 0, end)

    def advance(self, n: int) -> None:
        self.length += n


def _prepend(prefix, x: torch.Tensor) -> torch.Tensor:
    if isinstance(prefix, KVBuffer):
        if prefix.data.shape[0] != x.shape[0]:
            raise ValueError(f"a key/value buffer of batch {prefix.data.shape[0]} cannot take {x.shape[0]} rows")
        return prefix.append(x)
    if prefix.shape[-2] == 0:
        return x
    if prefix.shape[0] != x.shape[0]:
        prefix = prefix.expand(x.shape[0], *prefix.shape[1:])
    return torch.cat([prefix.to(x.dtype), x], dim=-2)


def kv_prefix(gm: fx.GraphModule, spec: KVPrefix) -> fx.GraphModule:
    with rewrite(gm) as rw:
        for operand, consumer, name in spec.uses:
            x, user = rw.node(operand), rw.node(consumer)
            if x not in user.all_input_nodes:
                raise PassError(f"{spec}: {consumer} does not read {operand}")
            prefix = rw.placeholder(name)
            with rw.graph.inserting_before(user):
                cat = rw.create(_prepend, (prefix, x), name=joined(operand))
            user.replace_input_with(x, cat)
    return rw.result
