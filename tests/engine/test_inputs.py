"""Model inputs: what is accepted gives the HF model's own logits, what is refused says why and how to fix it.

References: the HF model's logits for the same ids and mask (a bool or float 0/1 mask must act as the
integer one; every id of the input embedding must be accepted, whatever the head), and the size of the
HF model's input embedding (``get_input_embeddings().num_embeddings``) for the vocabulary.
"""

import pytest
import torch
import transformers as T
from conftest import cached_model
from families import hf_logits, tokens

import fxlens

COMMON = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=64)

# classification heads whose output size (num_labels) is not the vocabulary
HEADS = {
    "ElectraForPreTraining": lambda: T.ElectraForPreTraining(T.ElectraConfig(**COMMON, embedding_size=64)),
    "BertForTokenClassification": lambda: T.BertForTokenClassification(T.BertConfig(**COMMON, num_labels=5)),
    "BertForSequenceClassification": lambda: T.BertForSequenceClassification(T.BertConfig(**COMMON, num_labels=3)),
}
_BUILT: dict = {}


def head(name):
    if name not in _BUILT:
        torch.manual_seed(0)
        hf = HEADS[name]().eval()
        _BUILT[name] = (hf, fxlens.Model.from_hf(hf))
    return _BUILT[name]


# ---- vocabulary: the input embedding's rows, not the output size ------------------------------------


@pytest.mark.parametrize("name", sorted(HEADS))
def test_a_classification_head_accepts_every_id_of_its_input_embedding(name):
    hf, model = head(name)
    n_embed = hf.get_input_embeddings().num_embeddings
    assert model.cfg.d_vocab == n_embed
    assert model.cfg.d_vocab_out == (1 if name == "ElectraForPreTraining" else hf.config.num_labels)
    ids = torch.arange(n_embed).view(4, n_embed // 4)  # every id once, the last one included
    got, want = model(ids), hf_logits(hf, ids)
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=rf"token id {n_embed} .*0\.\.{n_embed - 1}.*d_vocab = {n_embed}"):
        model(torch.tensor([[5, n_embed]]))


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_a_language_model_has_equal_input_and_output_vocabularies(family):
    hf, model = cached_model(family)
    assert model.cfg.d_vocab == model.cfg.d_vocab_out == hf.get_input_embeddings().num_embeddings


def test_a_negative_token_id_is_refused_with_its_position():
    _, model = cached_model("gpt2")
    with pytest.raises(ValueError, match=r"token id -3 \(at \[1, 2\]\).*0\.\.99"):
        model(torch.tensor([[5, 6, 7], [5, 6, -3]]))


# ---- shape ----------------------------------------------------------------------------------------


def test_an_empty_batch_is_refused():
    _, model = cached_model("gpt2")
    with pytest.raises(ValueError, match=r"empty batch: the token ids have shape \(0, 5\); pass at least one sequence"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="empty input"):
        model([])


def test_rows_of_different_lengths_are_refused_with_the_fix():
    _, model = cached_model("gpt2")
    with pytest.raises(ValueError, match="rows of different lengths must be padded.*attention_mask"):
        model([[5, 6, 7], [5, 6]])


def test_float_token_ids_are_refused():
    _, model = cached_model("gpt2")
    with pytest.raises(ValueError, match=r"integer tensor \[batch, pos\].*torch.float32.*\.long\(\)"):
        model(torch.ones(2, 3))


# ---- attention mask -------------------------------------------------------------------------------


def padded():
    ids = tokens(2, 6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.int32])
def test_a_bool_or_float_mask_of_zeros_and_ones_acts_like_the_integer_mask(family, dtype):
    hf, model = cached_model(family)
    ids, mask = padded()
    got = model(ids, mask.to(dtype))
    assert (got - hf_logits(hf, ids, mask)).abs().max().item() <= 1e-5


def test_a_mask_with_a_fractional_entry_is_refused():
    _, model = cached_model("gpt2")
    ids, mask = padded()
    mask = mask.float()
    mask[0, 2] = 0.5
    with pytest.raises(ValueError, match=r"attention_mask holds 0\.5 at \[0, 2\]; a mask must hold 0 and 1 only \(or be bool\)"):
        model(ids, mask)


def test_a_mask_with_other_integers_is_refused():
    _, model = cached_model("gpt2")
    ids, mask = padded()
    mask[1, 1] = 2
    with pytest.raises(ValueError, match=r"holds 2 at \[1, 1\].*0 and 1 only"):
        model.run_with_cache(ids, mask)


def test_a_mask_with_nan_is_refused():
    _, model = cached_model("gpt2")
    ids, mask = padded()
    mask = mask.float()
    mask[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"attention_mask holds NaN at \[1, 3\]"):
        model(ids, mask)


def test_a_mask_of_the_wrong_shape_names_both_shapes():
    _, model = cached_model("gpt2")
    ids, _ = padded()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), but the token ids have shape \(2, 6\)"):
        model(ids, torch.ones(2, 5))


def test_a_one_dimensional_mask_goes_with_one_dimensional_ids():
    hf, model = cached_model("gpt2")
    ids = tokens(1, 5)
    mask = torch.tensor([1, 1, 1, 0, 0])
    got = model(ids[0], mask)
    assert (got - hf_logits(hf, ids, mask[None])).abs().max().item() <= 1e-5


# ---- padding side -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(tiny_tokenizer):
    hf, _ = cached_model("llama")
    return fxlens.Model.from_hf(hf, tiny_tokenizer)


def test_an_unknown_padding_side_is_refused(text_model):
    for call in (
        lambda: text_model(["t5 t6", "t7"], padding_side="middle"),
        lambda: text_model.to_tokens(["t5 t6", "t7"], padding_side="middle"),
        lambda: text_model.run_with_cache("t5", padding_side="Left"),
    ):
        with pytest.raises(ValueError, match=r"padding_side='(middle|Left)' is not a padding side: use 'left' or 'right'"):
            call()


def test_left_and_right_padding_put_the_padding_where_asked(text_model):
    left = text_model.to_tokens(["t5 t6", "t7"], padding_side="left")
    right = text_model.to_tokens(["t5 t6", "t7"], padding_side="right")
    assert left.tolist() == [[1, 5, 6], [2, 1, 7]] and right.tolist() == [[1, 5, 6], [1, 7, 2]]
