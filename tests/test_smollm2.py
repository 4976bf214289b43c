"""The real SmolLM2-135M (Llama architecture, 30 layers) from its GGUF file: exact logits, induction heads."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
from induction_heads import induction_scores  # noqa: E402


def test_smollm2_logits_equal_hf(smollm2):
    ids = smollm2.to_tokens(["The Eiffel Tower is in the city of", "Two plus two is"])
    mask = (ids != smollm2._tok.pad_token_id).long()
    mask[:, 0] = 1
    with torch.no_grad():
        ref = smollm2.hf_model(input_ids=ids, attention_mask=mask).logits
        got = smollm2(ids, mask)
        cached, _ = smollm2.run_with_cache(ids, mask, names_filter=lambda n: n.endswith(("hook_pattern", "hook_resid_post")))
    assert (got - ref).abs().max().item() <= 1e-5
    # patterns come from a side branch: caching them leaves the logits bit-identical
    assert torch.equal(cached, got)


def test_smollm2_has_strong_induction_heads(smollm2):
    scores, tokens, logits = induction_scores(smollm2, seq=50, seed=0)
    top = scores.flatten().topk(3)
    layer, head = divmod(int(top.indices[0]), scores.shape[1])
    # measured: L18H6 scores 0.901, then L17H3 0.816 and L17H4 0.779
    assert (layer, head) == (18, 6)
    assert top.values[0].item() == pytest.approx(0.901, abs=0.01)
    assert top.values[2].item() > 0.75
    logp = logits.log_softmax(-1)[0, :-1].gather(-1, tokens[0, 1:, None])[:, 0]
    first, second = -logp[:50].mean().item(), -logp[51:].mean().item()
    # measured: 13.06 on the random first copy, 1.69 on the repeat
    assert first == pytest.approx(13.06, abs=0.05)
    assert second == pytest.approx(1.69, abs=0.05)


def test_smollm2_tokens_round_trip(smollm2):
    text = "The Eiffel Tower is in Paris"
    ids = smollm2.to_tokens(text)
    assert ids[0, 0].item() == smollm2.tokenizer.bos_token_id
    assert smollm2.to_string(ids[0, 1:]) == text
    assert "".join(smollm2.to_str_tokens(text, prepend_bos=False)) == text
    assert smollm2.to_string(torch.tensor([smollm2.to_single_token(" Paris")])) == " Paris"
