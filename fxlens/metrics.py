"""Patching metrics that declare what they read, so a sweep computes only those logits.

Problem: a patching sweep's metric usually reads a handful of logits (two tokens at the last position)
but a plain callable must be handed the full [batch, pos, vocab] logits, which for a 49k-token
vocabulary costs more than several transformer layers per row.

Mechanism: a ``Metric`` is a callable on full logits (so it works anywhere TransformerLens expects a
metric) that also states ``positions`` and ``tokens``. A sweep then runs the final norm on those
positions only and the unembedding on those vocabulary rows only, and calls ``from_selected`` on a
[rows, batch, positions, tokens] tensor.

Example::

    metric = fxlens.metrics.logit_diff(model.to_single_token(" Paris"), model.to_single_token(" Rome"))
    metric(logits)                       # scalar, like any TransformerLens metric
    patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)   # reads 2 logits per row

Gotchas: per-prompt answers (IOI) are tensors of shape [batch]; positions may be an int (-1) or a
[batch] tensor (the last real token of each right-padded prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Metric", "logit_diff", "logit", "normalized"]


def _as_index(value, batch: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.long)
    return t.expand(batch) if t.dim() == 0 else t


def _positions(value, batch: int, seq: int) -> torch.Tensor:
    pos = _as_index(value, batch)
    bad = pos[(pos >= seq) | (pos < -seq)]
    if bad.numel():
        raise IndexError(f"the metric reads position {int(bad[0])}, but the input has positions 0..{seq - 1} (or -{seq}..-1)")
    return pos % seq


class Metric:
    """A metric with declared reads. Subclasses implement ``from_selected``."""

    positions: tuple  # absolute or negative positions, or None for every position
    tokens: tuple  # vocabulary ids, or None for the whole vocabulary

    def select(self, seq: int, batch: int):
        """(position index [batch, n_pos], token index [batch, n_tok]) for an input of this size."""
        raise NotImplementedError

    def from_selected(self, selected: torch.Tensor) -> torch.Tensor:
        """Metric per row from logits [rows, batch, n_pos, n_tok] gathered as ``select`` says."""
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = logits.shape
        pos, tok = self.select(seq, batch)
        rows = torch.arange(batch)[:, None, None]
        sel = logits[rows, pos[:, :, None], tok[:, None, :]]
        return self.from_selected(sel[None])[0]


@dataclass
class _LogitDiff(Metric):
    answer: object
    wrong: object
    pos: object = -1
    mean: bool = True

    def select(self, seq: int, batch: int):
        pos = _positions(self.pos, batch, seq)
        tok = torch.stack([_as_index(self.answer, batch), _as_index(self.wrong, batch)], dim=1)
        return pos[:, None], tok

    def from_selected(self, selected: torch.Tensor) -> torch.Tensor:
        diff = selected[..., 0, 0] - selected[..., 0, 1]  # [rows, batch]
        return diff.mean(-1) if self.mean else diff.sum(-1)


@dataclass
class _Logit(Metric):
    token: object
    pos: object = -1

    def select(self, seq: int, batch: int):
        return _positions(self.pos, batch, seq)[:, None], _as_index(self.token, batch)[:, None]

    def from_selected(self, selected: torch.Tensor) -> torch.Tensor:
        return selected[..., 0, 0].mean(-1)


@dataclass
class _Normalized(Metric):
    inner: Metric
    clean: float
    corrupted: float

    def select(self, seq: int, batch: int):
        return self.inner.select(seq, batch)

    def from_selected(self, selected: torch.Tensor) -> torch.Tensor:
        return (self.inner.from_selected(selected) - self.corrupted) / (self.clean - self.corrupted)


def logit_diff(answer, wrong, pos=-1, reduce: str = "mean") -> Metric:
    """Mean over the batch of logit[answer] - logit[wrong] at ``pos`` (ints or [batch] tensors)."""
    if reduce not in ("mean", "sum"):
        raise ValueError("reduce must be 'mean' or 'sum'")
    return _LogitDiff(answer, wrong, pos, reduce == "mean")


def logit(token, pos=-1) -> Metric:
    """Mean over the batch of logit[token] at ``pos``."""
    return _Logit(token, pos)


def normalized(metric: Metric, clean: float, corrupted: float) -> Metric:
    """(metric - corrupted) / (clean - corrupted): 0 at the corrupted run, 1 at the clean run."""
    return _Normalized(metric, float(clean), float(corrupted))
