"""TransformerLens' model surface: weight views against the HF parameters they come from, per-token
loss against a hand computation on HF's logits, token helpers, test_prompt against HF's probabilities."""

import pytest
import torch
import torch.nn.functional as F
from conftest import cached_model
from families import tokens

import fxlens

HEADS = {"gpt2": "lm_head", "llama": "lm_head", "gemma2": "lm_head", "neox": "lm_head", "opt": "lm_head"}


@pytest.mark.parametrize("family", sorted(HEADS))
def test_weight_views_are_the_hf_parameters(family):
    hf, model = cached_model(family)
    head = hf.get_submodule(HEADS[family])
    assert model.W_U.shape == (model.cfg.d_model, model.cfg.d_vocab_out)
    assert model.W_U.data_ptr() == head.weight.data_ptr() and torch.equal(model.W_U, head.weight.t())  # a view
    want_b = head.bias if head.bias is not None else torch.zeros(model.cfg.d_vocab_out)
    assert torch.equal(model.b_U, want_b)
    emb = hf.get_input_embeddings().weight
    assert model.W_E.data_ptr() == emb.data_ptr()
    d = model.tokens_to_residual_directions([3, 4])
    assert d.shape == (2, model.cfg.d_model) and torch.equal(d[1], head.weight[4])


def test_weight_views_follow_weight_edits_on_a_copy():
    hf, model = cached_model("llama")
    edited = model.with_weight_edits(lambda w: w.set("lm_head.weight", torch.zeros_like(hf.lm_head.weight)))
    assert bool((edited.W_U == 0).all()) and not bool((model.W_U == 0).all())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_per_token_equals_cross_entropy_on_hf_logits(family):
    hf, model = cached_model(family)
    ids = tokens(2, 7, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(2, 6)
    want = want * mask[:, 1:]
    got = model(ids, mask, return_type="loss", loss_per_token=True)
    assert got.shape == (2, 6) and (got - want).abs().max() <= 1e-5
    both_logits, both_loss = model(ids, mask, return_type="both", loss_per_token=True)
    assert torch.equal(both_loss, got) and (both_logits - logits).abs().max() <= 1e-5


def test_token_helpers_and_test_prompt(tiny_tokenizer, capsys):
    hf, _ = cached_model("gpt2")
    model = fxlens.Model.from_hf(hf, tokenizer=tiny_tokenizer)
    assert model.to_single_str_token(7) == model.to_string(7)
    assert model.get_token_position("t5", "t4 t5 t6 t5") == 2  # after BOS
    assert model.get_token_position("t5", "t4 t5 t6 t5", mode="last") == 4
    with pytest.raises(ValueError, match="not in the input"):
        model.get_token_position("t9", "t4 t5")
    out = model.test_prompt("t4 t5 t6", "t7", prepend_space_to_answer=False)
    printed = capsys.readouterr().out
    assert "Rank:" in printed and "Top 0th token" in printed
    ids = model.to_tokens("t4 t5 t6 t7")
    with torch.no_grad():
        probs = hf(ids).logits[0, -2].softmax(-1)
    token = int(ids[0, -1])
    assert abs(out["answer"][0]["prob"] - float(probs[token])) <= 1e-6
    assert out["answer"][0]["rank"] == int((probs > probs[token]).sum())


def test_to_casts_and_recaptures_said_once():
    """``model.to(dtype)`` acts on the wrapped HF model in place, as TransformerLens' ``to`` does; the
    recaptured program agrees with HF's own float64 forward."""
    import warnings

    import fxlens
    from families import make, tokens

    hf = make("llama", n_kv_heads=2)
    model = fxlens.Model.from_hf(hf)
    ids = tokens(2, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.to(torch.float64) is model
        model.to(torch.float64)
    said = [w for w in caught if "model.to moved" in str(w.message)]
    assert len(said) == 1 and not [w for w in caught if "changed after wrapping" in str(w.message)]
    assert next(hf.parameters()).dtype == torch.float64 and model.cfg.dtype == torch.float64
    got = model(ids)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    assert got.dtype == torch.float64 and (got - want).abs().max().item() < 1e-12
    assert model.cpu() is model
