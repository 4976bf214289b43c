"""TransformerLens' input sites (hook_q_input, hook_k_input, hook_v_input, hook_attn_in, hook_mlp_in)
against plain hooks on the HF model.

Reference: replacing head h's query input with x' means head h's query is computed from x' (through
the layer's norm and projection) and nothing else changes. On the HF model that is a forward hook on
the projection that overwrites head h's slice of its output with the projection of the norm of x'
(GPT-2: the q, k or v third of the fused ``c_attn``); for ``hook_mlp_in`` a forward-pre-hook on the
MLP that gives it the norm of x'. These hooks know nothing of fxlens' graph.
"""

from __future__ import annotations

import pytest
import torch

import fxlens
import hf_hooks as H
from families import make, tokens

D = 64


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request):
    hf = make(request.param, **({"n_kv_heads": 2} if request.param == "llama" else {}))
    return request.param, hf, fxlens.Model.from_hf(hf)


def _inputs():
    ids = tokens(3, 6)
    return ids, H.padding_mask(ids, "left")


def _new_input(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _hf_with_head_input(family, hf, ids, mask, layer, kind, head, x_new):
    """HF logits with head ``head``'s ``kind`` ("q", "k" or "v") computed from ``x_new`` [b, p, d]."""
    h_q, h_kv, dh = H.dims(hf)
    if family == "llama":
        blk = hf.model.layers[layer]
        proj = getattr(blk.self_attn, f"{kind}_proj")

        def hook(module, args, out):
            new = proj.forward.__wrapped__(blk.input_layernorm(x_new)) if hasattr(proj.forward, "__wrapped__") else \
                torch.nn.functional.linear(blk.input_layernorm(x_new), proj.weight, proj.bias)
            out = out.clone()
            out[..., head * dh:(head + 1) * dh] = new[..., head * dh:(head + 1) * dh]
            return out
    else:
        blk = hf.transformer.h[layer]
        proj = blk.attn.c_attn
        third = "qkv".index(kind) * D

        def hook(module, args, out):
            new = torch.addmm(proj.bias, blk.ln_1(x_new).reshape(-1, D), proj.weight).view(out.shape)
            out = out.clone()
            sl = slice(third + head * dh, third + (head + 1) * dh)
            out[..., sl] = new[..., sl]
            return out

    handle = proj.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return hf(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_a_head_input_patch_equals_hf_with_that_head_recomputed(pair, kind):
    family, hf, model = pair
    ids, mask = _inputs()
    n = model.cfg.n_heads if kind == "q" else model.cfg.n_key_value_heads or model.cfg.n_heads
    head, layer = n - 1, 1
    x_new = _new_input((3, 6, D))
    site = f"blocks.{layer}.hook_{kind}_input"
    want = _hf_with_head_input(family, hf, ids, mask, layer, kind, head, x_new)
    got = model.run_with_interventions(ids, [fxlens.Patch(site, source=x_new[:, :, None].expand(3, 6, n, D), head=head)], mask)
    real = mask.bool()
    assert H.maxdiff(got[real], want[real]) < 1e-5 * want.abs().max().item()
    hooked = model.run_with_hooks(ids, mask, fwd_hooks=[(site, lambda v, hook: v.index_copy(2, torch.tensor([head]), x_new[:, :, None]))])
    assert H.maxdiff(hooked[real], want[real]) < 1e-5 * want.abs().max().item()
    # the other heads' q (k, v) are untouched; this head's changed
    name = f"blocks.{layer}.attn.hook_{kind}"
    _, before = model.run_with_cache(ids, mask, names_filter=[name])
    _, after = model.run_with_interventions(ids, [fxlens.Patch(site, source=x_new[:, :, None].expand(3, 6, n, D), head=head)],
                                            mask, names_filter=[name])
    others = [h for h in range(n) if h != head]
    assert torch.equal(after[name][:, :, others], before[name][:, :, others])
    assert not torch.allclose(after[name][:, :, head], before[name][:, :, head])


def test_attn_in_drives_a_heads_query_key_and_value(pair):
    """Copy h of hook_attn_in feeds query head h and key/value head h (on a grouped model, the first
    n_key_value_heads copies feed the key/value heads), as TransformerLens' bridge does."""
    family, hf, model = pair
    ids, mask = _inputs()
    x_new = _new_input((3, 6, D), seed=1)
    head = 1
    h_q, h_kv, dh = H.dims(hf)
    if family == "llama":
        blk = hf.model.layers[1]
        projs = [(blk.self_attn.q_proj, 0), (blk.self_attn.k_proj, 0), (blk.self_attn.v_proj, 0)]
        norm = blk.input_layernorm
    else:
        blk = hf.transformer.h[1]
        projs = [(blk.attn.c_attn, third * D) for third in range(3)]
        norm = blk.ln_1

    def hook_for(proj, offset):
        def hook(module, args, out):
            x = norm(x_new)
            new = torch.nn.functional.linear(x, proj.weight, proj.bias) if family == "llama" else \
                torch.addmm(proj.bias, x.reshape(-1, D), proj.weight).view(out.shape)
            out = out.clone()
            sl = slice(offset + head * dh, offset + (head + 1) * dh)
            out[..., sl] = new[..., sl]
            return out
        return hook

    handles = []
    if family == "llama":
        handles = [p.register_forward_hook(hook_for(p, 0)) for p, _ in projs]
    else:
        def fused(module, args, out):
            for _, offset in projs:
                out = hook_for(blk.attn.c_attn, offset)(module, args, out)
            return out
        handles = [blk.attn.c_attn.register_forward_hook(fused)]
    try:
        with torch.no_grad():
            want = hf(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    got = model.run_with_interventions(ids, [fxlens.Patch("blocks.1.hook_attn_in", source=x_new[:, :, None].expand(3, 6, h_q, D), head=head)], mask)
    real = mask.bool()
    assert H.maxdiff(got[real], want[real]) < 1e-5 * want.abs().max().item()


def _mlp_in_patch_equals_hf(hf, model, site, module, mlp_input, seed):
    """Patching ``site`` (hook_mlp_in) with x' equals HF with ``module`` fed ``mlp_input(x')`` (a pre-hook)."""
    ids, mask = _inputs()
    x_new = _new_input((3, 6, D), seed=seed)
    handle = module.register_forward_pre_hook(lambda m, args: (mlp_input(x_new),) + tuple(args[1:]))
    try:
        with torch.no_grad():
            want = hf(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    got = model.run_with_interventions(ids, [fxlens.Patch(site, source=x_new)], mask)
    real = mask.bool()
    assert H.maxdiff(got[real], want[real]) < 1e-5 * want.abs().max().item()


def test_mlp_in_changes_the_mlp_input_and_not_the_skip_path(pair):
    family, hf, model = pair
    blk = hf.model.layers[0] if family == "llama" else hf.transformer.h[0]
    norm = blk.post_attention_layernorm if family == "llama" else blk.ln_2
    _mlp_in_patch_equals_hf(hf, model, "blocks.0.hook_mlp_in", blk.mlp, norm, seed=2)


def test_input_sites_read_the_residual_and_are_made_only_on_request(pair):
    _, _, model = pair
    ids, mask = _inputs()
    _, every = model.run_with_cache(ids, mask)
    assert not any(k.endswith(("_input", "attn_in", "mlp_in")) for k in every.keys())
    names = ["blocks.1.hook_q_input", "blocks.1.hook_k_input", "blocks.0.hook_mlp_in"]
    _, cache = model.run_with_cache(ids, mask, names_filter=names + ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_mid"])
    resid = cache["blocks.1.hook_resid_pre"]
    assert cache["blocks.1.hook_q_input"].shape == (3, 6, model.cfg.n_heads, D)
    assert torch.equal(cache["blocks.1.hook_q_input"], resid[:, :, None].expand_as(cache["blocks.1.hook_q_input"]))
    assert cache["blocks.1.hook_k_input"].shape[2] == (model.cfg.n_key_value_heads or model.cfg.n_heads)
    assert torch.equal(cache["blocks.0.hook_mlp_in"], cache["blocks.0.hook_resid_mid"])
    # an identity hook on every input site leaves the logits as they are
    same = model.run_with_hooks(ids, mask, fwd_hooks=[(n, lambda v, hook: v) for n in names])
    base = model(ids, mask)
    assert H.maxdiff(same, base) < 1e-5 * base.abs().max().item()


def test_mlp_in_of_a_flattened_mlp_input_opt():
    """OPT's MLP reads the residual flattened to [batch*pos, d]: the site is still [batch, pos, d]."""
    hf = make("opt")
    model = fxlens.Model.from_hf(hf)
    blk = hf.model.decoder.layers[1]
    _mlp_in_patch_equals_hf(hf, model, "blocks.1.hook_mlp_in", blk.fc1, lambda x: blk.final_layer_norm(x).reshape(-1, D), seed=4)
    ids, mask = _inputs()
    _, cache = model.run_with_cache(ids, mask, names_filter=["blocks.1.hook_mlp_in", "blocks.1.hook_resid_mid"])
    assert torch.equal(cache["blocks.1.hook_mlp_in"], cache["blocks.1.hook_resid_mid"])
