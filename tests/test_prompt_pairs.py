"""Datasets of prompt pairs: many clean/corrupted pairs of different lengths in one sweep.

Reference: a loop of single-pair sweeps (each pair alone, batch 1, no padding), which
tests/test_sweeps_vs_hf.py checks against plain HF hooks. ``reduce="none"`` gives each pair's grid; a
pair's grid, read in the padded batch's frame (left padding shifts its positions), equals its own
sweep, and positions that are padding for that pair leave its metric at the unpatched value.
``reduce="mean"`` is the metric's own mean over the pairs.
"""

import pytest
import torch
from conftest import cached_model
from families import tokens

from fxlens import metrics, patching

TOL = 1e-5
LENGTHS = (5, 7, 6)


def pairs(seed=0):
    clean, corrupted = [], []
    for k, n in enumerate(LENGTHS):
        c = tokens(1, n, seed=seed + k)[0]
        x = c.clone()
        x[n // 2] = (x[n // 2] + 11) % 100
        clean.append(c)
        corrupted.append(x)
    answers, wrongs = torch.tensor([5, 9, 13]), torch.tensor([7, 3, 21])
    return clean, corrupted, answers, wrongs


def single(model, sweep, clean, corrupted, answer, wrong):
    _, cache = model.run_with_cache(clean[None])
    return getattr(patching, sweep)(model, corrupted[None], cache, metrics.logit_diff(int(answer), int(wrong)))


def last_positions(mask, side):
    return mask.sum(1) - 1 if side == "right" else torch.full((mask.shape[0],), mask.shape[1] - 1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("sweep", ["get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos"])
def test_each_pair_of_a_dataset_equals_its_own_sweep(family, side, sweep):
    if family == "gpt2" and side == "left":
        pytest.skip("GPT-2's learned positions count from the first slot, padding included: a left-padded prompt "
                    "is another input than the prompt alone (HF's own semantics), so the reference does not apply")
    _, model = cached_model(family)
    clean, corrupted, answers, wrongs = pairs()
    _, cache = model.run_with_cache(clean, padding_side=side)
    mask = model._inputs(clean, padding_side=side)["attention_mask"].cpu()
    metric = metrics.logit_diff(answers, wrongs, pos=last_positions(mask, side))
    fn = getattr(patching, sweep)
    each = fn(model, corrupted, cache, metric, reduce="none", padding_side=side)
    width = max(LENGTHS)
    assert each.shape[:2] == (len(LENGTHS), model.cfg.n_layers) and each.shape[2] == width
    for j, n in enumerate(LENGTHS):
        alone = single(model, sweep, clean[j], corrupted[j], answers[j], wrongs[j])
        frame = slice(0, n) if side == "right" else slice(width - n, width)
        assert (each[j][:, frame] - alone).abs().max() <= TOL, f"pair {j}"
        # padding positions of this pair: patching them leaves its metric unpatched
        pad = torch.ones(width, dtype=torch.bool)
        pad[frame] = False
        if pad.any():
            unpatched = each[j][:, pad]
            assert (unpatched - unpatched.flatten()[0]).abs().max() <= TOL
    mean = fn(model, corrupted, cache, metric, padding_side=side)
    assert (mean - each.mean(0)).abs().max() <= TOL


def test_a_plain_callable_gives_per_prompt_values_when_it_returns_one_per_prompt():
    _, model = cached_model("gpt2")
    clean, corrupted, answers, wrongs = pairs(seed=10)
    _, cache = model.run_with_cache(clean)
    mask = model._inputs(clean)["attention_mask"].cpu()
    last = last_positions(mask, "right")
    rows = torch.arange(len(LENGTHS))

    def per_prompt(logits):
        return logits[rows, last, answers] - logits[rows, last, wrongs]

    declared = metrics.logit_diff(answers, wrongs, pos=last)
    got = patching.get_act_patch_resid_pre(model, corrupted, cache, per_prompt, reduce="none")
    assert model.last_sweep_stats["metric_reads"].startswith(f"{len(set(last.tolist()))} positions")
    want = patching.get_act_patch_resid_pre(model, corrupted, cache, declared, reduce="none")
    assert torch.equal(got, want)
    # the block of every part stacks after the prompt axis
    every = patching.get_act_patch_block_every(model, corrupted, cache, declared, reduce="none")
    assert every.shape == (len(LENGTHS), 3, model.cfg.n_layers, max(LENGTHS))
    assert torch.equal(every[:, 0], want)


def test_metric_shapes_that_do_not_fit_the_reduction_are_refused():
    _, model = cached_model("gpt2")
    clean, corrupted, answers, wrongs = pairs(seed=20)
    _, cache = model.run_with_cache(clean)
    with pytest.raises(patching.SweepError, match="one value per prompt"):
        patching.get_act_patch_resid_pre(model, corrupted, cache, lambda l: l[:, -1, 3].mean(), reduce="none")
    with pytest.raises(patching.SweepError, match="pass reduce='none'"):
        patching.get_act_patch_resid_pre(model, corrupted, cache, lambda l: l[:, -1, 3])
    with pytest.raises(ValueError, match="reduce must be"):
        patching.get_act_patch_resid_pre(model, corrupted, cache, lambda l: l[:, -1, 3].mean(), reduce="sum")
    with pytest.raises(Exception, match="drop attention_mask"):
        patching.get_act_patch_resid_pre(model, corrupted, cache, lambda l: l[:, -1, 3].mean(),
                                         attention_mask=torch.ones(3, 7))
