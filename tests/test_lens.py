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
