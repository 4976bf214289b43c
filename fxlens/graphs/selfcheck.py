"""Does the captured graph compute what the HF model computes? Asked once, at capture time.

Problem: a capture can succeed and still be wrong: an operation dropped or traced with the wrong
specialisation gives logits that are off, NaN, or different between identical calls, and every
result built on them (caches, patching, circuits) is then wrong without a word. A wrapper that is
exact or refuses must notice this before it hands out a Model.

Mechanism: capture's causality probe already runs the graph on a small input (``causality.probe``);
the HF model runs once on the same input with the same flags, and every tensor output the two
share is compared. The tolerance depends on the dtype (``TOLERANCE``), relative to the output's
largest magnitude (at least 1): the graph runs the HF model's own kernels, so a correct capture is
bit-identical or within a few rounding steps, and a dropped or wrong operation is far outside.
NaN must be NaN at the same places; infinities must match.

Example::

    mismatch = compare(probe.outputs, hf_output, torch.float32)
    if mismatch is not None:
        raise CaptureError(mismatch.describe("LlamaForCausalLM"))

Gotchas: the probe is one short sequence without padding; it proves the graph matches at one shape
(shape-dependent errors elsewhere are the dynamic-shape capture's business). Integer outputs must be
equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["TOLERANCE", "Mismatch", "compare", "tolerance"]

# Largest allowed |graph - model| per unit of the output's scale, max(1, max |model output|).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 1e-4)


@dataclass(frozen=True)
class Mismatch:
    output: str  # the output field ("logits")
    index: tuple[int, ...]  # where the largest difference is
    expected: float  # the HF model's value there
    got: float  # the graph's value there
    difference: float
    allowed: float
    dtype: torch.dtype
    length: int  # the probe's sequence length
    shapes: tuple = ()  # (graph's shape, model's shape) when they differ

    def where(self) -> str:
        parts = [f"index {list(self.index)}"]
        if len(self.index) >= 2:
            parts.append(f"batch row {self.index[0]}, position {self.index[1]}")
        return " (".join(parts) + (")" if len(parts) > 1 else "")

    def describe(self, model_name: str) -> str:
        if self.shapes:
            what = f"output {self.output!r} has shape {list(self.shapes[0])} in the graph but {list(self.shapes[1])} in the model"
        else:
            what = (f"output {self.output!r} differs by {self.difference:.4g} at {self.where()}: the model gives "
                    f"{self.expected:.6g}, the graph {self.got:.6g} (allowed for {str(self.dtype).replace('torch.', '')}: "
                    f"{self.allowed:.3g})")
        return (
            f"the captured graph of {model_name} does not compute what the model computes: on a probe input "
            f"of {self.length} tokens, {what}. fxlens refuses to wrap a model it would compute wrongly.\n"
            "What to do: report this to the fxlens developers with the model's class and config; meanwhile try "
            "Model.from_hf(model, attn_implementation='eager') (or 'sdpa'), which captures a different attention code path."
        )


def _largest(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    same = (got == ref) | (torch.isnan(got) & torch.isnan(ref))
    diff = (got - ref).abs().nan_to_num(nan=float("inf"), posinf=float("inf"))
    diff = torch.where(same, torch.zeros_like(diff), diff)
    flat = int(diff.argmax()) if diff.numel() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.numel() else ()
    return float(diff.flatten()[flat]) if diff.numel() else 0.0, index


def compare(outputs: Mapping, reference: Mapping, dtype: torch.dtype, length: int = 0) -> Mismatch | None:
    """The worst disagreement between the graph's ``outputs`` and the model's ``reference`` outputs
    beyond the dtype's tolerance, or None when every shared tensor output agrees."""
    worst = None
    for name, got in outputs.items():
        ref = reference.get(name) if hasattr(reference, "get") else None
        if not isinstance(got, torch.Tensor) or not isinstance(ref, torch.Tensor):
            continue
        if got.shape != ref.shape:
            return Mismatch(name, (), float("nan"), float("nan"), float("inf"), 0.0, dtype, length,
                            shapes=(tuple(got.shape), tuple(ref.shape)))
        if not got.numel():
            continue
        got = got.to(ref.device)  # a model spread over devices: accelerate returns outputs on the input's device
        difference, index = _largest(got, ref)
        if got.is_floating_point() or got.is_complex():
            finite = ref[torch.isfinite(ref)]
            scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
            allowed = tolerance(ref.dtype) * scale
        else:
            allowed = 0.0
        if difference > allowed and (worst is None or difference / max(allowed, 1e-30) > worst.difference / max(worst.allowed, 1e-30)):
            worst = Mismatch(name, index, float(ref[index]), float(got[index]), difference, allowed, ref.dtype, length)
    return worst
