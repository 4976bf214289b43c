"""``run_with_interventions`` and ``run_with_hooks`` against the same edit made with plain HF-module hooks.

The reference (tests/hf_hooks.py) replaces a site's value inside the HF model's own forward with
``torch.where(selected, edited, value)``, where ``selected`` is built here from the spec's batch, pos
and head indices by plain tensor indexing (negative indices counting from the end) and ``edited`` is
what the spec says: a source tensor, another HF-hooked run's value, zero, a reference mean, the batch
mean, ``value + scale * vector``, ``value * factor``, ``fn(value)``. Sources from another run are read
with the same HF hooks (fxlens' ActivationCache of that run is what fxlens is given).

Covered: Patch (tensor and ActivationCache sources), Ablate (zero; mean over the batch and over a
reference; resample from a reference and from the batch, checked as "each row equals the edit made
with some allowed row"), Steer, Scale, Apply; sites resid_pre, attn_out, mlp_out, z, q, v (GQA keys and
values on Llama); pos/head/batch indices with negatives; several interventions in one call, two on one
site chaining in order; right and left padding; ``run_with_hooks`` with hooks that edit in place and
return None; and a hypothesis property over random family, site, positions, heads and steering vector.
"""

import functools

import pytest
import torch
from families import tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_hooks as H
from fxlens import Ablate, Apply, Patch, Scale, Steer

TOL = 1e-5
B, S = 3, 6
FAMILIES = list(H.FAMILY_DIMS)
PADDINGS = ["right", "left"]


@functools.cache
def inputs(padding):
    """(ids, mask, other ids, reference ids): rows of 6, 4 and 3 real tokens; a reference batch of 4 unpadded prompts."""
    ids = tokens(B, S, seed=21)
    mask = H.padding_mask(ids, padding)
    other = (ids - 3 + 41) % 97 + 3
    return ids, mask, other, tokens(4, S, seed=22)


def selected(shape, batch=None, pos=None, head=None):
    """Bool mask broadcastable to ``shape`` ([batch, pos, ...] or [batch, pos, head, d_head])."""
    out = torch.ones(shape[:3] if head is not None else shape[:2], dtype=torch.bool)
    for axis, idx in enumerate((batch, pos, head)):
        if idx is None or axis >= out.dim():
            continue
        keep = torch.zeros(out.shape[axis], dtype=torch.bool)
        keep[torch.as_tensor(idx)] = True  # python semantics: -1 is the last
        view = [1] * out.dim()
        view[axis] = -1
        out = out & keep.view(view)
    return out.view(*out.shape, *([1] * (len(shape) - out.dim())))


def where(fn, **index):
    """A replacement for hf_hooks: ``fn(value)`` where the index selects, the value elsewhere."""
    return lambda v: torch.where(selected(v.shape, **index), fn(v), v)


maxdiff = H.maxdiff


@functools.cache
def caches(family, padding):
    """(fxlens cache of the other run, of the reference run; HF-hook values of both) at every hooked site."""
    hf, model = H.pair(family)
    ids, mask, other, ref = inputs(padding)
    sites = H.all_sites(hf)
    fx_other = model.run_with_cache(other, mask, names_filter=sites)[1]
    fx_ref = model.run_with_cache(ref, names_filter=sites)[1]
    return fx_other, fx_ref, H.hf_cache(hf, other, mask, sites), H.hf_cache(hf, ref, None, sites)


def vec(n, seed=7):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def case_specs(name, family, padding):
    """(fxlens specs, [(site, HF replacement)] in the order applied) for a named case."""
    hf, model = H.pair(family)
    fx_other, fx_ref, hf_other, hf_ref = caches(family, padding)
    d, dh = model.cfg.d_model, model.cfg.d_head
    g = torch.Generator().manual_seed(5)
    rp, ao, mo = "blocks.1.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.1.hook_mlp_out"
    z0, z1, q1, v1 = "blocks.0.attn.hook_z", "blocks.1.attn.hook_z", "blocks.1.attn.hook_q", "blocks.1.attn.hook_v"
    if name == "patch_tensor":
        src = torch.randn(B, S, d, generator=g)
        return [Patch(rp, source=src, pos=[1, -1])], [(rp, where(lambda v: src, pos=[1, -1]))]
    if name == "patch_cache_heads":
        src = hf_other[z0]
        return [Patch(z0, source=fx_other, pos=2, head=[0, -1])], [(z0, where(lambda v: src, pos=2, head=[0, -1]))]
    if name == "patch_cache_batch":
        src = hf_other[mo]
        return [Patch(mo, source=fx_other, batch=[-1, 0], pos=-2)], [(mo, where(lambda v: src, batch=[-1, 0], pos=-2))]
    if name == "ablate_zero_v":
        return [Ablate(v1, head=-1, pos=[0, 3])], [(v1, where(torch.zeros_like, head=-1, pos=[0, 3]))]
    if name == "ablate_mean_reference":
        mean = hf_ref[ao].mean(0, keepdim=True)
        return [Ablate(ao, how="mean", reference=fx_ref, pos=-3)], [(ao, where(lambda v: mean, pos=-3))]
    if name == "ablate_batch_mean":
        # the mean over the batch at each position counts only the rows whose token there is real
        m = inputs(padding)[1].to(torch.float32)[:, :, None, None]
        return [Ablate(z1, how="mean", head=1)], [(z1, where(lambda v: (v * m).sum(0, keepdim=True) / m.sum(0, keepdim=True), head=1))]
    if name == "steer":
        u = vec(d)
        return [Steer(ao, u, scale=2.5, pos=[0, -1])], [(ao, where(lambda v: v + 2.5 * u, pos=[0, -1]))]
    if name == "steer_heads":
        u = vec(dh)
        return [Steer(q1, u, scale=-1.5, head=[1, 2], batch=1)], [(q1, where(lambda v: v - 1.5 * u, head=[1, 2], batch=1))]
    if name == "scale":
        return [Scale(z1, factor=0.25, head=[1, -2], batch=[0, -1])], [(z1, where(lambda v: v * 0.25, head=[1, -2], batch=[0, -1]))]
    if name == "apply":
        fn = lambda v: v.flip(-1) * 0.5 + 0.1  # noqa: E731
        return [Apply(mo, fn=fn, pos=[-2, 1])], [(mo, where(fn, pos=[-2, 1]))]
    if name == "several":
        src, u = hf_other[rp], vec(d, 8)
        specs = [Steer("blocks.0.hook_resid_pre", u, scale=0.5, pos=-1), Ablate(z0, head=2), Patch(rp, source=fx_other, pos=[2, 3]),
                 Scale(v1, factor=3.0, head=0, pos=-1), Apply(mo, fn=torch.tanh, batch=-1)]
        return specs, [("blocks.0.hook_resid_pre", where(lambda v: v + 0.5 * u, pos=-1)), (z0, where(torch.zeros_like, head=2)),
                       (rp, where(lambda v: src, pos=[2, 3])), (v1, where(lambda v: v * 3.0, head=0, pos=-1)),
                       (mo, where(torch.tanh, batch=-1))]
    if name == "chain_on_one_site":
        u = vec(d, 9)
        specs = [Steer(ao, u, pos=[1, 2]), Scale(ao, factor=-2.0, pos=[2, 3])]
        return specs, [(ao, lambda v: where(lambda x: x * -2.0, pos=[2, 3])(where(lambda x: x + u, pos=[1, 2])(v)))]
    raise KeyError(name)


CASES = ["patch_tensor", "patch_cache_heads", "patch_cache_batch", "ablate_zero_v", "ablate_mean_reference", "ablate_batch_mean",
         "steer", "steer_heads", "scale", "apply", "several", "chain_on_one_site"]


def hf_edited(hf, ids, mask, edits):
    replace = {}
    for site, fn in edits:
        prev = replace.get(site)
        replace[site] = fn if prev is None else (lambda v, a=prev, b=fn: b(a(v)))
    return H.hf_run(hf, ids, mask, replace)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES)
def test_intervention_equals_hf_hooked_edit(case, family, padding):
    hf, model = H.pair(family)
    ids, mask, *_ = inputs(padding)
    specs, edits = case_specs(case, family, padding)
    got = model.run_with_interventions(ids, specs, attention_mask=mask)
    want = hf_edited(hf, ids, mask, edits)
    assert maxdiff(got, want) <= TOL
    assert maxdiff(want, H.hf_run(hf, ids, mask)) > 1e-3, "the edit should change the logits"


# ---- resample: each row equals the edit made with one allowed source row -----------------------------


def rows_matched(got, candidates, allowed):
    """For each batch row, the allowed candidate whose logits it equals (None if none)."""
    out = []
    for b in range(got.shape[0]):
        hits = [r for r in allowed(b) if maxdiff(got[b], candidates[r][b]) <= TOL]
        out.append(hits[0] if hits else None)
    return out


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_resample_from_reference_equals_hf_edit_with_some_reference_row(family, padding):
    hf, model = H.pair(family)
    ids, mask, *_ = inputs(padding)
    _, fx_ref, _, hf_ref = caches(family, padding)
    site = "blocks.1.attn.hook_z"
    got = model.run_with_interventions(ids, [Ablate(site, how="resample", reference=fx_ref, seed=1, head=[0, -1], pos=-1)], attention_mask=mask)
    candidates = [H.hf_run(hf, ids, mask, {site: where(lambda v, r=r: hf_ref[site][r:r + 1], head=[0, -1], pos=-1)}) for r in range(4)]
    rows = rows_matched(got, candidates, lambda b: range(4))
    assert None not in rows, f"rows matched no reference row: {rows}"


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_resample_from_the_batch_equals_hf_edit_with_another_row(family, padding):
    hf, model = H.pair(family)
    ids, mask, *_ = inputs(padding)
    site = "blocks.0.hook_mlp_out"
    got = model.run_with_interventions(ids, [Ablate(site, how="resample", seed=2, pos=[1, 2])], attention_mask=mask)
    candidates = [H.hf_run(hf, ids, mask, {site: where(lambda v, r=r: v[r:r + 1], pos=[1, 2])}) for r in range(B)]
    rows = rows_matched(got, candidates, lambda b: [r for r in range(B) if r != b])
    assert None not in rows, f"rows matched no other row: {rows}"
    assert sorted(rows) == list(range(B)), "each row should be taken once (a derangement)"


# ---- run_with_hooks with in-place edits -------------------------------------------------------------


@pytest.mark.parametrize("grad", [
    pytest.param(False, id="no_grad"),
    pytest.param(True, id="grad"),
])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_run_with_hooks_in_place_edits_equal_hf_hooked_edit(family, padding, grad):
    # with autograd on, GPT-2's and NeoX's hook_v is one output of a split, which autograd refuses to
    # edit in place: the hook gets a copy (this failed before issue 9's fix)
    hf, model = H.pair(family)
    ids, mask, *_ = inputs(padding)
    u = vec(model.cfg.d_model, 3)

    def zero_head(z, hook):
        z[:, -1, 1] = 0  # in place, returns None

    def steer(resid, hook):
        resid[1:, 2] += u

    def halve_v(v, hook):
        v[0, :, -1] *= 0.5

    hooks = [("blocks.1.attn.hook_z", zero_head), ("blocks.1.hook_resid_pre", steer), ("blocks.0.attn.hook_v", halve_v)]
    with torch.set_grad_enabled(grad):
        got = model.run_with_hooks(ids, mask, fwd_hooks=hooks)
    want = H.hf_run(hf, ids, mask, {
        "blocks.1.attn.hook_z": where(torch.zeros_like, pos=-1, head=1),
        "blocks.1.hook_resid_pre": where(lambda v: v + u, batch=[1, 2], pos=2),
        "blocks.0.attn.hook_v": where(lambda v: v * 0.5, batch=0, head=-1),
    })
    assert maxdiff(got, want) <= TOL
    assert maxdiff(want, H.hf_run(hf, ids, mask)) > 1e-3


# ---- a property over random configurations ----------------------------------------------------------

HOOKED = ["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v"]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    family=st.sampled_from(FAMILIES),
    kind=st.sampled_from(HOOKED),
    layer=st.integers(0, 1),
    padding=st.sampled_from(PADDINGS),
    pos=st.lists(st.integers(-S, S - 1), min_size=1, max_size=3),
    heads=st.lists(st.integers(-2, 1), min_size=1, max_size=2),
    scale=st.floats(-3, 3, allow_nan=False, width=32),
    seed=st.integers(0, 2**16),
)
def test_random_steer_equals_hf_hooked_edit(family, kind, layer, padding, pos, heads, scale, seed):
    hf, model = H.pair(family)
    ids, mask, *_ = inputs(padding)
    site = H.name(kind, layer)
    per_head = kind in "qkvz"
    u = vec(model.cfg.d_head if per_head else model.cfg.d_model, seed)
    index = dict(pos=pos, head=heads) if per_head else dict(pos=pos)
    got = model.run_with_interventions(ids, [Steer(site, u, scale=scale, **index)], attention_mask=mask)
    want = H.hf_run(hf, ids, mask, {site: where(lambda v: v + scale * u, **index)})
    assert maxdiff(got, want) <= TOL
