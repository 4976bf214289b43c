"""Hooks kept on the model (``add_hook``, ``reset_hooks``, ``with model.hooks(...)``) against plain HF hooks.

Reference: ``tests/hf_hooks.py`` replaces the same site with a plain forward hook on the HF model.
A kept hook applies to every forward call until it is removed; the context manager removes it on
exit, errors included; runs of rows (sweeps) refuse while hooks are kept, rather than run without them.
"""

import pytest
import torch
from families import tokens

import fxlens
import hf_hooks as H
from fxlens import patching

TOL = 1e-5
FAMILIES = ["gpt2", "llama"]


def steer(vector):
    def fn(value, hook):
        return value + vector

    return fn


def setup(family):
    hf, model = H.pair(family)
    model.reset_hooks(including_permanent=True)
    ids = tokens(3, 6, seed=8)
    mask = H.padding_mask(ids, "right")
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    return hf, model, ids, mask, vector


@pytest.mark.parametrize("family", FAMILIES)
def test_a_kept_hook_applies_to_every_forward_call_until_reset(family):
    hf, model, ids, mask, vector = setup(family)
    site = "blocks.0.hook_resid_post"
    want = H.hf_run(hf, ids, mask, replace={site: lambda v: v + vector})
    plain = H.hf_run(hf, ids, mask)
    model.add_hook(site, steer(vector))
    try:
        assert H.maxdiff(model(ids, mask), want) <= TOL
        assert H.maxdiff(model(ids, mask), want) <= TOL  # every call, not only the first
        logits, cache = model.run_with_cache(ids, mask, names_filter=[site, "blocks.1.hook_resid_pre"])
        assert H.maxdiff(logits, want) <= TOL
        # the cache holds the value after the hook, as TransformerLens' does
        hooked = H.hf_cache(hf, ids, mask, [site]) [site] + vector
        assert H.maxdiff(cache[site], hooked) <= TOL
        assert H.maxdiff(cache["blocks.1.hook_resid_pre"], hooked) <= TOL
        # run_with_hooks adds its own hooks after the kept ones
        both = H.hf_run(hf, ids, mask, replace={site: lambda v: (v + vector) * 2})
        assert H.maxdiff(model.run_with_hooks(ids, mask, fwd_hooks=[(site, lambda v, hook: v * 2)]), both) <= TOL
        ablate = fxlens.Ablate("blocks.1.hook_mlp_out")
        ref = H.hf_run(hf, ids, mask, replace={site: lambda v: v + vector, "blocks.1.hook_mlp_out": lambda v: v * 0})
        assert H.maxdiff(model.run_with_interventions(ids, [ablate], mask), ref) <= TOL
    finally:
        model.reset_hooks()
    assert model.persistent_hooks == []
    assert H.maxdiff(model(ids, mask), plain) <= TOL


def test_permanent_hooks_survive_reset_hooks_unless_asked():
    hf, model, ids, mask, vector = setup("gpt2")
    model.add_hook("blocks.1.hook_resid_pre", steer(vector), is_permanent=True)
    model.add_hook("blocks.0.hook_resid_pre", steer(vector))
    model.reset_hooks()
    assert [name for name, _ in model.persistent_hooks] == ["blocks.1.hook_resid_pre"]
    want = H.hf_run(hf, ids, mask, replace={"blocks.1.hook_resid_pre": lambda v: v + vector})
    assert H.maxdiff(model(ids, mask), want) <= TOL
    model.reset_hooks(including_permanent=True)
    assert model.persistent_hooks == []


def test_a_predicate_keeps_a_hook_on_every_site_it_accepts():
    hf, model, ids, mask, vector = setup("gpt2")
    seen = []
    model.add_hook(lambda name: name.endswith("hook_resid_pre"), lambda v, hook: seen.append(hook.name))
    try:
        model(ids, mask)
    finally:
        model.reset_hooks()
    assert seen == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]


def test_the_context_manager_removes_its_hooks_on_exit_and_on_error():
    hf, model, ids, mask, vector = setup("gpt2")
    site = "blocks.0.hook_resid_post"
    want = H.hf_run(hf, ids, mask, replace={site: lambda v: v + vector})
    plain = H.hf_run(hf, ids, mask)
    with model.hooks(fwd_hooks=[(site, steer(vector))]) as m:
        assert m is model
        assert H.maxdiff(model(ids, mask), want) <= TOL
    assert model.persistent_hooks == []
    with pytest.raises(RuntimeError, match="inside"):
        with model.hooks(fwd_hooks=[(site, steer(vector))]):
            raise RuntimeError("an error inside the block")
    assert model.persistent_hooks == []
    assert H.maxdiff(model(ids, mask), plain) <= TOL


def test_copies_keep_their_own_hooks():
    import copy

    hf, model, ids, mask, vector = setup("gpt2")
    model.add_hook("blocks.0.hook_resid_post", steer(vector))
    try:
        twin = copy.deepcopy(model)
        assert len(twin.persistent_hooks) == 1
        twin.add_hook("blocks.1.hook_resid_post", steer(vector))
        assert len(model.persistent_hooks) == 1
        twin.reset_hooks()
        assert len(model.persistent_hooks) == 1
        assert H.maxdiff(twin(ids, mask), H.hf_run(hf, ids, mask)) <= TOL
    finally:
        model.reset_hooks()


def test_sweeps_refuse_while_hooks_are_kept_and_bad_hooks_are_refused():
    hf, model, ids, mask, vector = setup("gpt2")
    _, cache = model.run_with_cache(ids)
    model.add_hook("blocks.0.hook_resid_post", steer(vector))
    try:
        with pytest.raises(patching.SweepError, match="reset_hooks"):
            patching.get_act_patch_resid_pre(model, ids, cache, lambda logits: logits[:, -1, 3].mean())
    finally:
        model.reset_hooks()
    with pytest.raises(ValueError, match="dir='both'"):
        model.add_hook("blocks.0.hook_resid_post", steer(vector), dir="both")
    with pytest.raises(fxlens.SiteError, match="unknown site"):
        model.add_hook("blocks.0.hook_resid_pots", steer(vector))
    with pytest.raises(ValueError, match="add_hook"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", steer(vector))], reset_hooks_end=False)
    assert model.persistent_hooks == []


def test_hook_dict_points_add_and_remove_hooks_on_the_model():
    """TransformerLens code adds hooks through ``model.hook_dict[name].add_hook``; they are the model's."""
    hf, model, ids, mask, vector = setup("gpt2")
    point = model.hook_dict["blocks.0.hook_resid_post"]
    point.add_hook(steer(vector))
    point.add_hook(lambda g, hook: None, dir="bwd")
    try:
        want = H.hf_run(hf, ids, mask, replace={"blocks.0.hook_resid_post": lambda v: v + vector})
        assert H.maxdiff(model(ids, mask), want) < 1e-4
        point.remove_hooks(dir="fwd")
        assert len(model.persistent_hooks) == 1  # the backward hook stays
        assert H.maxdiff(model(ids, mask), H.hf_run(hf, ids, mask)) < 1e-5
        point.remove_hooks(dir="both")
        assert model.persistent_hooks == []
    finally:
        model.reset_hooks(including_permanent=True)
