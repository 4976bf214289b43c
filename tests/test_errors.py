"""No silent wrong results: calls that used to mean something unintended now act as documented or say why not.

References: the HF model itself (its logits, its ``last_hidden_state``, forward hooks on its modules),
models saved with ``save_pretrained`` and loaded back offline, and for metrics the logits indexed by hand.
Each refusal is checked by its message: what was asked, what exists, and the fix.
"""

import pytest
import torch
import transformers as T
from conftest import cached_model
from families import hf_logits, make, tokens

import fxlens
from fxlens import metrics, patching

TOL = 1e-5
LLAMA = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)


# ---- construction ---------------------------------------------------------------------------------


def test_from_hf_with_a_name_points_to_from_pretrained():
    with pytest.raises(TypeError, match=r"not a name or folder: to load 'gpt2' use fxlens\.Model\.from_pretrained\('gpt2'\)"):
        fxlens.Model.from_hf("gpt2")
    hf, _ = cached_model("gpt2")
    with pytest.raises(TypeError, match=r"tokenizer='gpt2' is a name.*AutoTokenizer\.from_pretrained\('gpt2'\)"):
        fxlens.Model.from_hf(hf, "gpt2")


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """A GPT-2 folder with weights and config but no tokenizer files."""
    hf, _ = cached_model("gpt2")
    path = tmp_path_factory.mktemp("gpt2_no_tokenizer")
    hf.save_pretrained(path)
    return hf, path


def test_from_pretrained_without_a_tokenizer_says_how_to_go_on(saved_gpt2):
    _, path = saved_gpt2
    with pytest.raises(ValueError, match=r"no tokenizer from .*Pass tokenizer=False to go on without one"):
        fxlens.Model.from_pretrained(str(path))


def test_from_pretrained_with_tokenizer_false_loads_the_model_alone(saved_gpt2):
    hf, path = saved_gpt2
    model = fxlens.Model.from_pretrained(str(path), tokenizer=False)
    assert model.tokenizer is None
    ids = tokens(2, 5)
    assert (model(ids) - hf_logits(hf, ids)).abs().max().item() <= TOL


# ---- a base model has no logits -------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_llama():
    torch.manual_seed(0)
    hf = T.LlamaModel(T.LlamaConfig(**LLAMA)).eval()
    return hf, fxlens.Model.from_hf(hf)


def test_a_base_model_refuses_logits_and_names_its_output(base_llama):
    _, model = base_llama
    for return_type in ("logits", "loss", "both"):
        with pytest.raises(ValueError, match=r"LlamaModel has no logits.*its output is last_hidden_state.*"
                                             r"names_filter='norm', return_type=None"):
            model(tokens(2, 5), return_type=return_type)
    with pytest.raises(ValueError, match="has no logits"):
        model.run_with_cache(tokens(2, 5))


def test_a_base_model_output_is_read_as_the_message_says(base_llama):
    hf, model = base_llama
    ids = tokens(2, 5)
    logits, cache = model.run_with_cache(ids, names_filter="norm", return_type=None)
    with torch.no_grad():
        want = hf(input_ids=ids).last_hidden_state
    assert logits is None and (cache["norm"] - want).abs().max().item() <= TOL


def test_a_sweep_on_a_base_model_is_refused(base_llama):
    _, model = base_llama
    _, clean_cache = model.run_with_cache(tokens(2, 5, seed=2), return_type=None)
    with pytest.raises(ValueError, match="no logits"):
        patching.get_act_patch_resid_pre(model, tokens(2, 5), clean_cache, lambda logits: logits[:, -1, 0].mean())


def test_a_base_model_wraps_with_its_family_table():
    torch.manual_seed(0)
    model = fxlens.Model.from_hf(T.LlamaModel(T.LlamaConfig(**LLAMA)).eval())
    assert "blocks.0.hook_resid_pre" in model.sites


def test_next_token_loss_on_a_classification_head_is_refused():
    torch.manual_seed(0)
    hf = T.BertForTokenClassification(T.BertConfig(**LLAMA, num_labels=5)).eval()
    model = fxlens.Model.from_hf(hf)
    with pytest.raises(ValueError, match=r"needs logits over the 100 tokens.*holds 5, not 100 \(a classification head\)"):
        model(tokens(2, 5), return_type="loss")


# ---- metrics --------------------------------------------------------------------------------------


def test_a_negative_token_id_in_a_metric_is_refused():
    with pytest.raises(ValueError, match=r"answer=-1 is a negative token id"):
        metrics.logit_diff(-1, 8)
    with pytest.raises(ValueError, match=r"wrong=-2 is a negative token id"):
        metrics.logit_diff(3, torch.tensor([4, -2]))
    with pytest.raises(ValueError, match=r"token=-1 is a negative token id"):
        metrics.logit(-1)
    with pytest.raises(TypeError, match="must be integer token ids"):
        metrics.logit(2.5)


def test_a_metric_token_beyond_the_logits_is_refused_with_the_size():
    logits = torch.randn(2, 4, 100)
    with pytest.raises(ValueError, match=r"token id 100, but the logits have 100 entries \(ids 0\.\.99\)"):
        metrics.logit_diff(100, 8)(logits)
    want = (logits[:, -1, 99] - logits[:, -1, 8]).mean()
    assert (metrics.logit_diff(99, 8)(logits) - want).abs().item() == 0


def test_a_sweep_with_a_metric_token_beyond_the_vocabulary_names_the_size():
    _, model = cached_model("gpt2")
    _, clean_cache = model.run_with_cache(tokens(2, 5, seed=2))
    with pytest.raises(ValueError, match=r"token id 1000.*100 entries"):
        patching.get_act_patch_resid_pre(model, tokens(2, 5), clean_cache, metrics.logit_diff(1000, 5))


def test_normalizing_by_equal_clean_and_corrupted_values_is_refused():
    with pytest.raises(ValueError, match="both 1.5.*divide by zero"):
        metrics.normalized(metrics.logit(3), 1.5, 1.5)


# ---- decompose_resid ------------------------------------------------------------------------------


def test_decompose_resid_without_the_embeddings_cached_names_them():
    _, model = cached_model("gpt2")
    _, cache = model.run_with_cache(tokens(2, 5), names_filter=lambda n: n.endswith(("attn_out", "mlp_out")))
    with pytest.raises(fxlens.SiteError, match=r"needs hook_embed, hook_pos_embed, which were not cached; add them to names_filter"):
        cache.decompose_resid()


def test_decompose_resid_of_bert_includes_the_token_type_embedding():
    hf, model = cached_model("bert")
    ids = tokens(2, 5)
    _, cache = model.run_with_cache(ids)
    parts, labels = cache.decompose_resid(layer=0, return_labels=True)
    assert labels == ["embed", "pos_embed", "token_type_embed"]
    emb = hf.bert.embeddings
    with torch.no_grad():
        want = emb.word_embeddings(ids) + emb.position_embeddings(torch.arange(5)) + emb.token_type_embeddings(torch.zeros_like(ids))
    assert (parts.sum(0) - want).abs().max().item() <= TOL


def test_decompose_resid_of_an_untabled_gpt2_sums_to_the_hf_residual():
    hf = make("gpt2")
    model = fxlens.Model.from_hf(hf, table=None)
    ids = tokens(2, 5)
    _, cache = model.run_with_cache(ids)
    parts, labels = cache.decompose_resid(layer=1, return_labels=True)
    # without a table GPT-2's "wpe" has no canonical name: the embeddings enter as one term
    assert labels == ["embeddings", "0_attn_out", "0_mlp_out"]
    with torch.no_grad():
        embeddings = hf.transformer.wte(ids) + hf.transformer.wpe(torch.arange(5))
        after_block_0 = hf.transformer(input_ids=ids, output_hidden_states=True).hidden_states[1]
    assert (parts[0] - embeddings).abs().max().item() <= TOL
    assert (parts.sum(0) - after_block_0).abs().max().item() <= TOL


def test_hook_embed_without_a_table_is_the_token_embedding():
    hf = make("gpt2")
    model = fxlens.Model.from_hf(hf, table=None)
    ids = tokens(2, 5)
    _, cache = model.run_with_cache(ids, names_filter=["hook_embed"])
    with torch.no_grad():
        want = hf.transformer.wte(ids)
    assert (cache["hook_embed"] - want).abs().max().item() <= TOL


# ---- hooks on a broadcast site (hook_pos_embed, held as [1, pos, d]) -------------------------------


def _in_place_all_rows(x, hook):
    x[:, 2] = 0


def _in_place_row_0(x, hook):
    x[0, 2] *= 3


def _returned(x, hook):
    return x * 2


def _hf_all_rows(out, b):
    out = out.clone()
    out[:, 2] = 0
    return out


def _hf_row_0(out, b):
    out = out.expand(b, *out.shape[1:]).clone()
    out[0, 2] *= 3
    return out


EDITS = {
    "in_place_all_rows": (_in_place_all_rows, _hf_all_rows),
    "in_place_row_0": (_in_place_row_0, _hf_row_0),
    "returned": (_returned, lambda out, b: out * 2),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_hook_on_pos_embed_edits_like_an_hf_hook_on_wpe(edit):
    hf, model = cached_model("gpt2")
    fx_hook, hf_edit = EDITS[edit]
    ids = tokens(3, 6)
    seen = []
    got = model.run_with_hooks(ids, fwd_hooks=[("hook_pos_embed", lambda x, hook: seen.append(x.shape) or fx_hook(x, hook))])
    handle = hf.transformer.wpe.register_forward_hook(lambda mod, args, out: hf_edit(out, ids.shape[0]))
    try:
        want = hf_logits(hf, ids)
    finally:
        handle.remove()
    assert seen == [torch.Size([3, 6, model.cfg.d_model])]
    assert (got - want).abs().max().item() <= TOL
    assert (got - hf_logits(hf, ids)).abs().max().item() > 1e-3  # the edit mattered
    assert (model(ids) - hf_logits(hf, ids)).abs().max().item() <= TOL  # and did not persist
