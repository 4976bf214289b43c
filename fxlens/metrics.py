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

__all__ = ["Metric", "Several", "logit_diff", "logit", "normalized"]


def _as_index(value, batch: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.long)
    return t.expand(batch) if t.dim() == 0 else t


def _token_ids(value, what: str):
    """``value`` checked as vocabulary ids: integers, none negative (a negative id would silently read
    an entry counted from the end of the vocabulary)."""
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what} must be integer token ids (an int or an integer tensor); got {value!r}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(
            f"{what}={int(t.min())} is a negative token id; token ids count from 0 (use model.to_single_token(...) "
            "or model.cfg.d_vocab_out - 1 for the last entry)"
        )
    return value


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

    def per_example(self, selected: torch.Tensor) -> torch.Tensor:
        """The metric of each prompt before the batch reduction, [rows, batch] (``reduce="none"`` sweeps)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-prompt values")

    def check_vocab(self, n_vocab: int, seq: int, batch: int) -> None:
        """Refuse a token id beyond logits of ``n_vocab`` entries, for an input of ``batch`` x ``seq`` tokens
        (the metric itself does not know the model; whoever holds the logits checks)."""
        _, tok = self.select(seq, batch)
        if tok.numel() and int(tok.max()) >= n_vocab:
            raise ValueError(
                f"the metric reads token id {int(tok.max())}, but the logits have {n_vocab} entries (ids 0..{n_vocab - 1})"
            )

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3:
            raise ValueError(f"the metric expects logits [batch, pos, vocab]; got shape {tuple(logits.shape)}")
        batch, seq, n_vocab = logits.shape
        self.check_vocab(n_vocab, seq, batch)
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

    def per_example(self, selected: torch.Tensor) -> torch.Tensor:
        return selected[..., 0, 0] - selected[..., 0, 1]  # [rows, batch]

    def from_selected(self, selected: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.per_example(selected))

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """The batch reduction of per-prompt values [..., batch] (a sweep streamed in chunks of prompts)."""
        return values.mean(-1) if self.mean else values.sum(-1)


@dataclass
class _Logit(Metric):
    token: object
    pos: object = -1

    def select(self, seq: int, batch: int):
        return _positions(self.pos, batch, seq)[:, None], _as_index(self.token, batch)[:, None]

    def per_example(self, selected: torch.Tensor) -> torch.Tensor:
        return selected[..., 0, 0]

    def from_selected(self, selected: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.per_example(selected))

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values.mean(-1)


@dataclass
class _Normalized(Metric):
    inner: Metric
    clean: float
    corrupted: float

    def select(self, seq: int, batch: int):
        return self.inner.select(seq, batch)

    def from_selected(self, selected: torch.Tensor) -> torch.Tensor:
        return (self.inner.from_selected(selected) - self.corrupted) / (self.clean - self.corrupted)

    def per_example(self, selected: torch.Tensor) -> torch.Tensor:
        return (self.inner.per_example(selected) - self.corrupted) / (self.clean - self.corrupted)

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        span = self.clean - self.corrupted
        return (self.inner.reduce(values * span + self.corrupted) - self.corrupted) / span


def logit_diff(answer, wrong, pos=-1, reduce: str = "mean") -> Metric:
    """Mean over the batch of logit[answer] - logit[wrong] at ``pos`` (ints or [batch] tensors)."""
    if reduce not in ("mean", "sum"):
        raise ValueError("reduce must be 'mean' or 'sum'")
    return _LogitDiff(_token_ids(answer, "answer"), _token_ids(wrong, "wrong"), pos, reduce == "mean")


def logit(token, pos=-1) -> Metric:
    """Mean over the batch of logit[token] at ``pos``."""
    return _Logit(_token_ids(token, "token"), pos)


def normalized(metric: Metric, clean: float, corrupted: float) -> Metric:
    """(metric - corrupted) / (clean - corrupted): 0 at the corrupted run, 1 at the clean run."""
    if float(clean) == float(corrupted):
        raise ValueError(
            f"clean and corrupted are both {float(clean)}: the normalised metric would divide by zero; "
            "pick inputs on which the metric differs"
        )
    return _Normalized(metric, float(clean), float(corrupted))


class Several:
    """Several metrics evaluated on the same logits: ``{name: metric}`` in, a [n_metrics] tensor out
    ([n_metrics, batch] with ``per_prompt``: each metric's per-prompt values). A sweep given a mapping of
    metrics runs once and reads each row's logits once for all of them: this callable is traced like
    any plain metric (``engine.metric_reads``), so only the logits some metric reads are computed.
    Declared metrics give their per-prompt values from their own reads."""

    def __init__(self, metrics: dict, per_prompt: bool = False):
        if not metrics:
            raise ValueError("a mapping of metrics must hold at least one metric")
        bad = [k for k, m in metrics.items() if not callable(m)]
        if bad:
            raise TypeError(f"every metric must be a callable on logits; {bad[0]!r} is not")
        self.metrics = dict(metrics)
        self.per_prompt = per_prompt

    @property
    def names(self) -> list:
        return list(self.metrics)

    @property
    def lead(self) -> tuple:
        return (len(self.metrics),)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        out = []
        for name, m in self.metrics.items():
            if isinstance(m, Metric):  # through its own reads, so that tracing sees plain indexing
                b, s, _ = logits.shape
                pos, tok = _selection(m, s, b)
                sel = logits[torch.arange(b)[:, None, None], pos.to(logits.device)[:, :, None], tok.to(logits.device)[:, None, :]]
                value = (m.per_example if self.per_prompt else m.from_selected)(sel[None])[0]
            else:
                value = m(logits)
            value = torch.as_tensor(value, dtype=torch.float32, device=logits.device)
            want = (logits.shape[0],) if self.per_prompt else ()
            if value.numel() != (want[0] if want else 1):
                raise ValueError(
                    f"metric {name!r} returned shape {tuple(value.shape)}; "
                    + ("reduce='none' needs one value per prompt" if self.per_prompt else "a sweep metric must return a scalar")
                )
            out.append(value.reshape(want).float())
        return torch.stack(out)


def _selection(metric: Metric, seq: int, batch: int):
    """``metric.select(seq, batch)`` computed eagerly, also while a caller traces (``engine.metric_reads``):
    the positions and tokens are constants of the metric, and checking them reads their values."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        return metric.select(seq, batch)
