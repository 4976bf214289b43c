"""Read-out: the metric of each row from its final hidden states, computing only what the metric reads.

Problem: a sweep's rows end in a metric. A declared metric (``fxlens.metrics``) reads a few positions
and vocabulary entries; the head should compute the final norm at those positions and the
unembedding on those entries only. A plain callable needs full logits, and a row that never computed
the positions before its start must take the base run's logits there.

Mechanism: ``Readout(blocks, base, metric, model=model, suffixes=...)`` checks the metric once against this input (positions,
token ids, the batch size of per-row answers), then reads rows laid out padded (``padded``: [rows *
batch, seq - start, d]) or packed (``packed``: [batch, T, d] with each token's row and position). A
declared metric goes through the head with the vocabulary-selecting pass (``SelectVocab``); positions a
row never computed take the base run's selected logits. A plain callable is traced once to find
what it reads (``metric_reads``) and then runs like a declared metric, on the same selected logits;
one that cannot be traced gets full logits. ``base_value`` is the metric of the base run itself (for
rows that change nothing).

Example::

    readout = Readout(blocks, base, metrics.logit_diff(a, b), model=model, suffixes=engine.suffixes)
    values = readout.padded(h, start=4, n_rows=12)        # [12]
"""

from __future__ import annotations

import torch

from ...metrics import Metric
from ...passes import PassError
from ..metric_reads import reads_of
from ..plan import PlanBuilder
from .rows import RowError

__all__ = ["Readout", "MetricError"]


class MetricError(RowError):
    """A metric that does not fit the input or returns something other than a scalar."""


class Readout:
    def __init__(self, blocks, base, metric, *, model, suffixes: bool, per_example: bool = False):
        if not callable(metric):
            raise MetricError(f"the metric must be a callable on logits (or from fxlens.metrics); got {type(metric).__name__}")
        derived = model.derived
        if derived.captured.logits is None:
            raise MetricError(derived.no_logits("a metric"))
        self.model = model
        self.blocks = blocks  # None when rows run on the whole model
        self.suffixes = suffixes  # whether the last block may run the positions the metric reads alone (``RowEngine.suffixes``)
        self.base = base
        self.metric = metric
        if not isinstance(metric, Metric):  # a plain callable: what it reads, when tracing can prove it
            vocab = derived.graph.dims.get("d_vocab_out") or derived.graph.dims.get("d_vocab")
            meta = derived.captured.logits_meta
            # [batch, pos, vocab] logits only (a sequence-classification head's [batch, labels] is read whole)
            shape = (base.batch, base.seq, int(vocab)) if vocab and meta is not None and meta.dim() == 3 else None
            reads = reads_of(metric, shape, derived.captured.logits_dtype, derived.captured.device) if shape else None
            self.metric = reads if reads is not None else metric
        self.declared = isinstance(self.metric, Metric)
        self.per_example = per_example
        self.lead = tuple(getattr(metric, "lead", ()))  # [n_metrics] for several metrics at once
        self.value_shape = self.lead + ((base.batch,) if per_example else ())  # of each row's metric value
        if self.declared:
            self._check_shape()
            vocab = derived.graph.dims.get("d_vocab_out") or derived.graph.dims.get("d_vocab")
            self.pos, self.tok = _checked_select(self.metric, base.seq, base.batch, vocab)

    def _check_shape(self) -> None:
        """A declared or traced metric gives what was asked: one number per row, or one per prompt."""
        per_prompt = getattr(self.metric, "per_prompt", None)
        if per_prompt is None:  # fxlens.metrics: both are available
            return
        if self.per_example and not per_prompt:
            raise MetricError(
                "reduce='none' needs one value per prompt: return a [batch] tensor from the metric (leave out "
                "the .mean()), or use fxlens.metrics, whose metrics give per-prompt values"
            )
        if not self.per_example and per_prompt and self.base.batch != 1:
            raise MetricError(
                f"the metric must return a scalar; it returns shape ({self.base.batch},), one value per prompt "
                "(reduce over the batch, e.g. .mean(), or pass reduce='none' for per-prompt results)"
            )

    def values(self, selected: torch.Tensor) -> torch.Tensor:
        """A declared metric's value of each row from selected logits [rows, batch, n_pos, n_tok]."""
        if self.per_example:
            return self.metric.per_example(selected)
        return self.metric.from_selected(selected).reshape(selected.shape[0], *self.value_shape)

    # ---- what the metric reads ---------------------------------------------------------------------
    @property
    def reads(self) -> str:
        """What each row computes logits for: ``"3 positions x 2 tokens"``, or ``"full logits"``."""
        if not self.declared:
            return "full logits"
        return f"{self.pos.unique().numel()} positions x {self.tok.unique().numel()} tokens"

    def first_read(self, start: int) -> int:
        """The first position the metric reads at or after ``start`` (``start`` for a plain callable)."""
        if not (self.declared and self.suffixes):
            return start
        return max(start, int(self.pos.min()))

    def base_value(self) -> torch.Tensor:
        """The metric of the base run itself, of shape ``value_shape``."""
        if self.blocks is None:  # rows run on the whole model: so does the base run
            from .rows import Row
            from .whole import run_whole

            return run_whole(self.model, [Row(0)], self.base.feed, self, max_rows=1)[0]
        if self.declared:
            return self.values(self._base_selected()[None])[0].float().cpu()
        return self.per_row(self._base_logits()[None])[0].float().cpu()

    # ---- rows ----------------------------------------------------------------------------------
    def padded(self, h: torch.Tensor, start: int, n_rows: int) -> torch.Tensor:
        """Rows laid out [n_rows * batch, seq - start, d]."""
        b0 = self.base.batch
        if self.declared:
            rel = (self.pos - start).clamp(min=0).repeat(n_rows, 1)  # [rows*b0, n_pos]
            hs = h[torch.arange(h.shape[0], device=h.device)[:, None], rel.to(h.device)]
            return self._declared(hs, (self.pos < start).repeat(n_rows, 1), n_rows)
        logits = self.full(h)
        if start:
            logits = torch.cat([self._base_logits()[:, :start].repeat(n_rows, 1, 1), logits], dim=1)
        return self.per_row(logits.view(n_rows, b0, *logits.shape[1:]))

    def packed(self, h: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Rows packed [batch, T, d]; token t is position ``pos[t]`` of row ``row[t]``."""
        b0, seq = self.base.batch, self.base.seq
        if self.declared:
            slot = torch.full((n_rows, seq), -1, dtype=torch.long)  # (row, position) -> packed token
            slot[row, pos] = torch.arange(row.shape[0])
            idx = slot[:, self.pos]  # [rows, b0, n_pos]; -1: a position before the row's start
            hs = h[torch.arange(b0)[None, :, None], idx.clamp(min=0).to(h.device)].reshape(n_rows * b0, self.pos.shape[1], -1)
            return self._declared(hs, (idx < 0).reshape(n_rows * b0, -1), n_rows)
        logits = self.full(h)  # [b0, T, vocab]
        full = self._base_logits().unsqueeze(0).repeat(n_rows, 1, 1, 1)
        full[row, :, pos] = logits.permute(1, 0, 2).to(full.dtype)
        return self.per_row(full)

    def final(self, h: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Rows of final hidden states for every position, [n_rows * batch, seq, d]."""
        return self.padded(h, 0, n_rows)

    # ---- the head -------------------------------------------------------------------------------
    def full(self, h: torch.Tensor) -> torch.Tensor:
        out = self.blocks.head.get(())(**self.blocks.head_feed(h, self.base.context))["outputs"]
        return out[self.blocks.captured.logits]

    def _select(self, hs: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
        unembed = self.blocks.graph.structure.unembed
        b = PlanBuilder(self.blocks.graph).select_vocab(unembed, vocab.to(hs.device))
        plan, inputs = b.build()
        feed = self.blocks.head_feed(hs, self.base.context)
        try:
            prog = self.blocks.head.get(plan)
        except PassError:  # the head is not a plain linear unembedding: compute every entry
            return self.full(hs)[..., vocab.to(hs.device)]
        return prog(**feed, **inputs)["outputs"][self.blocks.captured.logits]

    def _selected(self, hs: torch.Tensor, n_rows: int) -> torch.Tensor:
        """The logits the metric reads from hidden states at its positions, [rows*B0, n_pos, n_tok]."""
        vocab, inverse = torch.unique(self.tok.flatten(), return_inverse=True)
        logits = self._select(hs, vocab)  # [rows*b0, n_pos, |vocab|]
        index = inverse.view(self.base.batch, 1, -1).repeat(n_rows, hs.shape[1], 1).to(logits.device)
        return logits.gather(-1, index)

    def _declared(self, hs: torch.Tensor, early: torch.Tensor, n_rows: int) -> torch.Tensor:
        """The metric per row from hidden states at its positions; where ``early`` the row never
        computed that position and the base run's logits stand."""
        sel = self._selected(hs, n_rows)
        if early.any():
            base = self._base_selected().repeat(n_rows, 1, 1)
            sel = torch.where(early[..., None].to(sel.device), base.to(sel.dtype), sel)
        return self.values(sel.view(n_rows, self.base.batch, *sel.shape[1:]))

    def _base_logits(self) -> torch.Tensor:
        if self.base.full_logits is None:
            self.base.full_logits = self.full(self.base.final)
        return self.base.full_logits

    def _base_selected(self) -> torch.Tensor:
        key = id(self.metric)
        if key not in self.base.selected:
            b0 = self.base.batch
            if self.base.full_logits is not None:
                sel = self.base.full_logits[torch.arange(b0)[:, None, None], self.pos[:, :, None], self.tok[:, None, :]]
            else:
                hs = self.base.final[torch.arange(b0)[:, None], self.pos.to(self.base.final.device)]
                sel = self._selected(hs, 1)
            self.base.selected[key] = (self.metric, sel)  # the metric is kept so that its id stays its own
        return self.base.selected[key][1]

    def per_row(self, logits: torch.Tensor) -> torch.Tensor:
        """A plain callable metric on each row's full logits [rows, B0, S, vocab]."""
        if self.lead:  # metrics.Several checks each metric's value itself: a wrong one is the user's metric
            try:
                return torch.stack([self.metric(rows_logits).reshape(self.value_shape) for rows_logits in logits])
            except ValueError as err:
                raise MetricError(str(err)) from None
        if self.per_example:
            return torch.stack([per_prompt(self.metric(rows_logits), self.base.batch) for rows_logits in logits])
        return torch.stack([scalar(self.metric(rows_logits)) for rows_logits in logits])


def scalar(value) -> torch.Tensor:
    """A metric's value as a 0-d tensor, or a MetricError that says what it returned."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    if not isinstance(value, torch.Tensor):
        raise MetricError(f"the metric must return a number or a scalar tensor; it returned {type(value).__name__} {value!r:.60}")
    if value.numel() != 1:
        raise MetricError(
            f"the metric must return a scalar; it returned shape {tuple(value.shape)} (reduce over the batch, e.g. .mean(), "
            "or pass reduce='none' for per-prompt results)"
        )
    return value.reshape(())


def per_prompt(value, batch: int) -> torch.Tensor:
    """A metric's per-prompt values as a [batch] tensor (``reduce="none"``), or a MetricError."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) not in ((batch,), (batch, 1)):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise MetricError(
            f"reduce='none' needs one value per prompt, a tensor of shape ({batch},); the metric returned {shape} "
            "(leave out the reduction over the batch)"
        )
    return value.reshape(batch)


def _checked_select(metric: Metric, seq: int, batch: int, vocab: int | None):
    try:
        pos, tok = metric.select(seq, batch)
    except (IndexError, ValueError, RuntimeError) as err:
        raise MetricError(f"the metric does not fit this input ({batch} rows of {seq} positions): {err}") from None
    if pos.shape[0] != batch or tok.shape[0] != batch:
        rows = tok.shape[0] if tok.shape[0] != batch else pos.shape[0]
        raise MetricError(f"the metric's per-row answers or positions have {rows} rows; the input has {batch}")
    if vocab is not None:
        try:
            metric.check_vocab(vocab, seq, batch)
        except ValueError as err:
            raise MetricError(str(err)) from None
    return pos, tok
