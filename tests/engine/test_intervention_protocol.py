"""The intervention protocol (``fxlens.Intervention``/``Lowered``), the shared ablation vocabulary, and
the indices and requests that used to mean nothing or something else.

References: plain ``register_forward_hook`` edits on the HF model (a deep copy, so the user's model is
untouched) and ``torch.autograd`` through that hooked model.
"""

import copy
from dataclasses import dataclass

import pytest
import torch
from conftest import cached_model
from families import tokens

import fxlens
from fxlens import Ablate, InterventionError, Patch, Steer

TOL = 1e-5


def llama():
    return cached_model("llama", n_kv_heads=2)


def hf_with_mlp_hook(hf, layer, fn):
    """A deep copy of ``hf`` whose MLP ``layer`` output becomes ``fn(output)``."""
    hooked = copy.deepcopy(hf)
    hooked.model.layers[layer].mlp.register_forward_hook(lambda m, a, out: fn(out))
    return hooked


@dataclass
class ProjectOut(fxlens.Intervention):
    """Remove the component along ``direction`` (a custom intervention: a function and its inputs)."""

    direction: torch.Tensor = None

    def lower(self, site, shape, ctx):
        d = self.direction / self.direction.norm()
        return fxlens.Lowered(lambda x, d: x - (x @ d)[..., None] * d, (d.to(ctx.dtype),))


def test_a_custom_intervention_equals_the_same_edit_in_an_hf_hook():
    hf, model = llama()
    ids, direction = tokens(2, 6), torch.randn(model.cfg.d_model)
    got = model.run_with_interventions(ids, [ProjectOut("blocks.1.hook_mlp_out", direction=direction, pos=[2, 4])])
    d = direction / direction.norm()

    def edit(out):
        new = out.clone()
        new[:, [2, 4]] = out[:, [2, 4]] - (out[:, [2, 4]] @ d)[..., None] * d
        return new

    with torch.no_grad():
        want = hf_with_mlp_hook(hf, 1, edit)(ids).logits
    assert (got - want).abs().max() <= TOL


@dataclass
class LearnedSteer(fxlens.Intervention):
    vector: torch.Tensor = None

    def lower(self, site, shape, ctx):
        return fxlens.Lowered(lambda x, v: x + v, (self.vector,))


def test_gradients_flow_to_a_trainable_interventions_inputs():
    hf, model = llama()
    ids = tokens(2, 6)
    vec = torch.zeros(model.cfg.d_model, requires_grad=True)
    logits = model.run_with_interventions(ids, [LearnedSteer("blocks.0.hook_mlp_out", vector=vec)])
    (grad,) = torch.autograd.grad(logits[:, -1, 7].sum(), vec)
    ref_vec = torch.zeros(model.cfg.d_model, requires_grad=True)
    hooked = hf_with_mlp_hook(hf, 0, lambda out: out + ref_vec)
    (want,) = torch.autograd.grad(hooked(ids).logits[:, -1, 7].sum(), ref_vec)
    assert grad.abs().max() > 0 and (grad - want).abs().max() <= 1e-5


def test_a_lower_that_returns_something_else_is_refused():
    @dataclass
    class Broken(fxlens.Intervention):
        def lower(self, site, shape, ctx):
            return lambda x: x

    _, model = llama()
    with pytest.raises(InterventionError, match=r"Broken.lower must return fxlens.Lowered\(fn, inputs\)"):
        model.run_with_interventions(tokens(1, 4), [Broken("blocks.0.hook_mlp_out")])


@pytest.mark.parametrize(
    "pos, shown",
    [(2.7, "a float such as 2.7"), (True, "a bool such as True"), (torch.tensor([1.0, 2.0]), "a float such as 1.0"),
     ([1, 2.5], "a float such as 2.5"), (torch.tensor([True, False]), "a bool")],
    ids=["float", "bool", "float_tensor", "mixed_list", "bool_tensor"],
)
def test_an_index_that_is_not_an_integer_is_refused_not_rounded(pos, shown):
    _, model = llama()
    with pytest.raises(InterventionError, match=rf"pos=.* is not an index.*{shown}.*mask="):
        model.run_with_interventions(tokens(1, 5), [Steer("blocks.0.hook_resid_pre", torch.ones(model.cfg.d_model), pos=pos)])


def test_integer_indices_of_every_integer_kind_are_accepted_alike():
    import numpy as np

    _, model = llama()
    ids = tokens(1, 5)
    vec = torch.randn(model.cfg.d_model)
    runs = [model.run_with_interventions(ids, [Steer("blocks.0.hook_resid_pre", vec, pos=p)])
            for p in (3, np.int64(3), torch.tensor(3), [3], torch.tensor([3]), slice(3, 4), -2)]
    assert all(torch.equal(r, runs[0]) for r in runs)


def test_a_mean_ablation_over_a_batch_of_one_is_refused():
    _, model = llama()
    with pytest.raises(InterventionError, match="batch has one row, so nothing would change; give reference="):
        model.run_with_interventions(tokens(1, 5), [Ablate("blocks.0.hook_mlp_out", how="mean")])
    with pytest.raises(InterventionError, match="batch has one row"):
        model.run_with_interventions(tokens(1, 5), [Ablate("blocks.0.hook_mlp_out", how="resample")])


def test_the_ablation_vocabulary_is_checked_and_named():
    _, model = llama()
    with pytest.raises(InterventionError, match="how must be one of 'zero', 'mean', 'resample', 'corrupted'; got 'median'"):
        model.run_with_interventions(tokens(2, 5), [Ablate("blocks.0.hook_mlp_out", how="median")])
    with pytest.raises(InterventionError, match="how='corrupted' takes the values of another run: give reference="):
        model.run_with_interventions(tokens(2, 5), [Ablate("blocks.0.hook_mlp_out", how="corrupted")])


def test_ablating_to_the_corrupted_run_is_patching_from_it():
    hf, model = llama()
    ids, other = tokens(2, 6, seed=1), tokens(2, 6, seed=2)
    _, ref = model.run_with_cache(other, names_filter="blocks.1.hook_mlp_out")
    got = model.run_with_interventions(ids, [Ablate("blocks.1.hook_mlp_out", how="corrupted", reference=ref, pos=3)])
    assert torch.equal(got, model.run_with_interventions(ids, [Patch("blocks.1.hook_mlp_out", source=ref, pos=3)]))
    with torch.no_grad():
        other_out = {}
        h = hf.model.layers[1].mlp.register_forward_hook(lambda m, a, out: other_out.setdefault("v", out.clone()))
        hf(other)
        h.remove()

        def edit(out):
            new = out.clone()
            new[:, 3] = other_out["v"][:, 3]
            return new

        want = hf_with_mlp_hook(hf, 1, edit)(ids).logits
    assert (got - want).abs().max() <= TOL


def test_a_mean_ablation_counts_only_real_tokens_of_a_padded_reference():
    hf, model = llama()
    ids = tokens(2, 6, seed=1)
    ref_ids = tokens(3, 6, seed=3)
    ref_mask = torch.ones_like(ref_ids)
    ref_mask[2, 3:] = 0  # the third reference row is padding from position 3
    _, ref = model.run_with_cache(ref_ids, ref_mask, names_filter="blocks.0.hook_mlp_out")
    got = model.run_with_interventions(ids, [Ablate("blocks.0.hook_mlp_out", how="mean", reference=ref, reference_attention_mask=ref_mask)])
    with torch.no_grad():
        vals = {}
        h = hf.model.layers[0].mlp.register_forward_hook(lambda m, a, out: vals.setdefault("v", out.clone()))
        hf(ref_ids, attention_mask=ref_mask)
        h.remove()
        v = vals["v"]
        mean = torch.cat([v[:, :3].mean(0), v[:2, 3:].mean(0)])  # rows 0-2 before position 3, rows 0-1 after
        want = hf_with_mlp_hook(hf, 0, lambda out: mean.expand_as(out))(ids).logits
    assert (got - want).abs().max() <= TOL
