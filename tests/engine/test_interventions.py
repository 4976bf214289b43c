"""``Model.run_with_interventions`` against the same edit written by hand.

Each intervention (Patch, Ablate, Steer, Scale, Apply, with pos/head/neuron/batch selections) is
compared with ``run_with_hooks`` and a hook that does the edit with plain tensor indexing over axes
named here, not taken from fxlens; a few are also compared with a forward hook on a deep copy of the
HF model. Covered too: sites that need graph rewrites (pattern and scores under SDPA, per-head
results, GPT-2's fused LayerNorm scale), several interventions in one call, ``names_filter``, that
nothing persists on the user's model, errors raised before any compute, and ``compile=True``.
"""

import copy
import functools
import warnings

import pytest
import torch
from conftest import cached_model
from families import hf_logits, tokens

import fxlens
from fxlens import Ablate, Apply, InterventionError, Patch, Scale, Steer

TOL = 1e-5
FAMILIES = {"llama": {"n_kv_heads": 2}, "gpt2": {}, "neox": {}, "bert": {}}
B, S = 3, 6


def model_for(family):
    return cached_model(family, **FAMILIES[family])


def inputs():
    """(ids, mask, clean_ids): three rows of six tokens, the last row right-padded to four."""
    ids = tokens(B, S, seed=1)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    return ids, mask, tokens(B, S, seed=2)


@functools.cache
def clean_cache(family):
    _, model = model_for(family)
    ids, mask, clean = inputs()
    return model.run_with_cache(clean, mask, names_filter=model.sites)[1]  # per-head results included


def max_diff(a, b):
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


def selection(shape, sel: dict) -> torch.Tensor:
    """Boolean mask of ``shape`` selecting ``sel`` = {axis number: int | list | slice} (other axes: all)."""
    index = []
    for axis, n in enumerate(shape):
        v = sel.get(axis, slice(None))
        v = list(range(n))[v] if isinstance(v, slice) else [v] if isinstance(v, int) else list(v)
        view = [1] * len(shape)
        view[axis] = -1
        index.append(torch.tensor([i % n for i in v]).view(view))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[tuple(index)] = True
    return mask


def edit_hook(fn, sel):
    """A TransformerLens-style hook: the selected part of the value becomes ``fn(value)``'s."""

    def hook(x, hook):
        new = torch.as_tensor(fn(x.clone()), dtype=x.dtype).expand(x.shape)
        out = x.clone()
        m = selection(x.shape, sel)
        out[m] = new[m]
        return out

    return hook


def real_token_mean(x, mask):
    """The batch mean at each position over the rows whose token there is real (not padding)."""
    w = mask.to(x.dtype).view(*mask.shape, *([1] * (x.dim() - 2)))
    return (x * w).sum(0, keepdim=True) / w.sum(0, keepdim=True)


def hooked(model, ids, mask, *edits):
    """Logits of ``run_with_hooks`` with ``edits = (site, fn, sel), ...`` in order."""
    return model.run_with_hooks(ids, mask, fwd_hooks=[(site, edit_hook(fn, sel)) for site, fn, sel in edits])


# ---- one intervention vs the same edit in a hook ------------------------------------------------
# axes: resid/attn_out/mlp [batch, pos, d]; q/k/v/z [batch, pos, head, d_head]; result [batch, pos,
# head, d_model]; pattern/scores [batch, head, query_pos, key_pos]; mlp.hook_post [batch, pos, d_mlp]

_gen = torch.Generator().manual_seed(0)
VEC = torch.randn(64, generator=_gen)
VEC_HEAD = torch.randn(16, generator=_gen)
FULL = torch.randn(B, S, 64, generator=_gen)


# name -> (spec factory(clean cache), site, reference fn(x, clean cache), selection)
CASES = {
    "patch_cache_pos_list_with_negative": (
        lambda cc: Patch("blocks.1.hook_resid_pre", source=cc, pos=[1, -1]),
        "blocks.1.hook_resid_pre", lambda x, cc: cc["blocks.1.hook_resid_pre"], {1: [1, -1]}),
    "patch_cache_pos_slice_kv_head": (
        lambda cc: Patch("blocks.0.attn.hook_k", source=cc, pos=slice(2, 5), head=1),
        "blocks.0.attn.hook_k", lambda x, cc: cc["blocks.0.attn.hook_k"], {1: slice(2, 5), 2: 1}),
    "patch_cache_value_negative_slice": (
        lambda cc: Patch("blocks.1.attn.hook_v", source=cc, pos=slice(-3, None)),
        "blocks.1.attn.hook_v", lambda x, cc: cc["blocks.1.attn.hook_v"], {1: slice(-3, None)}),
    "patch_cache_batch_rows_and_heads": (
        lambda cc: Patch("blocks.0.attn.hook_z", source=cc, batch=[0, 2], head=[0, 3]),
        "blocks.0.attn.hook_z", lambda x, cc: cc["blocks.0.attn.hook_z"], {0: [0, 2], 2: [0, 3]}),
    "patch_cache_neurons_at_a_pos": (
        lambda cc: Patch("blocks.0.mlp.hook_post", source=cc, pos=2, neuron=[3, 7, -1]),
        "blocks.0.mlp.hook_post", lambda x, cc: cc["blocks.0.mlp.hook_post"], {1: 2, 2: [3, 7, -1]}),
    "patch_cache_query_head_negative_batch": (
        lambda cc: Patch("blocks.1.attn.hook_q", source=cc, head=2, batch=-1),
        "blocks.1.attn.hook_q", lambda x, cc: cc["blocks.1.attn.hook_q"], {0: -1, 2: 2}),
    "patch_full_tensor_one_row": (
        lambda cc: Patch("blocks.0.hook_resid_post", source=FULL, batch=1),
        "blocks.0.hook_resid_post", lambda x, cc: FULL, {0: 1}),
    "patch_broadcast_vector_at_pos": (
        lambda cc: Patch("blocks.0.hook_attn_out", source=VEC, pos=-2),
        "blocks.0.hook_attn_out", lambda x, cc: VEC, {1: -2}),
    "patch_from_rows": (
        lambda cc: Patch("blocks.1.hook_resid_pre", from_rows=[2, 2, 0], pos=[0, 3]),
        "blocks.1.hook_resid_pre", lambda x, cc: x[[2, 2, 0]], {1: [0, 3]}),
    "ablate_zero_heads": (
        lambda cc: Ablate("blocks.0.attn.hook_z", head=[1, 2]),
        "blocks.0.attn.hook_z", lambda x, cc: torch.zeros(()), {2: [1, 2]}),
    "ablate_zero_everything": (
        lambda cc: Ablate("blocks.1.hook_mlp_out"),
        "blocks.1.hook_mlp_out", lambda x, cc: torch.zeros(()), {}),
    "ablate_batch_mean_at_pos": (
        lambda cc: Ablate("blocks.0.hook_mlp_out", how="mean", pos=-1),
        # the mean over the batch counts real tokens only: row 2 is padding at the last position
        "blocks.0.hook_mlp_out", lambda x, cc: x[:2].mean(0, keepdim=True), {1: -1}),
    "ablate_mean_of_reference_cache": (
        lambda cc: Ablate("blocks.1.attn.hook_z", how="mean", reference=cc, head=3),
        "blocks.1.attn.hook_z", lambda x, cc: cc["blocks.1.attn.hook_z"].mean(0, keepdim=True), {2: 3}),
    "ablate_mean_of_reference_tensor": (
        lambda cc: Ablate("blocks.1.hook_attn_out", how="mean", reference=FULL[:2], pos=[0, 5]),
        "blocks.1.hook_attn_out", lambda x, cc: FULL[:2].mean(0, keepdim=True), {1: [0, 5]}),
    "steer_vector_scaled_at_positions": (
        lambda cc: Steer("blocks.1.hook_resid_pre", vector=VEC, scale=3.0, pos=[0, -1]),
        "blocks.1.hook_resid_pre", lambda x, cc: x + 3.0 * VEC, {1: [0, -1]}),
    "steer_one_head": (
        lambda cc: Steer("blocks.0.attn.hook_z", vector=VEC_HEAD, scale=-2.0, head=1, batch=[0, 1]),
        "blocks.0.attn.hook_z", lambda x, cc: x - 2.0 * VEC_HEAD, {0: [0, 1], 2: 1}),
    "steer_everywhere": (
        lambda cc: Steer("blocks.0.hook_resid_post", vector=VEC),
        "blocks.0.hook_resid_post", lambda x, cc: x + VEC, {}),
    "scale_neurons": (
        lambda cc: Scale("blocks.1.mlp.hook_post", factor=0.0, neuron=slice(0, 64)),
        "blocks.1.mlp.hook_post", lambda x, cc: x * 0.0, {2: slice(0, 64)}),
    "scale_by_tensor_at_pos": (
        lambda cc: Scale("blocks.0.hook_attn_out", factor=torch.linspace(0, 2, 64), pos=slice(1, 4)),
        "blocks.0.hook_attn_out", lambda x, cc: x * torch.linspace(0, 2, 64), {1: slice(1, 4)}),
    "apply_callable_at_positions": (
        lambda cc: Apply("blocks.1.hook_resid_pre", fn=lambda x: x.flip(1) * 2, pos=[0, 1]),
        "blocks.1.hook_resid_pre", lambda x, cc: x.flip(1) * 2, {1: [0, 1]}),
    "apply_callable_one_head": (
        lambda cc: Apply("blocks.0.attn.hook_v", fn=torch.tanh, head=0),
        "blocks.0.attn.hook_v", lambda x, cc: torch.tanh(x), {2: 0}),
    # sites that only exist after a rewrite of the captured graph
    "ablate_pattern_head": (
        lambda cc: Ablate("blocks.1.attn.hook_pattern", head=2),
        "blocks.1.attn.hook_pattern", lambda x, cc: torch.zeros(()), {1: 2}),
    "patch_pattern_query_and_key_pos": (
        lambda cc: Patch("blocks.0.attn.hook_pattern", source=cc, query_pos=-1, key_pos=[0, 1]),
        "blocks.0.attn.hook_pattern", lambda x, cc: cc["blocks.0.attn.hook_pattern"], {2: -1, 3: [0, 1]}),
    "patch_pattern_pos_means_query_pos": (
        lambda cc: Patch("blocks.0.attn.hook_pattern", source=cc, pos=3, head=[0, 1]),
        "blocks.0.attn.hook_pattern", lambda x, cc: cc["blocks.0.attn.hook_pattern"], {1: [0, 1], 2: 3}),
    "scale_scores_query_pos": (
        lambda cc: Scale("blocks.0.attn.hook_attn_scores", factor=0.5, query_pos=[2, 3]),
        "blocks.0.attn.hook_attn_scores", lambda x, cc: x * 0.5, {2: [2, 3]}),
    "steer_scores_key_pos": (
        lambda cc: Steer("blocks.1.attn.hook_attn_scores", vector=torch.tensor(-1.5), key_pos=0, head=3),
        "blocks.1.attn.hook_attn_scores", lambda x, cc: x - 1.5, {1: 3, 3: 0}),
    "ablate_result_head": (
        lambda cc: Ablate("blocks.0.attn.hook_result", head=1),
        "blocks.0.attn.hook_result", lambda x, cc: torch.zeros(()), {2: 1}),
    "patch_result_from_cache": (
        lambda cc: Patch("blocks.1.attn.hook_result", source=cc, head=[0, 2], pos=4),
        "blocks.1.attn.hook_result", lambda x, cc: cc["blocks.1.attn.hook_result"], {1: 4, 2: [0, 2]}),
    "scale_ln_scale": (
        lambda cc: Scale("blocks.0.ln1.hook_scale", factor=2.0, pos=[1, 2]),
        "blocks.0.ln1.hook_scale", lambda x, cc: x * 2.0, {1: [1, 2]}),
    "steer_ln_normalized": (
        lambda cc: Steer("blocks.1.ln2.hook_normalized", vector=VEC, scale=0.5),
        "blocks.1.ln2.hook_normalized", lambda x, cc: x + 0.5 * VEC, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_intervention_equals_the_same_edit_in_a_hook(family, case):
    _, model = model_for(family)
    ids, mask, _ = inputs()
    cc = clean_cache(family)
    spec, site, fn, sel = CASES[case]
    got = model.run_with_interventions(ids, [spec(cc)], mask)
    want = hooked(model, ids, mask, (site, lambda x: fn(x, cc), sel))
    assert max_diff(got, want) <= TOL
    assert max_diff(want, model(ids, mask)) > 1e-6, "the edit should change the logits"


def test_patch_from_a_cache_that_holds_the_site_under_its_raw_module_path():
    # model.layers.0.mlp's output is blocks.0.hook_mlp_out
    _, model = model_for("llama")
    ids, mask, clean = inputs()
    _, raw = model.run_with_cache(clean, mask, names_filter="model.layers.0.mlp")
    assert list(raw) == ["model.layers.0.mlp"]
    got = model.run_with_interventions(ids, [Patch("blocks.0.hook_mlp_out", source=raw, pos=2)], mask)
    want = hooked(model, ids, mask, ("blocks.0.hook_mlp_out", lambda x: raw["model.layers.0.mlp"], {1: 2}))
    assert max_diff(got, want) <= TOL


def test_patch_source_may_be_a_plain_dict_and_a_cache_without_batch_dim():
    _, model = model_for("gpt2")
    ids, mask, clean = inputs()
    _, one = model.run_with_cache(clean[:1], names_filter="blocks.1.hook_resid_pre", remove_batch_dim=True)
    value = one["blocks.1.hook_resid_pre"]  # [pos, d_model]: broadcasts over the batch
    want = hooked(model, ids, mask, ("blocks.1.hook_resid_pre", lambda x: value, {1: 3}))
    for source in ({"blocks.1.hook_resid_pre": value}, one, value):
        got = model.run_with_interventions(ids, [Patch("blocks.1.hook_resid_pre", source=source, pos=3)], mask)
        assert max_diff(got, want) <= TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sites_outside_the_blocks_take_interventions(family):
    _, model = model_for(family)
    ids, mask, _ = inputs()
    embed, resid = ("hook_embed", lambda x: x + VEC, {1: 1}), ("blocks.0.hook_resid_pre", lambda x: x * 2.0, {1: [1, 2]})
    steer, scale = Steer("hook_embed", vector=VEC, pos=1), Scale("blocks.0.hook_resid_pre", factor=2.0, pos=[1, 2])
    # for some families the embedding is the first residual: then the order given is the order applied
    assert max_diff(model.run_with_interventions(ids, [steer, scale], mask), hooked(model, ids, mask, embed, resid)) <= TOL
    assert max_diff(model.run_with_interventions(ids, [scale, steer], mask), hooked(model, ids, mask, resid, embed)) <= TOL
    if family != "bert":  # BERT's MLM head has no final norm site
        got = model.run_with_interventions(ids, [Scale("ln_final.hook_scale", factor=2.0, pos=-1)], mask)
        assert max_diff(got, hooked(model, ids, mask, ("ln_final.hook_scale", lambda x: x * 2.0, {1: -1}))) <= TOL


def test_a_raw_hf_module_path_is_a_site_too():
    hf, model = model_for("llama")
    ids, mask, _ = inputs()

    def triple_at_2(mod, args, out):
        out = out.clone()
        out[:, 2] *= 3
        return out

    want = hf_run("llama", ids, mask, "model.layers.0.mlp", triple_at_2)
    got = model.run_with_interventions(ids, [Scale("model.layers.0.mlp", factor=3.0, pos=2)], mask)
    assert max_diff(got, want) <= TOL
    assert max_diff(got, model.run_with_interventions(ids, [Scale("blocks.0.hook_mlp_out", factor=3.0, pos=2)], mask)) <= TOL


# ---- resample ablation ----------------------------------------------------------------------------


def _resampled(model, ids, mask, spec):
    logits, cache = model.run_with_interventions(ids, [spec], mask, names_filter=spec.site)
    _, before = model.run_with_cache(ids, mask, names_filter=spec.site)
    return logits, cache[spec.site], before[spec.site]


DERANGEMENTS_OF_3 = [(1, 2, 0), (2, 0, 1)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_resample_takes_each_row_from_another_row_of_the_batch(family):
    _, model = model_for(family)
    ids, mask, _ = inputs()
    site = "blocks.1.hook_resid_pre"
    seen = set()
    for seed in range(6):
        logits, after, before = _resampled(model, ids, mask, Ablate(site, how="resample", seed=seed, pos=[1, 2]))
        perms = [p for p in DERANGEMENTS_OF_3 if max_diff(after[:, 1:3], before[list(p), 1:3]) == 0]
        assert len(perms) == 1, "each row must take the values of one other row"
        perm = perms[0]
        seen.add(perm)
        assert max_diff(after[:, [0, 3, 4, 5]], before[:, [0, 3, 4, 5]]) == 0  # unselected positions untouched
        want = model.run_with_interventions(ids, [Patch(site, from_rows=list(perm), pos=[1, 2])], mask)
        assert max_diff(logits, want) <= TOL
        assert max_diff(logits, model(ids, mask)) > 1e-4
        # the same seed draws the same rows
        again = model.run_with_interventions(ids, [Ablate(site, how="resample", seed=seed, pos=[1, 2])], mask)
        assert max_diff(again, logits) == 0
    assert len(seen) == 2, "different seeds should draw different derangements"


def test_resample_from_a_reference_takes_each_row_from_some_reference_row():
    _, model = model_for("neox")
    ids, mask, _ = inputs()
    site = "blocks.0.attn.hook_z"
    _, ref = model.run_with_cache(tokens(2, S, seed=5), names_filter=site)
    logits, after, before = _resampled(model, ids, mask, Ablate(site, how="resample", reference=ref, seed=3, head=1))
    rows = []
    for i in range(B):
        match = [j for j in range(2) if max_diff(after[i, :, 1], ref[site][j, :, 1]) == 0]
        assert match, f"row {i} took values from no reference row"
        rows.append(match[0])
    assert max_diff(after[:, :, [0, 2, 3]], before[:, :, [0, 2, 3]]) == 0
    want = hooked(model, ids, mask, (site, lambda x: ref[site][rows], {2: 1}))
    assert max_diff(logits, want) <= TOL


def test_resample_of_a_single_row_without_reference_is_refused():
    # a one-row batch has no other row to take values from; DESIGN: "no intervention is ever silently dropped"
    _, model = model_for("llama")
    with pytest.raises(InterventionError, match=r"Ablate\('blocks\.0\.hook_resid_pre'.*resample"):
        model.run_with_interventions(tokens(1, S), [Ablate("blocks.0.hook_resid_pre", how="resample")])


# ---- several interventions in one call ------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_interventions_on_one_site_chain_in_the_order_given(family):
    _, model = model_for(family)
    ids, mask, _ = inputs()
    site = "blocks.1.hook_resid_pre"
    scale, steer = Scale(site, factor=2.0, pos=1), Steer(site, vector=VEC, pos=[1, 2])
    ref_scale = (site, lambda x: x * 2.0, {1: 1})
    ref_steer = (site, lambda x: x + VEC, {1: [1, 2]})
    first = model.run_with_interventions(ids, [scale, steer], mask)
    second = model.run_with_interventions(ids, [steer, scale], mask)
    assert max_diff(first, hooked(model, ids, mask, ref_scale, ref_steer)) <= TOL
    assert max_diff(second, hooked(model, ids, mask, ref_steer, ref_scale)) <= TOL
    assert max_diff(first, second) > 1e-4  # 2x + v differs from 2(x + v)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_interventions_on_many_sites_equal_the_hooks_together(family):
    _, model = model_for(family)
    ids, mask, _ = inputs()
    cc = clean_cache(family)
    specs = [
        Patch("blocks.0.hook_resid_pre", source=cc, pos=[0, 4]),
        Ablate("blocks.0.attn.hook_pattern", head=0, query_pos=-1),
        Ablate("blocks.1.attn.hook_z", how="mean", head=[1, 3]),
        Steer("blocks.1.hook_resid_post", vector=VEC, scale=0.3, pos=-1),
    ]
    refs = [
        ("blocks.0.hook_resid_pre", lambda x: cc["blocks.0.hook_resid_pre"], {1: [0, 4]}),
        ("blocks.0.attn.hook_pattern", lambda x: torch.zeros(()), {1: 0, 2: -1}),
        ("blocks.1.attn.hook_z", lambda x: real_token_mean(x, mask), {2: [1, 3]}),
        ("blocks.1.hook_resid_post", lambda x: x + 0.3 * VEC, {1: -1}),
    ]
    got = model.run_with_interventions(ids, specs, mask)
    assert max_diff(got, hooked(model, ids, mask, *refs)) <= TOL


def test_an_empty_list_of_interventions_is_a_plain_forward():
    hf, model = model_for("llama")
    ids, mask, _ = inputs()
    assert max_diff(model.run_with_interventions(ids, [], mask), hf_logits(hf, ids, mask)) <= TOL


# ---- the same edits as forward hooks on the HF model ----------------------------------------------

# family -> (layers, output projection of attention, first LayerNorm of a block or None)
HF_PATHS = {
    "llama": ("model.layers", "self_attn.o_proj", None),
    "gpt2": ("transformer.h", "attn.c_proj", "ln_1"),
    "neox": ("gpt_neox.layers", "attention.dense", "input_layernorm"),
    "bert": ("bert.encoder.layer", "attention.output.dense", None),
}


@functools.cache
def hf_copy(family):
    hf, _ = model_for(family)
    return copy.deepcopy(hf)


def hf_run(family, ids, mask, module, hook, pre=False):
    hf = hf_copy(family)
    mod = dict(hf.named_modules())[module]
    handle = mod.register_forward_pre_hook(hook, with_kwargs=True) if pre else mod.register_forward_hook(hook)
    try:
        return hf_logits(hf, ids, mask)
    finally:
        handle.remove()


def _layer_input_edit(edit):
    """A with_kwargs pre-hook on an HF decoder layer editing its hidden-state input."""

    def pre(mod, args, kwargs):
        if args:
            return (edit(args[0].clone()),) + args[1:], kwargs
        return args, dict(kwargs, hidden_states=edit(kwargs["hidden_states"].clone()))

    return pre


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_steer_and_patch_of_resid_pre_equal_an_hf_pre_hook_on_the_layer(family):
    hf, model = model_for(family)
    ids, mask, clean = inputs()
    layers = HF_PATHS[family][0]
    with torch.no_grad():
        clean_h = hf(input_ids=clean, attention_mask=mask, output_hidden_states=True).hidden_states[1]

    def steer(h):
        h[:, [1, -1]] += 2.0 * VEC
        return h

    def patch(h):
        h[:, 2] = clean_h[:, 2]
        return h

    want = hf_run(family, ids, mask, f"{layers}.1", _layer_input_edit(steer), pre=True)
    got = model.run_with_interventions(ids, [Steer("blocks.1.hook_resid_pre", vector=VEC, scale=2.0, pos=[1, -1])], mask)
    assert max_diff(got, want) <= TOL
    want = hf_run(family, ids, mask, f"{layers}.1", _layer_input_edit(patch), pre=True)
    got = model.run_with_interventions(ids, [Patch("blocks.1.hook_resid_pre", source=clean_cache(family), pos=2)], mask)
    assert max_diff(got, want) <= TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ablating_a_head_of_z_or_result_equals_zeroing_its_slice_of_the_output_projection_input(family):
    _, model = model_for(family)
    ids, mask, _ = inputs()
    layers, o_proj, _ = HF_PATHS[family]
    dh = model.cfg.d_head

    def pre(mod, args, kwargs):
        x = args[0].clone()
        x[:, 3, 2 * dh : 3 * dh] = 0  # head 2 at position 3
        return (x,) + args[1:], kwargs

    want = hf_run(family, ids, mask, f"{layers}.0.{o_proj}", pre, pre=True)
    for site in ("blocks.0.attn.hook_z", "blocks.0.attn.hook_result"):
        got = model.run_with_interventions(ids, [Ablate(site, head=2, pos=3)], mask)
        assert max_diff(got, want) <= TOL, site


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_scaling_the_fused_layernorm_scale_equals_dividing_the_normalized_input(family):
    # hook_scale is the divisor of LayerNorm: doubling it halves (x - mean) / scale before w and b
    _, model = model_for(family)
    ids, mask, _ = inputs()
    layers, _, ln = HF_PATHS[family]
    hf = hf_copy(family)
    norm = dict(hf.named_modules())[f"{layers}.0.{ln}"]

    def halve(mod, args, out):
        out = out.clone()
        out[:, 2] = (out[:, 2] - norm.bias) / 2 + norm.bias
        return out

    want = hf_run(family, ids, mask, f"{layers}.0.{ln}", halve)
    got = model.run_with_interventions(ids, [Scale("blocks.0.ln1.hook_scale", factor=2.0, pos=2)], mask)
    assert max_diff(got, want) <= TOL


# ---- names_filter and the user's model ------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_names_filter_caches_the_values_after_the_interventions(family):
    _, model = model_for(family)
    ids, mask, _ = inputs()
    cc = clean_cache(family)
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post"]
    specs = [Patch("blocks.0.hook_resid_post", source=cc, pos=1), Ablate("blocks.1.attn.hook_z", head=0)]
    logits, cache = model.run_with_interventions(ids, specs, mask, names_filter=names)
    assert set(cache) == set(names)
    seen = {}

    def record(x, hook):
        seen[hook.name] = x.clone()

    want = model.run_with_hooks(ids, mask, fwd_hooks=[
        ("blocks.0.hook_resid_post", edit_hook(lambda x: cc["blocks.0.hook_resid_post"], {1: 1})),
        ("blocks.1.attn.hook_z", edit_hook(lambda x: torch.zeros(()), {2: 0})),
        *[(name, record) for name in names],
    ])
    assert max_diff(logits, want) <= TOL
    for name in names:
        assert max_diff(cache[name], seen[name]) <= TOL, name
    assert max_diff(cache["blocks.0.hook_resid_post"][:, 1], cc["blocks.0.hook_resid_post"][:, 1]) == 0
    assert cache["z", 1][:, :, 0].abs().max().item() == 0
    _, plain = model.run_with_cache(ids, mask, names_filter=names)
    assert max_diff(cache["pattern", 1], plain["pattern", 1]) > 1e-6  # downstream of the patch


def test_names_filter_with_return_type_none_gives_only_the_cache():
    _, model = model_for("gpt2")
    ids, mask, _ = inputs()
    logits, cache = model.run_with_interventions(ids, [Ablate("blocks.0.hook_resid_pre", pos=0)], mask,
                                                 names_filter="blocks.0.hook_resid_pre", return_type=None)
    assert logits is None
    assert cache["resid_pre", 0][:, 0].abs().max().item() == 0


def test_the_users_model_and_tensors_are_unchanged_afterwards():
    hf, model = model_for("llama")
    ids, mask, _ = inputs()
    cc = clean_cache("llama")
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in hf.modules()]
    source = cc["blocks.0.hook_resid_pre"].clone()
    vec = VEC.clone()
    before = model(ids, mask)
    model.run_with_interventions(ids, [
        Patch("blocks.0.hook_resid_pre", source=cc, pos=1),
        Steer("blocks.1.hook_resid_pre", vector=VEC, scale=5.0),
        Ablate("blocks.0.attn.hook_pattern", head=1),
        Apply("blocks.1.attn.hook_z", fn=lambda x: x * 0),
    ], mask)
    assert all(torch.equal(v, state[k]) for k, v in hf.state_dict().items())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in hf.modules()] == hooks
    assert torch.equal(cc["blocks.0.hook_resid_pre"], source) and torch.equal(VEC, vec)
    assert max_diff(model(ids, mask), before) == 0
    assert max_diff(before, hf_logits(hf, ids, mask)) <= TOL


# ---- errors before any compute ----------------------------------------------------------------------


@pytest.fixture
def no_compute(monkeypatch):
    """``no_compute()``: the shared llama model with program lookup forbidden from then on, for this test only
    (build the specs first: a cache they hold is computed by the same model). An error must then come from
    checking the specs."""
    _, model = model_for("llama")
    calls = []

    def forbid():
        monkeypatch.setattr(model.programs, "get", lambda *a, **k: calls.append(a) or pytest.fail("a program was built"))
        return model

    yield forbid
    assert not calls


def _cache_with(site):
    _, model = model_for("llama")
    ids, mask, clean = inputs()
    return model.run_with_cache(clean, mask, names_filter=site)[1]


ERRORS = {
    "head_on_a_site_without_heads": (
        lambda: Patch("blocks.0.hook_resid_pre", source=VEC, head=1),
        r"Patch\('blocks\.0\.hook_resid_pre', head=1\).*no head axis.*batch, pos, d_model"),
    "position_past_the_end": (
        lambda: Steer("blocks.1.hook_resid_pre", vector=VEC, pos=[2, 6]),
        r"Steer\('blocks\.1\.hook_resid_pre', pos=\[2, 6\]\).*position 6 is out of range.*0\.\.5"),
    "negative_position_past_the_start": (
        lambda: Ablate("blocks.0.hook_attn_out", pos=-7),
        r"Ablate\('blocks\.0\.hook_attn_out', pos=-7\).*position -7 is out of range.*0\.\.5"),
    "query_pos_past_the_end": (
        lambda: Ablate("blocks.0.attn.hook_pattern", query_pos=9),
        r"Ablate\('blocks\.0\.attn\.hook_pattern', query_pos=9\).*out of range.*0\.\.5"),
    "neuron_out_of_range": (
        lambda: Scale("blocks.0.mlp.hook_post", factor=0.0, neuron=128),
        r"Scale\('blocks\.0\.mlp\.hook_post', neuron=128\).*neuron 128 is out of range.*0\.\.127"),
    "kv_head_out_of_range": (
        lambda: Ablate("blocks.0.attn.hook_k", head=2),
        r"Ablate\('blocks\.0\.attn\.hook_k', head=2\).*head 2 is out of range.*0\.\.1"),
    "batch_row_out_of_range": (
        lambda: Ablate("blocks.0.hook_resid_pre", batch=3),
        r"Ablate\('blocks\.0\.hook_resid_pre', batch=3\).*batch row 3 is out of range.*0\.\.2"),
    "source_of_the_wrong_shape": (
        lambda: Patch("blocks.0.hook_resid_pre", source=torch.zeros(B, S - 1, 64)),
        r"Patch\('blocks\.0\.hook_resid_pre'\).*\(3, 5, 64\).*\(3, 6, 64\)"),
    "source_with_extra_dims": (
        lambda: Patch("blocks.0.hook_resid_pre", source=torch.zeros(1, B, S, 64)),
        r"Patch\('blocks\.0\.hook_resid_pre'\).*\(1, 3, 6, 64\)"),
    "steering_vector_of_the_wrong_size": (
        lambda: Steer("blocks.0.attn.hook_z", vector=VEC, head=0),
        r"Steer\('blocks\.0\.attn\.hook_z', head=0\).*\(64,\).*\(3, 6, 4, 16\)"),
    "cache_missing_the_site": (
        lambda: Patch("blocks.0.hook_attn_out", source=_cache_with("blocks.0.hook_resid_pre")),
        r"Patch\('blocks\.0\.hook_attn_out'\).*no value for blocks\.0\.hook_attn_out"),
    "reference_cache_missing_the_site": (
        lambda: Ablate("blocks.1.hook_mlp_out", how="mean", reference=_cache_with("blocks.0.hook_resid_pre")),
        r"Ablate\('blocks\.1\.hook_mlp_out'\).*no value for blocks\.1\.hook_mlp_out"),
    "reference_of_another_length": (
        lambda: Ablate("blocks.0.hook_resid_pre", how="mean", reference=torch.zeros(2, S + 1, 64)),
        r"Ablate\('blocks\.0\.hook_resid_pre'\).*\(1, 7, 64\).*\(3, 6, 64\)"),
    "from_rows_of_the_wrong_length": (
        lambda: Patch("blocks.0.hook_resid_pre", from_rows=[1, 0]),
        r"Patch\('blocks\.0\.hook_resid_pre'\).*from_rows.*\(3\)"),
    "from_rows_out_of_range": (
        lambda: Patch("blocks.0.hook_resid_pre", from_rows=[0, 1, 3]),
        r"Patch\('blocks\.0\.hook_resid_pre'\).*batch row 3 is out of range"),
    "unknown_how": (
        lambda: Ablate("blocks.0.hook_resid_pre", how="median"),
        r"Ablate\('blocks\.0\.hook_resid_pre'\).*how must be.*'median'"),
    "patch_without_source": (
        lambda: Patch("blocks.0.hook_resid_pre", pos=0),
        r"Patch\('blocks\.0\.hook_resid_pre', pos=0\).*source"),
    "steer_without_vector": (
        lambda: Steer("blocks.0.hook_resid_pre"),
        r"Steer\('blocks\.0\.hook_resid_pre'\).*vector"),
    "apply_without_a_callable": (
        lambda: Apply("blocks.0.hook_resid_pre", fn=3),
        r"Apply\('blocks\.0\.hook_resid_pre'\).*callable"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_a_bad_spec_fails_before_compute_naming_the_spec(no_compute, case):
    make_spec, message = ERRORS[case]
    ids, mask, _ = inputs()
    ok = Steer("blocks.0.hook_resid_pre", vector=VEC)  # a valid spec first: nothing may run either
    bad = make_spec()
    with pytest.raises(InterventionError, match=message):
        no_compute().run_with_interventions(ids, [ok, bad], mask)


def test_an_unknown_site_or_a_non_spec_fails_before_compute(no_compute):
    ids, mask, _ = inputs()
    model = no_compute()
    with pytest.raises(fxlens.SiteError, match="blocks.0.attn.hook_pattern"):
        model.run_with_interventions(ids, [Ablate("blocks.0.attn.hook_patern")], mask)
    with pytest.raises(InterventionError, match="Patch, Ablate, Steer, Scale, Apply or a subclass of fxlens.Intervention; got tuple"):
        model.run_with_interventions(ids, [("blocks.0.hook_resid_pre", lambda x, hook: x)], mask)


def test_apply_returning_the_wrong_shape_names_the_site():
    _, model = model_for("llama")
    ids, mask, _ = inputs()
    with pytest.raises(Exception, match=r"blocks\.1\.hook_resid_pre.*\(3, 6, 64\)"):
        model.run_with_interventions(ids, [Apply("blocks.1.hook_resid_pre", fn=lambda x: x[:, :2])], mask)


# ---- compile=True ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2"])
def test_compiled_program_equals_uncompiled(family):
    _, model = model_for(family)
    ids, mask, _ = inputs()
    cc = clean_cache(family)

    def specs(scale):
        return [
            Patch("blocks.0.hook_resid_pre", source=cc, pos=[1, 3]),
            Ablate("blocks.0.attn.hook_pattern", head=1),
            Steer("blocks.1.hook_resid_pre", vector=VEC, scale=scale, pos=-1),
        ]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for scale in (1.0, -3.0):  # new tensors, same plan: the compiled program is reused
            want = model.run_with_interventions(ids, specs(scale), mask)
            got = model.run_with_interventions(ids, specs(scale), mask, compile=True)
            assert max_diff(got, want) <= 1e-4
    assert not [w for w in caught if "could not compile" in str(w.message)], "the program ran uncompiled"
