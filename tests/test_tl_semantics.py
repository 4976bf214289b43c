"""Same words, same numbers: arguments whose meaning TransformerLens defines, against TransformerLens.

The reference is TransformerLens' TransformerBridge on the same weights and tokenizer (its cache
helpers are TransformerLens' own ActivationCache code): ``prepend_bos=None`` is the model's default
(``cfg.default_prepend_bos``), ``to_str_tokens`` of a list of strings, negative layers in cache keys,
and the ``layer=`` argument of ``accumulated_resid``, ``decompose_resid`` and ``stack_activation``.
"""

import copy
import re

import pytest
import torch
from conftest import cached_model
from families import tokens

TOL = 1e-5
TEXTS = ["t5 t6 t7", "t8 t9"]


@pytest.fixture(scope="module")
def pair(tiny_tokenizer):
    """(fxlens Model, TransformerLens bridge) of one GPT-2 with the same weights and tokenizer."""
    import fxlens
    from transformer_lens.model_bridge import TransformerBridge

    hf, _ = cached_model("gpt2")
    model = fxlens.Model.from_hf(hf, tokenizer=tiny_tokenizer)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf), tokenizer=tiny_tokenizer)
    return model, bridge


@pytest.fixture(scope="module")
def caches(pair):
    model, bridge = pair
    ids = tokens(2, 6, seed=4)
    _, mine = model.run_with_cache(ids)
    _, theirs = bridge.run_with_cache(ids)
    return mine, theirs


@pytest.mark.parametrize("prepend_bos", [None, True, False])
def test_to_tokens_prepend_bos_means_what_transformer_lens_means(pair, prepend_bos):
    model, bridge = pair
    assert model.cfg.default_prepend_bos is True
    for text in TEXTS:
        assert torch.equal(model.to_tokens(text, prepend_bos=prepend_bos), bridge.to_tokens(text, prepend_bos=prepend_bos))
        assert model.to_str_tokens(text, prepend_bos=prepend_bos) == bridge.to_str_tokens(text, prepend_bos=prepend_bos)


def test_prepend_bos_none_runs_with_bos_unless_the_model_default_says_otherwise(pair):
    model, bridge = pair
    text = TEXTS[0]
    assert torch.equal(model(text), model(text, prepend_bos=True))
    assert (model(text) - bridge(text)).abs().max() <= TOL  # the bridge's default also prepends BOS
    _, cache = model.run_with_cache(text)
    assert cache["resid_pre", 0].shape[1] == len(text.split()) + 1
    model.cfg.default_prepend_bos = False
    try:
        assert torch.equal(model.to_tokens(text), model.to_tokens(text, prepend_bos=False))
        assert torch.equal(model(text), model(text, prepend_bos=False))
    finally:
        model.cfg.default_prepend_bos = True


def test_to_str_tokens_of_a_list_of_strings_is_one_list_per_string(pair):
    model, bridge = pair
    got = model.to_str_tokens(TEXTS)
    assert got == [bridge.to_str_tokens(t) for t in TEXTS]
    assert got == [model.to_str_tokens(t) for t in TEXTS]


@pytest.mark.parametrize("kind", ["resid_post", "resid_pre", "attn_out", "pattern"])
@pytest.mark.parametrize("layer", [-1, -2])
def test_negative_layer_in_a_cache_key_counts_from_the_end(caches, kind, layer):
    mine, theirs = caches
    want = theirs[f"blocks.{2 + layer}." + {"pattern": "attn.hook_pattern"}.get(kind, f"hook_{kind}")]
    assert (mine[kind, layer] - want).abs().max() <= TOL
    with pytest.raises(Exception, match="out of range"):
        mine[kind, -3]


@pytest.mark.parametrize("layer", [0, 1, 2, -1, None])
@pytest.mark.parametrize("incl_mid", [False, True])
def test_accumulated_resid_layer_equals_transformer_lens(caches, layer, incl_mid):
    mine, theirs = caches
    got, labels = mine.accumulated_resid(layer=layer, incl_mid=incl_mid, return_labels=True)
    want, want_labels = theirs.accumulated_resid(layer=layer, incl_mid=incl_mid, return_labels=True)
    assert labels == want_labels
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("layer", [1, 2, -1, None])
@pytest.mark.parametrize("mode", ["all", "attn", "mlp"])
def test_decompose_resid_layer_equals_transformer_lens(caches, layer, mode):
    mine, theirs = caches
    got, labels = mine.decompose_resid(layer=layer, mode=mode, return_labels=True)
    want, want_labels = theirs.decompose_resid(layer=layer, mode=mode, return_labels=True)
    assert labels == want_labels
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("layer", [1, 2, -1, None])
def test_stack_activation_layer_equals_transformer_lens(caches, layer):
    mine, theirs = caches
    got = mine.stack_activation("resid_post", layer=layer)
    want = theirs.stack_activation("resid_post", layer=layer if layer is not None else -1)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL


def test_layer_arguments_out_of_range_say_the_range(caches):
    mine, _ = caches
    with pytest.raises(ValueError, match="out of range; use 0..2"):
        mine.accumulated_resid(layer=3)
    with pytest.raises(ValueError, match="selects no layer"):
        mine.stack_activation("resid_post", layer=0)


def test_a_predicate_sees_raw_module_paths_unless_canonical_only(pair, caches):
    model, bridge = pair
    _, theirs = caches
    ids = tokens(1, 5, seed=5)
    _, every = model.run_with_cache(ids, names_filter=lambda name: True)
    assert any(not name.startswith(("blocks.", "hook_", "ln_final.")) for name in every)  # raw HF paths
    _, canonical = model.run_with_cache(ids, names_filter=lambda name: True, canonical_only=True)
    assert all(model.site_table[name].canonical for name in canonical)
    assert set(canonical) < set(every)
    # every TransformerLens hook the bridge caches for this model is among the canonical ones
    legacy = re.compile(r"^(blocks\.\d+\.((attn|mlp|ln\d|ln\d_post)\.)?|ln_final\.)?hook_\w+$")
    tl_names = {n for n in theirs.keys() if legacy.match(n) and not n.endswith(("hook_in", "hook_out"))}
    assert len(tl_names) >= 20
    # hook_result is expensive (asked for by name); hook_hidden_states and hook_unembed are the bridge's own
    bridge_only = {"hook_unembed"} | {f"blocks.{i}.attn.{h}" for i in range(2) for h in ("hook_result", "hook_hidden_states")}
    assert tl_names - set(canonical) <= bridge_only
    seen = []
    model.run_with_hooks(ids, fwd_hooks=[(lambda name: True, lambda v, hook: seen.append(hook.name))], canonical_only=True)
    assert set(seen) == {s.name for s in model.site_table.values() if s.canonical}


@pytest.fixture(scope="module")
def scaled_pair(tiny_tokenizer):
    """GPT-2 with weights large enough that one head's path moves the metric well above rounding
    (``hf_hooks.pair``), as an fxlens Model and a TransformerLens bridge."""
    import hf_hooks as H
    from transformer_lens.model_bridge import TransformerBridge

    hf, model = H.pair("gpt2")
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf), tokenizer=tiny_tokenizer)
    return model, bridge


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_direct_path_patching_equals_transformer_lens(scaled_pair, component):
    """get_act_patch_direct_path against TransformerLens 4.3's (one hooked forward per receiver there)."""
    from transformer_lens import patching as tl_patching

    from fxlens import patching

    model, bridge = scaled_pair
    clean, corrupted = tokens(2, 6, seed=5), tokens(2, 6, seed=6)
    metric = lambda logits: (logits[:, -1, 5] - logits[:, -1, 9]).mean()  # noqa: E731
    _, clean_mine = model.run_with_cache(clean)
    _, corrupted_mine = model.run_with_cache(corrupted)
    with torch.no_grad():
        _, clean_tl = bridge.run_with_cache(clean)
        _, corrupted_tl = bridge.run_with_cache(corrupted)
        want = tl_patching.get_act_patch_direct_path(bridge, corrupted, clean_tl, corrupted_tl, metric, 0, 1,
                                                     component=component, verbose=False)
        unpatched = metric(model(corrupted)).item()
    got = patching.get_act_patch_direct_path(model, corrupted, clean_mine, corrupted_mine, metric, 0, 1, component=component)
    assert got.shape == want.shape
    tol = 1e-5 * (want.abs().max().item() + 1)
    assert (got - want.cpu()).abs().max() <= tol
    assert (got[1] - unpatched).abs().max() > 20 * tol  # the paths matter: the comparison can tell a wrong patch
    assert got[0].abs().sum() == 0
