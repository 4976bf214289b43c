"""When the layer-by-layer engine cannot run a model, sweeps, edge sweeps and path patching fall back to
whole-model rows: exact (equal to the layered results and to a loop of hooked forwards), said once,
never an internal error. The failure is planted (a model that does not split into blocks; a block call
that fails), since every family tested today runs layered."""

import functools
import warnings

import pytest
import torch
from families import make, tokens

import fxlens
from fxlens import circuits, metrics, patching
from fxlens.engine.rows import engine as engine_module
from fxlens.graphs import segments

TOL = 1e-5
METRIC = metrics.logit_diff(5, 7)


def fresh(family="llama"):
    hf = make(family, n_layers=2, n_kv_heads=2 if family == "llama" else None)
    return fxlens.Model.from_hf(hf)


def results(model):
    clean, corrupted = tokens(2, 6, seed=1), tokens(2, 6, seed=2)
    corrupted[:, :2] = clean[:, :2]  # rows start late where the engine can
    _, cache = model.run_with_cache(clean)
    return {
        "resid_pre": patching.get_act_patch_resid_pre(model, corrupted, cache, METRIC),
        "heads": patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, lambda l: l[:, -1, 5].mean()),
        "edges": circuits.edge_sweep(model, clean, [["a0.h1->a1.h0<q>"], ["a0.h0->a1.h1<k>", "input->a1.h0<v>"], ["m0->logits"]],
                                     METRIC, ablation="corrupted", reference=corrupted),
        "paths": torch.tensor(list(circuits.path_patch(model, clean, corrupted, METRIC, receivers=["a1.h0<q>"]).values())),
    }


@functools.cache
def layered_results():
    return results(fresh())


def failing_split(mg):
    raise segments.SegmentError("a block reads the size 3*s0 from outside")


@pytest.mark.parametrize("how", ["split", "block_call"])
def test_a_model_the_engine_cannot_run_gets_exact_results_and_one_warning(monkeypatch, how):
    want = layered_results()
    model = fresh()
    if how == "split":
        monkeypatch.setattr(segments, "split", failing_split)
    else:
        def broken(self, *args, **kwargs):
            raise RuntimeError("The size of tensor a (7) must match the size of tensor b (6)")
        monkeypatch.setattr(engine_module.RowEngine, "_run", broken)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = results(model)
    told = [w for w in seen if "run as whole-model forwards" in str(w.message)]
    assert len(told) == 1, [str(w.message) for w in seen]
    for name in want:
        assert (got[name] - want[name]).abs().max() <= TOL, name


def test_a_user_error_is_not_taken_for_an_engine_failure():
    model = fresh()
    _, cache = model.run_with_cache(tokens(1, 5, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(patching.SweepError, match="must return a number or a scalar tensor"):
            patching.get_act_patch_resid_pre(model, tokens(1, 5, seed=2), cache, lambda logits: "oops")


@pytest.mark.parametrize("how", ["split", "block_call"])
def test_per_prompt_results_on_whole_model_rows_equal_the_layered_ones(monkeypatch, how):
    clean, corrupted = tokens(3, 6, seed=4), tokens(3, 6, seed=5)
    metric = metrics.logit_diff(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]))
    layered = fresh()
    _, cache = layered.run_with_cache(clean)
    want = patching.get_act_patch_resid_pre(layered, corrupted, cache, metric, reduce="none")
    plain_want = patching.get_act_patch_resid_pre(layered, corrupted, cache, lambda l: l[:, -1, 5], reduce="none")
    model = fresh()
    if how == "split":
        monkeypatch.setattr(segments, "split", failing_split)
    else:
        monkeypatch.setattr(engine_module.RowEngine, "_run", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, reduce="none")
        plain = patching.get_act_patch_resid_pre(model, corrupted, cache, lambda l: l[:, -1, 5], reduce="none")
    assert got.shape == (3, 2, 6)
    assert (got - want).abs().max() <= TOL
    assert (plain - plain_want).abs().max() <= TOL
