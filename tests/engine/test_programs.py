"""The program cache: bounded, keyed by plan, and compile failures told once and run uncompiled."""

import warnings

import pytest
import torch
from conftest import cached_model
from families import tokens

import fxlens
from fxlens.engine import programs as programs_module


def test_programs_are_reused_per_plan_and_bounded():
    _, model = cached_model("gpt2")
    ids = tokens(2, 5)
    p = model.programs
    p._cache.clear()
    model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
    model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
    assert len(p) == 1
    old = p.maxsize
    try:
        p.maxsize = 3
        for i in range(model.cfg.n_layers):
            for name in ("resid_pre", "resid_post", "attn_out"):
                model.run_with_cache(ids, names_filter=model.get_act_name(name, i))
        assert len(p) == 3
    finally:
        p.maxsize = old


def test_new_values_never_build_a_new_program():
    _, model = cached_model("llama")
    ids = tokens(2, 5)
    before = len(model.programs)
    for scale in (1.0, 2.0, 3.0):
        model.run_with_interventions(ids, [fxlens.Steer("blocks.1.hook_resid_pre", torch.randn(model.cfg.d_model), scale=scale, pos=2)])
    after_first = len(model.programs)
    for pos in (0, 1, 4):
        model.run_with_interventions(ids, [fxlens.Steer("blocks.1.hook_resid_pre", torch.randn(model.cfg.d_model), pos=pos)])
    assert len(model.programs) == after_first <= before + 1


def test_a_program_torch_compile_cannot_run_is_told_once_and_runs_uncompiled(monkeypatch):
    _, model = cached_model("gpt2")
    ids = tokens(2, 5)
    spec = [fxlens.Scale("blocks.0.hook_mlp_out", 0.5)]
    expected = model.run_with_interventions(ids, spec)

    def broken_compile(gm, **kwargs):
        def run(**feed):
            raise RuntimeError("backend exploded")

        return run

    monkeypatch.setattr(programs_module.torch, "compile", broken_compile)
    model.programs._cache.clear()
    with pytest.warns(RuntimeWarning, match="could not compile.*backend exploded.*identical results"):
        first = model.run_with_interventions(ids, spec, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # told once: the second call is silent
        second = model.run_with_interventions(ids, spec, compile=True)
    assert torch.equal(first, expected) and torch.equal(second, expected)
