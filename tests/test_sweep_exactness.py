"""resid_pre sweeps of blocks that read more than their residual input and attention's keys and values
equal a hooked HF loop (issue 10's "slightly wrong numbers").

Reference: one plain HF forward per cell, a forward-pre-hook on the decoder layer putting the clean
layer input at the cell's position (tests/test_coverage.py's ``hf_resid_pre_sweep``), with a plain
callable metric (every logit) and a declared one (the last position's logits: the last block then runs
that position alone on the earlier positions' keys and values).

Causes, and what these tests saw before the fixes:
- Zamba and Zamba2 feed the embedding both to block 0 and, as ``original_hidden_states``, to every
  shared attention block; an edit of ``blocks.0.hook_resid_pre`` also reached the shared blocks, which
  an HF hook on the layer input does not (off by 3.9e-3 and 5.5e-4, layer 0 only).
- Doge's attention bias is computed from its values per key, and Inkling convolves keys, values and
  both branch outputs over the last positions; a row that starts after position 0 lacked the earlier
  positions' share of both (off by 3.9e-4 and 2.5e-5). The row engine now checks, once per capture,
  that a block run on a suffix reproduces the base run, and where not starts every row at position 0
  (still layer by layer; before, such models ran rows on the whole model).
"""

import copy
import warnings

import pytest
import torch

import all_families as A
import hf_hooks as H
import fxlens
from fxlens import patching
from fxlens.engine.rows import RowEngine
from fxlens.engine.rows.exactness import suffix_mismatch
from fxlens.engine.rows.base import run_base
from test_coverage import hf_resid_pre_sweep, sweep_metric

SEQ = 6


def _model(hf):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxlens.Model.from_hf(hf)


def _sweeps(family):
    """[(fxlens' grid, the HF loop's grid)] for a plain and a declared metric, and the warnings the sweeps gave."""
    hf = A.build(family)
    clean, corrupted = A.probe_ids(1, SEQ, seed=3), A.probe_ids(1, SEQ, seed=4)
    with torch.no_grad():
        plain = sweep_metric(hf(input_ids=clean).logits.shape[-1])
    declared = fxlens.metrics.logit_diff(3, 7)
    model = _model(hf)
    paths = [b.path for b in model.graph.structure.blocks]
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    out = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for metric in (declared, plain):
            out.append(patching.get_act_patch_resid_pre(model, corrupted, cache, metric))
    return model, [(got, hf_resid_pre_sweep(hf, clean, corrupted, paths, m)) for got, m in zip(out, (declared, plain))], seen


def _close(got, want):
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, scale), (got - want).abs().max()


@pytest.mark.parametrize("family", ["zamba", "zamba2"])
def test_shared_block_models_sweep_equals_hooked_hf_loop(family):
    model, grids, _ = _sweeps(family)
    for got, want in grids:
        _close(got, want)
    assert model.site("blocks.0.hook_resid_pre").bypass  # the shared blocks' embedding input is left alone


@pytest.mark.parametrize("family", ["doge", "inkling_text"])
def test_blocks_that_mix_positions_beside_attention_sweep_exactly_and_say_why(family):
    model, grids, seen = _sweeps(family)
    for got, want in grids:
        _close(got, want)
    told = [str(w.message) for w in seen if "would not be exact" in str(w.message)]
    assert len(told) == 1 and "mixes positions outside attention's keys and values" in told[0]
    assert "block 0" in told[0]
    # one cell alone is one row, whose start no schedule merges into an earlier one's: it must start at 0
    want = grids[0][1]  # the HF loop of _sweeps' declared metric, on the same prompts
    clean, corrupted = A.probe_ids(1, SEQ, seed=3), A.probe_ids(1, SEQ, seed=4)
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    metric = fxlens.metrics.logit_diff(3, 7)
    for cell in [(0, SEQ // 2), (0, SEQ - 1), (1, SEQ // 2)]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = patching.generic_activation_patch(model, corrupted, cache, metric, patching.layer_pos_patch_setter,
                                                    "resid_pre", index_df=[cell])
        _close(got[0], want[cell])
        assert not [w for w in seen if "whole-model" in str(w.message)], [str(w.message) for w in seen]
        assert model.last_sweep_stats["block_calls"] > 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_ordinary_blocks_pass_the_suffix_check_and_keep_the_layered_engine(family):
    model = _model(A.build(family))
    engine = RowEngine(model)
    ids = A.probe_ids(1, SEQ, seed=4)
    base = run_base(engine.blocks, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, True)
    assert suffix_mismatch(engine, base) is None
    clean = A.probe_ids(1, SEQ, seed=3)
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back warning
        patching.get_act_patch_resid_pre(model, ids, cache, fxlens.metrics.logit_diff(3, 7))
    assert model.last_sweep_stats["block_calls"] > 0


@pytest.mark.parametrize("family", ["bitnet", "diffllama", "granite_swa"])
def test_blocks_with_unrecognised_attention_keep_the_layered_engine_exactly(family):
    """Attention with a norm before its output projection (BitNet, DiffLlama) or a sliding window is not
    recognised as heads; such a block reads a [q, k] mask that packed rows cannot gather per token. These
    blocks run rows unpacked: before, the packed call failed and every sweep fell back to whole-model forwards."""
    model, grids, seen = _sweeps(family)
    for got, want in grids:
        _close(got, want)
    assert not [w for w in seen if "cannot run this model's sweeps" in str(w.message)]
    assert model.last_sweep_stats["block_calls"] > 0


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_alibi_rows_read_every_key_and_keep_the_layered_engine(padding):
    """BLOOM's ALiBi bias, [batch*heads, 1, key], is over keys: a row that starts at position p still reads
    keys 0..p-1. It was sliced like a per-query tensor, the suffix-exactness probe then sent every BLOOM sweep
    to whole-model forwards; now rows run layered, exact against the hooked HF loop, padded on either side."""
    hf = A.build("bloom")
    model = _model(hf)
    clean, corrupted = A.probe_ids(3, SEQ, seed=3), A.probe_ids(3, SEQ, seed=4)
    mask = None if padding == "none" else H.padding_mask(clean, padding)
    real = torch.ones(3, SEQ) if mask is None else mask.float()

    def metric(logits):  # every real position's logits, none of the padding's
        return (logits.log_softmax(-1)[..., :9].sum(-1) * real).sum()

    paths = [b.path for b in model.graph.structure.blocks]
    _, cache = model.run_with_cache(clean, mask, names_filter=lambda n: n.endswith("hook_resid_pre"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, attention_mask=mask)
    _close(got, hf_resid_pre_sweep(hf, clean, corrupted, paths, metric, mask))
    assert not [w for w in seen if "whole-model" in str(w.message)], [str(w.message) for w in seen]
    assert model.last_sweep_stats["block_calls"] > 0


def _sparse_indexer_model(family: str):
    """A copy of the tiny DeepSeek-V3.2/GLM-DSA model whose indexer keeps 3 keys per query (fewer than the
    tests' lengths, so that it drops keys); the shared per-process build is left as it is."""
    hf = copy.deepcopy(A.build(family))
    for layer in hf.model.layers:
        layer.self_attn.indexer.index_topk = 3
    hf.config.index_topk = 3
    return hf


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_sparse_attention_indexer_sweeps_exactly_on_the_layered_engine(family):
    """DeepSeek's sparse-attention indexer keeps top-Min(index_topk, seq) keys per query. Two things were wrong:

    - a block reads that size from outside; it is recomputed from the block's own input like any size of the
      batch and sequence sizes (before, every sweep of these models fell back to whole-model forwards);
    - the indexer scores each query against keys of its own, computed from the block's input at every
      position, so a row cannot start after position 0 on the base run's attention keys and values. Whether
      the engine tried depended on the capture's causality probe, which read the uninitialised half of the
      keys' ``new_empty`` and so called the model causal in some captures only: CI then saw the sweep raise
      in a suffix run and fall back to whole-model forwards. Now the probe is deterministic (the model is
      causal), the suffix check finds the block cannot run late, says so once, and every row starts at 0.
    """
    hf = _sparse_indexer_model(family)
    model = _model(hf)
    assert model.captured.is_causal
    clean, corrupted = A.probe_ids(1, 8, seed=3), A.probe_ids(1, 8, seed=4)
    paths = [b.path for b in model.graph.structure.blocks]
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    with torch.no_grad():
        metric = sweep_metric(hf(input_ids=clean).logits.shape[-1])
    seen = []
    for m in (metric, fxlens.metrics.logit_diff(3, 7)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = patching.get_act_patch_resid_pre(model, corrupted, cache, m)
        seen += [str(w.message) for w in caught]
        _close(got, hf_resid_pre_sweep(hf, clean, corrupted, paths, m))
        assert model.last_sweep_stats["block_calls"] > 0
    assert not [w for w in seen if "whole-model" in w], seen
    told = [w for w in seen if "would not be exact" in w]
    assert len(told) == 1 and "block 0" in told[0] and "starts at position 0" in told[0], seen


@pytest.mark.parametrize("family", ["doge", "deepseek_v32", "glm_moe_dsa"])
def test_generation_recomputes_where_a_step_cannot_run_on_cached_keys_and_equals_hf(family):
    """A decode step runs the last position alone on cached keys and values: the same block call the suffix
    check finds inexact on Doge and impossible with the sparse-attention indexer (it needs every position's
    own indexer keys, which HF's cache keeps), so generation recomputes (said once) and gives HF's tokens."""
    hf = A.build(family) if family == "doge" else _sparse_indexer_model(family)
    ids = A.probe_ids(1, SEQ, seed=3)
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    model = _model(hf)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = model.generate(ids, 5, stop_at_eos=False)
    assert torch.equal(got, want)
    told = [str(w.message) for w in seen if "step from cached keys and values would not be exact" in str(w.message)]
    assert len(told) == 1, [str(w.message) for w in seen]
