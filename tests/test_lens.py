"""fxlens.lens.logit_lens against HF: the last layer is the model's logits; every other layer is HF's
hidden state (``output_hidden_states``) through the model's final norm and ``lm_head``."""

import copy

import pytest
import torch
from conftest import cached_model
from families import tokens

from fxlens import lens

TOL = 1e-5


def _norm_and_head(hf, family):
    norm = hf.transformer.ln_f if family == "gpt2" else hf.model.norm
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 soft-caps its logits after the unembedding
        return lambda h: torch.tanh(hf.lm_head(norm(h)) / cap) * cap
    return lambda h: hf.lm_head(norm(h))


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma", "gemma2"])
def test_logit_lens_equals_hf_hidden_states_through_norm_and_unembed(family):
    hf, model = cached_model(family)
    ids = tokens(2, 6, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    got = lens.logit_lens(model, ids, attention_mask=mask)
    assert got.shape == (3, 2, 6, 100)
    hf = copy.deepcopy(hf)  # HF records hidden states with hooks: keep them off the shared model
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        to_logits = _norm_and_head(hf, family)
        for layer in range(2):  # HF's hidden_states[i] is the stream entering block i
            assert (got[layer] - to_logits(out.hidden_states[layer])).abs().max() <= 1e-4
    assert (got[-1] - out.logits).abs().max() <= TOL


def test_logit_lens_top_k_and_pos():
    hf, model = cached_model("llama")
    ids = tokens(2, 6, seed=6)
    full = lens.logit_lens(model, ids)
    values, indices = lens.logit_lens(model, ids, top_k=3, pos=-1)
    assert values.shape == indices.shape == (3, 2, 3)
    top = full[:, :, -1].topk(3, dim=-1)
    assert torch.equal(indices, top.indices) and (values - top.values).abs().max() <= TOL
    some = lens.logit_lens(model, ids, pos=[1, 4])
    assert (some - full[:, :, [1, 4]]).abs().max() <= TOL


def test_tuned_lens_translators_apply_before_the_models_head():
    """Affine translators (the tuned lens' form) against HF hidden states mapped by hand."""
    hf, model = cached_model("llama")
    ids = tokens(2, 6, seed=7)
    d = model.cfg.d_model
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(d, d, generator=g) * 0.05, torch.randn(d, generator=g) * 0.1
    module = torch.nn.Linear(d, d)
    got = lens.logit_lens(model, ids, translators={0: (A, b), 1: module})
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
        to_logits = _norm_and_head(hf, "llama")
        h0, h1 = out.hidden_states[0], out.hidden_states[1]
        assert (got[0] - to_logits(h0 + h0 @ A + b)).abs().max() <= 1e-4
        assert (got[1] - to_logits(module(h1))).abs().max() <= 1e-4
        assert (got[2] - out.logits).abs().max() <= TOL  # no translator: the plain lens
    with pytest.raises(ValueError, match="rows"):
        lens.logit_lens(model, ids, translators=[None])
    with pytest.raises(ValueError, match="same shape"):
        lens.logit_lens(model, ids, translators={0: lambda x: x[..., :3]})
