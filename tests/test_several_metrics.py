"""Several metrics at once and the baseline row (TransformerLens 4.3's patching API).

References: each metric's own sweep (itself checked against hooked HF loops in test_sweeps_vs_hf.py),
and for the baseline the metric on the HF model's own logits of the corrupted input.
"""

from __future__ import annotations

import pytest
import torch

import hf_hooks as H
from families import tokens
from fxlens import metrics, patching


@pytest.fixture(scope="module")
def setup():
    hf, model = H.pair("llama")
    clean, corrupted = tokens(2, 6, seed=1), tokens(2, 6, seed=2)
    _, cache = model.run_with_cache(clean)
    return hf, model, clean, corrupted, cache


def _metrics():
    return {
        "diff": metrics.logit_diff(torch.tensor([5, 7]), torch.tensor([9, 11])),
        "plain": lambda logits: logits[:, -1, 3].mean() - logits[:, -2, 4].mean(),
        "logprob": lambda logits: logits[:, -1].log_softmax(-1)[:, 8].mean(),
    }


@pytest.mark.parametrize("sweep", ["get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"])
def test_a_mapping_of_metrics_equals_one_sweep_per_metric(setup, sweep):
    _, model, _, corrupted, cache = setup
    fn = getattr(patching, sweep)
    both = fn(model, corrupted, cache, _metrics())
    assert set(both) == set(_metrics())
    for name, metric in _metrics().items():
        alone = fn(model, corrupted, cache, metric)
        assert both[name].shape == alone.shape
        assert H.maxdiff(both[name], alone) < 1e-5 * (alone.abs().max().item() + 1), name
    # one run read the union of what the metrics read, not full logits
    assert model.last_sweep_stats["metric_reads"] != "full logits"


def test_baseline_is_the_metric_on_the_unpatched_corrupted_run(setup):
    hf, model, clean, corrupted, cache = setup
    ms = _metrics()
    res = patching.get_act_patch_resid_pre(model, corrupted, cache, ms, baseline=True)
    with torch.no_grad():
        hf_logits = hf(input_ids=corrupted).logits
        hf_clean = hf(input_ids=clean).logits
    for name, metric in ms.items():
        want = metric(hf_logits)
        assert abs(res.baseline[name].item() - float(want)) < 1e-5 * (abs(float(want)) + 1), name
    effect = res.effect()
    clean_base = {name: float(m(hf_clean)) for name, m in ms.items()}
    norm = res.normalized(clean_base)
    for name in ms:
        assert torch.allclose(effect[name], res.values[name] - res.baseline[name])
        assert torch.allclose(norm[name], effect[name] / (clean_base[name] - res.baseline[name]))
    single = patching.get_act_patch_resid_pre(model, corrupted, cache, ms["diff"], baseline=True)
    assert torch.equal(single.values, patching.get_act_patch_resid_pre(model, corrupted, cache, ms["diff"]))


def test_per_prompt_results_and_baselines(setup):
    hf, model, _, corrupted, cache = setup
    ms = {"diff": metrics.logit_diff(torch.tensor([5, 7]), torch.tensor([9, 11])), "logit": lambda l: l[:, -1, 3]}
    res = patching.get_act_patch_resid_pre(model, corrupted, cache, ms, reduce="none", baseline=True)
    assert res.values["diff"].shape == (2, model.cfg.n_layers, 6) and res.baseline["logit"].shape == (2,)
    alone = patching.get_act_patch_resid_pre(model, corrupted, cache, ms["diff"], reduce="none")
    assert H.maxdiff(res.values["diff"], alone) < 1e-5
    with torch.no_grad():
        want = hf(input_ids=corrupted).logits[:, -1, 3]
    assert H.maxdiff(res.baseline["logit"], want) < 1e-5
    assert torch.allclose(res.effect()["logit"], res.values["logit"] - want[:, None, None], atol=1e-5)


def test_every_with_several_metrics_and_bad_input(setup):
    _, model, _, corrupted, cache = setup
    ms = _metrics()
    every = patching.get_act_patch_block_every(model, corrupted, cache, ms)
    alone = patching.get_act_patch_block_every(model, corrupted, cache, ms["plain"])
    assert H.maxdiff(every["plain"], alone) < 1e-5
    heads = patching.get_act_patch_attn_head_by_pos_every(model, corrupted, cache, ms, baseline=True)
    alone = patching.get_act_patch_attn_head_by_pos_every(model, corrupted, cache, ms["diff"])
    assert H.maxdiff(heads.values["diff"], alone) < 1e-5 and heads.effect()["diff"].shape == alone.shape
    with pytest.raises(ValueError, match="at least one"):
        patching.get_act_patch_resid_pre(model, corrupted, cache, {})
    with pytest.raises(ValueError, match="scalar"):
        patching.get_act_patch_resid_pre(model, corrupted, cache, {"bad": lambda l: l[:, -1, 3]})
