"""Capture: the graph reproduces the HF model exactly and leaves the model as it was."""


import pytest
import torch
from conftest import cached_model
from families import FAMILIES, UNTABLED, hf_logits, make, tokens

import fxlens
from fxlens.graphs.capture import CaptureError, capture


@pytest.mark.parametrize("family", FAMILIES + UNTABLED)
def test_captured_logits_equal_hf_logits_with_padding(family):
    hf, model = cached_model(family)
    ids = tokens(3, 9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    for m in (None, mask):
        ref = hf_logits(hf, ids, m)
        got = model(ids, m)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 16), (5, 3), (4, 33)])
def test_one_capture_serves_every_batch_and_length(family, shape):
    hf, model = cached_model(family)
    ids = tokens(*shape)
    assert (model(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-5


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.config.to_dict(),
        model.config._attn_implementation,
        {name: m.training for name, m in model.named_modules()},
        [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()],
    )


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_capture_leaves_the_model_unchanged(family):
    hf = make(family)
    hf.train()  # a model in training mode must come back in training mode
    before = _snapshot(hf)
    model = fxlens.Model.from_hf(hf, attn_implementation="eager")
    ids = tokens(2, 5)
    model.run_with_cache(ids)
    model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x * 2)])
    after = _snapshot(hf)
    assert before[1:] == after[1:]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_wrapping_again_always_captures_afresh():
    hf = make("llama")
    a = fxlens.Model.from_hf(hf)
    b = fxlens.Model.from_hf(hf)
    c = fxlens.Model.from_hf(hf, attn_implementation="eager")
    assert a.captured is not b.captured
    assert c.captured is not a.captured
    assert c.cfg.attn_implementation == "eager" and a.cfg.attn_implementation == "sdpa"


def test_eager_and_sdpa_captures_agree():
    hf = make("llama")
    ids = tokens(2, 8)
    a = fxlens.Model.from_hf(hf)(ids)
    b = fxlens.Model.from_hf(hf, attn_implementation="eager")(ids)
    assert (a - b).abs().max().item() <= 1e-5


def test_parameters_are_shared_not_copied():
    hf = make("gpt2")
    cg = capture(hf)
    ptrs = {p.data_ptr() for p in hf.parameters()}
    graph_ptrs = {p.data_ptr() for p in cg.module.parameters()} | {b.data_ptr() for b in cg.module.buffers()}
    assert ptrs <= graph_ptrs


class _DataDependent(torch.nn.Module):
    """A forward whose control flow depends on token values: not exportable."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask=None):
        if input_ids.sum() > 3:
            return self.emb(input_ids)
        return self.emb(input_ids) * 2


def test_unexportable_model_gets_an_error_that_names_the_cause_and_the_fix():
    with pytest.raises(CaptureError) as err:
        capture(_DataDependent())
    text = str(err.value)
    assert "_DataDependent" in text and "torch.export" in text
    assert "attn_implementation" in text  # what the user can try


def test_model_without_input_ids_is_refused_with_a_clear_message():
    class NoIds(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(CaptureError, match="takes no input_ids"):
        capture(NoIds())
