"""The ActivationCache's analysis helpers against hand computations from the HF model itself.

GPT-2 (LayerNorm with weight and bias, biases everywhere) and Llama (RMSNorm, no biases), batched with
left padding. References are plain HF forwards with ``register_forward_hook`` on the norm modules and
the HF logits: decompositions must sum to the residual they decompose (1e-5), the normed stacks plus
the norm's bias to the norm's output (1e-5), and logit attributions plus the documented constant to the
HF logit difference (1e-4).
"""

import copy

import pytest
import torch
from conftest import cached_model
from families import tokens

import fxlens
from fxlens.engine.slices import Slice

TOL = 1e-5
FAMILIES = ("gpt2", "llama")
PADS = 2  # row 0 is left-padded by this many positions
SLICES = [None, -1, [0, 3], (1, 4)]

NORMS = {  # final norm, ln1 and ln2 of layer 1
    "gpt2": ("transformer.ln_f", "transformer.h.1.ln_1", "transformer.h.1.ln_2"),
    "llama": ("model.norm", "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"),
}


@pytest.fixture(scope="module", params=FAMILIES)
def run(request):
    """(family, hf, model, ids, mask, cache, HF norm outputs by module path, HF logits)."""
    family = request.param
    hf, model = cached_model(family)
    ids = tokens(2, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :PADS] = 0
    ids[0, :PADS] = 2
    outs, handles, ref = {}, [], copy.deepcopy(hf)  # hooks go on a copy, never on the shared model
    for path in NORMS[family]:
        handles.append(ref.get_submodule(path).register_forward_hook(lambda m, i, o, p=path: outs.__setitem__(p, o.detach())))
    try:
        with torch.no_grad():
            logits = ref(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    _, cache = model.run_with_cache(ids, mask)
    return family, hf, model, ids, mask, cache, outs, logits


def _bias(hf, path):
    b = getattr(hf.get_submodule(path), "bias", None)
    return 0.0 if b is None else b.detach()


def test_compute_head_results_equals_the_cached_per_head_site_and_sums_to_attn_out(run):
    family, hf, model, ids, mask, cache, _, _ = run
    assert "blocks.0.attn.hook_result" not in cache  # not cached by names_filter=None: computed from z
    cache_z = fxlens.ActivationCache(dict(cache.cache_dict), model.site_table, model)
    cache_z.compute_head_results()
    _, with_result = model.run_with_cache(ids, mask, names_filter=lambda n: n.endswith("hook_result"))
    for layer in range(2):
        got = cache_z["result", layer]
        assert got.shape == (2, 6, 4, 64)
        assert (got - with_result["result", layer]).abs().max() <= TOL
        b_O = hf.get_submodule(f"transformer.h.{layer}.attn.c_proj" if family == "gpt2" else f"model.layers.{layer}.self_attn.o_proj").bias
        b_O = 0 if b_O is None else b_O.detach()
        assert (got.sum(-2) + b_O - cache["attn_out", layer]).abs().max() <= TOL


@pytest.mark.parametrize("pos_slice", SLICES)
@pytest.mark.parametrize("expand_neurons", [True, False])
@pytest.mark.parametrize("where", ["final", "resid_pre1", "resid_mid1"])
def test_full_resid_decomposition_sums_to_the_residual(run, pos_slice, expand_neurons, where):
    family, hf, model, ids, mask, cache, _, _ = run
    layer, mlp_input, target = {"final": (None, False, cache["resid_post", -1]), "resid_pre1": (1, False, cache["resid_pre", 1]),
                                "resid_mid1": (1, True, cache["resid_mid", 1])}[where]
    stack, labels = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input, expand_neurons=expand_neurons,
                                                       pos_slice=pos_slice, return_labels=True)
    want = Slice(pos_slice).apply(target, dim=-2)
    assert len(labels) == stack.shape[0] and stack.shape[1:] == want.shape
    assert (stack.sum(0) - want).abs().max() <= TOL
    n = 2 if layer is None else layer
    heads = n + (1 if mlp_input else 0)
    assert labels[: 4 * heads] == [f"L{i}H{h}" for i in range(heads) for h in range(4)]
    assert labels[-1] == "bias"
    embeds = ["embed", "pos_embed"] if family == "gpt2" else ["embed"]
    assert labels[-1 - len(embeds):-1] == embeds
    mlps = labels[4 * heads:-1 - len(embeds)]
    assert mlps == ([f"L{i}N{j}" for i in range(n) for j in range(128)] if expand_neurons else [f"{i}_mlp_out" for i in range(n)])


def test_neuron_results_are_post_times_the_hf_down_projection(run):
    family, hf, model, ids, mask, cache, _, _ = run
    down = hf.get_submodule("transformer.h.1.mlp.c_proj" if family == "gpt2" else "model.layers.1.mlp.down_proj")
    W_out = down.weight.detach() if family == "gpt2" else down.weight.detach().t()  # Conv1D holds [in, out]
    b_out = 0 if down.bias is None else down.bias.detach()
    stack, labels = cache.stack_neuron_results(2, neuron_slice=[5, 7], pos_slice=-1, return_labels=True)
    assert labels == ["L0N5", "L0N7", "L1N5", "L1N7"]
    post = cache["post", 1][:, -1]
    assert (stack[3] - post[:, 7, None] * W_out[7]).abs().max() <= TOL
    every = cache.stack_neuron_results(2)
    assert every.shape == (256, 2, 6, 64)
    assert (every[128:].sum(0) + b_out - cache["mlp_out", 1]).abs().max() <= TOL
    with_rest, labels = cache.stack_neuron_results(1, incl_remainder=True, return_labels=True)
    assert labels[-1] == "remainder" and (with_rest.sum(0) - cache["resid_post", 0]).abs().max() <= TOL


@pytest.mark.parametrize("pos_slice", SLICES)
def test_normed_stack_plus_norm_bias_is_the_hf_final_norm_output(run, pos_slice):
    family, hf, model, ids, mask, cache, outs, _ = run
    final, _, _ = NORMS[family]
    stack = cache.decompose_resid(pos_slice=pos_slice)
    normed = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=pos_slice)
    want = Slice(pos_slice).apply(outs[final], dim=-2)
    assert (normed.sum(0) + _bias(hf, final) - want).abs().max() <= TOL
    also = cache.decompose_resid(apply_ln=True, pos_slice=pos_slice)
    assert (also - normed).abs().max() <= TOL


@pytest.mark.parametrize("mlp_input", [False, True])
def test_normed_stack_at_a_layer_is_that_layers_hf_norm_output(run, mlp_input):
    family, hf, model, ids, mask, cache, outs, _ = run
    path = NORMS[family][2 if mlp_input else 1]
    stack = cache.get_full_resid_decomposition(1, mlp_input=mlp_input, expand_neurons=False, apply_ln=True)
    assert (stack.sum(0) + _bias(hf, path) - outs[path]).abs().max() <= TOL
    heads = cache.stack_head_results(1, incl_remainder=True, apply_ln=True, pos_slice=[1, 2])
    assert (heads.sum(0) + _bias(hf, NORMS[family][1]) - outs[NORMS[family][1]][:, [1, 2]]).abs().max() <= TOL


def test_accumulated_resid_apply_ln_at_the_end_is_the_logit_lens(run):
    family, hf, model, ids, mask, cache, outs, logits = run
    acc, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"]
    assert (acc[-1] - outs[NORMS[family][0]]).abs().max() <= TOL
    assert ((acc[-1] @ model.W_U + model.b_U) - logits).abs().max() <= 1e-4
    mid, labels = cache.accumulated_resid(layer=1, mlp_input=True, apply_ln=True, pos_slice=-1, return_labels=True)
    assert labels == ["0_pre", "1_pre", "1_mid"] and mid.shape == (3, 2, 64)
    assert (mid[-1] + _bias(hf, NORMS[family][2]) - outs[NORMS[family][2]][:, -1]).abs().max() <= TOL


@pytest.mark.parametrize("expand_neurons", [True, False])
def test_logit_attrs_sum_to_the_hf_logit_difference(run, expand_neurons):
    family, hf, model, ids, mask, cache, outs, logits = run
    final = NORMS[family][0]
    correct, wrong = torch.tensor([11, 12]), torch.tensor([13, 14])
    stack = cache.get_full_resid_decomposition(expand_neurons=expand_neurons, pos_slice=-1)
    attrs = cache.logit_attrs(stack, correct, wrong, pos_slice=-1)
    assert attrs.shape == (stack.shape[0], 2)
    W_U = hf.lm_head.weight.detach().t()
    b_U = 0 if hf.lm_head.bias is None else hf.lm_head.bias.detach()
    constant = (_bias(hf, final) @ W_U + b_U) if family == "gpt2" else torch.zeros(100)  # documented: not attributed
    rows = torch.arange(2)
    want = logits[rows, -1, correct] - logits[rows, -1, wrong]
    assert (attrs.sum(0) + constant[correct] - constant[wrong] - want).abs().max() <= 1e-4
    # every position, one token per row; and a token per position
    full = cache.get_full_resid_decomposition(expand_neurons=False)
    per_row = cache.logit_attrs(full, correct)
    assert per_row.shape == (full.shape[0], 2, 6)
    want = logits[rows[:, None], torch.arange(6), correct[:, None]]
    assert (per_row.sum(0) + constant[correct][:, None] - want).abs().max() <= 1e-4
    per_pos = cache.logit_attrs(full, ids)
    assert (per_pos.sum(0) + constant[ids] - logits.gather(-1, ids[..., None])[..., 0]).abs().max() <= 1e-4


def test_decompose_resid_falls_back_to_resid_pre_0_and_excludes_embeddings_on_request(run):
    family, hf, model, ids, mask, cache, _, _ = run
    _, partial = model.run_with_cache(ids, mask, names_filter=lambda n: n.endswith(("attn_out", "mlp_out", "blocks.0.hook_resid_pre")))
    parts, labels = partial.decompose_resid(return_labels=True)
    assert labels[0] == "embeddings" and (parts.sum(0) - cache["resid_post", -1]).abs().max() <= TOL
    parts, labels = cache.decompose_resid(incl_embeds=False, mode="attn", return_labels=True)
    assert labels == ["0_attn_out", "1_attn_out"]
    parts, labels = cache.decompose_resid(1, mlp_input=True, return_labels=True)
    assert labels[-2:] == ["0_mlp_out", "1_attn_out"] and (parts.sum(0) - cache["resid_mid", 1]).abs().max() <= TOL


def test_cache_dict_is_the_cache_and_missing_scales_are_named(run):
    family, hf, model, ids, mask, cache, _, _ = run
    assert cache.cache_dict is cache.cache_dict and set(cache.cache_dict) == set(cache.keys())
    _, partial = model.run_with_cache(ids, mask, names_filter=lambda n: n.endswith(("hook_embed", "pos_embed", "attn_out", "mlp_out")))
    with pytest.raises(fxlens.SiteError, match="ln_final.hook_scale.*names_filter"):
        partial.apply_ln_to_stack(partial.decompose_resid())


def test_remove_batch_dim_keeps_the_helpers_working(run):
    family, hf, model, ids, mask, cache, outs, _ = run
    _, single = model.run_with_cache(ids[1:], mask[1:], remove_batch_dim=True)
    assert single.has_batch_dim is False
    stack = single.get_full_resid_decomposition(expand_neurons=False, pos_slice=-1)
    assert stack.shape[1:] == (64,)
    attrs = single.logit_attrs(stack, 11, has_batch_dim=False, pos_slice=-1)
    batched = cache.logit_attrs(cache.get_full_resid_decomposition(expand_neurons=False, pos_slice=-1), 11, pos_slice=-1)
    assert (attrs - batched[:, 1]).abs().max() <= 1e-4


def test_apply_slice_to_batch_dim_selects_rows(run):
    family, hf, model, ids, mask, cache, _, _ = run
    one = cache.apply_slice_to_batch_dim(1)
    assert one.has_batch_dim is False and torch.equal(one["resid_post", 1], cache["resid_post", 1][1])
    assert (one.decompose_resid(pos_slice=-1).sum(0) - cache["resid_post", 1][1, -1]).abs().max() <= TOL
    some = cache.apply_slice_to_batch_dim([1, 0])
    # a left-padded row's padding queries attend to nothing: NaN in both
    torch.testing.assert_close(some["pattern", 0], cache["pattern", 0][[1, 0]], rtol=0, atol=0, equal_nan=True)


def test_head_results_need_z_only_of_the_layers_asked_for(run):
    family, hf, model, ids, mask, cache, _, _ = run
    _, partial = model.run_with_cache(ids, mask, names_filter=["blocks.0.attn.hook_z"])
    assert partial.stack_head_results(1).shape == (4, 2, 6, 64)
    with pytest.raises(fxlens.SiteError, match=r"needs 'blocks.1.attn.hook_z'.*names_filter"):
        partial.stack_head_results(2)


def test_post_norm_sublayers_refuse_per_head_decomposition():
    _, model = cached_model("gemma2")
    _, cache = model.run_with_cache(tokens(1, 4))
    with pytest.raises(ValueError, match="passes through a norm .*post_attention_layernorm.* do not add up"):
        cache.get_full_resid_decomposition()
    parts = cache.decompose_resid()  # the layer outputs still sum to the residual
    assert (parts.sum(0) - cache["resid_post", -1]).abs().max() <= TOL


def test_slices_mean_what_transformer_lens_slices_mean():
    from transformer_lens.utilities import Slice as TLSlice

    t = torch.arange(24).reshape(2, 12)
    for s in [None, 3, -1, (4,), (2, 8), (1, 9, 3), slice(2, None), [5, 1, 7], torch.tensor([0, 11])]:
        assert torch.equal(Slice(s).apply(t, dim=-1), TLSlice(s).apply(t, dim=-1)), s
        assert torch.equal(Slice(TLSlice(s)).apply(t, dim=1), TLSlice(s).apply(t, dim=1)), s
    with pytest.raises(TypeError, match="a slice must be"):
        Slice("last")
