"""``with_processed_weights``: the processed copy's outputs against the HF model's, its weights against
TransformerLens' own processing of the same weights, and the user's HF model untouched bit for bit.

The HF model's logits are the reference (log-softmax equal to 1e-5; ``center_unembed`` shifts each
position's logits by one constant); TransformerLens' TransformerBridge with ``enable_compatibility_mode``
(fold_ln, center_writing_weights, center_unembed, fold_value_biases) is the reference for the weights.
Matrices are scaled up (x5) so that norms and biases move the outputs well above the tolerance.
"""

import contextlib
import copy
import warnings

import pytest
import torch
import transformers as T
from families import make, tokens

import fxlens
from fxlens.engine.processed_weights import ProcessingError

TOL = 1e-5
KV = {"llama": 2, "qwen2": 2}


def scaled(family, **kwargs):
    hf = make(family, n_kv_heads=KV.get(family), **kwargs)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    return hf


def snapshot(hf) -> dict:
    return {k: v.clone() for k, v in hf.state_dict(keep_vars=False).items()}


def unchanged(hf, before) -> bool:
    now = hf.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids).logits


_MODELS = {}


def processed(family):
    """(hf, its snapshot before processing, Model, processed Model), once per family."""
    if family not in _MODELS:
        hf = scaled(family)
        before = snapshot(hf)
        model = fxlens.Model.from_hf(hf)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", UserWarning)
            new = model.with_processed_weights()
        new.said = [str(w.message) for w in said]
        _MODELS[family] = (hf, before, model, new)
    return _MODELS[family]


@contextlib.contextmanager
def _quiet():
    """Without the warnings processing gives on purpose (an RMSNorm model's skipped centring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "qwen2", "opt"])
def test_processed_copy_gives_the_hf_models_probabilities_and_leaves_it_untouched(family):
    hf, before, model, new = processed(family)
    ids = tokens(2, 7, seed=3)
    want = hf_logits(hf, ids)
    got = new(ids)
    assert (got.log_softmax(-1) - want.log_softmax(-1)).abs().max() <= TOL
    # center_unembed: the logits move by one constant per position
    shift = got - want
    assert (shift - shift.mean(-1, keepdim=True)).abs().max() <= 1e-4 * want.abs().max()
    assert unchanged(hf, before)
    assert new.hf_model is not hf
    ours = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    assert not ours & {p.untyped_storage().data_ptr() for p in new.hf_model.parameters()}
    assert torch.equal(model(ids), model(ids)) and (model(ids) - want).abs().max() <= TOL  # the original still runs as before


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_layernorm_models_are_folded_and_centred(family):
    hf, _, model, new = processed(family)
    assert new.weight_processing == {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
                                     "fold_value_biases": True, "skipped": {}}
    assert new.cfg.normalization_type == "LNPre" and model.cfg.normalization_type == "LN"
    assert new.W_E.mean(-1).abs().max() <= 1e-6 and new.W_O.mean(-1).abs().max() <= 1e-6
    assert new.W_out.mean(-1).abs().max() <= 1e-6 and new.W_U.mean(-1).abs().max() <= 1e-6
    assert new.W_Q.mean(-2).abs().max() <= 1e-6  # reading weights centred over d_model
    assert bool((new.b_V == 0).all()) and not bool((model.b_V == 0).all())
    for block in new.blocks:
        assert bool((block.ln1.w == 1).all()) and bool((block.ln1.b == 0).all())
    if family == "gpt2":  # the copy's unembedding is untied from its embedding (GPT-2 ties them); the user's stays tied
        assert new.W_U.data_ptr() != new.W_E.data_ptr() and model.W_U.data_ptr() == model.W_E.data_ptr()
        assert bool((new.W_pos.mean(-1).abs() <= 1e-6).all())


@pytest.fixture(scope="module")
def tl_processed(tiny_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    names = {"gpt2": "gpt2", "neox": "EleutherAI/pythia-70m", "llama": "meta-llama/Llama-3.2-1B"}
    out = {}
    for family, name in names.items():
        hf, _, _, new = processed(family)
        bridge = TransformerBridge.boot_transformers(name, hf_model=copy.deepcopy(hf), tokenizer=tiny_tokenizer)
        with _quiet():
            bridge.enable_compatibility_mode(disable_warnings=True)
        out[family] = (new, bridge)
    return out


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_processed_weights_equal_transformer_lens_processing(tl_processed, family):
    new, bridge = tl_processed[family]
    names = ["W_Q", "W_O", "W_in", "W_out", "W_E", "W_U", "b_U"]
    names += ["W_gate"] if family == "llama" else ["W_K", "W_V", "b_Q", "b_K", "b_V", "b_O", "b_in", "b_out"]
    for name in names:
        ours, theirs = getattr(new, name).detach(), getattr(bridge, name).detach()
        assert ours.shape == theirs.shape, name
        assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(theirs.abs().max())), name
    if family == "llama":
        assert torch.allclose(new._W_K, bridge.W_K, atol=1e-5) and torch.allclose(new._W_V, bridge.W_V, atol=1e-5)
    ids = tokens(2, 6, seed=8)
    assert (new(ids) - bridge(ids)).abs().max() <= 1e-4


def test_rms_models_fold_the_weight_only_and_say_what_they_skip():
    hf, _, model, new = processed("llama")
    assert any("center_writing_weights skipped: the model uses RMSNorm" in w for w in new.said)
    assert new.weight_processing["center_writing_weights"] is False and "RMSNorm" in new.weight_processing["skipped"]["center_writing_weights"]
    assert new.cfg.normalization_type == "RMSPre"
    assert torch.equal(new.W_E, model.W_E)  # not centred
    layer0 = hf.model.layers[0]
    want = model.W_Q[0] * layer0.input_layernorm.weight[None, :, None]
    assert torch.allclose(new.W_Q[0], want, atol=1e-6)
    assert bool((new.blocks[0].ln1.w == 1).all())


@pytest.mark.parametrize("option", ["fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"])
def test_each_option_alone_keeps_the_probabilities(option):
    hf, before, model, _ = processed("gpt2")
    flags = {o: o == option for o in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")}
    new = model.with_processed_weights(**flags)
    ids = tokens(2, 6, seed=9)
    want = hf_logits(hf, ids)
    got = new(ids)
    assert (got.log_softmax(-1) - want.log_softmax(-1)).abs().max() <= TOL
    if option != "center_unembed":  # the other options leave the logits themselves unchanged
        assert (got - want).abs().max() <= 1e-4
    assert new.weight_processing[option] is True and sum(new.weight_processing[o] for o in flags) == 1
    assert unchanged(hf, before)


def test_gemma_norms_fold_their_one_plus_weight_and_soft_capped_logits_are_not_shifted():
    hf = scaled("gemma2")
    model = fxlens.Model.from_hf(hf)
    with pytest.warns(UserWarning, match="center_unembed skipped: the logits pass through a non-linear op"):
        new = model.with_processed_weights()
    ids = tokens(2, 6, seed=10)
    want = hf_logits(hf, ids)
    assert (new(ids) - want).abs().max() <= 1e-4
    assert bool((new.hf_model.model.layers[0].input_layernorm.weight == 0).all())  # x * (1 + 0)


def test_models_that_cannot_be_processed_say_why():
    bert = fxlens.Model.from_hf(make("bert"))
    with pytest.raises(ProcessingError, match="without a norm in front"):
        bert.with_processed_weights()
    torch.manual_seed(0)
    moe = T.MixtralForCausalLM(T.MixtralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=64, num_local_experts=4,
                                               num_experts_per_tok=2, max_position_embeddings=64)).eval()
    with pytest.raises(ProcessingError, match="block 0's MLP is a mixture of experts"):
        fxlens.Model.from_hf(moe).with_processed_weights()


def test_a_fused_gate_and_up_projection_is_processed_in_place():
    torch.manual_seed(0)
    hf = T.Phi3ForCausalLM(T.Phi3Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    before = snapshot(hf)
    with _quiet():
        new = fxlens.Model.from_hf(hf).with_processed_weights()
    ids = tokens(2, 6, seed=12)
    assert (new(ids).log_softmax(-1) - hf_logits(hf, ids).log_softmax(-1)).abs().max() <= TOL
    w = hf.model.layers[0].post_attention_layernorm.weight
    assert torch.allclose(new.hf_model.model.layers[0].mlp.gate_up_proj.weight, hf.model.layers[0].mlp.gate_up_proj.weight * w, atol=1e-6)
    assert unchanged(hf, before)
