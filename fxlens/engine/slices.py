"""Slice: TransformerLens' ``pos_slice`` / ``batch_slice`` / ``neuron_slice`` arguments.

Problem: TransformerLens' cache helpers take a position (or batch, or neuron) selection in one of
several forms, and an int must drop the axis where a Python slice would keep it. Code ported from
TransformerLens passes these forms unchanged, including TransformerLens' own ``Slice`` objects.

Mechanism: ``Slice(x)`` normalises the input once: None is the identity, an int indexes (the axis
goes), a tuple ``(k,)``/``(start, stop[, step])`` or a ``slice`` keeps the axis, and a list, tensor or
array of indices gathers them in that order. ``apply(tensor, dim)`` indexes one axis.

Example::

    Slice(-1).apply(resid, dim=-2)          # [batch, d_model]: the last position
    Slice([0, 3]).apply(resid, dim=-2)      # [batch, 2, d_model]
    Slice((1, 4)).apply(resid, dim=-2)      # positions 1, 2, 3

Gotchas: a tuple means ``slice(*tuple)``, so ``(4,)`` is ``[:4]``, not position 4, as in
TransformerLens.
"""

from __future__ import annotations

import torch

__all__ = ["Slice"]


class Slice:
    def __init__(self, input_slice=None):
        if isinstance(input_slice, Slice) or (hasattr(input_slice, "mode") and hasattr(input_slice, "slice")):
            self.slice, self.mode = input_slice.slice, input_slice.mode  # ours, or TransformerLens' own
            if self.mode == "array":
                self.slice = torch.as_tensor(self.slice, dtype=torch.long).flatten()
            return
        if isinstance(input_slice, torch.Tensor) and input_slice.ndim == 0:
            input_slice = int(input_slice)
        if isinstance(input_slice, bool):
            raise TypeError(f"a slice must be None, an int, a tuple, a slice or a list of indices; got {input_slice!r}")
        if input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        elif isinstance(input_slice, int) or type(input_slice).__module__ == "numpy" and getattr(input_slice, "ndim", 1) == 0:
            self.slice, self.mode = int(input_slice), "int"
        elif isinstance(input_slice, tuple):
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, (list, torch.Tensor)) or hasattr(input_slice, "__array__"):
            self.slice, self.mode = torch.as_tensor(input_slice, dtype=torch.long).flatten(), "array"
        else:
            raise TypeError(f"a slice must be None, an int, a tuple, a slice or a list of indices; got {input_slice!r}")

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if self.mode == "identity":
            return tensor
        index = [slice(None)] * tensor.ndim
        index[dim] = self.slice.to(tensor.device) if self.mode == "array" else self.slice
        return tensor[tuple(index)]

    def indices(self, length: int) -> torch.Tensor:
        """The indices this slice selects from an axis of ``length`` (an int gives a 0-d tensor)."""
        return self.apply(torch.arange(length), 0)

    def __repr__(self) -> str:
        return f"Slice({self.slice!r})"
