"""Packed rows (``passes/pack_rows.py`` and the sweep's packed path) against unpacked references.

The pass: a block run on rows of different starts packed into one sequence equals the plain block
run on each row's whole sequence (whose positions before the start are the base run's), on every
causal family, at random starts, batch sizes and right padding. The checks: a core that reads a
size of the packed input, or an input read on both sides of the attention, is refused. The sweep:
packed and unpacked paths give the same results, and the packed path makes one call per layer.
"""

import pytest
import torch
import torch.fx as fx
from conftest import cached_model
from families import FAMILIES, UNTABLED, ENCODERS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxlens import metrics, patching
from fxlens.engine.rows import Blocks, RowEngine
from fxlens.engine.rows.layouts import Packed
from fxlens.engine.rows.schedule import CostModel
from fxlens.passes import PackRows, PassError
from fxlens.passes.pack_rows import core_contexts

CAUSAL = [f for f in FAMILIES + UNTABLED if f not in ENCODERS]
DIMS = {"llama": {"n_kv_heads": 2}, "mistral": {"n_kv_heads": 2}}
SEQ = 7


def model_for(family):
    return cached_model(family, **DIMS.get(family, {}))[1]


def base_run(model, batch, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, SEQ), generator=g)
    mask = (torch.arange(SEQ)[None] < torch.tensor(lengths)[:, None]).long()
    engine = RowEngine(model)
    return engine, engine.base(model._inputs(ids, mask)), g


def packed_vs_rows(model, layer, batch, lengths, starts, seed=0):
    """Max difference between the packed block and the plain block run per row."""
    engine, base, g = base_run(model, batch, lengths, seed)
    blocks = engine.blocks
    assert blocks.packing() is not None
    h0 = base.hidden[layer]
    rows_h = []
    for s in starts:
        h = h0.clone()
        h[:, s:] += torch.randn(h[:, s:].shape, generator=g)  # this row's own values from its start
        rows_h.append(h)
    packed_h = torch.cat([h[:, s:] for h, s in zip(rows_h, starts)], dim=1)
    row = torch.cat([torch.full((SEQ - s,), r) for r, s in enumerate(starts)])
    pos = torch.cat([torch.arange(s, SEQ) for s in starts])
    with torch.no_grad():
        got = engine._block(layer, packed_h, base, [], Packed(row, pos, len(starts), SEQ))
        plain = blocks.programs[layer].get(())
        want = torch.cat([plain(**blocks.feed(layer, h, base.context))["outputs"]["hidden"][:, s:] for h, s in zip(rows_h, starts)], dim=1)
    real = torch.tensor(lengths)[:, None] > pos[None]  # padded positions hold no defined value
    return (got - want).abs()[real].max().item()


@pytest.mark.parametrize("family", CAUSAL)
def test_a_packed_block_equals_the_block_run_on_each_row(family):
    model = model_for(family)
    assert packed_vs_rows(model, 1, 2, [SEQ, 5], [0, 3, 6, 2, 3]) <= 1e-5


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(["llama", "gpt2", "gemma2", "neox"]),
    batch=st.integers(1, 3),
    starts=st.lists(st.integers(0, SEQ - 1), min_size=1, max_size=6),
    data=st.data(),
)
def test_property_packed_block_equals_rows(family, batch, starts, data):
    lengths = [SEQ] + data.draw(st.lists(st.integers(1, SEQ), min_size=batch - 1, max_size=batch - 1))
    layer = data.draw(st.integers(0, 1))
    assert packed_vs_rows(model_for(family), layer, batch, lengths, starts, seed=len(starts)) <= 1e-5


@pytest.mark.parametrize("family", CAUSAL)
def test_every_causal_family_packs_rows(family):
    # a block the check refuses falls back to one call per start: correct, but slow; say so here
    assert Blocks.of(model_for(family).derived).packing() is not None


def test_an_encoder_does_not_pack_rows():
    assert Blocks.of(cached_model("bert")[1].derived).packing() is None


# ---- the checks, on hand-made graphs ---------------------------------------------------------------


def _traced(fn):
    return fx.symbolic_trace(fn)


def _spec(gm):
    """The attention of a hand-made block: q, k, v are its three ``unsqueeze`` nodes, in order."""
    sdpa = next(n.name for n in gm.graph.nodes if "scaled_dot_product" in str(n.target))
    q, k, v = [n.name for n in gm.graph.nodes if n.op == "call_method" and n.target == "unsqueeze"]
    return PackRows(((q, k, v, sdpa, "0", ()),))


def test_a_core_reading_a_size_of_the_packed_input_is_refused():
    def block(h, mask):
        n = h.size(1)
        z = torch.nn.functional.scaled_dot_product_attention(h.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1), attn_mask=mask[:, :, :n, :n])
        return z.squeeze(1) + h

    gm = _traced(block)
    with pytest.raises(PassError, match="depends on the block's packed input"):
        core_contexts(gm, _spec(gm), "h")


def test_an_input_read_inside_and_outside_attention_is_refused():
    def block(h, mask):
        z = torch.nn.functional.scaled_dot_product_attention(h.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1), attn_mask=mask)
        return z.squeeze(1) + h * mask.sum()

    gm = _traced(block)
    with pytest.raises(PassError, match=r"\['mask'\].*both inside and outside"):
        core_contexts(gm, _spec(gm), "h")


def test_contexts_are_split_by_where_they_are_read():
    def block(h, mask, cos):
        q = h * cos
        z = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1), attn_mask=mask)
        return z.squeeze(1) + h

    gm = _traced(block)
    assert core_contexts(gm, _spec(gm), "h") == (frozenset({"mask"}), frozenset({"cos"}))


# ---- the sweep's packed path ---------------------------------------------------------------------


def _sweep(model, packed: bool, name, ids, corrupted, metric):
    blocks = Blocks.of(model.derived)
    saved = blocks.packing()
    if not packed:
        blocks._packing = None  # what the check answers for a block it refuses
    try:
        _, cache = model.run_with_cache(ids)
        out = getattr(patching, name)(model, corrupted, cache, metric)
    finally:
        blocks._packing = saved
    return out, dict(model.last_sweep_stats)


@pytest.mark.parametrize("family", ["gemma3", "gptj", "olmo", "starcoder2", "qwen2"])
@pytest.mark.parametrize("name", ["get_act_patch_resid_pre", "get_act_patch_attn_head_pattern_by_pos", "get_act_patch_attn_head_k_by_pos"])
def test_packed_and_unpacked_sweeps_agree(family, name):
    model = model_for(family)
    ids = torch.randint(3, 100, (1, SEQ), generator=torch.Generator().manual_seed(3))
    corrupted = ids.clone()
    corrupted[0, [1, 3, 4]] = (ids[0, [1, 3, 4]] + 40) % 97 + 3
    for metric in (metrics.logit_diff(5, 9), lambda logits: logits[0, -2:, :20].sum()):
        packed, stats = _sweep(model, True, name, ids, corrupted, metric)
        unpacked, _ = _sweep(model, False, name, ids, corrupted, metric)
        assert (packed - unpacked).abs().max().item() <= 1e-5
        # every start in one call per layer (and the last layer's keys-and-values call)
        assert stats["block_calls"] <= model.cfg.n_layers + 1


def test_a_compiled_packed_sweep_equals_the_uncompiled_one():
    import warnings

    model = model_for("llama")
    ids = torch.randint(3, 100, (1, SEQ), generator=torch.Generator().manual_seed(4))
    corrupted = ids.clone()
    corrupted[0, [1, 4]] = (ids[0, [1, 4]] + 40) % 97 + 3
    _, cache = model.run_with_cache(ids)
    metric = metrics.logit_diff(5, 9)
    want = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notices while compiling
        warnings.filterwarnings("error", message="torch.compile could not compile")
        got = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, compile=True)
    assert model.last_sweep_stats["block_calls"] <= model.cfg.n_layers + 1  # the packed path ran
    assert (got - want).abs().max().item() <= 1e-4


def test_a_sweep_too_wide_to_pack_runs_one_batch_per_start(monkeypatch):
    model = model_for("gpt2")
    ids = torch.randint(3, 100, (1, SEQ), generator=torch.Generator().manual_seed(5))
    corrupted = ids.clone()
    corrupted[0, [1, 3, 4]] = (ids[0, [1, 3, 4]] + 40) % 97 + 3
    _, cache = model.run_with_cache(ids)
    metric = metrics.logit_diff(5, 9)
    packed = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    p = dict(model.last_sweep_stats)
    assert p["block_calls"] <= model.cfg.n_layers + 1
    monkeypatch.setattr(CostModel, "pack_activation_bytes", 0)
    per_start = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    s = model.last_sweep_stats
    # one call per start and layer, or starts merged by computing positions again
    assert s["block_calls"] > p["block_calls"] or s["token_layers"] > p["token_layers"]
    assert (packed - per_start).abs().max().item() <= 1e-5
