"""fxlens.Model as a TransformerLens user meets it: caching, hooks, tokens, loss, and errors.

References are plain HF forwards (with ``register_forward_hook`` edits on a deep copy where a hook is
involved) and hand-computed values; nothing from fxlens' internals builds an expected value.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import cached_model
from families import hf_logits, tokens

import fxlens

TOL = 1e-5


def padded_batch():
    ids = tokens(2, 6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return ids, mask


def max_diff(a, b):
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


# ---- run_with_cache: what names_filter selects -------------------------------------------------


def test_names_filter_none_caches_every_site_except_per_head_results_and_inputs():
    _, model = cached_model("llama")
    logits, cache = model.run_with_cache(tokens(2, 5))
    kinds = ("attn.hook_result", "hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in", "hook_mlp_in")
    expensive = {f"blocks.{i}.{k}" for i in range(model.cfg.n_layers) for k in kinds}
    assert expensive <= set(model.sites)
    assert set(cache) == set(model.sites) - expensive
    assert logits.shape == (2, 5, model.cfg.d_vocab)


def test_result_is_cached_when_asked_for_by_name():
    _, model = cached_model("llama")
    _, cache = model.run_with_cache(tokens(2, 5), names_filter="blocks.1.attn.hook_result")
    assert list(cache) == ["blocks.1.attn.hook_result"]
    assert cache["result", 1].shape == (2, 5, model.cfg.n_heads, model.cfg.d_model)


@pytest.mark.parametrize(
    "names_filter, expected",
    [
        ("blocks.0.hook_resid_post", {"blocks.0.hook_resid_post"}),
        (["blocks.1.attn.hook_pattern", "model.layers.0.mlp"], {"blocks.1.attn.hook_pattern", "model.layers.0.mlp"}),
        (lambda name: name.endswith("hook_z"), {"blocks.0.attn.hook_z", "blocks.1.attn.hook_z"}),
        (("pattern", 0), {"blocks.0.attn.hook_pattern"}),
    ],
    ids=["name", "list", "predicate", "tl_tuple"],
)
def test_names_filter_selects_exactly_the_named_sites(names_filter, expected):
    _, model = cached_model("llama")
    _, cache = model.run_with_cache(tokens(2, 5), names_filter=names_filter)
    assert set(cache) == expected


def test_cache_accepts_tl_keys_short_names_and_raw_module_paths():
    hf, model = cached_model("llama")
    ids, mask = padded_batch()
    _, cache = model.run_with_cache(ids, mask)
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["resid_post", 1] is cache["blocks.1.hook_resid_post"]
    assert cache["pattern", 0].shape == (2, model.cfg.n_heads, 6, 6)
    # a raw HF module path holds that module's output: the MLP's output is what the block adds
    assert max_diff(cache["model.layers.0.mlp"], cache["mlp_out", 0]) == 0
    assert "model.layers.0.mlp" in cache and ("pattern", 1) in cache and "no.such.site" not in cache


def test_a_valid_site_that_was_not_cached_says_so():
    _, model = cached_model("llama")
    _, cache = model.run_with_cache(tokens(1, 3), names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(fxlens.SiteError, match="not cached.*names_filter"):
        cache["resid_post", 0]


def _live_modules(program) -> set:
    """HF module paths of the computing nodes in a program's graph."""
    paths = set()
    for node in program.graph.nodes:
        if node.op == "call_function" and node.meta.get("nn_module_stack"):
            paths.add(list(node.meta["nn_module_stack"].values())[-1][0])
    return paths


def _last_program(model):
    # Programs keeps its GraphModules in an LRU dict; the last one is the one just run
    return list(model.programs._cache.values())[-1]


@pytest.mark.parametrize("how", ["return_logits", "stop_at_layer"])
def test_nothing_after_the_last_needed_site_is_in_the_program(how):
    hf, _ = cached_model("llama")
    model = fxlens.Model.from_hf(hf)  # a fresh program cache
    ids = tokens(2, 5)
    if how == "return_logits":
        logits, cache = model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post", return_logits=False)
        assert logits is None and list(cache) == ["blocks.0.hook_resid_post"]
    else:
        resid, cache = model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post", stop_at_layer=1)
        assert resid.shape == (2, 5, model.cfg.d_model)
    program = _last_program(model)
    live = _live_modules(program)
    assert any(p.startswith("model.layers.0.") for p in live)
    late = sorted(p for p in live if p.startswith(("model.layers.1", "model.norm", "lm_head")))
    assert not late, f"the program still computes {late}"
    dead = [n.name for n in program.graph.nodes if n.op == "call_function" and not n.users]
    assert not dead, f"dead nodes left in the program: {dead}"


@pytest.mark.parametrize("layer", [0, 1])
def test_stop_at_layer_returns_resid_pre_of_that_layer(layer):
    _, model = cached_model("gpt2")
    ids, mask = padded_batch()
    _, full = model.run_with_cache(ids, mask)
    resid, cache = model.run_with_cache(ids, mask, stop_at_layer=layer)
    assert max_diff(resid, full["resid_pre", layer]) == 0
    assert f"blocks.{layer}.hook_resid_pre" in cache
    assert f"blocks.{layer}.hook_resid_post" not in cache


def test_stop_at_n_layers_returns_the_final_residual_not_logits():
    # TransformerLens: stop_at_layer=n_layers runs every block and returns the residual stream
    _, model = cached_model("gpt2")
    ids = tokens(2, 5)
    _, full = model.run_with_cache(ids)
    resid, _ = model.run_with_cache(ids, stop_at_layer=model.cfg.n_layers)
    assert resid.shape == (2, 5, model.cfg.d_model)
    assert max_diff(resid, full["resid_post", model.cfg.n_layers - 1]) == 0


def test_remove_batch_dim_drops_the_batch_axis():
    _, model = cached_model("llama")
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.0.ln1.hook_scale"]
    _, cache = model.run_with_cache(tokens(1, 5), names_filter=names, remove_batch_dim=True)
    assert cache["resid_pre", 0].shape == (5, model.cfg.d_model)
    assert cache["pattern", 1].shape == (model.cfg.n_heads, 5, 5)
    assert cache["z", 0].shape == (5, model.cfg.n_heads, model.cfg.d_head)
    assert cache["blocks.0.ln1.hook_scale"].shape == (5, 1)
    with pytest.raises(ValueError, match="batch size is 2, not 1"):
        model.run_with_cache(tokens(2, 5), names_filter=names, remove_batch_dim=True)


def test_remove_batch_dim_works_with_the_default_names_filter():
    # every site is cached, raw ones without a batch axis included (model.rotary_emb is [1, pos, d])
    _, model = cached_model("llama")
    _, cache = model.run_with_cache(tokens(1, 5), remove_batch_dim=True)
    assert cache["resid_pre", 0].shape == (5, model.cfg.d_model)


def test_accumulated_resid_and_stack_activation_shapes():
    _, model = cached_model("llama")
    n, d, h = model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads
    _, cache = model.run_with_cache(tokens(2, 5))
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert acc.shape == (n + 1, 2, 5, d)
    assert labels == [f"{i}_pre" for i in range(n)] + ["final_post"]
    assert max_diff(acc[-1], cache["resid_post", n - 1]) == 0 and max_diff(acc[1], cache["resid_pre", 1]) == 0
    assert cache.accumulated_resid(incl_mid=True).shape == (2 * n + 1, 2, 5, d)
    assert cache.accumulated_resid(layer=1).shape == (2, 2, 5, d)  # resid_pre 0 and 1, as TransformerLens
    assert cache.stack_activation("pattern").shape == (n, 2, h, 5, 5)
    assert cache.stack_activation("resid_pre", layer=1).shape == (1, 2, 5, d)


def test_decompose_resid_sums_to_the_final_residual_for_gpt2():
    _, model = cached_model("gpt2")
    n = model.cfg.n_layers
    ids, mask = padded_batch()
    _, cache = model.run_with_cache(ids, mask)
    parts, labels = cache.decompose_resid(return_labels=True)
    assert parts.shape == (2 + 2 * n, 2, 6, model.cfg.d_model)
    assert labels[:2] == ["embed", "pos_embed"] and labels[2:4] == ["0_attn_out", "0_mlp_out"]
    assert max_diff(parts.sum(0), cache["resid_post", n - 1]) <= TOL
    assert max_diff(cache["embed"] + cache["pos_embed"], cache["resid_pre", 0]) <= TOL


# ---- run_with_hooks vs the same edit as an HF hook ---------------------------------------------

# family -> (layers, output projection of attention, module whose output is hook_mlp_out)
HF_PATHS = {
    "llama": ("model.layers", "self_attn.o_proj", "mlp"),
    "gpt2": ("transformer.h", "attn.c_proj", "mlp"),
    "neox": ("gpt_neox.layers", "attention.dense", "mlp"),
    "bert": ("bert.encoder.layer", "attention.output.dense", "output.dense"),
}


@functools.cache
def hf_copy(family):
    hf, _ = cached_model(family)
    return copy.deepcopy(hf)


def hf_edited_logits(family, edit, ids, mask):
    """Logits of a deep copy of the HF model with one forward (pre-)hook doing ``edit``."""
    hf = hf_copy(family)
    layers, o_proj, mlp = HF_PATHS[family]
    modules = dict(hf.named_modules())
    dh = hf.config.hidden_size // hf.config.num_attention_heads
    if edit == "zero_head":

        def pre(mod, args):
            x = args[0].clone()
            x[..., dh : 2 * dh] = 0  # head 1 of the o_proj input
            return (x,) + args[1:]

        handle = modules[f"{layers}.0.{o_proj}"].register_forward_pre_hook(pre)
    elif edit == "scale_mlp":
        handle = modules[f"{layers}.1.{mlp}"].register_forward_hook(lambda mod, args, out: out * 3)
    elif edit == "ablate_resid":

        def pre(mod, args, kwargs):
            if args:
                return (torch.zeros_like(args[0]),) + args[1:], kwargs
            return args, dict(kwargs, hidden_states=torch.zeros_like(kwargs["hidden_states"]))

        handle = modules[f"{layers}.1"].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        return hf_logits(hf, ids, mask)
    finally:
        handle.remove()


def _zero_head_in_place(z, hook):
    z[:, :, 1] = 0  # returns None: the in-place edit is kept


FX_EDITS = {
    "zero_head": ("blocks.0.attn.hook_z", _zero_head_in_place),
    "scale_mlp": ("blocks.1.hook_mlp_out", lambda x, hook: x * 3),
    "ablate_resid": ("blocks.1.hook_resid_pre", lambda x, hook: torch.zeros_like(x)),
}


@pytest.mark.parametrize("edit", sorted(FX_EDITS))
@pytest.mark.parametrize("family", sorted(HF_PATHS))
def test_run_with_hooks_equals_the_same_edit_as_an_hf_hook(family, edit):
    hf, model = cached_model(family)
    ids, mask = padded_batch()
    want = hf_edited_logits(family, edit, ids, mask)
    got = model.run_with_hooks(ids, mask, fwd_hooks=[FX_EDITS[edit]])
    assert max_diff(want, hf_logits(hf, ids, mask)) > 1e-3  # the edit matters
    assert max_diff(got, want) <= TOL


def test_nothing_persists_after_run_with_hooks():
    hf, model = cached_model("llama")
    ids, mask = padded_batch()

    def hf_hooks():
        # transformers installs its own output-capturing hooks once output_hidden_states is used
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in hf.modules()]

    before = hf_hooks()
    model.run_with_hooks(ids, mask, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x * 0)])
    assert hf_hooks() == before
    assert max_diff(model(ids, mask), hf_logits(hf, ids, mask)) <= TOL
    _, cache = model.run_with_cache(ids, mask, names_filter="blocks.0.hook_resid_pre")
    assert cache["resid_pre", 0].abs().max().item() > 0


def test_hook_receives_the_value_and_a_hook_point_with_name_and_layer():
    _, model = cached_model("llama")
    ids = tokens(2, 5)
    seen = []
    _, cache = model.run_with_cache(ids, names_filter=["blocks.1.attn.hook_pattern", "hook_embed"])

    def record(x, hook):
        seen.append((hook.name, hook.layer(), x.clone(), type(hook)))

    model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_pattern", record), ("hook_embed", record)])
    by_name = {name: (layer, x, kind) for name, layer, x, kind in seen}
    assert set(by_name) == {"blocks.1.attn.hook_pattern", "hook_embed"}
    assert by_name["blocks.1.attn.hook_pattern"][0] == 1 and by_name["hook_embed"][0] is None
    assert all(kind is fxlens.HookPoint for _, _, kind in by_name.values())
    for name, (_, x, _) in by_name.items():
        assert max_diff(x, cache[name]) == 0


def test_a_predicate_in_fwd_hooks_hooks_every_matching_site_in_order():
    _, model = cached_model("gpt2")
    seen = []
    model.run_with_hooks(tokens(1, 4), fwd_hooks=[(lambda name: name.endswith("hook_resid_pre"), lambda x, hook: seen.append(hook.name))])
    assert seen == [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]


def test_two_hooks_on_one_site_chain_in_order():
    _, model = cached_model("llama")
    ids = tokens(2, 5)
    calls = []

    def double(x, hook):
        calls.append(("double", x.clone()))
        return x * 2

    def plus_one(x, hook):
        calls.append(("plus_one", x.clone()))
        return x + 1

    site = "blocks.1.hook_resid_pre"
    got = model.run_with_hooks(ids, fwd_hooks=[(site, double), (site, plus_one)])
    want = model.run_with_hooks(ids, fwd_hooks=[(site, lambda x, hook: x * 2 + 1)])
    assert [c[0] for c in calls] == ["double", "plus_one"]
    assert max_diff(calls[1][1], calls[0][1] * 2) == 0
    assert max_diff(got, want) <= TOL


# ---- tokens, text input, loss -------------------------------------------------------------------


# tiny_tokenizer splits "t10".."t29" around its special tokens "t1" and "t2": use other words
@pytest.fixture(scope="module")
def text_model(tiny_tokenizer):
    hf, _ = cached_model("llama")
    return hf, fxlens.Model.from_hf(hf, tiny_tokenizer)


def test_to_tokens_prepends_bos_and_right_pads(text_model):
    _, model = text_model
    assert model.to_tokens("t5 t6").tolist() == [[1, 5, 6]]
    assert model.to_tokens("t5 t6", prepend_bos=False).tolist() == [[5, 6]]
    ids = model.to_tokens(["t5 t6 t7", "t48"])
    assert ids.tolist() == [[1, 5, 6, 7], [1, 48, 2, 2]]
    # text input carries a mask that marks the padding: its loss is that of the ids with this mask
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss = model(["t5 t6 t7", "t48"], return_type="loss")
    assert abs(loss.item() - model(ids, mask, return_type="loss").item()) <= TOL
    assert abs(loss.item() - model(ids, return_type="loss").item()) > 1e-4


def test_string_helpers_round_trip(text_model):
    _, model = text_model
    ids = model.to_tokens("t5 t6")
    assert model.to_string(ids[0]) == "t1 t5 t6"
    assert model.to_str_tokens("t5 t6") == ["t1", "t5", "t6"]
    assert model.to_str_tokens(ids) == ["t1", "t5", "t6"]
    assert model.to_single_token("t7") == 7


def test_text_batch_equals_each_text_alone_at_its_valid_positions(text_model):
    hf, model = text_model
    texts = ["t5 t6 t7 t8 t9", "t40 t41"]
    batch = model(texts)
    assert batch.shape == (2, 6, model.cfg.d_vocab)
    for row, text in enumerate(texts):
        alone = model(text)
        n = alone.shape[1]
        assert max_diff(batch[row, :n], alone[0]) <= TOL
        assert max_diff(alone, hf_logits(hf, model.to_tokens(text))) <= TOL


def test_loss_is_next_token_cross_entropy(text_model):
    _, model = text_model
    ids = model.to_tokens("t5 t6 t7 t8 t9")
    logits = model(ids)
    want = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert abs(model(ids, return_type="loss").item() - want.item()) <= TOL
    both_logits, both_loss = model(ids, return_type="both")
    assert max_diff(both_logits, logits) == 0 and abs(both_loss.item() - want.item()) <= TOL


def test_loss_of_a_padded_batch_ignores_padding_targets(text_model):
    _, model = text_model
    texts = ["t5 t6 t7 t8 t9", "t40 t41"]
    logits = model(texts)
    ids = model.to_tokens(texts)
    nll = [F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none"), F.cross_entropy(logits[1, :2], ids[1, 1:3], reduction="none")]
    want = torch.cat(nll).mean()
    assert abs(model(texts, return_type="loss").item() - want.item()) <= TOL


# ---- errors that speak the user's language ------------------------------------------------------


def test_unknown_site_lists_close_valid_names():
    _, model = cached_model("llama")
    for call in (
        lambda: model.run_with_cache(tokens(1, 3), names_filter="blocks.0.attn.hook_patern"),
        lambda: model.run_with_hooks(tokens(1, 3), fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, hook: x)]),
        lambda: model.run_with_cache(tokens(1, 3))[1]["blocks.0.attn.hook_patern"],
    ):
        with pytest.raises(fxlens.SiteError) as err:
            call()
        assert "blocks.0.attn.hook_pattern" in str(err.value) and "hook_patern" in str(err.value)


def test_layer_out_of_range_gives_the_valid_range():
    _, model = cached_model("llama")
    with pytest.raises(fxlens.SiteError, match=r"0\.\.1"):
        model.run_with_cache(tokens(1, 3), names_filter="blocks.9.hook_resid_pre")
    _, cache = model.run_with_cache(tokens(1, 3), names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(fxlens.SiteError, match=r"layer 9.*0\.\.1"):
        cache["resid_pre", 9]


@pytest.mark.parametrize(
    "bad, expected",
    [
        (lambda x, hook: x[:, :2], r"blocks\.0\.hook_resid_pre.*\(2, 5, 64\)"),
        (lambda x, hook: x.double(), r"blocks\.0\.hook_resid_pre.*torch\.float32"),
        (lambda x, hook: 3.0, r"blocks\.0\.hook_resid_pre.*float"),
    ],
    ids=["shape", "dtype", "not_a_tensor"],
)
def test_hook_returning_a_wrong_value_names_the_site_and_what_it_expects(bad, expected):
    _, model = cached_model("llama")
    with pytest.raises(fxlens.HookError, match=expected):
        model.run_with_hooks(tokens(2, 5), fwd_hooks=[("blocks.0.hook_resid_pre", bad)])


def test_token_id_outside_the_vocabulary_gives_the_valid_range():
    _, model = cached_model("llama")
    with pytest.raises(ValueError, match=r"100.*0\.\.99"):
        model(torch.tensor([[1, 100]]))
    with pytest.raises(ValueError, match=r"0\.\.99"):
        model.run_with_cache(torch.tensor([[-1, 5]]))


def test_sequence_longer_than_the_context_is_refused():
    _, model = cached_model("llama")
    with pytest.raises(ValueError, match=r"65.*64 positions"):
        model(torch.ones(1, 65, dtype=torch.long))


@pytest.mark.parametrize("layer", [3, -1])
def test_stop_at_layer_out_of_range_gives_the_valid_range(layer):
    _, model = cached_model("llama")
    with pytest.raises(ValueError, match=rf"stop_at_layer={layer}.*0\.\.2"):
        model.run_with_cache(tokens(1, 3), stop_at_layer=layer)


def test_backward_hooks_need_pairs():
    _, model = cached_model("llama")
    with pytest.raises(TypeError, match="bwd_hooks must be a list of"):
        model.run_with_hooks(tokens(1, 3), bwd_hooks=[lambda g, hook: g])


def test_a_hook_predicate_that_matches_nothing_is_an_error():
    _, model = cached_model("llama")
    with pytest.raises(fxlens.SiteError, match="matched no site"):
        model.run_with_hooks(tokens(1, 3), fwd_hooks=[(lambda name: name.endswith("hook_nothing"), lambda x, hook: x)])


def test_multi_token_string_is_not_a_single_token(text_model):
    _, model = text_model
    with pytest.raises(ValueError, match=r"2 tokens.*'t5', 't6'"):
        model.to_single_token("t5 t6")
