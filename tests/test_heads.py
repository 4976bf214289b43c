"""fxlens.heads.detect_head against TransformerLens' detect_head on the same GPT-2 weights and tokens."""

import copy

import pytest
import torch
from conftest import cached_model

from fxlens import heads

TEXT = "t5 t6 t7 t8 t5 t6 t7 t8 t9 t5"


@pytest.fixture(scope="module")
def pair(tiny_tokenizer):
    import fxlens
    from transformer_lens.model_bridge import TransformerBridge

    hf, _ = cached_model("gpt2")
    model = fxlens.Model.from_hf(hf, tokenizer=tiny_tokenizer)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf), tokenizer=tiny_tokenizer)
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return model, bridge


@pytest.mark.parametrize("pattern", ["previous_token_head", "duplicate_token_head", "induction_head", "tensor"])
@pytest.mark.parametrize("error_measure", ["mul", "abs"])
@pytest.mark.parametrize("exclude", [(False, False), (True, True)])
def test_detect_head_equals_transformer_lens(pair, pattern, error_measure, exclude):
    from transformer_lens.head_detector import detect_head as tl_detect_head

    model, bridge = pair
    if pattern == "tensor":
        n = model.to_tokens(TEXT).shape[-1]
        pattern = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None] if error_measure == "abs" else torch.tril(torch.ones(n, n), -2)
    kwargs = dict(exclude_bos=exclude[0], exclude_current_token=exclude[1], error_measure=error_measure)
    got = heads.detect_head(model, TEXT, pattern, **kwargs)
    want = tl_detect_head(bridge, TEXT, pattern, **kwargs)
    assert got.shape == (2, 4)
    assert (got - want).abs().max() <= 1e-5


def test_detect_head_on_chosen_heads_a_list_of_texts_and_a_cache(pair):
    from transformer_lens.head_detector import detect_head as tl_detect_head

    model, bridge = pair
    chosen = heads.detect_head(model, TEXT, "induction_head", heads=[(1, 2), (0, 3)])
    assert (chosen == -1).sum() == 6
    assert (chosen - tl_detect_head(bridge, TEXT, "induction_head", heads=[(1, 2), (0, 3)])).abs().max() <= 1e-5
    texts = [TEXT, "t9 t8 t9 t8 t9"]
    assert (heads.detect_head(model, texts, "previous_token_head") - tl_detect_head(bridge, texts, "previous_token_head")).abs().max() <= 1e-5
    _, cache = model.run_with_cache(TEXT)
    assert torch.equal(heads.detect_head(model, TEXT, "induction_head", cache=cache), heads.detect_head(model, TEXT, "induction_head"))


def test_detection_patterns_by_hand():
    ids = torch.tensor([[1, 5, 6, 5, 6]])
    assert heads.get_previous_token_head_detection_pattern(ids)[3].tolist() == [0, 0, 1, 0, 0]
    assert heads.get_duplicate_token_head_detection_pattern(ids)[3].tolist() == [0, 1, 0, 0, 0]
    assert heads.get_induction_head_detection_pattern(ids)[3].tolist() == [0, 0, 1, 0, 0]
    assert heads.get_induction_head_detection_pattern(ids)[4].tolist() == [0, 0, 0, 1, 0]


def test_a_pattern_of_the_wrong_shape_is_refused(pair):
    model, _ = pair
    with pytest.raises(ValueError, match="lower-triangular"):
        heads.detect_head(model, TEXT, torch.ones(3, 3))
    with pytest.raises(ValueError, match="scores one sequence"):
        heads.detect_head(model, torch.ones(2, 5, dtype=torch.long), "induction_head")
    with pytest.raises(ValueError, match="one of previous_token_head"):
        heads.detect_head(model, TEXT, "copy_head")
