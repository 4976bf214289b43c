"""Edge interventions: run a model with chosen circuit edges ablated or patched.

Problem: an edge (sender -> receiver) is what the sender wrote into the residual stream, as the
receiver reads it. Patching or ablating an edge changes that receiver's input and nothing else. The
replacement comes from another run (the corrupted prompt, a reference set's mean or a resampled row)
and must be computed with that run's own attention mask, or padded prompts silently give other numbers.

Mechanism: ``sender_values`` caches every sender's output ([batch, pos, senders, d_model]: the
embedding, each head's result, each MLP's output) in one run; ``alternatives`` turns an ablation
name (the shared vocabulary of ``engine.ablation``) and reference tokens into the replacement values;
the Edges pass (``passes.edges``) rebuilds only the receivers an edge set touches, and the plan builder
names its inputs. ``reference_feed`` is the one place that decides the reference run's mask: its own
(``reference_attention_mask``), else ``attention_mask`` when the shapes agree, else an error.

Post-norm models (Gemma 2/3, OLMo 2/3: each branch normalised before it is added): layer l writes
``post_norm_l(branch_l)``, where ``branch_l`` is the sum of the per-head results (+ the output bias)
or the MLP output. A sender's value is taken before the norm (a head's result, the MLP's output as
the branch computes it). Replacing the edges into receiver r means r reads

    clean_entry_r + sum over layers l upstream of r [post_norm_l(branch_l + D_{l,r}) - post_norm_l(branch_l)]

with ``D_{l,r} = sum_{s in l} mask[s, r] * (alt_s - cur_s)``: several edges from one layer into one
receiver are combined inside the norm, not added after it. Every other reader of the residual stream
is unchanged, the embedding sender is added as it is, and for a model without such norms this is the
plain sum ``entry + sum_s mask[s, r] * (alt_s - cur_s)``.

Post-norm encoders (BERT, RoBERTa, ELECTRA: the residual stream itself normalised after each branch,
``h = LN1(x + attn)``, ``x' = LN2(h + mlp)``): the residual stream is a chain of norms over sums of
sender outputs (``graphs.spine``). An edge s -> r replaces s's output in that chain as r reads it:
with every other component's output frozen at its value in this run, r reads

    x = embed + D_input;  per layer before r: x = LN1(x + attn + D_attn);  x = LN2(x + mlp + D_mlp)

(an MLP receiver stops after its own layer's LN1), ``D_attn`` summing ``mask[s, r] * (alt_s - cur_s)``
over the layer's heads with a replaced edge into r (the MLP's likewise). Every norm between sender and
receiver is replayed, the statistics changing with the input; several edges into one receiver combine
in one replay. Every other reader of the residual stream is unchanged.

Example::

    logits = run_with_edges(model, clean, ["a0.h1->a1.h0<k>"], ablation="corrupted", reference=corrupted,
                            attention_mask=mask)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..engine.ablation import AblationError, replacement
from ..engine.plan import PlanBuilder
from ..graphs.components import CircuitError, Components
from ..passes import EdgePostNorm, EdgeSender, EdgeSpine, EdgeSpineStep
from ..passes.edges import receiver_specs
from .circuit import Circuit

__all__ = [
    "sender_values",
    "run_with_edges",
    "run_with_circuit",
    "reference_feed",
    "alternatives",
    "post_norm_specs",
    "spine_spec",
]


# ---- what senders and receivers are in the graph ----------------------------------------------------
def sender_site(model, s):
    """The site a sender's output is read from: the embedding (resid_pre 0), per-head results, MLP out
    (before its post-norm, where the branch has one)."""
    if s.kind == "input":
        return model.site_table["resid_pre", 0]
    if s.kind == "mlp":
        pn = model.derived.components.post_norm(s.name)
        if pn is not None:
            return model.site_table[pn.value_site]
    return model.site_table["result" if s.kind == "head" else "mlp_out", s.layer]


def post_norm_specs(comp: Components) -> tuple:
    """The Edges pass's view of the norms some senders' branches pass through before the add."""
    index = {s.name: i for i, s in enumerate(comp.senders)}
    return tuple(EdgePostNorm(tuple(index[n] for n in pn.senders), pn.input, pn.cone) for pn in comp.post_norms)


def spine_spec(comp: Components) -> EdgeSpine | None:
    """The Edges pass's view of a residual stream normalised itself (BERT), or None."""
    if comp.spine is None:
        return None
    index = {s.name: i for i, s in enumerate(comp.senders)}
    steps = tuple(EdgeSpineStep(st.kind, st.output, st.input, tuple(index[n] for n in st.senders), st.cone)
                  for st in comp.spine.steps)
    return EdgeSpine(comp.spine.start, (index["input"],), steps)


def sender_specs(model, comp: Components) -> tuple:
    out = []
    for s in comp.senders:
        site = sender_site(model, s)
        out.append(EdgeSender(s.name, site.node, site.layout, s.head if s.kind == "head" else None))
    return tuple(out)


def result_sites(model) -> list:
    """The per-head result sites the Edges pass reads senders from."""
    return [model.site_table["result", layer] for layer in range(model.cfg.n_layers)]


def edge_mask(comp: Components, edges: Iterable, rows: int = 1) -> torch.Tensor:
    s_index = {s.name: i for i, s in enumerate(comp.senders)}
    r_index = {r.name: j for j, r in enumerate(comp.receivers)}
    mask = torch.zeros(rows, len(comp.senders), len(comp.receivers))
    for s, r in edges:
        mask[:, s_index[s], r_index[r]] = 1.0
    return mask


# ---- sender outputs and their replacements -----------------------------------------------------------
def sender_values(model, tokens, attention_mask=None, senders=None) -> torch.Tensor:
    """Every sender's output on ``tokens``: [batch, pos, senders, d_model] (the ``alt`` of an ablation).

    ``senders``: names of the senders wanted, in that order (default: all of them); the run then
    caches only their sites and stops after the last one.
    """
    comp = model.derived.components
    wanted = comp.senders if senders is None else [comp.sender(n) for n in senders]
    names = list(dict.fromkeys(sender_site(model, s).name for s in wanted))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask, names_filter=names, return_logits=False)
    parts = []
    for s in wanted:
        value = cache[sender_site(model, s).name]
        parts.append(value[:, :, s.head] if s.kind == "head" else value)
    device = model.captured.device  # senders of a model spread over devices: gathered where its inputs are fed
    return torch.stack([p.to(device) for p in parts], dim=2)


def reference_feed(model, reference, attention_mask=None, reference_attention_mask=None, what: str = "the reference") -> dict:
    """The inputs of the reference (corrupted) run, with its attention mask (see the module docstring)."""
    if reference_attention_mask is None and attention_mask is not None and not isinstance(reference, (str, list)):
        ref_shape = tuple(torch.as_tensor(reference).shape) if not isinstance(reference, torch.Tensor) else tuple(reference.shape)
        ref_shape = ref_shape if len(ref_shape) == 2 else (1, *ref_shape)
        if tuple(torch.as_tensor(attention_mask).shape) != ref_shape:
            raise CircuitError(
                f"{what} has shape {ref_shape} but attention_mask has shape {tuple(attention_mask.shape)}; "
                f"pass {what}'s own mask as reference_attention_mask= (or corrupted_attention_mask=)"
            )
        reference_attention_mask = attention_mask
    return model._inputs(reference, reference_attention_mask)


def paired_feeds(model, clean_tokens, corrupted_tokens, attention_mask=None, corrupted_attention_mask=None,
                 why: str = "they are compared") -> tuple[dict, dict]:
    """The clean and corrupted runs' inputs, each with its mask, refused unless their shapes agree
    (``why`` says, in the message, why the function needs that)."""
    feed = model._inputs(clean_tokens, attention_mask)
    corrupted = reference_feed(model, corrupted_tokens, attention_mask, corrupted_attention_mask, "the corrupted tokens")
    if corrupted["input_ids"].shape != feed["input_ids"].shape:
        raise CircuitError(
            f"the clean tokens have shape {tuple(feed['input_ids'].shape)} and the corrupted {tuple(corrupted['input_ids'].shape)}; "
            f"{why} row by row and position by position, so both must have the same shape"
        )
    return feed, corrupted


def alternatives(model, ablation, shape: tuple, reference=None, reference_mask=None, senders=None, *, attention_mask=None) -> torch.Tensor:
    """What the senders' outputs become: [batch or 1, pos, senders (or ``senders`` only), d_model].

    ``ablation``: "zero", "mean" / "resample" / "corrupted" over ``reference`` tokens (run with
    their own mask), or a tensor of every sender's output (``sender_values``).
    """
    comp = model.derived.components
    d = model.cfg.d_model
    batch, seq = shape
    if isinstance(ablation, torch.Tensor):
        want = (len(comp.senders), d)
        if ablation.dim() != 4 or tuple(ablation.shape[2:]) != want or ablation.shape[1] != seq or ablation.shape[0] not in (1, batch):
            raise CircuitError(
                f"an ablation tensor holds every sender's output, [{batch} rows or 1, {seq} positions, "
                f"{want[0]} senders, {d}] (e.g. circuits.sender_values(model, tokens)); got {tuple(ablation.shape)}"
            )
        if senders is None:
            return ablation
        index = {s.name: i for i, s in enumerate(comp.senders)}
        return ablation[:, :, [index[n] for n in senders]]
    n = len(comp.senders) if senders is None else len(senders)
    like = torch.zeros(1, seq, n, d, dtype=model.captured.dtype, device=model.captured.device)
    if not isinstance(ablation, str):
        raise CircuitError(f"ablation must be 'zero', 'mean', 'resample', 'corrupted' or a tensor of sender outputs; got {ablation!r}")
    values, mask = None, None
    if ablation != "zero" and reference is not None:
        feed = reference_feed(model, reference, attention_mask, reference_mask)
        if feed["input_ids"].shape[1] != seq:
            raise CircuitError(
                f"the reference tokens have {feed['input_ids'].shape[1]} positions and the input {seq}: edges replace "
                "sender outputs position by position, so both must have the same length"
            )
        mask = feed.get("attention_mask")
        values = sender_values(model, feed["input_ids"], mask, senders)
    try:
        return replacement(ablation, values, batch=batch, reference_mask=mask, like=like, what=f"ablation={ablation!r}")
    except AblationError as err:
        raise CircuitError(str(err)) from None


def given_mask(tokens, attention_mask, feed: dict):
    """The mask the caller gave for ``tokens`` (or the tokenizer made from text); None for bare ids."""
    if attention_mask is not None:
        return feed.get("attention_mask")
    text = isinstance(tokens, str) or (isinstance(tokens, list) and tokens and isinstance(tokens[0], str))
    return feed.get("attention_mask") if text else None


# ---- running ----------------------------------------------------------------------------------
def run_with_edges(model, tokens, edges, *, ablation="zero", reference=None, attention_mask=None,
                   reference_attention_mask=None, return_type="logits"):
    """Run with each edge in ``edges`` replaced (ablated, or patched from ``reference``'s run).

    ``ablation``: "zero", "mean" (over ``reference`` tokens), "corrupted" (the sender outputs on
    ``reference`` tokens: edge patching), "resample", or a tensor [batch or 1, pos, senders, d_model].
    The reference run uses ``reference_attention_mask``, else ``attention_mask``.
    """
    comp = model.derived.components
    comp.require_edges("an edge intervention")
    circuit = Circuit(edges).validate(model)
    feed = model._inputs(tokens, attention_mask)
    alt = alternatives(model, ablation, tuple(feed["input_ids"].shape), reference, reference_attention_mask,
                       attention_mask=given_mask(tokens, attention_mask, feed))
    receivers = {r for _, r in circuit.edges}
    inputs = {}
    plan = ()
    if receivers:
        b = PlanBuilder(model.graph).edges(
            sender_specs(model, comp), receiver_specs(comp, receivers), "edges",
            mask=edge_mask(comp, circuit.edges).to(model.captured.device),
            alt=alt.to(model.captured.device, model.captured.dtype),
            result_sites=result_sites(model), post_norms=post_norm_specs(comp), spine=spine_spec(comp),
        )
        plan, inputs = b.build()
    out = model.programs.get(plan)(**feed, **inputs)
    return model._outputs(out, feed, return_type)


def run_with_circuit(model, tokens, circuit, *, ablation="zero", reference=None, attention_mask=None,
                     reference_attention_mask=None, return_type="logits"):
    """Run with every edge *outside* ``circuit`` ablated: the circuit's faithfulness in one call."""
    circuit = Circuit(circuit).validate(model)
    outside = Circuit.full(model).edges - circuit.edges
    return run_with_edges(model, tokens, outside, ablation=ablation, reference=reference, attention_mask=attention_mask,
                          reference_attention_mask=reference_attention_mask, return_type=return_type)
