"""Attribution patching: the gradient-based linear estimate of every activation-patching sweep.

Problem: exact patching costs one (batched) run per cell; a first-order estimate of all cells costs
one forward and one backward (Nanda, "Attribution Patching"; Syed et al.).

Mechanism: the corrupted run gets a zero-valued ``add`` edit at every patched site (the Intervene
pass), so the gradient of the metric with respect to that zero tensor is the gradient with respect to
the site's value in the user's layout. Each cell's estimate is
``metric(corrupted) + sum((clean - corrupted) * grad)`` over the entries the cell patches, summed
over the batch. Functions, arguments and result shapes are those of ``fxlens.patching``.

Example::

    from fxlens import attribution, patching
    est = attribution.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)   # [n_layers, pos]
    exact = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)

Gotchas: the metric must be differentiable in the logits (fxlens.metrics are). Gradients are taken with
``torch.autograd.grad``, so nothing accumulates in the model's parameters' ``.grad``.
"""

from __future__ import annotations

import sys

import torch

from .engine.plan import PlanBuilder
from .engine.rows.readout import scalar
from .passes.intervene import add_to
from .patching import SWEEPS, _block_every, _head_all_pos_every, _head_by_pos_every

__all__ = ["attribute"] + list(SWEEPS) + [
    "get_act_patch_block_every",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
]


def attribute(model, corrupted_tokens, clean_cache, metric, activation_name: str, axes: tuple, *, attention_mask=None):
    """Estimates [n_layers, *sizes of ``axes``] for patching ``activation_name`` on the given axes.

    ``axes`` are site axis names (``pos``, ``head``, ``query_pos``, ``key_pos``) kept in the result;
    every other axis, the batch included, is summed over.
    """
    feed = model._inputs(corrupted_tokens, attention_mask)
    batch, seq = feed["input_ids"].shape
    sites = [model.site_table[activation_name, layer] for layer in range(model.cfg.n_layers)]
    dtype = model.captured.dtype
    deltas = [torch.zeros(model.graph.shape(s, batch, seq), dtype=dtype, device=model.captured.device, requires_grad=True) for s in sites]
    b = PlanBuilder(model.graph)
    for site, delta in zip(sites, deltas):
        b.edit(site, add_to, (delta,))
    b.cache(sites)
    plan, inputs = b.build()
    program = model.programs.get(plan)
    with torch.enable_grad():
        out = program(**feed, **inputs)
        logits = model._logits(out)
        value = scalar(metric(logits))
        if not value.requires_grad:
            raise ValueError("the metric's value does not depend on the logits through autograd; attribution needs a differentiable metric")
        grads = torch.autograd.grad(value, deltas)
    results = []
    for site, grad in zip(sites, grads):
        corrupted = out["cache"][site.name].detach()
        clean = clean_cache[site.name].to(corrupted.dtype)
        if clean.shape != corrupted.shape:
            raise ValueError(f"the clean value of {site.name} has shape {tuple(clean.shape)}; the corrupted run has {tuple(corrupted.shape)}")
        contrib = (clean - corrupted) * grad
        keep = [site.axes.index(a) for a in axes]
        drop = [i for i in range(contrib.dim()) if i not in keep]
        reduced = contrib.sum(dim=drop) if drop else contrib
        # sum() keeps the kept axes in their site order; reorder to the order ``axes`` names them
        order = sorted(range(len(keep)), key=lambda k: keep[k])
        results.append(reduced.permute(*[order.index(k) for k in range(len(keep))]) if keep else reduced)
    return float(value.detach()) + torch.stack(results).detach()


def _attribution(name: str):
    activation, setter, _, what = SWEEPS[name]

    def fn(model, corrupted_tokens, clean_cache, patching_metric, *, attention_mask=None):
        return attribute(model, corrupted_tokens, clean_cache, patching_metric, activation, setter.axes, attention_mask=attention_mask)

    fn.__name__ = name
    fn.__doc__ = f"Linear estimate of patching {what}."
    return fn


for _name in SWEEPS:
    setattr(sys.modules[__name__], _name, _attribution(_name))


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """resid_pre, attn_out and mlp_out estimates, stacked: [3, n_layers, pos]."""
    return _block_every(sys.modules[__name__], model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """Head output, q, k, v and pattern estimates at every position: [5, n_layers, n_heads]."""
    return _head_all_pos_every(sys.modules[__name__], model, corrupted_tokens, clean_cache, metric, **kwargs)


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """Head output, q, k, v by position and pattern by destination: [5, n_layers, pos, n_heads]."""
    return _head_by_pos_every(sys.modules[__name__], model, corrupted_tokens, clean_cache, metric, **kwargs)
