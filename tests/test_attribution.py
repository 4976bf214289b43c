"""Attribution patching: same functions and shapes as fxlens.patching, and exact to first order."""

import pytest
import torch
from conftest import cached_model
from families import tokens

from fxlens import ActivationCache, attribution, metrics, patching

SWEEPS = [
    "get_act_patch_resid_pre",
    "get_act_patch_attn_out",
    "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_pattern_by_pos",
]


def _nudged_cache(model, ids, activation: str, eps: float, seed: int = 0) -> ActivationCache:
    """The corrupted run's values of ``activation`` plus noise of eps times their spread, as a 'clean' cache."""
    names = [model.get_act_name(activation, layer) for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(ids, names_filter=names)
    g = torch.Generator().manual_seed(seed)
    values = {n: cache[n] + eps * cache[n].std() * torch.randn(cache[n].shape, generator=g) for n in names}
    return ActivationCache(values, model.site_table, model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", SWEEPS)
def test_attribution_has_the_patching_shape_and_is_exact_to_first_order(family, name):
    hf, model = cached_model(family, n_layers=2, **({"n_kv_heads": 2} if family == "llama" else {}))
    ids = tokens(2, 6, seed=3)
    activation = patching.SWEEPS[name][0]
    metric = metrics.logit_diff(5, 7)
    errors = []
    for eps in (1e-2, 5e-3):
        clean = _nudged_cache(model, ids, activation, eps)
        exact = getattr(patching, name)(model, ids, clean, metric)
        estimate = getattr(attribution, name)(model, ids, clean, metric)
        assert estimate.shape == exact.shape
        errors.append((estimate - exact).abs().max().item())
        # the linear term dominates: the error is second order in eps
        base = metric(model(ids)).item()
        assert (exact - base).abs().max().item() > 10 * errors[-1] or errors[-1] < 1e-6
    # halving eps divides a second-order error by about four
    assert errors[1] < errors[0] / 2.5 or errors[1] < 1e-6


def test_attribution_every_functions_stack_like_patching():
    _, model = cached_model("llama", n_layers=2, n_kv_heads=2)
    ids = tokens(1, 5, seed=4)
    _, clean = model.run_with_cache(tokens(1, 5, seed=5), names_filter=lambda n: n.endswith(("hook_z", "hook_q", "hook_k", "hook_v", "hook_pattern", "resid_pre", "attn_out", "mlp_out")))
    metric = metrics.logit_diff(5, 7)
    est = attribution.get_act_patch_attn_head_all_pos_every(model, ids, clean, metric)
    assert est.shape == (5, 2, model.cfg.n_heads)
    # k and v have 2 key/value heads: the rest of their rows is zero padding, as in TransformerLens
    assert torch.all(est[2:4, :, 2:] == 0)
    assert attribution.get_act_patch_block_every(model, ids, clean, metric).shape == (3, 2, 5)


def test_attribution_leaves_no_gradients_on_the_model():
    hf, model = cached_model("gpt2", n_layers=2)
    ids = tokens(1, 5)
    _, clean = model.run_with_cache(tokens(1, 5, seed=9), names_filter=lambda n: n.endswith("resid_pre"))
    attribution.get_act_patch_resid_pre(model, ids, clean, metrics.logit_diff(5, 7))
    assert all(p.grad is None for p in hf.parameters())


def test_attribution_needs_a_scalar_metric():
    _, model = cached_model("gpt2", n_layers=2)
    ids = tokens(2, 5)
    _, clean = model.run_with_cache(tokens(2, 5, seed=9), names_filter=lambda n: n.endswith("resid_pre"))
    with pytest.raises(ValueError, match="scalar"):
        attribution.get_act_patch_resid_pre(model, ids, clean, lambda logits: logits[:, -1, 5])
