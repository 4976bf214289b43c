"""Attention patterns of padding queries, and hooks on them, against HF.

A padding query may attend to no key: softmax of an all -inf row is NaN. Where fxlens computes the
pattern beside a fused SDPA kernel, it gives such a row all zeros (as TransformerLens does); where the
model computes its pattern itself (eager attention), the pattern is the model's own, every row. And a hook or intervention on ``hook_pattern`` of a left-padded batch
leaves the logits at real positions equal to HF's. Before the fix, an identity hook on the pattern made
every logit NaN: the padding rows' NaN values reached the later layers' keys and, through them, the
real positions.

References: HF with eager attention (``output_attentions``) for the real query rows, HF's logits.
"""

import pytest
import torch

import fxlens
from families import make, tokens

FAMILIES = ("llama", "gpt2", "neox", "qwen2", "gemma2", "opt")


def _left_padded():
    ids = tokens(3, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_rows_are_zero_and_real_rows_equal_hf(family):
    hf = make(family, n_kv_heads=2 if family in ("llama", "qwen2") else None)
    model = fxlens.Model.from_hf(hf)
    ids, mask = _left_padded()
    _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n.endswith("hook_pattern"))
    fused = hf.config._attn_implementation == "sdpa"  # else the model computes its pattern itself (gemma2: eager)
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    real = mask.bool()
    for layer, ref in enumerate(want):
        got = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert not got.isnan().any()
        if fused:  # computed beside SDPA: padding queries get all-zero rows
            assert got.permute(0, 2, 1, 3)[~real].abs().max() == 0
            got, ref = got.permute(0, 2, 1, 3)[real], ref.permute(0, 2, 1, 3)[real]
        diff = (got - ref).abs().max()  # the model's own pattern: every row, as HF computes it
        assert diff < 1e-5, (family, layer, diff.item())


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_on_the_pattern_keep_real_logits(family):
    hf = make(family, n_kv_heads=2 if family in ("llama", "qwen2") else None)
    model = fxlens.Model.from_hf(hf)
    ids, mask = _left_padded()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    runs = {
        "identity hook": model.run_with_hooks(ids, attention_mask=mask,
                                              fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x)]),
        "Scale(1.0)": model.run_with_interventions(ids, [fxlens.Scale("blocks.0.attn.hook_pattern", 1.0)],
                                                   attention_mask=mask),
    }
    for what, got in runs.items():
        assert not got[real].isnan().any(), what
        assert (got[real] - want[real]).abs().max() < 1e-5, what
