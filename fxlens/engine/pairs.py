"""Datasets of prompt pairs streamed in chunks of pairs under a memory budget.

Problem: a sweep over a dataset of prompt pairs runs every prompt in every row, and its base run keeps
each block's residual input and attention keys and values for every prompt. Thousands of pairs, or
long prompts, do not fit at once: a row of one position then holds the whole dataset, and the base run
alone can exceed ``memory_budget`` whatever the rows' chunking.

Mechanism: ``chunks(model, batch, seq, memory_budget, declared)`` prices one prompt of the base run
(residuals and keys/values of every block, in the model's dtype) and one prompt of one row (a block's
widest activations), and cuts the batch into slices of prompts whose base run and a call of
``MIN_ROWS`` rows fit the budget (one slice, the whole batch, whenever it fits). ``run_chunks`` runs
the sweep on each slice (its inputs, the clean cache's values and the metric's per-prompt answers and
positions sliced alike), takes each prompt's values and reduces them as the metric itself does
(``Metric.reduce``), so the result equals the unchunked sweep's. ``last_sweep_stats["prompt_chunks"]``
says how many slices ran; ``progress`` shows a bar over the pairs.

Example::

    spans = chunks(model, batch=4096, seq=20, memory_budget=1.0, declared=True)   # [slice(0, 1365), ...]
    values = run_chunks(sweep, cells, feed, clean_cache, metric, spans, per_example=False, ...)

Gotchas: only a metric from ``fxlens.metrics`` can be sliced (a plain callable closes over answers for
the whole batch): a plain callable runs the batch at once, and says so when the budget asked for
chunks. Each prompt's values are its own whatever the chunking; the mean is the metric's mean over
every prompt (float rounding of a mean over a different order of sums aside).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from tqdm.auto import tqdm

from ..metrics import Metric

__all__ = ["chunks", "run_chunks", "slice_metric", "MIN_ROWS"]

MIN_ROWS = 8  # rows one block call should hold at least: fewer makes every call pay for reading the weights


def prompt_bytes(model, seq: int, declared: bool) -> tuple[int, int]:
    """(bytes one prompt of the base run keeps, bytes one prompt adds to one row of a block call)."""
    from .rows.schedule import row_bytes, widths

    d = model.graph.dims
    element = torch.empty((), dtype=model.captured.dtype).element_size()
    d_model, _, heads, _ = widths(d)
    d_head = int(d.get("d_head") or max(1, d_model // heads))
    layers = model.cfg.n_layers
    base = element * seq * (d_model * (layers + 1) + 2 * heads * d_head * layers)
    return base, row_bytes(d, element, seq, 0, 1, declared)  # the row engine's own estimate, for one prompt


def chunks(model, batch: int, seq: int, memory_budget: float, declared: bool) -> list:
    """Slices of the batch's prompts, each small enough that its base run and one call of ``MIN_ROWS``
    rows fit ``memory_budget`` GiB; ``[slice(0, batch)]`` when the whole batch does."""
    base, row = prompt_bytes(model, seq, declared)
    per = max(1, int(memory_budget * 2**30) // (base + MIN_ROWS * row))
    if per >= batch:
        return [slice(0, batch)]
    return [slice(i, min(batch, i + per)) for i in range(0, batch, per)]


def slice_metric(metric, span: slice, batch: int):
    """``metric`` for the prompts ``span`` of a batch of ``batch``: each per-prompt tensor (answers,
    positions) sliced; None when the metric cannot be sliced (not a dataclass of ``fxlens.metrics``)."""
    if not isinstance(metric, Metric) or not dataclasses.is_dataclass(metric):
        return None
    changes = {}
    for f in dataclasses.fields(metric):
        value = getattr(metric, f.name)
        if isinstance(value, Metric):
            inner = slice_metric(value, span, batch)
            if inner is None:
                return None
            changes[f.name] = inner
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] != batch:
                return None  # not per prompt of this batch: the unchunked run reports the mismatch
            changes[f.name] = value[span]
        elif isinstance(value, (list, tuple)) and len(value) == batch and batch > 1:
            changes[f.name] = torch.as_tensor(value)[span]
    return dataclasses.replace(metric, **changes)


class _Sliced:
    """The clean cache's values for a slice of the prompts (every site's layout is batch-first)."""

    def __init__(self, source, span: slice):
        self.source, self.span = source, span

    def __getitem__(self, name):
        return self.source[name][self.span]


def run_chunks(sweep, cells, feed: dict, source, metric, spans: list, *, per_example: bool, memory_budget: float,
               progress: bool) -> torch.Tensor:
    """The sweep over each slice of prompts in ``spans``: [len(cells), batch] per prompt with
    ``per_example``, else [len(cells)] reduced over every prompt as ``metric`` reduces."""
    batch = feed["input_ids"].shape[0]
    parts = []
    bar = tqdm(total=batch, desc="prompt pairs", disable=not progress)
    for span in spans:
        sub = {k: v[span] for k, v in feed.items()}
        part = sweep.run(cells, sub, _Sliced(source, span), slice_metric(metric, span, batch),
                         memory_budget=memory_budget, progress=progress, per_example=True)
        parts.append(part)
        bar.update(span.stop - span.start)
    bar.close()
    values = torch.cat(parts, dim=1)  # [cells, batch]
    sweep.model.last_sweep_stats["prompt_chunks"] = len(spans)
    return values if per_example else metric.reduce(values)


def plan(model, metric, batch: int, seq: int, memory_budget: float) -> list | None:
    """The slices to stream, or None to run the batch at once (it fits, or the metric cannot be sliced:
    then said once)."""
    declared = isinstance(metric, Metric)
    spans = chunks(model, batch, seq, memory_budget, declared)
    if len(spans) == 1:
        return None
    if isinstance(metric, Metric) and hasattr(metric, "reduce"):
        # a declared metric whose answers are not per prompt of this batch: the unchunked run refuses it
        return spans if slice_metric(metric, slice(0, 1), batch) is not None else None
    warnings.warn(
        f"{batch} prompts of {seq} tokens need more than memory_budget={memory_budget} GiB at once, but a plain "
        "callable metric cannot be split by prompt (it reads answers for the whole batch): running them in one "
        "batch. Use a metric from fxlens.metrics (per-prompt answers and positions as [batch] tensors) to stream "
        "them in chunks",
        UserWarning,
        stacklevel=4,
    )
    return None
