"""Sweeps on models whose blocks mix positions outside attention (linear attention, state-space layers)
run as whole-model rows: a row that starts late would not have the running state of earlier positions.

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


def test_minimax_sweep_equals_a_hooked_hf_loop_and_says_how_it_runs():
    hf = A.build("minimax")
    clean, corrupted = A.probe_ids(1, 5, seed=3), A.probe_ids(1, 5, seed=4)
    with torch.no_grad():
        metric = sweep_metric(hf(input_ids=clean).logits.shape[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fxlens.Model.from_hf(hf)
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
