"""Sweeps on models whose blocks mix positions outside attention (linear attention, state-space layers,
RWKV's time mixing) run as whole-model rows: a row that starts late would not have the running state of
earlier positions.

Reference: a loop of plain HF forwards with a forward-pre-hook on the decoder layer putting the clean
layer input at the cell's position (tests/test_coverage.py's ``hf_resid_pre_sweep``). Before the fix,
MiniMax's (lightning attention) resid_pre sweep differed from it by 0.14 while fxlens' own hooks agreed.
"""

import warnings

import torch

import all_families as A
import fxlens
from fxlens import patching
from test_coverage import hf_resid_pre_sweep, sweep_metric


def _sweep_case(family):
    """(hf, fxlens model, clean ids, corrupted ids, metric) of the coverage harness's sweep check."""
    hf = A.build(family)
    clean, corrupted = A.probe_ids(1, 5, seed=3), A.probe_ids(1, 5, seed=4)
    with torch.no_grad():
        metric = sweep_metric(hf(input_ids=clean).logits.shape[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fxlens.Model.from_hf(hf)
    return hf, model, clean, corrupted, metric


def test_minimax_sweep_equals_a_hooked_hf_loop_and_says_how_it_runs():
    hf, model, clean, corrupted, metric = _sweep_case("minimax")
    assert any(s.kind == "mixer_out" for s in model.site_table.values())
    _, cache = model.run_with_cache(clean)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
        patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    told = [w for w in seen if "mixes positions outside attention" in str(w.message)]
    assert len(told) == 1
    want = hf_resid_pre_sweep(hf, clean, corrupted, [b.path for b in model.graph.structure.blocks], metric)
    assert (got - want).abs().max() <= 1e-5


def test_rwkv_time_mixing_is_a_mixer_and_its_sweep_equals_a_hooked_hf_loop():
    """RWKV's time mixing shifts the sequence by one position and runs its recurrence position by position:
    no attention op and no product of two activations, so it was taken for an MLP and the layered engine
    reused rows from a late start (sweep off by 9.95 against a grid spread of 2.13)."""
    hf, model, clean, corrupted, metric = _sweep_case("rwkv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert model.graph.mixes_outside_attention
        assert "blocks.0.hook_mixer_out" in model.sites
        _, cache = model.run_with_cache(clean)
        got = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    want = hf_resid_pre_sweep(hf, clean, corrupted, [b.path for b in model.graph.structure.blocks], metric)
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))


def test_state_space_generation_equals_hf_generate_through_lengths_equal_to_model_sizes():
    """Mamba is captured per sequence length, and a length equal to one of its sizes (8 here) is refused;
    generation runs such a step with a masked padding token after the last one and still gives HF's
    tokens, plain and steered (a vector added to layer 0's output by a plain HF hook)."""
    hf = A.build("mamba")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fxlens.Model.from_hf(hf)
        ids = A.probe_ids(2, 5, seed=3)
        sizes = model.derived.sizes
        assert 8 in sizes and model.derived.usable_length(8) > 8
        vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 3

        def hf_gen(add=None):
            handle = hf.backbone.layers[0].register_forward_hook(lambda m, a, o: o + vector) if add else None
            try:
                with torch.no_grad():
                    return hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
            finally:
                if handle is not None:
                    handle.remove()

        assert torch.equal(model.generate(ids, 6, stop_at_eos=False), hf_gen())
        steered = model.generate(ids, 6, stop_at_eos=False, interventions=[fxlens.Steer("blocks.0.hook_resid_post", vector)])
        assert torch.equal(steered, hf_gen(add=True))
        out, cache = model.generate(ids, 3, stop_at_eos=False, names_filter=["blocks.1.hook_resid_pre"])
    assert out.shape[1] == 8 and cache["blocks.1.hook_resid_pre"].shape[:2] == (2, 8)
