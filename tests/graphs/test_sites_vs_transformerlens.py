"""Every canonical site equals TransformerLens (4.x TransformerBridge) on the same weights.

The bridge computes its hooks with forward hooks on the HF modules, so it is an independent eager
reference that also pins down TransformerLens' meaning (layouts, scale, pre-affine normalised value).
BERT is checked against HF directly in test_sites_vs_hf.py: the bridge's BERT hooks follow neither
HF nor legacy TransformerLens (its ``attn_scores`` equals its ``pattern``).
"""

import copy

import pytest
import torch
from conftest import cached_model
from families import tokens

BRIDGE_NAMES = {
    "gpt2": "gpt2",
    "llama": "meta-llama/Llama-3.2-1B",
    "mistral": "mistralai/Mistral-7B-v0.1",
    "qwen2": "Qwen/Qwen2-0.5B",
    "neox": "EleutherAI/pythia-70m",
    "gemma": "google/gemma-2b",
    "gemma2": "google/gemma-2-2b",
    "gptj": "EleutherAI/gpt-j-6b",
    "phi": "microsoft/phi-2",
    "opt": "facebook/opt-125m",
}
# Bridge hooks that are not TransformerLens' meaning: the GPT-J and OPT bridges return the pattern as attn_scores.
BRIDGE_DIFFERS = {"gptj": ("hook_attn_scores",), "opt": ("hook_attn_scores",)}


@pytest.fixture(scope="module")
def bridge_cache(tiny_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    def run(family, ids):
        hf, _ = cached_model(family)
        # the bridge switches the model it is given to eager attention: give it a copy
        bridge = TransformerBridge.boot_transformers(BRIDGE_NAMES[family], hf_model=copy.deepcopy(hf), tokenizer=tiny_tokenizer)
        _, cache = bridge.run_with_cache(ids)
        return cache

    return run


@pytest.mark.parametrize("family", sorted(BRIDGE_NAMES))
def test_canonical_sites_equal_transformerlens(family, bridge_cache):
    _, model = cached_model(family)
    ids = tokens(2, 7)
    ref = bridge_cache(family, ids)
    names = [n for n in model.sites if n.startswith(("blocks.", "hook_", "ln_final.")) and n in ref]
    names += [n for n in (f"blocks.{i}.attn.hook_result" for i in range(model.cfg.n_layers))]
    _, cache = model.run_with_cache(ids, names_filter=names)
    checked = 0
    for name in names:
        if name not in ref:
            continue  # hook_result: checked against the per-head product below
        got, want = cache[name], ref[name]
        if want.dim() == got.dim() - 1 and want.shape[0] == got.shape[0] * got.shape[1]:
            want = want.reshape(got.shape)  # the OPT bridge keeps HF's flattened [batch*pos] MLP-side axis
        assert got.shape == want.shape, name
        if name.endswith(BRIDGE_DIFFERS.get(family, ())):
            # softmax of our scores must still give the bridge's pattern
            got, want = got.softmax(-1), ref[name.replace("attn_scores", "pattern")]
        elif name.endswith("hook_attn_scores"):
            # masked entries are -inf, finfo.min or unmasked depending on the implementation
            keep = torch.ones_like(want, dtype=torch.bool).tril()
            got, want = got[keep], want[keep]
        assert (got - want).abs().max().item() <= 1e-5, name
        checked += 1
    # every canonical site TransformerLens has for this family was compared
    assert checked >= 14 * model.cfg.n_layers // 2
    for i in range(model.cfg.n_layers):
        result = cache["result", i]
        attn_out = cache["attn_out", i]
        if f"blocks.{i}.ln1_post.hook_normalized" in model.sites:
            continue  # Gemma 2: attn_out is taken after a post-norm of the head sum
        bias = attn_out - result.sum(2)
        # the remainder is the output bias: the same vector at every batch row and position
        assert (bias - bias[:1, :1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_tabled_families_have_the_transformerlens_site_set(family, bridge_cache):
    _, model = cached_model(family)
    ref = bridge_cache(family, tokens(1, 4))
    theirs = {n for n in ref.keys() if n.startswith("blocks.0.") and ".hook_in" not in n and ".hook_out" not in n}
    theirs -= {"blocks.0.attn.hook_cos", "blocks.0.attn.hook_sin", "blocks.0.attn.hook_hidden_states", "blocks.0.hook_mlp_in"}
    ours = {n for n in model.sites if n.startswith("blocks.0.")}
    assert theirs <= ours, theirs - ours
