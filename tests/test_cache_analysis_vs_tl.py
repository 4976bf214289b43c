"""The cache's analysis helpers against TransformerLens' own ActivationCache on the same weights
(GPT-2: LayerNorm with biases; Llama: RMSNorm).

The reference is TransformerLens' TransformerBridge with ``fold_ln=True`` (and no centring, which would
change the residual stream itself): there the final norm's weight lives in ``W_U``, here
``apply_ln_to_stack`` multiplies by it, so logit attributions agree and normed stacks agree once
TransformerLens' are multiplied by the weight.
"""

import copy

import pytest
import torch
from conftest import cached_model
from families import tokens

TOL = 1e-5


BRIDGE_NAMES = {"gpt2": "gpt2", "llama": "meta-llama/Llama-3.2-1B"}  # the architecture; weights come from hf_model


@pytest.fixture(scope="module", params=sorted(BRIDGE_NAMES))
def caches(request, tiny_tokenizer):
    import fxlens
    from transformer_lens.model_bridge import TransformerBridge

    hf, _ = cached_model(request.param)
    model = fxlens.Model.from_hf(hf, tokenizer=tiny_tokenizer)
    bridge = TransformerBridge.boot_transformers(BRIDGE_NAMES[request.param], hf_model=copy.deepcopy(hf), tokenizer=tiny_tokenizer)
    bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=False,
                                     center_unembed=False, fold_value_biases=False)
    ids = tokens(2, 6, seed=7)
    _, mine = model.run_with_cache(ids)
    _, theirs = bridge.run_with_cache(ids)
    return hf, mine, theirs


@pytest.mark.parametrize("layer", [-1, 1])
@pytest.mark.parametrize("pos_slice", [None, -1, [1, 4]])
def test_stack_head_results_equal_transformer_lens(caches, layer, pos_slice):
    _, mine, theirs = caches
    got, labels = mine.stack_head_results(layer, return_labels=True, incl_remainder=True, pos_slice=pos_slice)
    want, want_labels = theirs.stack_head_results(layer, return_labels=True, incl_remainder=True, pos_slice=pos_slice)
    assert labels == want_labels
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("expand_neurons", [True, False])
def test_full_resid_decomposition_equals_transformer_lens(caches, expand_neurons):
    _, mine, theirs = caches
    got, labels = mine.get_full_resid_decomposition(expand_neurons=expand_neurons, pos_slice=-1, return_labels=True)
    want, want_labels = theirs.get_full_resid_decomposition(expand_neurons=expand_neurons, pos_slice=-1, return_labels=True)
    assert labels == want_labels
    assert (got - want).abs().max() <= TOL


def test_logit_attrs_equal_transformer_lens_with_folded_norms(caches):
    hf, mine, theirs = caches
    stack = mine.get_full_resid_decomposition(expand_neurons=False, pos_slice=-1)
    got = mine.logit_attrs(stack, torch.tensor([11, 12]), torch.tensor([13, 14]), pos_slice=-1)
    want = theirs.logit_attrs(theirs.get_full_resid_decomposition(expand_neurons=False, pos_slice=-1),
                              torch.tensor([11, 12]), torch.tensor([13, 14]), pos_slice=-1)
    assert (got - want).abs().max() <= 1e-4
    normed = mine.apply_ln_to_stack(stack, pos_slice=-1)
    final_norm = hf.transformer.ln_f if hasattr(hf, "transformer") else hf.model.norm
    theirs_normed = theirs.apply_ln_to_stack(stack, pos_slice=-1) * final_norm.weight.detach()
    assert (normed - theirs_normed).abs().max() <= TOL


@pytest.mark.parametrize("neuron_slice", [None, [3, 9]])
def test_stack_neuron_results_equal_transformer_lens(caches, neuron_slice):
    _, mine, theirs = caches
    got, labels = mine.stack_neuron_results(2, neuron_slice=neuron_slice, pos_slice=-1, incl_remainder=True, return_labels=True)
    want, want_labels = theirs.stack_neuron_results(2, neuron_slice=neuron_slice, pos_slice=-1, incl_remainder=True, return_labels=True)
    assert labels == want_labels
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("layer", [None, 1])
def test_normed_stacks_equal_transformer_lens_times_the_norm_weight(caches, layer):
    hf, mine, theirs = caches
    if layer is None:
        norm = hf.transformer.ln_f if hasattr(hf, "transformer") else hf.model.norm
    else:
        norm = hf.transformer.h[1].ln_1 if hasattr(hf, "transformer") else hf.model.layers[1].input_layernorm
    got, labels = mine.decompose_resid(layer, apply_ln=True, pos_slice=[0, 5], return_labels=True)
    want, want_labels = theirs.decompose_resid(layer, apply_ln=True, pos_slice=[0, 5], return_labels=True)
    assert labels == want_labels
    assert (got - want * norm.weight.detach()).abs().max() <= TOL
    heads = mine.stack_head_results(layer if layer is not None else -1, apply_ln=True, pos_slice=-1)
    want_heads = theirs.stack_head_results(layer if layer is not None else -1, apply_ln=True, pos_slice=-1)
    assert (heads - want_heads * norm.weight.detach()).abs().max() <= TOL
