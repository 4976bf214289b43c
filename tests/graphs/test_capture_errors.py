"""Capture failures (issue 10): sequence-length bounds found and enforced; errors that explain and name the fix.

- ``graphs.bounds``: torch's suggested range, a specialised length, a range torch could not prove.
- Real models: Aria's guards hold only from length 2 (captured with lengths 2..64; a 1-token input is
  refused before it runs, naming the minimum; logits equal HF at the longest length); BART's
  conditional-generation model needs 3 tokens (the capture finds it).
- DeepSeek-V3 with ``head_dim`` unequal to ``qk_rope_head_dim``: the HF forward itself fails (a config
  problem); the CaptureError says so and names both settings.
- ``graphs.explain``: torch's explanation kept (not only its first line), trailers and printed graphs
  dropped, long messages cut; each recognised cause names its fix.
"""

import types

import pytest
import torch
import transformers as T

import fxlens
from fxlens import CaptureError
from fxlens.engine.inputs import InputError
from fxlens.graphs.bounds import REFINE, STATIC, next_bounds
from fxlens.graphs.capture import capture
from fxlens.graphs.explain import MAX_LINES, explain, torch_text

VOCAB = 100

ARIA_TEXT = (
    'Constraints violated (seq)! For more information, run with TORCH_LOGS="+dynamic".\n'
    "  - Not all values of seq = L['input_ids'].size()[1] in the specified range seq <= 64 satisfy the generated guard "
    "(L['input_ids'].size()[1]*min(64, 64*L['input_ids'].size()[1])) == (64*L['input_ids'].size()[1]).\n\n"
    "The error above occurred when calling torch.export.export. If you would like to view some more information about "
    "this error, and get a list of all other errors that may occur in your export call, you can replace your `export()` "
    "call with `draft_export()`."
)
SPECIALISED = (
    'Constraints violated (seq)! For more information, run with TORCH_LOGS="+dynamic".\n'
    "  - You marked seq as dynamic but your code specialized it to be a constant (5). If you're using mark_dynamic, "
    "either remove it or use maybe_mark_dynamic.\nSuggested fixes:\n  seq = 5\n"
)


# -- bounds ----------------------------------------------------------------------------------------

def test_next_bounds_takes_torchs_suggested_range():
    text = "Constraints violated (seq)! ...\nSuggested fixes:\n  seq = Dim('seq', min=3, max=64)\n"
    assert next_bounds(text, 1, 64) == (3, 64)


def test_next_bounds_says_static_when_the_length_was_specialised():
    assert next_bounds(SPECIALISED, 1, 64) == STATIC


def test_next_bounds_refines_a_range_torch_could_not_prove_once():
    assert next_bounds(ARIA_TEXT, 1, 64) == REFINE
    assert next_bounds(ARIA_TEXT, 1, 64, tried=[REFINE]) is None


def test_next_bounds_ignores_other_errors():
    assert next_bounds("Could not guard on data-dependent expression Eq(u0, 1)", 1, 64) is None


# -- real models -----------------------------------------------------------------------------------

def _aria():
    torch.manual_seed(0)
    return T.AriaTextForCausalLM(T.AriaTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1,
        use_cache=False)).eval()


def test_aria_captures_with_the_lengths_its_guards_allow_and_refuses_shorter_inputs():
    hf = _aria()
    model = fxlens.Model.from_hf(hf)
    assert (model.captured.min_seq, model.captured.max_seq) == (2, 64)
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (model(ids) - ref).abs().max().item() <= 1e-5
    with pytest.raises(InputError, match=r"sequence length 1 is shorter than the 2 tokens this model takes.*pad the input to 2"):
        model(ids[:, :1])
    with pytest.raises(InputError, match=r"sequence length 65 exceeds the model's 64 positions"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_bart_needs_a_minimum_length_and_the_capture_finds_it():
    hf = T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)).eval()
    cg = capture(hf)
    assert cg.min_seq == 3 and cg.max_seq == 64


def test_deepseek_v3_with_a_head_dim_other_than_the_rotary_width_is_refused_as_a_config_problem():
    hf = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, max_position_embeddings=64, n_group=1, topk_group=1, head_dim=16)).eval()
    with pytest.raises(CaptureError) as err:
        fxlens.Model.from_hf(hf)
    text = str(err.value)
    assert "own forward fails" in text and "not the capture" in text
    assert "must match the size of tensor b" in text  # the model's own error, kept
    assert "config.head_dim = 16" in text and "config.qk_rope_head_dim = 8" in text and "head_dim=8" in text


# -- messages --------------------------------------------------------------------------------------

class _Model(torch.nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.config = types.SimpleNamespace(**config)


def test_torch_explanation_is_kept_without_trailers():
    lines = torch_text(RuntimeError(ARIA_TEXT))
    assert lines[0] == "Constraints violated (seq)!"
    assert any("Not all values of seq" in line and "satisfy the generated guard" in line for line in lines)
    assert not any("draft_export" in line or "TORCH_LOGS" in line or "The error above" in line for line in lines)


def test_printed_graphs_are_dropped_and_long_messages_cut():
    dump = "Could not guard on data-dependent expression Eq(u0, 1)\n\n\ndef forward(self, x):\n    y = x + 1\n" * 1
    assert torch_text(RuntimeError(dump)) == ["Could not guard on data-dependent expression Eq(u0, 1)"]
    long = "\n".join(f"line {i} " + "x" * 500 for i in range(100))
    lines = torch_text(RuntimeError(long))
    assert len(lines) == MAX_LINES + 1 and lines[-1] == f"... ({100 - MAX_LINES} more lines of torch's message)"
    assert all(len(line) <= 300 for line in lines)


def test_a_sequence_bound_names_max_position_embeddings():
    text = explain(_Model(max_position_embeddings=64), RuntimeError(ARIA_TEXT), seq_bounds=(2, 64))
    assert "Not all values of seq" in text  # torch's explanation
    assert "config.max_position_embeddings = 64" in text and "lengths 2..64" in text


def test_a_data_dependent_branch_names_the_line_and_the_config_settings_it_reads():
    guard_error = type("GuardOnDataDependentSymNode", (RuntimeError,), {})
    err = guard_error(
        "Could not guard on data-dependent expression Eq(u0, 0) (unhinted: Eq(u0, 0)).\n"
        "The following call raised this error:\n"
        '  File "/site-packages/transformers/models/foo/modeling_foo.py", line 296, in forward\n'
        "    if self.config.moe_jitter and expert_hit.any():\n"
    )
    text = explain(_Model(moe_jitter=0.1), err)
    assert "GuardOnDataDependentSymNode" in text
    assert "branches on the values of a tensor (modeling_foo.py, line 296)" in text
    assert "config.moe_jitter = 0.1" in text


def test_an_attention_failure_names_attn_implementation():
    err = RuntimeError("aten.scaled_dot_product_attention: unsupported mask shape")
    text = explain(_Model(_attn_implementation="sdpa"), err)
    assert "attn_implementation='eager'" in text and "('sdpa')" in text


def test_a_cache_failure_names_use_cache():
    text = explain(_Model(), RuntimeError("DynamicCache.update() got an unexpected tensor"))
    assert "config.use_cache = False" in text


def test_a_half_precision_kernel_names_the_dtype():
    text = explain(_Model(), RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\''))
    assert "torch_dtype=torch.float32" in text


def test_a_batch_constraint_says_the_model_fixes_the_batch():
    text = explain(_Model(), RuntimeError("Constraints violated (batch)! ... specialized it to be a constant (2)"))
    assert "fixes the batch size" in text
