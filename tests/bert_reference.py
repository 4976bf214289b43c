"""Edges on post-norm encoders (BERT, RoBERTa, ELECTRA), written with plain HF hooks; nothing here calls fxlens.

These models normalise the residual stream itself after each branch: layer l computes
``h = LN1_l(x + attn_l)`` and ``x' = LN2_l(h + mlp_l)``, ``attn_l`` being the attention output dense
layer's output (the per-head results plus its bias) and ``mlp_l`` the output dense layer's output.

The definition: receiver r reads the residual stream recomputed from the embedding with every
component's output frozen at its value in this run, except the replaced edges' senders, whose outputs
are replaced by ``cur_s + w[s, r] (alt_s - cur_s)``; every norm between the embedding and r is replayed
(the HF LayerNorm modules themselves, called on the tensors):

    x = input + D_input;  for each layer before r: x = LN1(x + attn_l + D_attn_l); x = LN2(x + mlp_l + D_mlp_l)

(an MLP receiver stops after its own layer's LN1), ``D_attn_l`` summing the replaced edges' differences
from layer l's heads. ``cur`` holds this very run's values (heads' results: their slices of the output
dense layer's input times that slice of its weight, no bias).

``hf_run`` is one hooked HF forward (masks honoured) with the signature of ``postnorm_reference.hf_run``,
so that module's ``hf_edges``, ``hf_eap`` and ``hf_sender_values`` run it (``run=hf_run,
reader=receiver_input``). A q/k/v receiver recomputes its projection (query/key/value Linear) from its
own input and replaces its head's slice; an MLP receiver replaces the intermediate dense layer's input
(the residual add after the MLP still reads the run's own value); the logits receiver replaces the
masked-LM head's input. Families: BERT's module layout ("bert", "roberta", "electra", DeBERTa v1 and v2,
whose LayerNorm v1 writes out by hand) and DistilBERT's (``parts``).
"""

from __future__ import annotations

from types import SimpleNamespace

import postnorm_reference as pr
from circuit_references import current as sender_value
from circuit_references import parse

D_HEAD = pr.D_HEAD


def layers(hf):
    base = hf.base_model
    return base.transformer.layer if hasattr(base, "transformer") else base.encoder.layer


def parts(blk):
    """A layer's modules: ``out`` (the attention output projection), ``ln1``, ``mlp_in`` (the module whose
    input is what the MLP reads), ``mlp_out`` (the module whose output is what the MLP adds), ``ln2`` and
    ``qkv`` (``projections``)."""
    if hasattr(blk, "sa_layer_norm"):  # DistilBERT
        a = blk.attention
        return SimpleNamespace(out=a.out_lin, ln1=blk.sa_layer_norm, mlp_in=blk.ffn, mlp_out=blk.ffn, ln2=blk.output_layer_norm,
                               qkv={"q": a.q_lin, "k": a.k_lin, "v": a.v_lin})
    return SimpleNamespace(out=blk.attention.output.dense, ln1=blk.attention.output.LayerNorm, mlp_in=blk.intermediate,
                           mlp_out=blk.output.dense, ln2=blk.output.LayerNorm, qkv=projections(blk))


def lm_head(hf):
    """The module reading the encoder's output (the logits receiver's reader)."""
    for name in ("cls", "lm_head", "generator_predictions", "lm_predictions", "vocab_transform"):
        if hasattr(hf, name):
            return getattr(hf, name)
    raise AssertionError(f"no masked-LM head on {type(hf).__name__}")


def projections(blk) -> dict:
    """{"q"|"k"|"v": the Linear computing every head's query/key/value}, or {} where one fused projection
    computes them all (DeBERTa v1's in_proj: its q/k/v receivers are not tested)."""
    a = blk.attention.self
    for names in (("query", "key", "value"), ("query_proj", "key_proj", "value_proj")):
        if all(hasattr(a, n) for n in names):
            return dict(zip("qkv", (getattr(a, n) for n in names)))
    return {}


def hf_run(family, hf, ids, mask, read=None):
    """(logits, cur): one HF forward; ``read(receiver, entry, cur)`` returns the input that receiver reads
    instead of ``entry`` (or None). ``cur``: sender values ('input', ('result', l), ('mlp', l)), the
    attention branches' outputs (('attn', l)) and the residual each layer reads (('pre', l))."""
    cur: dict = {}
    quiet, recompute, handles = pr.quiet_hooks()

    def on(module, fn, pre=False):
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        handles.append(register(quiet(fn)))

    for l, blk in enumerate(layers(hf)):

        pr.record_layer_input(blk, l, cur, quiet, handles)
        p = parts(blk)
        on(p.out, lambda m, a, l=l, blk=blk, dense=p.out: cur.__setitem__(("result", l), pr.head_results(blk, a[0], dense)), pre=True)
        on(p.out, lambda m, a, out, l=l: cur.__setitem__(("attn", l), out))
        on(p.mlp_out, lambda m, a, out, l=l: cur.__setitem__(("mlp", l), out))

        def on_mlp_in(m, args, l=l):
            new = None if read is None else read(f"m{l}", args[0], cur)
            return None if new is None else (new,)

        on(p.mlp_in, on_mlp_in, pre=True)
        heads = hf.config.num_attention_heads
        for kind, proj in p.qkv.items():

            def on_qkv(m, args, out, l=l, kind=kind, proj=proj):
                return pr.replace_heads(out, heads, l, kind, cur, read, lambda x, proj=proj: recompute(proj, x))

            on(proj, on_qkv)

    def on_final(m, args):
        new = None if read is None else read("logits", args[0], cur)
        return None if new is None else (new,)

    on(lm_head(hf), on_final, pre=True)
    try:
        logits = hf(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    return logits, cur


def receiver_input(hf, receiver, entry, cur, weights, alt, *, after_norm=False):
    """What ``receiver`` reads per the definition; ``weights``: {sender: weight} of its replaced edges.
    ``after_norm``: the wrong, additive formula (the differences added to the residual the receiver
    reads, no norm replayed), for the tests' sanity checks."""
    diffs: dict = {}
    for s, w in weights.items():
        kind, layer, _ = parse(s)
        key = "input" if kind == "input" else ("attn" if kind == "head" else "mlp", layer)
        diffs[key] = diffs.get(key, 0) + w * (alt[s] - sender_value(cur, s))
    if after_norm:
        return entry + sum(diffs.values())
    kind, layer, _ = parse(receiver)
    n = len(layers(hf)) if kind == "logits" else layer
    x = cur["input"] + diffs.get("input", 0)
    for l, blk in enumerate(layers(hf)[: n + (kind == "mlp")]):
        x = parts(blk).ln1(x + cur[("attn", l)] + diffs.get(("attn", l), 0))
        if kind == "mlp" and l == layer:
            return x
        x = parts(blk).ln2(x + cur[("mlp", l)] + diffs.get(("mlp", l), 0))
    return x


def hf_edges(family, hf, ids, mask, edges, alt, **kw):
    return pr.hf_edges(family, hf, ids, mask, edges, alt, run=hf_run, reader=receiver_input, **kw)


def hf_alternatives(family, hf, ablation, reference, reference_mask, like):
    return pr.hf_alternatives(family, hf, ablation, reference, reference_mask, like, run=hf_run)


def hf_sender_values(family, hf, ids, mask):
    return pr.hf_sender_values(family, hf, ids, mask, run=hf_run)


def hf_eap(family, hf, clean, corrupt, mask, corrupt_mask, metric):
    return pr.hf_eap(family, hf, clean, corrupt, mask, corrupt_mask, metric, run=hf_run, reader=receiver_input)
