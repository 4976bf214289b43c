"""Activation patching with TransformerLens' names, signatures and result shapes, run as batched programs.

Problem: ``transformer_lens.patching`` runs one hooked forward per patch. The same sweep, expressed as
cells (site + index), can run as a few batched programs that share the corrupted run's prefix
(``engine/sweep.py``).

Mechanism: each ``get_act_patch_*`` names an activation and the axes it sweeps, exactly as in
TransformerLens; ``generic_activation_patch`` turns the grid (or ``index_df``) into cells and runs
them with ``Sweep``. A result equals TransformerLens' one-forward-per-patch semantics: the clean
activation at the index replaces the corrupted one in every batch row, and the metric is evaluated on
the patched corrupted run's logits.

Example::

    from fxlens import patching, metrics
    metric = metrics.logit_diff(model.to_single_token(" Paris"), model.to_single_token(" Rome"))
    _, clean_cache = model.run_with_cache(clean_tokens)
    out = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric)   # [n_layers, pos]

Gotchas: a metric from ``fxlens.metrics`` lets the sweep compute only the logits it reads; any callable
``metric(logits) -> scalar`` works too. A custom ``patch_setter`` (not one of the setters below) runs
one hooked forward per cell, as TransformerLens does.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch

from .engine import pairs
from .engine.sweep import Cell, Sweep, SweepError
from .metrics import Several

__all__ = [
    "SweepError",
    "generic_activation_patch",
    "layer_pos_patch_setter",
    "layer_pos_head_vector_patch_setter",
    "layer_head_vector_patch_setter",
    "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter",
    "layer_head_dest_src_pos_pattern_patch_setter",
    "layer_expert_vector_patch_setter",
    "layer_pos_expert_vector_patch_setter",
    "get_act_patch_resid_pre",
    "get_act_patch_resid_mid",
    "get_act_patch_attn_out",
    "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_expert_out_all_pos",
    "get_act_patch_expert_out_by_pos",
    "get_act_patch_block_every",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
    "make_df_from_ranges",
    "PatchingResult",
    "get_act_patch_direct_path",
]


@dataclass
class PatchingResult:
    """A sweep's values with the unpatched corrupted run's metric (``baseline=True``).

    ``values``: the result (a tensor, or ``{name: tensor}`` for several metrics); ``baseline``: the metric
    on the corrupted run without any patch (a 0-d tensor, or [prompt] with ``reduce="none"``; a dict for
    several metrics)."""

    values: object
    baseline: object
    per_prompt: bool = False

    def _apply(self, fn):
        if isinstance(self.values, dict):
            return {k: fn(v, self.baseline[k]) for k, v in self.values.items()}
        return fn(self.values, self.baseline)

    def _base(self, v, b):
        return b.reshape(b.shape + (1,) * (v.dim() - b.dim())) if self.per_prompt else b

    def effect(self):
        """``values - baseline``: what each patch changes in the corrupted run's metric."""
        return self._apply(lambda v, b: v - self._base(v, b))

    def normalized(self, clean_baseline):
        """``(values - baseline) / (clean_baseline - baseline)``: 0 the patch did nothing, 1 it recovered the
        clean run's metric. ``clean_baseline`` is the metric on the clean run (a dict for several metrics)."""
        def one(v, b, c):
            c = torch.as_tensor(c, dtype=v.dtype)
            return (v - self._base(v, b)) / self._base(v, c - b)

        if isinstance(self.values, dict):
            return {k: one(v, self.baseline[k], clean_baseline[k]) for k, v in self.values.items()}
        return one(self.values, self.baseline, clean_baseline)


# ---- patch setters: TransformerLens' in-place semantics, plus the axes each one indexes ------------
def _setter(axes):
    def wrap(fn):
        fn.axes = axes
        return fn

    return wrap


@_setter(("pos",))
def layer_pos_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos]: the activation is [batch, pos, ...]."""
    _, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


@_setter(("pos", "head"))
def layer_pos_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos, head]: the activation is [batch, pos, head, ...]."""
    _, pos, head = index
    corrupted_activation[:, pos, head] = clean_activation[:, pos, head]
    return corrupted_activation


@_setter(("head",))
def layer_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head]: the activation is [batch, pos, head, ...]."""
    _, head = index
    corrupted_activation[:, :, head] = clean_activation[:, :, head]
    return corrupted_activation


@_setter(("head",))
def layer_head_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head]: the activation is [batch, head, dest_pos, src_pos]."""
    _, head = index
    corrupted_activation[:, head, :, :] = clean_activation[:, head, :, :]
    return corrupted_activation


@_setter(("head", "query_pos"))
def layer_head_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head, dest_pos]."""
    _, head, dest = index
    corrupted_activation[:, head, dest, :] = clean_activation[:, head, dest, :]
    return corrupted_activation


@_setter(("head", "query_pos", "key_pos"))
def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head, dest_pos, src_pos]."""
    _, head, dest, src = index
    corrupted_activation[:, head, dest, src] = clean_activation[:, head, dest, src]
    return corrupted_activation


@_setter(("expert",))
def layer_expert_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, expert]: the activation is [batch, pos, expert, d_model] (``hook_expert_out``)."""
    _, expert = index
    corrupted_activation[:, :, expert] = clean_activation[:, :, expert]
    return corrupted_activation


@_setter(("pos", "expert"))
def layer_pos_expert_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos, expert]: the activation is [batch, pos, expert, d_model]."""
    _, pos, expert = index
    corrupted_activation[:, pos, expert] = clean_activation[:, pos, expert]
    return corrupted_activation


_KNOWN = {f.__name__: f.axes for f in (
    layer_pos_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_head_vector_patch_setter,
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_dest_src_pos_pattern_patch_setter,
    layer_expert_vector_patch_setter,
    layer_pos_expert_vector_patch_setter,
)}


def make_df_from_ranges(column_max_ranges, column_names):
    """A pandas DataFrame with one row per index tuple of the grid (TransformerLens' helper)."""
    import pandas as pd

    rows = list(itertools.product(*[range(n) for n in column_max_ranges]))
    return pd.DataFrame(rows, columns=list(column_names))


def _rows(index_df):
    if hasattr(index_df, "itertuples"):
        return [tuple(int(x) for x in row) for row in index_df.itertuples(index=False)]
    return [tuple(int(x) for x in row) for row in index_df]


def _grid(ranges: dict, index_axis_names, index_df) -> tuple[list, list, bool]:
    """(rows of indices, result shape, flat?): the full grid over ``index_axis_names`` (sizes from
    ``ranges``), or the rows of ``index_df`` with a flat result."""
    if index_df is None:
        if index_axis_names is None:
            raise ValueError("give index_axis_names (e.g. ('layer', 'pos')) or index_df")
        shape = [ranges[a] for a in index_axis_names]
        return list(itertools.product(*[range(n) for n in shape])), shape, False
    if index_axis_names is not None:
        raise ValueError("give either index_axis_names or index_df, not both")
    rows = _rows(index_df)
    return rows, [len(rows)], True


def generic_activation_patch(
    model,
    corrupted_tokens,
    clean_cache,
    patching_metric,
    patch_setter,
    activation_name: str,
    index_axis_names=None,
    index_df=None,
    return_index_df: bool = False,
    *,
    attention_mask=None,
    memory_budget: float = 1.0,
    progress: bool = False,
    compile: bool = False,
    reduce: str = "mean",
    padding_side: str = "right",
    decoder_input=None,
    decoder_attention_mask=None,
    stack: str = "decoder",
    baseline: bool = False,
):
    """Patch ``activation_name`` at every index of the grid (or of ``index_df``); see the module docstring.

    ``index_axis_names`` (e.g. ("layer", "pos", "head")) sweep the full grid and the result has one axis
    per name; ``index_df`` (rows of indices, layer first) gives a flat result with one entry per row.
    ``memory_budget`` (GiB) bounds the rows batched at once and, for a dataset of prompts too large for it,
    the prompts run at once: they stream in chunks of pairs (``engine/pairs.py``; with a metric from
    ``fxlens.metrics``, whose per-prompt answers can be sliced), and ``model.last_sweep_stats["prompt_chunks"]``
    says how many. ``progress`` shows a bar (over the pairs too when they stream).

    A dataset of prompt pairs: ``corrupted_tokens`` a padded batch with its ``attention_mask``, or a list
    of token tensors of different lengths (padded on ``padding_side``; make ``clean_cache`` with
    ``model.run_with_cache(clean_list, padding_side=...)`` from the clean prompts in the same order).
    ``reduce="none"`` gives each prompt's result, ``[n_prompts, *grid]``: the metric must then give one
    value per prompt (a ``fxlens.metrics`` metric, or a callable returning a [batch] tensor). Each prompt's
    result equals a sweep of that pair alone (positions in the padded batch's frame).

    Several metrics at once: ``patching_metric={"name": metric, ...}`` runs the sweep once, reading each
    row's logits once for all of them (``metrics.Several``), and returns ``{"name": result}``.
    ``baseline=True`` also evaluates the metric(s) on the unpatched corrupted run and returns a
    ``PatchingResult`` (``values``, ``baseline``, ``effect()``, ``normalized(clean_baseline)``).

    Encoder-decoders (``fxlens.Seq2SeqModel``): ``decoder_input`` (and ``decoder_attention_mask``) is the
    decoder's input, ``stack`` ("decoder" or "encoder") the stack whose sites are patched.
    """
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce must be 'mean' (the metric's own reduction over prompts) or 'none' (one result per prompt); got {reduce!r}")
    several = isinstance(patching_metric, Mapping)
    if several or baseline:
        if getattr(model, "is_encoder_decoder", False):
            raise ValueError("several metrics and baseline=True are not offered for encoder-decoders yet: pass one metric")
        if return_index_df:
            raise ValueError("return_index_df applies to a single tensor result; make the index with make_df_from_ranges")
        metric = Several(patching_metric if several else {"metric": patching_metric}, per_prompt=reduce == "none")
        out = generic_activation_patch(model, corrupted_tokens, clean_cache, metric, patch_setter, activation_name,
                                       index_axis_names, index_df, attention_mask=attention_mask,
                                       memory_budget=memory_budget, progress=progress, compile=compile, reduce=reduce,
                                       padding_side=padding_side)
        # [prompt?, *grid, metric] -> one result per metric
        values = {name: out.select(-1, k) for k, name in enumerate(metric.names)}
        values = values if several else values["metric"]
        if not baseline:
            return values
        with torch.no_grad():
            base = metric(model(corrupted_tokens, attention_mask, padding_side=padding_side).float())
        base = {name: base[k] for k, name in enumerate(metric.names)} if several else base[0]
        return PatchingResult(values, base, reduce == "none")
    if getattr(model, "is_encoder_decoder", False):
        if reduce != "mean":
            raise ValueError("reduce='none' is not offered for encoder-decoders yet: run one pair at a time")
        from .engine.seq2seq import activation_patch

        axes = getattr(patch_setter, "axes", None) or _KNOWN.get(getattr(patch_setter, "__name__", ""))
        return activation_patch(model, corrupted_tokens, clean_cache, patching_metric, patch_setter, activation_name,
                                index_axis_names, index_df, return_index_df, attention_mask=attention_mask,
                                decoder_input=decoder_input, decoder_attention_mask=decoder_attention_mask, stack=stack,
                                axes=axes, grid=_grid, make_df=make_df_from_ranges, memory_budget=memory_budget,
                                progress=progress)
    if decoder_input is not None or decoder_attention_mask is not None:
        raise ValueError(f"decoder_input is for encoder-decoder models; {type(model.hf_model).__name__} has no decoder input")
    feed = model._inputs(corrupted_tokens, attention_mask, padding_side=padding_side)
    batch, seq = feed["input_ids"].shape
    kv_heads = model.cfg.n_key_value_heads or model.cfg.n_heads
    heads = kv_heads if activation_name in ("k", "v") else model.cfg.n_heads
    ranges = {"layer": model.cfg.n_layers, "pos": seq, "head_index": heads, "head": heads, "src_pos": seq, "dest_pos": seq,
              "expert": model.cfg.num_experts}
    rows, shape, flat = _grid(ranges, index_axis_names, index_df)
    axes = getattr(patch_setter, "axes", None) or _KNOWN.get(getattr(patch_setter, "__name__", ""))
    per_example = reduce == "none"
    if axes is None:
        out = _hooked_loop(model, feed, clean_cache, patching_metric, patch_setter, activation_name, rows, per_example)
    else:
        cells = []
        for row in rows:
            layer = row[0]
            site = model.site_table[activation_name, layer]
            if len(row) - 1 != len(axes):
                raise ValueError(f"{patch_setter.__name__} takes indices (layer, {', '.join(axes)}); got {row}")
            for a, v in zip(axes, row[1:]):
                size = model.graph.shape(site, batch, seq)[site.axes.index(a)]
                if not 0 <= v < size:
                    raise IndexError(f"index {v} on axis {a} of {site.name} is out of range 0..{size - 1}")
            cells.append(Cell(site, tuple(zip(axes, row[1:]))))
        sweep = Sweep(model, compile=compile)
        spans = pairs.plan(model, patching_metric, batch, seq, memory_budget) if batch > 1 else None
        with torch.no_grad():
            if spans is not None:  # more prompts than fit the budget at once: streamed in chunks of pairs
                out = pairs.run_chunks(sweep, cells, feed, clean_cache, patching_metric, spans, per_example=per_example,
                                       memory_budget=memory_budget, progress=progress)
            else:
                out = sweep.run(cells, feed, clean_cache, patching_metric, memory_budget=memory_budget, progress=progress,
                                per_example=per_example)
    out = out if flat else out.view(*shape, *out.shape[1:])
    if isinstance(patching_metric, Several):
        out = out.movedim(len(shape), -1)  # the metric axis last: [*grid, (prompt,) metric]
    if per_example:
        out = out.movedim(-2 if isinstance(patching_metric, Several) else -1, 0)  # [prompt, *grid(, metric)]
    if return_index_df:
        df = index_df if index_df is not None else make_df_from_ranges(shape, index_axis_names)
        return out, df
    return out


def _hooked_loop(model, feed, clean_cache, metric, setter, activation_name, rows, per_example=False):
    """TransformerLens' algorithm, for a patch setter fxlens cannot batch: one hooked forward per row."""
    from .engine.rows.readout import per_prompt, scalar

    out = []
    for row in rows:
        name = model.get_act_name(activation_name, row[0])
        clean = clean_cache[name]

        def hook(value, hook, index=row, clean=clean):
            return setter(value.clone(), list(index), clean)

        with torch.no_grad():
            logits = model.run_with_hooks(feed["input_ids"], feed.get("attention_mask"), fwd_hooks=[(name, hook)])
        value = metric(logits)
        if isinstance(metric, Several):  # [n_metrics] or [n_metrics, batch], checked by Several
            out.append(value.float().cpu())
            continue
        out.append((per_prompt(value, logits.shape[0]) if per_example else scalar(value)).float().cpu())
    return torch.stack(out)


# name -> (activation, patch setter, swept axes, what the result holds); fxlens.attribution reuses it
SWEEPS = {
    "get_act_patch_resid_pre": ("resid_pre", layer_pos_patch_setter, ("layer", "pos"), "each block's residual input by position: [n_layers, pos]"),
    "get_act_patch_resid_mid": ("resid_mid", layer_pos_patch_setter, ("layer", "pos"), "the residual between attention and MLP by position: [n_layers, pos]"),
    "get_act_patch_attn_out": ("attn_out", layer_pos_patch_setter, ("layer", "pos"), "each attention layer's output by position: [n_layers, pos]"),
    "get_act_patch_mlp_out": ("mlp_out", layer_pos_patch_setter, ("layer", "pos"), "each MLP's output by position: [n_layers, pos]"),
    "get_act_patch_attn_head_out_by_pos": ("z", layer_pos_head_vector_patch_setter, ("layer", "pos", "head"), "each head's output (z) by position: [n_layers, pos, n_heads]"),
    "get_act_patch_attn_head_q_by_pos": ("q", layer_pos_head_vector_patch_setter, ("layer", "pos", "head"), "each head's queries by position: [n_layers, pos, n_heads]"),
    "get_act_patch_attn_head_k_by_pos": ("k", layer_pos_head_vector_patch_setter, ("layer", "pos", "head"), "each KV head's keys by position: [n_layers, pos, n_key_value_heads]"),
    "get_act_patch_attn_head_v_by_pos": ("v", layer_pos_head_vector_patch_setter, ("layer", "pos", "head"), "each KV head's values by position: [n_layers, pos, n_key_value_heads]"),
    "get_act_patch_attn_head_pattern_by_pos": ("pattern", layer_head_pos_pattern_patch_setter, ("layer", "head_index", "dest_pos"), "each head's pattern row by destination: [n_layers, n_heads, dest_pos]"),
    "get_act_patch_attn_head_pattern_dest_src_pos": ("pattern", layer_head_dest_src_pos_pattern_patch_setter, ("layer", "head_index", "dest_pos", "src_pos"), "each pattern entry: [n_layers, n_heads, dest_pos, src_pos]"),
    "get_act_patch_attn_head_out_all_pos": ("z", layer_head_vector_patch_setter, ("layer", "head"), "each head's output (z) at every position: [n_layers, n_heads]"),
    "get_act_patch_attn_head_q_all_pos": ("q", layer_head_vector_patch_setter, ("layer", "head"), "each head's queries at every position: [n_layers, n_heads]"),
    "get_act_patch_attn_head_k_all_pos": ("k", layer_head_vector_patch_setter, ("layer", "head"), "each KV head's keys at every position: [n_layers, n_key_value_heads]"),
    "get_act_patch_attn_head_v_all_pos": ("v", layer_head_vector_patch_setter, ("layer", "head"), "each KV head's values at every position: [n_layers, n_key_value_heads]"),
    "get_act_patch_attn_head_pattern_all_pos": ("pattern", layer_head_pattern_patch_setter, ("layer", "head_index"), "each head's whole pattern: [n_layers, n_heads]"),
    "get_act_patch_expert_out_all_pos": ("expert_out", layer_expert_vector_patch_setter, ("layer", "expert"), "each expert's output of a mixture-of-experts MLP at every position: [n_layers, num_experts]"),
    "get_act_patch_expert_out_by_pos": ("expert_out", layer_pos_expert_vector_patch_setter, ("layer", "pos", "expert"), "each expert's output by position: [n_layers, pos, num_experts]"),
}


def _sweep(name: str):
    activation, setter, axes, what = SWEEPS[name]
    fn = partial(generic_activation_patch, patch_setter=setter, activation_name=activation, index_axis_names=axes)
    fn.__doc__ = f"Patch {what}. Arguments as generic_activation_patch (model, corrupted_tokens, clean_cache, metric)."
    return fn


get_act_patch_resid_pre = _sweep("get_act_patch_resid_pre")
get_act_patch_resid_mid = _sweep("get_act_patch_resid_mid")
get_act_patch_attn_out = _sweep("get_act_patch_attn_out")
get_act_patch_mlp_out = _sweep("get_act_patch_mlp_out")
get_act_patch_attn_head_out_by_pos = _sweep("get_act_patch_attn_head_out_by_pos")
get_act_patch_attn_head_q_by_pos = _sweep("get_act_patch_attn_head_q_by_pos")
get_act_patch_attn_head_k_by_pos = _sweep("get_act_patch_attn_head_k_by_pos")
get_act_patch_attn_head_v_by_pos = _sweep("get_act_patch_attn_head_v_by_pos")
get_act_patch_attn_head_pattern_by_pos = _sweep("get_act_patch_attn_head_pattern_by_pos")
get_act_patch_attn_head_pattern_dest_src_pos = _sweep("get_act_patch_attn_head_pattern_dest_src_pos")
get_act_patch_attn_head_out_all_pos = _sweep("get_act_patch_attn_head_out_all_pos")
get_act_patch_attn_head_q_all_pos = _sweep("get_act_patch_attn_head_q_all_pos")
get_act_patch_attn_head_k_all_pos = _sweep("get_act_patch_attn_head_k_all_pos")
get_act_patch_attn_head_v_all_pos = _sweep("get_act_patch_attn_head_v_all_pos")
get_act_patch_attn_head_pattern_all_pos = _sweep("get_act_patch_attn_head_pattern_all_pos")
get_act_patch_expert_out_all_pos = _sweep("get_act_patch_expert_out_all_pos")
get_act_patch_expert_out_by_pos = _sweep("get_act_patch_expert_out_by_pos")


def _stack(parts, kwargs):
    """Parts stacked on a new first axis; with reduce="none" after the prompt axis: [prompt, part, ...].
    Several metrics stack per metric; with a baseline (the same corrupted run for every part) the result
    keeps it."""
    if isinstance(parts[0], PatchingResult):
        return PatchingResult(_stack([p.values for p in parts], kwargs), parts[0].baseline, parts[0].per_prompt)
    if isinstance(parts[0], dict):
        return {k: _stack([p[k] for p in parts], kwargs) for k in parts[0]}
    return torch.stack(parts, dim=1 if kwargs.get("reduce") == "none" else 0)


def _block_every(ns, model, corrupted_tokens, clean_cache, metric, **kwargs):
    return _stack([
        ns.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric, **kwargs),
        ns.get_act_patch_attn_out(model, corrupted_tokens, clean_cache, metric, **kwargs),
        ns.get_act_patch_mlp_out(model, corrupted_tokens, clean_cache, metric, **kwargs),
    ], kwargs)


def _map(result, fn):
    """``fn`` applied to a sweep's values: a tensor, each metric's tensor, or a PatchingResult's values."""
    if isinstance(result, PatchingResult):
        return PatchingResult(_map(result.values, fn), result.baseline, result.per_prompt)
    if isinstance(result, dict):
        return {k: fn(v) for k, v in result.items()}
    return fn(result)


def _pad_heads(t, n_heads: int):
    return _map(t, lambda v: torch.nn.functional.pad(v, (0, n_heads - v.shape[-1])))


def _head_all_pos_every(ns, model, corrupted_tokens, clean_cache, metric, **kwargs):
    parts = [
        ns.get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, metric, **kwargs),
        ns.get_act_patch_attn_head_q_all_pos(model, corrupted_tokens, clean_cache, metric, **kwargs),
        ns.get_act_patch_attn_head_k_all_pos(model, corrupted_tokens, clean_cache, metric, **kwargs),
        ns.get_act_patch_attn_head_v_all_pos(model, corrupted_tokens, clean_cache, metric, **kwargs),
        ns.get_act_patch_attn_head_pattern_all_pos(model, corrupted_tokens, clean_cache, metric, **kwargs),
    ]
    return _stack([_pad_heads(p, model.cfg.n_heads) for p in parts], kwargs)


def _head_by_pos_every(ns, model, corrupted_tokens, clean_cache, metric, **kwargs):
    parts = [
        ns.get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, metric, **kwargs),
        ns.get_act_patch_attn_head_q_by_pos(model, corrupted_tokens, clean_cache, metric, **kwargs),
        ns.get_act_patch_attn_head_k_by_pos(model, corrupted_tokens, clean_cache, metric, **kwargs),
        ns.get_act_patch_attn_head_v_by_pos(model, corrupted_tokens, clean_cache, metric, **kwargs),
        # [.., layer, head, dest_pos] -> [.., layer, pos, head]
        _map(ns.get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, metric, **kwargs),
             lambda t: t.transpose(-1, -2)),
    ]
    return _stack([_pad_heads(p, model.cfg.n_heads) for p in parts], kwargs)


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """resid_pre, attn_out and mlp_out by position, stacked: [3, n_layers, pos]."""
    return _block_every(sys.modules[__name__], model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """Head output, q, k, v and pattern at every position, stacked: [5, n_layers, n_heads] (k, v zero-padded for GQA)."""
    return _head_all_pos_every(sys.modules[__name__], model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """Head output, q, k, v by position and pattern by destination, stacked: [5, n_layers, pos, n_heads]."""
    return _head_by_pos_every(sys.modules[__name__], model, corrupted_tokens, clean_cache, metric, **kwargs)


def _head_write(model, cache, layer: int, head: int) -> torch.Tensor:
    """Head ``layer.head``'s write into the residual stream in a cached run, [batch, pos, d_model], without
    the output bias (which belongs to no head): its per-head result when cached, else z @ W_O."""
    result = f"blocks.{layer}.attn.hook_result"
    if result in cache:
        return cache[result][:, :, head]
    z = f"blocks.{layer}.attn.hook_z"
    if z not in cache:
        raise ValueError(f"the cache holds neither {result} nor {z}: cache the source head's z (the default cache has it)")
    return cache[z][:, :, head] @ model.blocks[layer].attn.W_O[head].to(cache[z].dtype)


def get_act_patch_direct_path(model, corrupted_tokens, clean_cache, corrupted_cache, patching_metric, src_layer: int,
                              src_head: int, component: str = "q", verbose: bool = False, *, attention_mask=None):
    """Direct path patching (TransformerLens 4.3): the path from one source head into each later head's
    ``component`` ("q", "k" or "v") input alone, on the corrupted run.

    ``results[l, h]`` is the metric with head ``(l, h)``'s ``component`` computed from the residual stream
    plus the source head's clean-minus-corrupted write (z @ W_O); every other reader still sees the
    corrupted write. Rows ``l <= src_layer`` are 0, not measurements. Returns [n_layers, n_heads]
    ([n_layers, n_key_value_heads] for "k"/"v" on a grouped-query model, whose key/value heads are the
    receivers). Runs as one edge sweep (``circuits.edge_sweep``), not one forward per receiver; the
    source's corrupted write is the one the corrupted run computes (``corrupted_cache`` is accepted for
    TransformerLens' signature; its hook_z must be that run's).
    """
    from .circuits import edge_sweep

    if component not in ("q", "k", "v"):
        raise ValueError(f"component must be 'q', 'k' or 'v'; got {component!r}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if not (0 <= src_layer < n_layers and 0 <= src_head < n_heads):
        raise ValueError(f"no head L{src_layer}H{src_head}: layers 0..{n_layers - 1}, heads 0..{n_heads - 1}")
    n_dst = n_heads if component == "q" else (model.cfg.n_key_value_heads or n_heads)
    comp = model.derived.components
    feed = model._inputs(corrupted_tokens, attention_mask)
    batch, seq = feed["input_ids"].shape
    source = f"a{src_layer}.h{src_head}"
    clean = _head_write(model, clean_cache, src_layer, src_head)
    if tuple(clean.shape[:2]) != (batch, seq):
        raise ValueError(f"the clean cache has {tuple(clean.shape[:2])} (batch, pos); the corrupted tokens {(batch, seq)}")
    # every sender's replacement: only the source's is read (the sweep gathers the senders it uses)
    alt = torch.zeros(batch, seq, len(comp.senders), model.cfg.d_model, dtype=model.captured.dtype, device=model.captured.device)
    alt[:, :, [s.name for s in comp.senders].index(source)] = clean.to(alt)
    receivers = [(layer, h) for layer in range(src_layer + 1, n_layers) for h in range(n_dst)]
    out = torch.zeros(n_layers, n_dst)
    if receivers:
        sets = [[(source, f"a{layer}.h{h}<{component}>")] for layer, h in receivers]
        values = edge_sweep(model, feed["input_ids"], sets, patching_metric, ablation=alt, attention_mask=feed.get("attention_mask"))
        for (layer, h), v in zip(receivers, values):
            out[layer, h] = v
    return out
