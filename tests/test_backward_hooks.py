"""Backward hooks and gradient caches against autograd on the HF model with plain hooks.

The reference: every site of ``hf_hooks`` is replaced by a copy of itself through plain
``register_forward_hook`` / ``register_forward_pre_hook`` hooks on the HF model, and
``torch.autograd.grad`` of a next-token loss computed here (not fxlens' ``lm_loss``) gives the gradient
at each copy. fxlens' ``run_with_cache(incl_bwd=True)``, ``run_with_hooks(bwd_hooks=...)``,
``add_hook(dir="bwd")`` and ``hooks(bwd_hooks=...)`` must give the same gradients, left padding included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxlens
import hf_hooks as H
from families import make, tokens

FAMILIES = ("gpt2", "llama", "neox", "opt")


def _loss(logits, ids, mask):
    """Mean next-token cross-entropy over targets that are not padding (written here, independently)."""
    keep = mask[:, 1:].bool()
    return F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep])


def _hf_grads(hf, ids, mask, sites):
    copies = {}

    def keep(site):
        def replace(value):
            copies[site] = value  # a copy of the site's value; the model goes on with it
            return value
        return replace

    logits, _ = H.hf_forward(hf, ids, mask, replace={s: keep(s) for s in sites}, grad=True)
    loss = _loss(logits, ids, mask)
    grads = torch.autograd.grad(loss, [copies[s] for s in sites])
    return loss.detach(), dict(zip(sites, grads))


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    hf = make(request.param, **H.FAMILY_DIMS[request.param])
    return hf, fxlens.Model.from_hf(hf)


def _inputs(padding="left"):
    ids = tokens(3, 6)
    return ids, H.padding_mask(ids, padding)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_gradient_cache_equals_autograd_on_hf(pair, padding):
    hf, model = pair
    ids, mask = _inputs(padding)
    sites = H.all_sites(hf)
    ref_loss, ref = _hf_grads(hf, ids, mask, sites)
    loss, cache = model.run_with_cache(ids, mask, names_filter=sites, return_type="loss", incl_bwd=True)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    assert not loss.requires_grad
    for site in sites:
        got, want = cache[site + "_grad"], ref[site]
        scale = want.abs().max().item() + 1e-12
        assert H.maxdiff(got, want) <= 1e-4 * scale + 1e-7, site
        assert site in cache  # forward values are cached beside the gradients, as in TransformerLens
    assert all(p.grad is None for p in hf.parameters()), "incl_bwd must not accumulate parameter gradients"


def test_bwd_hook_sees_the_site_gradient_and_can_replace_it(pair):
    hf, model = pair
    ids, mask = _inputs()
    site = "blocks.1.hook_resid_pre"
    _, ref = _hf_grads(hf, ids, mask, [site])
    seen = []

    def zero(grad, hook):
        seen.append((hook.name, grad.clone()))
        return torch.zeros_like(grad)

    loss = model.run_with_hooks(ids, mask, return_type="loss", bwd_hooks=[(site, zero)])
    emb = next(p for p in hf.parameters() if p.dim() == 2)
    (g_emb,) = torch.autograd.grad(loss, [emb], allow_unused=True)
    assert seen and seen[0][0] == site
    assert H.maxdiff(seen[0][1], ref[site]) <= 1e-4 * ref[site].abs().max().item()
    # with the gradient cut at resid_pre of layer 1 the embedding gets none through layer 1 and later;
    # reference: the same cut made with a tensor hook on the HF copy
    copies = {}

    def cut(value):
        value.register_hook(torch.zeros_like)
        copies[site] = value
        return value

    logits, _ = H.hf_forward(hf, ids, mask, replace={site: cut}, grad=True)
    (want,) = torch.autograd.grad(_loss(logits, ids, mask), [emb], allow_unused=True)
    if want is None:
        assert g_emb is None or g_emb.abs().max() == 0
    else:
        assert H.maxdiff(g_emb, want) <= 1e-5 * (want.abs().max().item() + 1e-12) + 1e-9


def test_persistent_and_scoped_backward_hooks():
    hf = make("llama", n_kv_heads=2)
    model = fxlens.Model.from_hf(hf)
    ids = tokens(2, 6)
    site = "blocks.0.hook_resid_post"
    calls = []
    model.add_hook(site, lambda g, h: calls.append(h.name), dir="bwd")
    model(ids, return_type="loss").backward()
    model(ids, return_type="loss").backward()
    assert calls == [site, site]
    model.reset_hooks()
    model(ids, return_type="loss").backward()
    assert calls == [site, site]
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(bwd_hooks=[(site, lambda g, h: calls.append("ctx"))]):
            model(ids, return_type="loss").backward()
            raise RuntimeError("boom")
    assert calls[-1] == "ctx" and model.persistent_hooks == []
    hf.zero_grad()


def test_gradient_cache_under_no_grad_and_errors():
    hf = make("gpt2")
    model = fxlens.Model.from_hf(hf)
    ids = tokens(2, 6)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post", return_type="loss", incl_bwd=True)
    assert cache["blocks.0.hook_resid_post_grad"].abs().sum() > 0
    with pytest.raises(ValueError, match="return_type='loss'"):
        model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post", incl_bwd=True)
    with pytest.raises(ValueError, match="dir="):
        model.add_hook("blocks.0.hook_resid_post", lambda g, h: None, dir="both")
    with pytest.raises(Exception, match="shape"):
        model.run_with_hooks(ids, return_type="loss",
                             bwd_hooks=[("blocks.0.hook_resid_post", lambda g, h: g[:, :1])]).backward()


def test_resid_mid_gradient_matches_finite_differences():
    """TransformerLens' bridge drops the skip path in this gradient (issue 12); finite differences in
    float64 are the reference here."""
    hf = make("llama", n_kv_heads=2).double()
    model = fxlens.Model.from_hf(hf)
    ids = tokens(1, 6)
    site = "blocks.0.hook_resid_mid"
    _, cache = model.run_with_cache(ids, names_filter=site, return_type="loss", incl_bwd=True)
    grad = cache[site + "_grad"]
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-5

    def loss_at(t):
        logits = model.run_with_hooks(ids, fwd_hooks=[(site, lambda v, h: v + t * direction)])
        return F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()  # in float64 throughout

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = (grad * direction).sum().item()
    # fxlens' loss takes log-softmax in float32, so the two agree to float32's precision, not float64's
    assert abs(fd - analytic) < 1e-5 * abs(fd)
