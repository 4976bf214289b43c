"""Datasets of prompt pairs streamed in chunks of pairs under memory_budget (fxlens/engine/pairs.py).

Reference: plain HF forwards of the padded batch with a forward-pre-hook writing the clean residual
(``tests/hf_hooks.py``), for sampled cells; and the same sweep run in one batch (a budget that fits),
which tests/test_prompt_pairs.py checks against single-pair sweeps. A small budget must cut the batch
into several chunks (``last_sweep_stats["prompt_chunks"]``) and change no result beyond float rounding.
"""

import pytest
import torch
from conftest import cached_model
from families import tokens
from hf_hooks import hf_cache, hf_run

from fxlens import metrics, patching
from fxlens.engine import pairs

TOL = 1e-5
N = 10


def dataset(seed=0):
    clean, corrupted = [], []
    for k in range(N):
        c = tokens(1, 5 + k % 3, seed=seed + k)[0]
        x = c.clone()
        x[1 + k % 3] = (x[1 + k % 3] + 11) % 100
        clean.append(c)
        corrupted.append(x)
    return clean, corrupted, torch.arange(N) % 40, (torch.arange(N) + 7) % 40


SMALL = 1e-3  # GiB: three prompts of these tiny models per chunk


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_small_budget_streams_chunks_of_pairs_with_the_unchunked_results(family):
    hf, model = cached_model(family)
    clean, corrupted, answers, wrongs = dataset()
    _, cache = model.run_with_cache(clean)
    mask = model._inputs(clean)["attention_mask"].cpu()
    last = mask.sum(1) - 1
    metric = metrics.logit_diff(answers, wrongs, pos=last)
    whole = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, reduce="none")
    assert "prompt_chunks" not in model.last_sweep_stats
    spans = pairs.chunks(model, N, mask.shape[1], SMALL, True)
    assert 2 < len(spans) < N
    streamed = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, reduce="none", memory_budget=SMALL)
    assert model.last_sweep_stats["prompt_chunks"] == len(spans)
    assert streamed.shape == whole.shape == (N, model.cfg.n_layers, mask.shape[1])
    assert (streamed - whole).abs().max() <= TOL
    # the mean, a sum-reduced and a normalised metric reduce over every prompt as the metric does
    for m in (metric, metrics.logit_diff(answers, wrongs, pos=last, reduce="sum"), metrics.normalized(metric, 2.0, -1.0)):
        a = patching.get_act_patch_resid_pre(model, corrupted, cache, m)
        b = patching.get_act_patch_resid_pre(model, corrupted, cache, m, memory_budget=SMALL, progress=True)
        assert model.last_sweep_stats["prompt_chunks"] == len(spans)
        assert (a - b).abs().max() <= TOL * max(1.0, float(a.abs().max()))
    # against plain HF hooks, for a few cells: the clean residual written into the corrupted padded batch
    ids = model._inputs(corrupted)["input_ids"].cpu()
    clean_ids = model._inputs(clean)["input_ids"].cpu()
    for layer, pos in [(0, 1), (1, 2), (model.cfg.n_layers - 1, 3)]:
        site = f"blocks.{layer}.hook_resid_pre"
        clean_value = hf_cache(hf, clean_ids, mask, [site])[site]

        def put(v, clean_value=clean_value, pos=pos):
            v[:, pos] = clean_value[:, pos]
            return v

        logits = hf_run(hf, ids, mask, {site: put})
        want = logits[torch.arange(N), last, answers] - logits[torch.arange(N), last, wrongs]
        assert (streamed[:, layer, pos] - want).abs().max() <= TOL, (layer, pos)


def test_a_plain_callable_runs_the_batch_at_once_and_says_why():
    _, model = cached_model("gpt2")
    clean, corrupted, answers, wrongs = dataset(seed=5)
    _, cache = model.run_with_cache(clean)
    last = model._inputs(clean)["attention_mask"].cpu().sum(1) - 1
    rows = torch.arange(N)

    def plain(logits):
        return (logits[rows, last, answers] - logits[rows, last, wrongs]).mean()

    want = patching.get_act_patch_resid_pre(model, corrupted, cache, metrics.logit_diff(answers, wrongs, pos=last))
    with pytest.warns(UserWarning, match="fxlens.metrics"):
        got = patching.get_act_patch_resid_pre(model, corrupted, cache, plain, memory_budget=SMALL)
    assert "prompt_chunks" not in model.last_sweep_stats
    assert (got - want).abs().max() <= TOL


def test_a_metric_whose_answers_do_not_fit_the_batch_is_refused_as_without_chunks():
    _, model = cached_model("gpt2")
    clean, corrupted, answers, wrongs = dataset(seed=9)
    _, cache = model.run_with_cache(clean)
    bad = metrics.logit_diff(answers[:3], wrongs[:3])
    with pytest.raises(patching.SweepError, match="3 rows; the input has 10"):
        patching.get_act_patch_resid_pre(model, corrupted, cache, bad, memory_budget=SMALL)
