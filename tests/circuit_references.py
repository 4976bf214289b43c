"""Textbook circuit algorithms written with plain HF forward hooks, attention masks honoured in every run.

Nothing here calls fxlens: each algorithm is one or more ``hf(input_ids=..., attention_mask=...)``
forwards with ``register_forward_hook`` / ``register_forward_pre_hook`` on the HF modules, so a
reference run uses exactly the mask it is given (the clean run the clean mask, the corrupted or
reference run its own).

- ``hf_run``: one hooked forward. It records every sender's output as it is computed (the input is
  what layer 0's input norm reads; a head's output is its slice of the attention output projection's
  input times that slice of the projection weight, bias excluded as in TransformerLens' ``hook_result``;
  an MLP's output is the MLP module's output) and lets a caller change what each receiver reads: a
  q/k/v receiver recomputes the HF input norm and projection from a residual it is given and replaces
  its head's slice of the projection output (before rotary embeddings); an MLP receiver and the logits
  replace the input of their own norm (the residual itself flows on unchanged).
- ``hf_edges``: edge interventions (each receiver reads the residual minus each replaced edge's sender
  output in this run plus the sender's alternative).
- ``hf_path_patch``: Wang et al.'s three steps (cache; path run with every head's attention output
  frozen at the clean run and the sender's from the corrupted run, recording the receivers' q/k/v;
  a clean run reading them).
- ``hf_eap``: EAP by autograd: a zero added to each receiver's input, the gradient of the metric,
  dotted with (corrupted - clean) sender outputs, summed over batch and positions.

Families: llama (and Gemma-1, same module layout), GPT-2 (fused QKV, Conv1D), GPT-NeoX (parallel
attention and MLP, per-head interleaved QKV), OPT (no MLP module: ``fc2`` writes the MLP's output; the
residual is flattened to [batch*pos, d] around the MLP).
"""

from __future__ import annotations

import torch


def parse(name):
    """('input'|'head'|'mlp'|'q'|'k'|'v'|'logits', layer, head) of a sender or receiver name."""
    if name in ("input", "logits"):
        return name, None, None
    if name.startswith("m"):
        return "mlp", int(name[1:]), None
    layer, rest = name[1:].split(".h")
    if "<" in rest:
        head, kind = rest[:-1].split("<")
        return kind, int(layer), int(head)
    return "head", int(layer), int(rest)


# ---- where each family keeps its modules --------------------------------------------------------------


def blocks(family, hf):
    if family == "gpt2":
        return hf.transformer.h
    if family == "neox":
        return hf.gpt_neox.layers
    if family == "opt":
        return hf.model.decoder.layers
    return hf.model.layers  # llama, gemma


def in_norm(family, blk):
    return {"gpt2": lambda: blk.ln_1, "opt": lambda: blk.self_attn_layer_norm}.get(family, lambda: blk.input_layernorm)()


def mlp_norm(family, blk):
    """The norm in front of the MLP: its input is resid_mid (resid_pre in GPT-NeoX's parallel layers)."""
    return {"gpt2": lambda: blk.ln_2, "opt": lambda: blk.final_layer_norm}.get(family, lambda: blk.post_attention_layernorm)()


def out_proj(family, blk):
    return {"gpt2": lambda: blk.attn.c_proj, "neox": lambda: blk.attention.dense,
            "opt": lambda: blk.self_attn.out_proj}.get(family, lambda: blk.self_attn.o_proj)()


def final_norm(family, hf):
    return {"gpt2": lambda: hf.transformer.ln_f, "neox": lambda: hf.gpt_neox.final_layer_norm,
            "opt": lambda: hf.model.decoder.final_layer_norm}.get(family, lambda: hf.model.norm)()


def mlp_module(family, blk):
    """The module whose output is the MLP's: OPT has no MLP module, its ``fc2`` writes the MLP's output."""
    return blk.fc2 if family == "opt" else blk.mlp


def dims(hf):
    c = hf.config
    d = getattr(c, "hidden_size", None) or c.n_embd
    n = getattr(c, "num_attention_heads", None) or c.n_head
    d_head = getattr(c, "head_dim", None) or d // n
    return d, n, d_head


def projections(family, blk):
    """{module: [kind, ...]}: the modules whose outputs hold q, k and v (fused in GPT-2 and GPT-NeoX)."""
    if family == "gpt2":
        return {blk.attn.c_attn: ["q", "k", "v"]}
    if family == "neox":
        return {blk.attention.query_key_value: ["q", "k", "v"]}
    a = blk.self_attn
    return {a.q_proj: ["q"], a.k_proj: ["k"], a.v_proj: ["v"]}


def head_view(family, hf, kind, out):
    """A view [batch, pos, heads, d_head] of ``kind``'s part of a projection output (writes go through)."""
    d, _, d_head = dims(hf)
    i = "qkv".index(kind)
    if family == "gpt2":
        return out[..., i * d : (i + 1) * d].view(*out.shape[:-1], -1, d_head)
    if family == "neox":  # per head [q | k | v]
        return out.view(*out.shape[:-1], -1, 3 * d_head)[..., i * d_head : (i + 1) * d_head]
    return out.view(*out.shape[:-1], -1, d_head)


def head_results(family, hf, layer, z):
    """[batch, pos, heads, d_model]: each head's share of the attention output projection (no bias)."""
    _, n, d_head = dims(hf)
    w = out_proj(family, blocks(family, hf)[layer]).weight
    zh = z.view(*z.shape[:-1], n, d_head)
    if family == "gpt2":  # Conv1D: [in, out]
        return torch.einsum("bshe,hed->bshd", zh, w.view(n, d_head, -1))
    return torch.einsum("bshe,dhe->bshd", zh, w.view(-1, n, d_head))


# ---- one hooked forward -------------------------------------------------------------------------------


def hf_run(family, hf, ids, mask, *, qkv_input=None, mlp_input=None, logits_input=None, z=None, mlp_out=None):
    """(logits, cur): one HF forward with masks; ``cur`` holds what each sender wrote in this run
    ('input', ('result', l): [b, s, heads, d], ('mlp', l)) and the residual at each read point
    (('pre', l), ('mid', l), 'post').

    Callbacks change what receivers read or what components write:
    - ``qkv_input(layer, kind, head, cur)``: a residual for that head's q/k/v to be recomputed from
      (through the HF input norm and projection), or None;
    - ``mlp_input(layer, resid, cur)``, ``logits_input(resid, cur)``: the residual the MLP's / the final
      norm reads, or None;
    - ``z(layer, z)``: the attention output projection's input, or None; ``mlp_out(layer, out)``.
    """
    cur: dict = {}
    busy = []  # while a receiver recomputes its input, the recorders stay quiet
    handles = []
    L = len(blocks(family, hf))
    flat = family == "opt"  # OPT flattens the residual to [batch*pos, d] around its MLP

    def unflat(x):
        return x.view(*ids.shape, -1) if flat else x

    def reflat(x):
        return x.reshape(-1, x.shape[-1]) if flat else x

    def pre(mod, fn):
        handles.append(mod.register_forward_pre_hook(lambda m, args: None if busy else fn(args[0])))

    def post(mod, fn):
        handles.append(mod.register_forward_hook(lambda m, args, out: None if busy else fn(out)))

    for layer, blk in enumerate(blocks(family, hf)):

        def on_pre(x, layer=layer):
            if layer == 0:
                cur["input"] = x
            cur[("pre", layer)] = x

        pre(in_norm(family, blk), on_pre)

        def on_mid(x, layer=layer):
            x = unflat(x)
            cur[("mid", layer)] = x
            new = mlp_input(layer, x, cur) if mlp_input else None
            return None if new is None else (reflat(new),)

        pre(mlp_norm(family, blk), on_mid)

        def on_z(x, layer=layer):
            new = z(layer, x) if z else None
            cur[("result", layer)] = head_results(family, hf, layer, x if new is None else new)
            return None if new is None else (new,)

        pre(out_proj(family, blk), on_z)

        def on_mlp(out, layer=layer):
            out = unflat(out)
            new = mlp_out(layer, out) if mlp_out else None
            cur[("mlp", layer)] = out if new is None else new
            return None if new is None else reflat(new)

        post(mlp_module(family, blk), on_mlp)

        for proj, kinds in projections(family, blk).items():

            def on_proj(out, layer=layer, kinds=kinds, blk=blk, proj=proj):
                if qkv_input is None:
                    return None
                new = None
                for kind in kinds:
                    for head in range(head_view(family, hf, kind, out).shape[-2]):
                        resid = qkv_input(layer, kind, head, cur)
                        if resid is None:
                            continue
                        busy.append(1)
                        try:
                            recomputed = proj(in_norm(family, blk)(resid))
                        finally:
                            busy.pop()
                        if new is None:
                            new = out.clone()
                        head_view(family, hf, kind, new)[:, :, head] = head_view(family, hf, kind, recomputed)[:, :, head]
                return new

            post(proj, on_proj)

    def on_final(x):
        cur["post"] = x
        new = logits_input(x, cur) if logits_input else None
        return None if new is None else (new,)

    pre(final_norm(family, hf), on_final)
    try:
        logits = hf(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    assert len([k for k in cur if isinstance(k, tuple) and k[0] == "result"]) == L
    return logits, cur


def current(cur, sender):
    kind, layer, head = parse(sender)
    if kind == "input":
        return cur["input"]
    if kind == "head":
        return cur[("result", layer)][:, :, head]
    return cur[("mlp", layer)]


def hf_sender_outputs(family, hf, ids, mask):
    """{sender name: [batch, pos, d_model]} from one plain masked HF forward."""
    with torch.no_grad():
        _, cur = hf_run(family, hf, ids, mask)
    out = {"input": cur["input"]}
    for layer in range(len(blocks(family, hf))):
        r = cur[("result", layer)]
        for h in range(r.shape[2]):
            out[f"a{layer}.h{h}"] = r[:, :, h]
        out[f"m{layer}"] = cur[("mlp", layer)]
    return out


def hf_alternatives(family, hf, ablation, reference, reference_mask, like):
    """The replacement value of every sender: the reference run's outputs ('corrupted'), their mean over
    the reference batch at each position ('mean'), or zeros ('zero', shaped like ``like``'s run)."""
    if ablation == "zero":
        return {k: torch.zeros_like(v[:1]) for k, v in hf_sender_outputs(family, hf, like, None).items()}
    values = hf_sender_outputs(family, hf, reference, reference_mask)
    if ablation == "mean":
        if reference_mask is None:
            return {k: v.mean(0, keepdim=True) for k, v in values.items()}
        # at each position, the mean over the reference rows whose token there is real (not padding)
        w = reference_mask.to(torch.float32)[:, :, None]
        return {k: (v * w).sum(0, keepdim=True) / w.sum(0, keepdim=True) for k, v in values.items()}
    assert ablation == "corrupted"
    return values


def hf_edges(family, hf, ids, mask, edges, alt):
    """Logits with each edge replaced: a receiver reads its residual minus each replaced edge's sender
    output in this run plus the sender's alternative."""
    into: dict = {}
    for e in edges:
        s, r = e.split("->") if isinstance(e, str) else e
        into.setdefault(r.strip(), []).append(s.strip())

    def read(r, resid, cur):
        if r not in into:
            return None
        return resid + sum(alt[s] - current(cur, s) for s in into[r])

    def qkv_input(layer, kind, head, cur):
        return read(f"a{layer}.h{head}<{kind}>", cur[("pre", layer)], cur)

    with torch.no_grad():
        logits, _ = hf_run(family, hf, ids, mask, qkv_input=qkv_input,
                           mlp_input=lambda layer, x, cur: read(f"m{layer}", x, cur),
                           logits_input=lambda x, cur: read("logits", x, cur))
    return logits


def hf_path_patch(family, hf, clean, corrupt, mask, corrupt_mask, metric, receivers, sender, freeze_mlps):
    """Wang et al.'s three steps: the metric of the clean run whose receivers read the path run."""
    with torch.no_grad():
        z_clean, z_corrupt, mlp_clean, mlp_corrupt = {}, {}, {}, {}
        hf_run(family, hf, clean, mask, z=lambda l, x: z_clean.__setitem__(l, x), mlp_out=lambda l, o: mlp_clean.__setitem__(l, o))
        hf_run(family, hf, corrupt, corrupt_mask, z=lambda l, x: z_corrupt.__setitem__(l, x),
               mlp_out=lambda l, o: mlp_corrupt.__setitem__(l, o))
        s_kind, s_layer, s_head = parse(sender)
        _, n, d_head = dims(hf)

        def freeze(layer, x):
            new = z_clean[layer].clone()
            if s_kind == "head" and s_layer == layer:
                sl = slice(s_head * d_head, (s_head + 1) * d_head)
                new[..., sl] = z_corrupt[layer][..., sl]
            return new

        def mlps(layer, out):
            if s_kind == "mlp" and s_layer == layer:
                return mlp_corrupt[layer]
            return mlp_clean[layer] if freeze_mlps else None

        recorded = {}
        wanted = {parse(r)[:3] for r in receivers if r != "logits"}

        def record(layer, kind, head, cur):
            if (kind, layer, head) in wanted:
                recorded[(kind, layer, head)] = cur[("pre", layer)]
            return None

        logits, _ = hf_run(family, hf, clean, mask, z=freeze, mlp_out=mlps, qkv_input=record)
        if receivers == ["logits"]:
            return float(metric(logits))
        # the receivers' q/k/v in the path run are what their input norm and projection make of the
        # path run's residual; the last run recomputes them from that residual
        logits, _ = hf_run(family, hf, clean, mask, qkv_input=lambda layer, kind, head, cur: recorded.get((kind, layer, head)))
    return float(metric(logits))


def hf_eap(family, hf, clean, corrupt, mask, corrupt_mask, metric, edges):
    """{(sender, receiver): score} for ``edges``: d metric / d (receiver input) on the clean run, dotted
    with (corrupted - clean) sender output, summed over batch, positions and d_model."""
    receivers = sorted({r for _, r in edges})
    ids_shape = clean.shape
    d, _, _ = dims(hf)
    delta = {r: torch.zeros(*ids_shape, d, requires_grad=True) for r in receivers}

    def add(r, resid):
        return resid + delta[r] if r in delta else None

    logits, _ = hf_run(family, hf, clean, mask,
                       qkv_input=lambda layer, kind, head, cur: add(f"a{layer}.h{head}<{kind}>", cur[("pre", layer)]),
                       mlp_input=lambda layer, x, cur: add(f"m{layer}", x),
                       logits_input=lambda x, cur: add("logits", x))
    grads = dict(zip(receivers, torch.autograd.grad(metric(logits), [delta[r] for r in receivers])))
    clean_v = hf_sender_outputs(family, hf, clean, mask)
    corrupt_v = hf_sender_outputs(family, hf, corrupt, corrupt_mask)
    return {(s, r): float(((corrupt_v[s] - clean_v[s]) * grads[r]).sum()) for s, r in edges}
