"""Edges on post-norm models (Gemma 2, OLMo 2), written with plain HF forward hooks; nothing here calls fxlens.

The definition: layer l writes ``post_norm_l(branch_l)``, ``branch_l`` being the attention output
projection's output (the sum of the per-head results, + bias) or the MLP module's output. With edges
replaced, receiver r reads

    entry_r + sum_{s = input} w[s, r] (alt_s - cur_s)
            + sum over branches l upstream of r [post_norm_l(branch_l + D_{l,r}) - post_norm_l(branch_l)],
    D_{l,r} = sum_{s in l} w[s, r] (alt_s - cur_s)

where ``cur`` are the sender values of this very run (a head's result: its slice of the output
projection's input times that slice of the weight; an MLP's: the MLP module's output, before the norm),
``entry_r`` the residual the receiver reads in this run, and ``post_norm_l`` the HF norm module
itself, called on the tensors.

``hf_run`` is one hooked HF forward (masks honoured): decoder-layer pre-hooks record the residual
each layer reads, output-projection hooks the per-head results and the branch sums, MLP hooks the MLP
outputs. A q/k/v receiver recomputes, from its own input, the modules from the residual to its
projection output as the model applies them (Gemma 2/3: input norm then projection, Gemma 3's per-head
q/k norms following in the model; OLMo 2/3: projection then q/k norm over all heads) and replaces its
head's slice; an MLP receiver replaces its MLP's input (Gemma: the pre-feedforward norm's input); the
logits receiver replaces the final norm's input. Families: "gemma2", "gemma3", "olmo2", "olmo3" (names
starting so, e.g. "gemma2-gqa").
Every other reader sees the run as it is.
"""

from __future__ import annotations

import torch
from circuit_references import current as sender_value
from circuit_references import parse

D_HEAD = 16


def reaches(sender, receiver) -> bool:
    s_kind, s_layer, _ = parse(sender)
    r_kind, r_layer, _ = parse(receiver)
    if r_kind == "logits" or s_kind == "input":
        return True
    if s_layer != r_layer:
        return s_layer < r_layer
    return s_kind == "head" and r_kind == "mlp"


def all_senders(hf):
    n, h = hf.config.num_hidden_layers, hf.config.num_attention_heads
    return ["input"] + [name for l in range(n) for name in [f"a{l}.h{i}" for i in range(h)] + [f"m{l}"]]


def all_receivers(hf):
    n, h = hf.config.num_hidden_layers, hf.config.num_attention_heads
    kv = getattr(hf.config, "num_key_value_heads", None) or h
    out = []
    for l in range(n):
        out += [f"a{l}.h{i}<q>" for i in range(h)] + [f"a{l}.h{i}<{k}>" for k in "kv" for i in range(kv)] + [f"m{l}"]
    return out + ["logits"]


def _qkv_modules(family, blk, kind):
    """(module whose output holds ``kind`` for every head, how to recompute it from a residual)."""
    a = blk.self_attn
    proj = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj}[kind]
    if family.startswith("gemma"):  # Gemma 3 normalises q and k per head after the projection: the model does that
        return proj, lambda x: proj(blk.input_layernorm(x))
    if kind == "v":
        return proj, proj
    norm = a.q_norm if kind == "q" else a.k_norm  # OLMo 2 normalises q and k over all heads together
    return norm, lambda x: norm(proj(x))


def _mlp_reader(family, blk):
    """The module whose input is the residual the MLP reads (and nothing else reads)."""
    return blk.pre_feedforward_layernorm if family.startswith("gemma") else blk.mlp


def head_results(blk, z, proj=None):
    """[batch, pos, heads, d_model]: each head's share of the output projection ``proj`` (default: the
    block's ``self_attn.o_proj``; no bias)."""
    w = (proj or blk.self_attn.o_proj).weight
    zh = z.view(*z.shape[:-1], -1, D_HEAD)
    return torch.einsum("bshe,dhe->bshd", zh, w.view(w.shape[0], -1, D_HEAD))


def quiet_hooks():
    """(quiet, recompute, handles): ``quiet(fn)`` wraps a hook so that it does nothing while ``recompute(fn, x)``
    runs HF modules for a receiver's input (the recorders must not see those calls); ``handles`` collects
    the hooks to remove."""
    busy, handles = [], []

    def quiet(fn):
        return lambda *a: None if busy else fn(*a)

    def recompute(fn, x):
        busy.append(1)
        try:
            return fn(x)
        finally:
            busy.pop()

    return quiet, recompute, handles


def record_layer_input(blk, l: int, cur: dict, quiet, handles: list) -> None:
    """Record what layer ``l`` reads as ``cur[("pre", l)]`` (and layer 0's as ``cur["input"]``)."""

    def on_layer(m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if l == 0:
            cur["input"] = x
        cur[("pre", l)] = x

    handles.append(blk.register_forward_pre_hook(quiet(on_layer), with_kwargs=True))


def replace_heads(out, n: int, l: int, kind: str, cur: dict, read, project):
    """``out`` (a q/k/v projection's output, heads of D_HEAD along the last axis) with each head h whose
    receiver ``a{l}.h{h}<{kind}>`` ``read`` gives an input replaced by ``project(input)``'s head h; None
    if no head is replaced."""
    if read is None:
        return None
    new = None
    for h in range(n):
        x = read(f"a{l}.h{h}<{kind}>", cur[("pre", l)], cur)
        if x is None:
            continue
        again = project(x)
        new = out.clone() if new is None else new
        new[..., h * D_HEAD : (h + 1) * D_HEAD] = again[..., h * D_HEAD : (h + 1) * D_HEAD]
    return new


def hf_run(family, hf, ids, mask, read=None):
    """(logits, cur): one HF forward. ``read(receiver, entry, cur)`` returns the input that receiver
    reads instead of ``entry`` (or None). ``cur`` holds this run's sender values ('input', ('result', l),
    ('mlp', l)) and branch sums (('attn_sum', l), ('mlp', l))."""
    cur: dict = {}
    quiet, recompute, handles = quiet_hooks()
    layers = hf.model.layers

    for l, blk in enumerate(layers):

        record_layer_input(blk, l, cur, quiet, handles)

        def on_z(m, args, l=l, blk=blk):
            cur[("result", l)] = head_results(blk, args[0])

        handles.append(blk.self_attn.o_proj.register_forward_pre_hook(quiet(on_z)))
        handles.append(blk.self_attn.o_proj.register_forward_hook(quiet(lambda m, a, out, l=l: cur.__setitem__(("attn_sum", l), out))))
        handles.append(blk.mlp.register_forward_hook(quiet(lambda m, a, out, l=l: cur.__setitem__(("mlp", l), out))))

        def on_mlp_in(m, args, l=l):
            if read is None:
                return None
            new = read(f"m{l}", args[0], cur)
            return None if new is None else (new,)

        handles.append(_mlp_reader(family, blk).register_forward_pre_hook(quiet(on_mlp_in)))
        kinds = {"q": hf.config.num_attention_heads, "k": hf.config.num_key_value_heads, "v": hf.config.num_key_value_heads}
        for kind, n in kinds.items():
            module, fn = _qkv_modules(family, blk, kind)

            def on_qkv(m, args, out, l=l, kind=kind, n=n, fn=fn):
                return replace_heads(out, n, l, kind, cur, read, lambda x, fn=fn: recompute(fn, x))

            handles.append(module.register_forward_hook(quiet(on_qkv)))

    def on_final(m, args):
        if read is None:
            return None
        new = read("logits", args[0], cur)
        return None if new is None else (new,)

    handles.append(hf.model.norm.register_forward_pre_hook(quiet(on_final)))
    try:
        logits = hf(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    return logits, cur


def hf_sender_values(family, hf, ids, mask, *, run=None):
    """{sender: [batch, pos, d_model]} of a plain masked run (values before the post-norms). ``run``: another
    family's ``hf_run`` (``bert_reference``)."""
    with torch.no_grad():
        _, cur = (run or hf_run)(family, hf, ids, mask)
    return {s: sender_value(cur, s) for s in all_senders(hf)}


def receiver_input(hf, receiver, entry, cur, weights, alt, *, after_norm=False):
    """What ``receiver`` reads per the definition; ``weights``: {sender: weight} of its replaced edges.
    ``after_norm``: the wrong formula (each edge's difference normalised alone and added after the
    norm is not it; here, the raw differences added to the residual), for the tests' sanity checks."""
    x = entry
    groups: dict = {}
    for s, w in weights.items():
        kind, layer, _ = parse(s)
        d = w * (alt[s] - sender_value(cur, s))
        if kind == "input" or after_norm:
            x = x + d
        else:
            key = ("attn" if kind == "head" else "mlp", layer)
            groups[key] = groups.get(key, 0) + d
    for (kind, layer), d in groups.items():
        blk = hf.model.layers[layer]
        norm = blk.post_attention_layernorm if kind == "attn" else blk.post_feedforward_layernorm
        branch = cur[("attn_sum", layer)] if kind == "attn" else cur[("mlp", layer)]
        x = x + (norm(branch + d) - norm(branch))
    return x


def hf_edges(family, hf, ids, mask, edges, alt, *, run=None, reader=None, **kw):
    """Logits of the run with ``edges`` replaced by ``alt`` ({sender: value}), per the definition. ``run``
    and ``reader``: another family's ``hf_run`` and ``receiver_input`` (``bert_reference``)."""
    run, reader = run or hf_run, reader or receiver_input
    into: dict = {}
    for e in edges:
        s, r = e.split("->") if isinstance(e, str) else e
        into.setdefault(r.strip(), {})[s.strip()] = 1.0

    def read(r, entry, cur):
        return reader(hf, r, entry, cur, into[r], alt, **kw) if r in into else None

    with torch.no_grad():
        logits, _ = run(family, hf, ids, mask, read)
    return logits


def hf_alternatives(family, hf, ablation, reference, reference_mask, like, *, run=None):
    if ablation == "zero":
        return {s: torch.zeros_like(v[:1]) for s, v in hf_sender_values(family, hf, like, None, run=run).items()}
    assert ablation == "corrupted"
    return hf_sender_values(family, hf, reference, reference_mask, run=run)


def hf_eap(family, hf, clean, corrupt, mask, corrupt_mask, metric, *, run=None, reader=None):
    """{(sender, receiver): d metric / d w[s, r]} at w = 0, by autograd through the hooked run: every
    receiver reads its input per the definition with all its upstream edges weighted by w."""
    run, reader = run or hf_run, reader or receiver_input
    senders, receivers = all_senders(hf), all_receivers(hf)
    w = torch.zeros(len(senders), len(receivers), requires_grad=True)
    alt = hf_sender_values(family, hf, corrupt, corrupt_mask, run=run)
    si = {s: i for i, s in enumerate(senders)}
    ri = {r: j for j, r in enumerate(receivers)}

    def read(r, entry, cur):
        weights = {s: w[si[s], ri[r]] for s in senders if reaches(s, r)}
        return reader(hf, r, entry, cur, weights, alt)

    with torch.enable_grad():
        logits, _ = run(family, hf, clean, mask, read)
        (grad,) = torch.autograd.grad(metric(logits), [w])
    return {(s, r): float(grad[si[s], ri[r]]) for r in receivers for s in senders if reaches(s, r)}
