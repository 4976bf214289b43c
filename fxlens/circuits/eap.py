"""Edge attribution patching (Syed et al.): every edge's first-order effect from one forward and backward.

Problem: patching each edge exactly costs a run per edge; a linear estimate of all of them costs one
forward and one backward.

Mechanism: score(sender, receiver) = sum over batch and positions of (corrupted_s - clean_s) .
d metric / d (receiver input), on the clean run. The gradient is taken once per receiver: the Edges
pass in "delta" mode adds a zero tensor (requiring grad) to every receiver's input, so one backward
gives every receiver's input gradient whatever the number of edges. Sender outputs come from one run
of each input, each with its own attention mask.

On a post-norm model (Gemma 2/3, OLMo 2/3) an edge changes its receiver's input through the sender's
branch norm (``edges`` module docstring): the score is the gradient of the metric with respect to the
edge's mask at zero, ``sum over batch and positions of J_l(branch_l) (corrupted_s - clean_s) . d metric
/ d (receiver input)``, the linearisation through the norm's Jacobian at the clean branch value. The
receivers' gradients come as above; each normalised sender's difference is pushed through its norm's
Jacobian by a Jacobian-vector product (``torch.autograd.functional.jvp``) of the norm's own program
(``Blocks.post_norm_programs``) at the clean run's branch value. Where that program cannot be built
the gradient is taken with respect to a zero edge mask directly (the Edges pass in "edges" mode with
every sender's corrupted output as the replacement: every receiver replays every upstream norm, so it
costs more memory).

On a model that normalises the residual stream itself after each branch (BERT, RoBERTa, ELECTRA) an
edge's difference passes through every norm between sender and receiver (``edges`` module docstring);
the score is again the gradient of the metric with respect to a zero edge mask, taken directly through
the Edges pass in "edges" mode, which replays those norms: exact, at the memory cost above.

Example::

    scores = eap_scores(model, clean, corrupted, metric)          # {(sender, receiver): float}
"""

from __future__ import annotations

import warnings

import torch

from ..engine.plan import PlanBuilder
from ..engine.rows.readout import scalar
from ..graphs.components import CircuitError
from .edges import paired_feeds, post_norm_specs, receiver_specs, result_sites, sender_specs, sender_values, spine_spec

__all__ = ["eap_scores"]


def eap_scores(model, clean_tokens, corrupted_tokens, metric, *, attention_mask=None, corrupted_attention_mask=None,
               corrupted_mask=None) -> dict:
    """{(sender, receiver): score} (see the module docstring). ``corrupted_mask`` is an alias of
    ``corrupted_attention_mask``; without either, the corrupted run uses ``attention_mask``."""
    if corrupted_mask is not None:
        if corrupted_attention_mask is not None:
            raise ValueError("give corrupted_attention_mask or its alias corrupted_mask, not both")
        corrupted_attention_mask = corrupted_mask
    comp = model.derived.components
    comp.require_edges("edge attribution patching")
    feed, corrupted = paired_feeds(model, clean_tokens, corrupted_tokens, attention_mask, corrupted_attention_mask,
                                   "EAP scores the difference of the two runs' sender outputs")
    if comp.spine is not None:  # BERT: the exact gradient of a zero edge mask through the replayed norms
        return _through_norms(model, comp, feed, corrupted, metric)
    normed = None
    if comp.post_norms:
        try:
            normed = _norm_jacobians(model, comp, feed)
        except Exception as err:  # noqa: BLE001 - no separate norm programs: the exact, costlier gradient of the mask
            warnings.warn(
                f"EAP cannot run this model's branch norms on their own ({type(err).__name__}); the scores come "
                "from the gradient of the edge mask instead: the same values, more memory. Please report this with the "
                "model's config", RuntimeWarning, stacklevel=2,
            )
            return _through_norms(model, comp, feed, corrupted, metric)
    batch, seq = feed["input_ids"].shape
    specs = receiver_specs(comp, {r.name for r in comp.receivers})
    groups: dict = {}
    for r in specs:
        groups.setdefault(r.entry, []).append(r)
    zeros = {
        entry: torch.zeros(batch, seq, len(group), model.cfg.d_model, dtype=model.captured.dtype,
                           device=model.captured.device, requires_grad=True)
        for entry, group in groups.items()
    }
    plan, inputs = PlanBuilder(model.graph).edges((), specs, "delta", deltas=zeros).build()
    with torch.enable_grad():
        out = model.programs.get(plan)(**feed, **inputs)
        value = scalar(metric(model._logits(out)))
        if not value.requires_grad:
            raise CircuitError("the metric's value does not depend on the logits through autograd; EAP needs a differentiable metric")
        grads = torch.autograd.grad(value, list(zeros.values()))
    with torch.no_grad():
        diff = (sender_values(model, corrupted["input_ids"], corrupted.get("attention_mask"))
                - sender_values(model, feed["input_ids"], feed.get("attention_mask"))).to(model.captured.dtype)
        if normed is not None:
            diff = normed(diff)
        flat = diff.permute(2, 0, 1, 3).reshape(len(comp.senders), -1)  # [senders, batch*pos*d]
        scores = {}
        for (entry, group), grad in zip(groups.items(), grads):
            g = grad.permute(2, 0, 1, 3).reshape(len(group), -1)  # [receivers, batch*pos*d]
            table = flat @ g.T  # [senders, receivers]
            for j, r in enumerate(group):
                for i in r.upstream:
                    scores[(comp.senders[i].name, r.name)] = float(table[i, j])
    return scores


def _norm_jacobians(model, comp, feed: dict):
    """A function of the senders' differences [batch, pos, senders, d_model] that replaces each
    normalised sender's difference by its norm's Jacobian, at the clean branch value, times it."""
    from ..engine.rows.blocks import Blocks

    programs = Blocks.of(model.derived).post_norm_programs()
    if any(not pn.value_site for pn in comp.post_norms):
        raise CircuitError("a branch's value before its norm is not a site")
    with torch.no_grad():
        _, cache = model.run_with_cache(feed["input_ids"], feed.get("attention_mask"),
                                        names_filter=[pn.value_site for pn in comp.post_norms], return_logits=False)
    index = {s.name: i for i, s in enumerate(comp.senders)}

    def apply(diff: torch.Tensor) -> torch.Tensor:
        out = diff.clone()
        for pn in comp.post_norms:
            program = programs[(pn.layer, pn.kind)]
            cols = [index[n] for n in pn.senders]
            branch = cache[pn.value_site]
            d = diff[:, :, cols].permute(2, 0, 1, 3).flatten(0, 1).to(branch.dtype)  # [senders * batch, pos, d]

            def norm(x, program=program, name=pn.input):
                return program(**{name: x})["outputs"]["normed"]

            # the double-backward product: forward-mode AD would load torch's TorchScript decompositions
            _, tangent = torch.autograd.functional.jvp(norm, branch.repeat(len(cols), 1, 1), d)
            out[:, :, cols] = tangent.unflatten(0, (len(cols), -1)).permute(1, 2, 0, 3).to(out.dtype)
        return out

    return apply


def _through_norms(model, comp, feed: dict, corrupted: dict, metric) -> dict:
    """EAP as the gradient of the metric with respect to a zero edge mask (post-norm models)."""
    with torch.no_grad():
        alt = sender_values(model, corrupted["input_ids"], corrupted.get("attention_mask")).to(model.captured.dtype)
    mask = torch.zeros(1, len(comp.senders), len(comp.receivers), dtype=model.captured.dtype,
                       device=model.captured.device, requires_grad=True)
    specs = receiver_specs(comp, {r.name for r in comp.receivers})
    plan, inputs = PlanBuilder(model.graph).edges(
        sender_specs(model, comp), specs, "edges", mask=mask, alt=alt, result_sites=result_sites(model),
        post_norms=post_norm_specs(comp), spine=spine_spec(comp),
    ).build()
    with torch.enable_grad():
        out = model.programs.get(plan)(**feed, **inputs)
        value = scalar(metric(model._logits(out)))
        if not value.requires_grad:
            raise CircuitError("the metric's value does not depend on the logits through autograd; EAP needs a differentiable metric")
        (grad,) = torch.autograd.grad(value, [mask])
    table = grad[0].float().cpu()
    return {(comp.senders[i].name, r.name): float(table[i, r.index]) for r in specs for i in r.upstream}
