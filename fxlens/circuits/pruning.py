"""ACDC (Conmy et al.): prune the edges whose removal changes the metric by less than a threshold.

Problem: finding a circuit by removing edges one at a time costs a forward per edge per step.

Mechanism: receivers are visited from the logits back to the input; for each, every incoming edge's
removal is checked in one batched run (one row per candidate, ``edge_sweeps.full_rows``), then the
candidates are removed in order of increasing effect as long as removing them together stays within
the threshold (checked in a second batched run). Removed edges are patched from the corrupted run
(run with its own attention mask). The default metric is the KL divergence of the last position's
distribution from the full model's.

Example::

    found = acdc(model, clean, corrupted, threshold=0.05)          # a Circuit
"""

from __future__ import annotations

import math

import torch

from ..graphs.components import CircuitError
from .circuit import Circuit
from .edge_sweeps import full_rows
from .edges import paired_feeds, sender_values

__all__ = ["acdc"]


def _kl_metric(reference_logits: torch.Tensor, pos):
    """KL divergence of the distribution at ``pos`` ([batch] positions) from the reference run's."""
    rows = torch.arange(reference_logits.shape[0])
    ref = reference_logits[rows, pos].log_softmax(-1)

    def metric(logits):
        return torch.nn.functional.kl_div(logits[rows, pos].log_softmax(-1), ref, log_target=True, reduction="batchmean")

    return metric


def acdc(model, clean_tokens, corrupted_tokens, *, threshold: float, metric=None, attention_mask=None,
         corrupted_attention_mask=None, progress: bool = False) -> Circuit:
    """ACDC: the circuit that remains after pruning (see the module docstring).

    The default metric reads each row's last real token (the last position where ``attention_mask``
    is 1), so right-padded batches mean what they say.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold < 0:
        raise CircuitError(f"threshold must be a number >= 0 (the largest change of the metric an edge's removal may cause); got {threshold!r}")
    comp = model.derived.components
    comp.require_edges("ACDC")
    feed, corrupted = paired_feeds(model, clean_tokens, corrupted_tokens, attention_mask, corrupted_attention_mask,
                                   "ACDC patches removed edges from the corrupted run")
    with torch.no_grad():
        full_logits = model(feed["input_ids"], feed.get("attention_mask"))
    if metric is None:
        mask = feed.get("attention_mask")
        seq = feed["input_ids"].shape[1]
        last = (mask * torch.arange(seq, device=mask.device)).argmax(-1) if mask is not None else torch.full((feed["input_ids"].shape[0],), seq - 1)
        metric = _kl_metric(full_logits, last.cpu())
    alt = sender_values(model, corrupted["input_ids"], corrupted.get("attention_mask"))
    full = Circuit.full(model).edges
    current = set(full)

    def evaluate(extras: list) -> torch.Tensor:
        """The metric with the edges outside the current circuit, and each extra set, removed."""
        removed = full - current
        return full_rows(model, feed, [removed | extra for extra in extras], metric, alt)

    score = float(evaluate([set()])[0])
    for r in sorted(comp.receivers, key=lambda r: (-r.layer, -r.stage)):
        incoming = sorted(e for e in current if e[1] == r.name)
        if not incoming:
            continue
        effects = evaluate([{e} for e in incoming]) - score
        ranked = [incoming[i] for i in torch.argsort(effects).tolist() if effects[i] < threshold]
        if ranked:
            prefixes = [set(ranked[: k + 1]) for k in range(len(ranked))]
            totals = evaluate(prefixes) - score
            ok = [k for k in range(len(ranked)) if totals[k] < threshold]
            if ok:
                k = max(ok)
                current -= prefixes[k]
                score += float(totals[k])
        if progress:
            print(f"acdc: {r.name}: kept {sum(1 for e in current if e[1] == r.name)} of {len(incoming)} edges")
    return Circuit(current)
