"""bfloat16 and float16 models: caches, interventions, sweeps, path patching and generation.

References: the HF model in the same dtype (logits, greedy generation: fxlens runs HF's own kernels,
so these are exact), and the same computation in float32 on the same weights for the sweep and path
patching, whose tolerances are measured here and documented in the README: a bfloat16 sweep of a
logit difference differs from float32 by the rounding of a bfloat16 forward (within 6% of the grid's
spread on these tiny models; path patching within 1% of the metric), float16 within 1%.
"""

import copy

import pytest
import torch
from families import make, tokens

import fxlens
from fxlens import circuits, metrics, patching

# relative to the float32 grid's spread (max - min): measured 2-3x below these on these models
RELATIVE = {torch.bfloat16: 0.06, torch.float16: 0.01}


def pair(dtype, family="llama"):
    hf32 = make(family, n_layers=2, n_kv_heads=2 if family == "llama" else None)
    hf = copy.deepcopy(hf32).to(dtype)
    # the float32 reference has exactly the half-precision weights
    ref = copy.deepcopy(hf).float()
    return hf, fxlens.Model.from_hf(hf), fxlens.Model.from_hf(ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_cache_and_generation_equal_hf_in_that_dtype(dtype):
    hf, model, _ = pair(dtype)
    ids = tokens(2, 7, seed=1)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        gen = hf.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    logits, cache = model.run_with_cache(ids)
    assert logits.dtype == want.dtype and torch.equal(logits, want)
    assert cache["resid_pre", 1].dtype == dtype
    assert torch.equal(model.generate(ids, 5, stop_at_eos=False), gen)
    vec = torch.ones(model.cfg.d_model)
    steered = model.run_with_interventions(ids, [fxlens.Steer("blocks.1.hook_resid_pre", vec)])
    assert steered.dtype == dtype and not torch.equal(steered, logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sweeps_and_path_patching_track_float32_on_the_same_weights(dtype):
    _, model, ref = pair(dtype)
    clean, corrupted = tokens(2, 6, seed=2), tokens(2, 6, seed=3)
    metric = metrics.logit_diff(5, 7)
    _, cache = model.run_with_cache(clean)
    _, cache32 = ref.run_with_cache(clean)
    for sweep in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"):
        got = getattr(patching, sweep)(model, corrupted, cache, metric)
        want = getattr(patching, sweep)(ref, corrupted, cache32, metric)
        spread = float(want.max() - want.min())
        assert (got - want).abs().max() <= RELATIVE[dtype] * spread, sweep
    got = circuits.path_patch(model, clean, corrupted, metric, receivers=["a1.h0<q>"])
    want = circuits.path_patch(ref, clean, corrupted, metric, receivers=["a1.h0<q>"])
    g, w = torch.tensor(list(got.values())), torch.tensor(list(want.values()))
    # path effects on a random 2-layer model are tiny (spread 2e-4): relative to the metric itself
    assert (g - w).abs().max() <= RELATIVE[dtype] * float(w.abs().max())
