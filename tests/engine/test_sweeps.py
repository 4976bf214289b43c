"""Every sweep in ``fxlens.patching`` against a naive loop of one hooked forward per cell.

The reference is TransformerLens' algorithm written out here: for each index of the grid, one
``model.run_with_hooks`` forward of the corrupted tokens whose hook puts the clean value at that index
into every batch row, and the metric on the patched logits. Sweeps run on random small models of
several families (causal with GQA, parallel attention, eager-only, encoder), batches of one row and
of three right-padded rows, a declared metric with per-row answers and positions and a plain callable
on full logits, corruptions of a few positions (most patches change nothing, rows start late) and of
every position. Also: the ``_every`` stacks and their shapes, ``index_df``, ``memory_budget``, a
custom patch setter, errors, ``progress``, and hypothesis properties over random configurations.
"""

import functools
import itertools

import pandas as pd
import pytest
import torch
from conftest import cached_model
from families import hf_logits, make, tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxlens
from fxlens import metrics, patching
from fxlens.engine.sweep import Cell, Sweep, SweepError

TOL = 1e-5
FAMILIES = {"llama": {"n_kv_heads": 2}, "gpt2": {}, "neox": {}, "gemma2": {}, "opt": {}, "bert": {}, "phi": {}}
PARALLEL = {"neox", "phi"}  # attention and MLP read the same residual: no resid_mid
S = 5

# sweep -> (activation, which axes of the activation the index after the layer addresses)
# activations: resid/attn_out/mlp_out [batch, pos, d]; q/k/v/z [batch, pos, head, d_head];
# pattern [batch, head, dest_pos, src_pos]
SWEEPS = {
    "resid_pre": ("resid_pre", (1,)),
    "resid_mid": ("resid_mid", (1,)),
    "attn_out": ("attn_out", (1,)),
    "mlp_out": ("mlp_out", (1,)),
    "attn_head_out_by_pos": ("z", (1, 2)),
    "attn_head_q_by_pos": ("q", (1, 2)),
    "attn_head_k_by_pos": ("k", (1, 2)),
    "attn_head_v_by_pos": ("v", (1, 2)),
    "attn_head_pattern_by_pos": ("pattern", (1, 2)),
    "attn_head_pattern_dest_src_pos": ("pattern", (1, 2, 3)),
    "attn_head_out_all_pos": ("z", (2,)),
    "attn_head_q_all_pos": ("q", (2,)),
    "attn_head_k_all_pos": ("k", (2,)),
    "attn_head_v_all_pos": ("v", (2,)),
    "attn_head_pattern_all_pos": ("pattern", (1,)),
}


def sweep_fn(name):
    return getattr(patching, f"get_act_patch_{name}")


def expected_shape(model, name, seq):
    """The result shape TransformerLens documents for each sweep."""
    c = model.cfg
    act, _ = SWEEPS[name]
    heads = (c.n_key_value_heads or c.n_heads) if act in ("k", "v") else c.n_heads
    L = c.n_layers
    if act == "pattern":
        return {1: (L, heads), 2: (L, heads, seq), 3: (L, heads, seq, seq)}[len(SWEEPS[name][1])]
    return {"resid_pre": (L, seq), "resid_mid": (L, seq), "attn_out": (L, seq), "mlp_out": (L, seq)}.get(
        name, (L, seq, heads) if name.endswith("by_pos") else (L, heads))


# ---- inputs and metrics ---------------------------------------------------------------------------


def shifted(ids):
    """Different tokens at every position (3..99 shifted by 50, modulo the range)."""
    return (ids - 3 + 50) % 97 + 3


@functools.cache
def setup(batch: int, corruption: str):
    """(clean ids, corrupted ids, mask or None, answers, wrong answers) for a named configuration."""
    clean = tokens(batch, S, seed=11)
    if corruption == "few":
        corrupted = clean.clone()
        corrupted[:, 2] = shifted(clean[:, 2])
        corrupted[0, 4] = shifted(clean[0, 4])
    elif corruption == "all":
        corrupted = shifted(clean)
    else:
        corrupted = clean.clone()
    mask = None
    if batch == 3:
        mask = torch.ones_like(clean)
        mask[1, 3:] = 0  # right padding: row 1 has 3 real tokens, row 2 has 4
        mask[2, 4:] = 0
    answer = torch.tensor([5, 17, 42][:batch])
    wrong = torch.tensor([7, 8, 90][:batch])
    return clean, corrupted, mask, answer, wrong


def last_real(mask, batch):
    return torch.full((batch,), S - 1) if mask is None else mask.sum(1) - 1


def declared_metric(batch, mask, answer, wrong):
    return metrics.logit_diff(answer, wrong, pos=last_real(mask, batch))


def plain_metric(batch, mask, answer, wrong):
    """A callable reading full logits: a log-prob difference and every real position's mean logit."""
    last = last_real(mask, batch)
    rows = torch.arange(batch)
    weights = torch.ones(batch, S) if mask is None else mask.float()

    def metric(logits):
        lp = logits.log_softmax(-1)
        diff = (lp[rows, last, answer] - lp[rows, last, wrong]).mean()
        return diff + (logits.mean(-1) * weights).sum() / weights.sum()

    return metric


METRICS = {"declared": declared_metric, "plain": plain_metric}


def model_for(family):
    return cached_model(family, **FAMILIES[family])


@functools.cache
def clean_cache(family, batch, corruption):
    _, model = model_for(family)
    clean, _, mask, _, _ = setup(batch, corruption)
    return model.run_with_cache(clean, mask)[1]


# ---- the naive reference ------------------------------------------------------------------------


def naive_loop(model, corrupted, mask, cache, metric, act, index_axes, rows):
    """One hooked forward per index row (layer, *index): the clean value at the index in every batch row."""
    out = []
    for layer, *index in rows:
        name = model.get_act_name(act, layer)
        clean = cache[name]

        def hook(x, hook, index=index, clean=clean):
            x = x.clone()
            where = [slice(None)] * x.dim()
            for axis, i in zip(index_axes, index):
                where[axis] = i
            x[tuple(where)] = clean[tuple(where)]
            return x

        with torch.no_grad():
            logits = model.run_with_hooks(corrupted, mask, fwd_hooks=[(name, hook)])
        out.append(float(metric(logits)))
    return torch.tensor(out)


def grid(model, name, seq):
    return list(itertools.product(*[range(n) for n in expected_shape(model, name, seq)]))


_NAIVE: dict = {}


def naive(family, batch, corruption, metric_name, name):
    """The naive result of a sweep on a named configuration, shaped like the grid (memoised)."""
    key = (family, batch, corruption, metric_name, name)
    if key not in _NAIVE:
        _, model = model_for(family)
        _, corrupted, mask, answer, wrong = setup(batch, corruption)
        metric = METRICS[metric_name](batch, mask, answer, wrong)
        act, axes = SWEEPS[name]
        cache = clean_cache(family, batch, corruption)
        flat = naive_loop(model, corrupted, mask, cache, metric, act, axes, grid(model, name, S))
        _NAIVE[key] = flat.view(expected_shape(model, name, S))
    return _NAIVE[key]


def swept(family, batch, corruption, metric_name, fn, **kwargs):
    _, model = model_for(family)
    _, corrupted, mask, answer, wrong = setup(batch, corruption)
    metric = METRICS[metric_name](batch, mask, answer, wrong)
    return fn(model, corrupted, clean_cache(family, batch, corruption), metric, attention_mask=mask, **kwargs)


def max_diff(a, b):
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


def sweeps_for(family):
    return [n for n in SWEEPS if not (n == "resid_mid" and family in PARALLEL)]


# ---- every sweep, every family ------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, name", [(f, n) for f in FAMILIES for n in sweeps_for(f)], ids=lambda v: v if isinstance(v, str) else None
)
def test_sweep_equals_the_naive_loop_on_a_padded_batch_with_a_declared_metric(family, name):
    _, model = model_for(family)
    got = swept(family, 3, "few", "declared", sweep_fn(name))
    assert tuple(got.shape) == expected_shape(model, name, S)
    assert got.dtype == torch.float32
    assert max_diff(got, naive(family, 3, "few", "declared", name)) <= TOL


COMBOS = [(1, "all", "plain"), (3, "few", "plain"), (3, "all", "declared"), (1, "few", "declared")]
SUBSET = ["resid_pre", "mlp_out", "attn_head_out_by_pos", "attn_head_v_by_pos", "attn_head_pattern_by_pos"]


@pytest.mark.parametrize("batch, corruption, metric_name", COMBOS, ids=["-".join(map(str, c)) for c in COMBOS])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sweeps_equal_the_naive_loop_for_each_batch_corruption_and_metric(family, batch, corruption, metric_name):
    for name in SUBSET:
        got = swept(family, batch, corruption, metric_name, sweep_fn(name))
        assert max_diff(got, naive(family, batch, corruption, metric_name, name)) <= TOL, name


def test_resid_mid_of_a_parallel_attention_model_is_an_unknown_site():
    _, model = model_for("neox")
    with pytest.raises(fxlens.SiteError, match=r"blocks\.0\.hook_resid_mid"):
        swept("neox", 1, "few", "declared", patching.get_act_patch_resid_mid)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_identical_clean_and_corrupted_runs_give_the_corrupted_metric_everywhere(family):
    _, model = model_for(family)
    _, corrupted, mask, answer, wrong = setup(3, "none")
    for metric_name in METRICS:
        metric = METRICS[metric_name](3, mask, answer, wrong)
        with torch.no_grad():
            base = float(metric(model(corrupted, mask)))
        for name in ("resid_pre", "attn_head_k_by_pos", "attn_head_pattern_all_pos"):
            got = swept(family, 3, "none", metric_name, sweep_fn(name))
            assert max_diff(got, torch.full_like(got, base)) <= TOL


def test_resid_pre_sweep_equals_a_loop_of_hf_pre_hooks():
    # a reference that does not go through fxlens at all
    hf, model = model_for("llama")
    clean, corrupted, mask, answer, wrong = setup(3, "all")
    with torch.no_grad():
        clean_h = hf(input_ids=clean, attention_mask=mask, output_hidden_states=True).hidden_states
    metric = declared_metric(3, mask, answer, wrong)
    want = torch.zeros(model.cfg.n_layers, S)
    for layer, pos in itertools.product(range(model.cfg.n_layers), range(S)):

        def pre(mod, args, kwargs, layer=layer, pos=pos):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[:, pos] = clean_h[layer][:, pos]
            return ((h,) + args[1:], kwargs) if args else (args, dict(kwargs, hidden_states=h))

        handle = hf.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            want[layer, pos] = float(metric(hf_logits(hf, corrupted, mask)))
        finally:
            handle.remove()
    got = swept("llama", 3, "all", "declared", patching.get_act_patch_resid_pre)
    assert max_diff(got, want) <= TOL


# ---- the stacked sweeps ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_sweeps_stack_the_parts_with_kv_heads_zero_padded(family):
    _, model = model_for(family)
    L, H, kv = model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads
    assert family != "llama" or kv < H  # the GQA case pads

    def ref(name):
        return naive(family, 3, "few", "declared", name)

    def pad(t):
        return torch.nn.functional.pad(t, (0, H - t.shape[-1]))

    block = swept(family, 3, "few", "declared", patching.get_act_patch_block_every)
    assert block.shape == (3, L, S)
    assert max_diff(block, torch.stack([ref("resid_pre"), ref("attn_out"), ref("mlp_out")])) <= TOL

    all_pos = swept(family, 3, "few", "declared", patching.get_act_patch_attn_head_all_pos_every)
    assert all_pos.shape == (5, L, H)
    parts = ["attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos", "attn_head_v_all_pos", "attn_head_pattern_all_pos"]
    assert max_diff(all_pos, torch.stack([pad(ref(p)) for p in parts])) <= TOL
    assert (all_pos[2:4, :, kv:] == 0).all()

    by_pos = swept(family, 3, "few", "declared", patching.get_act_patch_attn_head_by_pos_every)
    assert by_pos.shape == (5, L, S, H)
    parts = ["attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos", "attn_head_v_by_pos"]
    want = [pad(ref(p)) for p in parts] + [ref("attn_head_pattern_by_pos").permute(0, 2, 1)]  # layer head pos -> layer pos head
    assert max_diff(by_pos, torch.stack(want)) <= TOL
    assert (by_pos[2:4, :, :, kv:] == 0).all()


# ---- generic_activation_patch -------------------------------------------------------------------


def _generic(family, **kwargs):
    _, model = model_for(family)
    _, corrupted, mask, answer, wrong = setup(3, "few")
    metric = declared_metric(3, mask, answer, wrong)
    cache = clean_cache(family, 3, "few")
    return model, patching.generic_activation_patch(model, corrupted, cache, metric, attention_mask=mask, **kwargs)


def test_generic_patch_with_index_axis_names_equals_the_named_sweep():
    model, got = _generic("llama", patch_setter=patching.layer_pos_head_vector_patch_setter, activation_name="v",
                          index_axis_names=("layer", "pos", "head"))
    assert got.shape == (2, S, 2)
    assert max_diff(got, naive("llama", 3, "few", "declared", "attn_head_v_by_pos")) <= TOL


def test_generic_patch_returns_the_index_df_of_its_grid():
    model, (got, df) = _generic("gpt2", patch_setter=patching.layer_head_pos_pattern_patch_setter, activation_name="pattern",
                                index_axis_names=("layer", "head_index", "dest_pos"), return_index_df=True)
    assert isinstance(df, pd.DataFrame) and list(df.columns) == ["layer", "head_index", "dest_pos"]
    assert len(df) == got.numel()
    want = naive("gpt2", 3, "few", "declared", "attn_head_pattern_by_pos")
    for (layer, head, dest), value in zip(df.itertuples(index=False), got.flatten()):
        assert abs(float(value) - float(want[layer, head, dest])) <= TOL


@pytest.mark.parametrize("as_dataframe", [True, False], ids=["dataframe", "tuples"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_generic_patch_with_index_df_gives_one_value_per_row(family, as_dataframe):
    rows = [(1, 4, 0), (0, 2, 3), (0, 0, 1), (1, 2, 2), (1, 2, 2), (0, 3, 1)]  # unordered, a repeat, unchanged cells
    index_df = pd.DataFrame(rows, columns=["layer", "pos", "head"]) if as_dataframe else rows
    model, (got, df) = _generic(family, patch_setter=patching.layer_pos_head_vector_patch_setter, activation_name="z",
                                index_df=index_df, return_index_df=True)
    assert df is index_df
    assert got.shape == (len(rows),)
    want = naive(family, 3, "few", "declared", "attn_head_out_by_pos")
    assert max_diff(got, torch.stack([want[r] for r in rows])) <= TOL


def test_generic_patch_index_out_of_range_names_the_axis_and_site():
    with pytest.raises(IndexError, match=r"index 5 on axis pos of blocks\.1\.hook_resid_pre.*0\.\.4"):
        _generic("gpt2", patch_setter=patching.layer_pos_patch_setter, activation_name="resid_pre", index_df=[(1, 5)])


def test_generic_patch_needs_exactly_one_of_index_axis_names_and_index_df():
    with pytest.raises(ValueError, match="index_axis_names.*index_df"):
        _generic("gpt2", patch_setter=patching.layer_pos_patch_setter, activation_name="resid_pre")
    with pytest.raises(ValueError, match="not both"):
        _generic("gpt2", patch_setter=patching.layer_pos_patch_setter, activation_name="resid_pre",
                 index_axis_names=("layer", "pos"), index_df=[(0, 1)])


def test_custom_patch_setter_falls_back_to_a_hooked_loop(monkeypatch):
    # a setter fxlens cannot batch (it interpolates): one hooked forward per cell, as in TransformerLens
    def halfway_setter(corrupted_activation, index, clean_activation):
        _, pos = index
        corrupted_activation[:, pos] = (corrupted_activation[:, pos] + clean_activation[:, pos]) / 2
        return corrupted_activation

    monkeypatch.setattr(Sweep, "run", lambda *a, **k: pytest.fail("a custom setter must not be batched"))
    _, model = model_for("gpt2")
    _, corrupted, mask, answer, wrong = setup(3, "few")
    metric = plain_metric(3, mask, answer, wrong)
    cache = clean_cache("gpt2", 3, "few")
    got = patching.generic_activation_patch(model, corrupted, cache, metric, halfway_setter, "attn_out",
                                            index_axis_names=("layer", "pos"), attention_mask=mask)
    want = []
    for layer, pos in itertools.product(range(model.cfg.n_layers), range(S)):
        name = f"blocks.{layer}.hook_attn_out"

        def hook(x, hook, pos=pos, clean=cache[name]):
            x = x.clone()
            x[:, pos] = (x[:, pos] + clean[:, pos]) / 2
            return x

        with torch.no_grad():
            want.append(float(metric(model.run_with_hooks(corrupted, mask, fwd_hooks=[(name, hook)]))))
    assert max_diff(got, torch.tensor(want).view(model.cfg.n_layers, S)) <= TOL
    # a setter fxlens knows, passed by another name: its semantics are TransformerLens' -> same loop path
    same = lambda a, i, c: patching.layer_pos_patch_setter(a, i, c)  # noqa: E731
    got = patching.generic_activation_patch(model, corrupted, cache, declared_metric(3, mask, answer, wrong), same,
                                            "mlp_out", index_axis_names=("layer", "pos"), attention_mask=mask)
    assert max_diff(got, naive("gpt2", 3, "few", "declared", "mlp_out")) <= TOL


# ---- memory budget, progress, errors -------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_tiny_memory_budget_gives_the_same_result(family):
    for metric_name, name in (("declared", "attn_head_out_by_pos"), ("plain", "resid_pre")):
        small = swept(family, 3, "few", metric_name, sweep_fn(name), memory_budget=1e-6)
        default = swept(family, 3, "few", metric_name, sweep_fn(name))
        assert max_diff(small, default) <= TOL
        assert max_diff(small, naive(family, 3, "few", metric_name, name)) <= TOL


def test_progress_bar_runs_and_changes_nothing(capsys):
    got = swept("gpt2", 3, "all", "declared", patching.get_act_patch_resid_pre, progress=True)
    assert "patching" in capsys.readouterr().err
    assert max_diff(got, naive("gpt2", 3, "all", "declared", "resid_pre")) <= TOL


def test_a_sweep_over_a_site_outside_the_blocks_is_refused():
    _, model = model_for("gpt2")
    _, corrupted, mask, answer, wrong = setup(1, "all")
    cache = clean_cache("gpt2", 1, "all")
    feed = model._inputs(corrupted, mask)
    with pytest.raises(SweepError, match=r"hook_embed is not in a block"):
        Sweep(model).run([Cell(model.site("hook_embed"), (("pos", 0),))], feed, cache, metrics.logit(5))
    # through the TransformerLens-style API the name does not even resolve to a site of that layer
    with pytest.raises(fxlens.SiteError, match="hook_embed"):
        patching.generic_activation_patch(model, corrupted, cache, metrics.logit(5), patching.layer_pos_patch_setter,
                                          "hook_embed", index_axis_names=("layer", "pos"))


def test_a_clean_cache_without_the_site_names_it():
    _, model = model_for("llama")
    _, corrupted, mask, answer, wrong = setup(3, "few")
    clean = setup(3, "few")[0]
    _, partial = model.run_with_cache(clean, mask, names_filter="blocks.0.hook_attn_out")
    with pytest.raises(SweepError, match=r"clean cache holds no value for blocks\.1\.hook_attn_out"):
        patching.get_act_patch_attn_out(model, corrupted, partial, metrics.logit(5), attention_mask=mask)


def test_a_clean_cache_of_another_shape_is_refused():
    _, model = model_for("llama")
    _, corrupted, mask, _, _ = setup(3, "few")
    _, other = model.run_with_cache(tokens(3, S + 1), names_filter=lambda n: n.endswith("resid_pre"))
    with pytest.raises(SweepError, match=r"blocks\.0\.hook_resid_pre.*\(3, 6, 64\).*\(3, 5, 64\)"):
        patching.get_act_patch_resid_pre(model, corrupted, other, metrics.logit(5), attention_mask=mask)


@pytest.mark.parametrize("pos", [S + 2, -(S + 1)])
def test_a_declared_metric_reading_a_position_past_the_end_is_refused(pos):
    # logits[:, 7] of a 5-token run is an IndexError in TransformerLens; it must not wrap to position 2
    _, model = model_for("gpt2")
    _, corrupted, mask, _, _ = setup(1, "all")
    metric = metrics.logit_diff(5, 7, pos=pos)
    with pytest.raises((ValueError, IndexError)):
        metric(torch.zeros(1, S, 100))
    with pytest.raises((ValueError, IndexError)):
        patching.get_act_patch_resid_pre(model, corrupted, clean_cache("gpt2", 1, "all"), metric)


def test_a_metric_that_is_not_a_scalar_is_refused():
    _, model = model_for("gpt2")
    _, corrupted, mask, _, _ = setup(3, "all")
    cache = clean_cache("gpt2", 3, "all")
    with pytest.raises(SweepError, match="scalar"):
        patching.get_act_patch_resid_pre(model, corrupted, cache, lambda logits: logits[:, -1, 5], attention_mask=mask)


# ---- properties over random configurations --------------------------------------------------------

PROP_FAMILIES = ("llama", "gpt2", "bert")
PROP_SWEEPS = sorted(SWEEPS)


@functools.lru_cache(maxsize=None)
def prop_model(family, n_layers):
    hf = make(family, n_layers=n_layers, d_model=32, n_heads=2, n_kv_heads=1 if family == "llama" else None, d_mlp=64, seed=n_layers)
    return fxlens.Model.from_hf(hf)


@st.composite
def sweep_cases(draw):
    family = draw(st.sampled_from(PROP_FAMILIES))
    n_layers = draw(st.integers(1, 3))
    seq = draw(st.integers(2, 8))
    batch = draw(st.integers(1, 3))
    name = draw(st.sampled_from(PROP_SWEEPS))
    if name == "attn_head_pattern_dest_src_pos":
        seq = min(seq, 5)  # L * H * seq^2 naive forwards
    lengths = [seq] + draw(st.lists(st.integers(1, seq), min_size=batch - 1, max_size=batch - 1))
    changed = draw(st.sets(st.integers(0, seq - 1), max_size=seq))
    seed = draw(st.integers(0, 2**16))
    metric = draw(st.sampled_from(["logit_diff", "logit", "normalized", "plain"]))
    return family, n_layers, seq, batch, name, lengths, sorted(changed), seed, metric


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
@given(sweep_cases())
def test_property_sweep_equals_the_naive_loop(case):
    family, n_layers, seq, batch, name, lengths, changed, seed, metric_name = case
    model = prop_model(family, n_layers)
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 100, (batch, seq), generator=g)
    corrupted = clean.clone()
    corrupted[:, changed] = shifted(clean[:, changed])
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
    answer, wrong = torch.randint(0, 100, (batch,), generator=g), torch.randint(0, 100, (batch,), generator=g)
    last = mask.sum(1) - 1
    rows = torch.arange(batch)
    metric = {
        "logit_diff": metrics.logit_diff(answer, wrong, pos=last),
        "logit": metrics.logit(answer, pos=-1),
        "normalized": metrics.normalized(metrics.logit_diff(answer, wrong, pos=last, reduce="sum"), 2.0, -1.0),
        "plain": lambda logits: (logits[rows, last, answer] - logits.logsumexp(-1)[rows, last]).mean(),
    }[metric_name]
    _, cache = model.run_with_cache(clean, mask)
    act, axes = SWEEPS[name]
    got = sweep_fn(name)(model, corrupted, cache, metric, attention_mask=mask)
    shape = expected_shape(model, name, seq)
    assert tuple(got.shape) == shape
    index = list(itertools.product(*[range(n) for n in shape]))
    want = naive_loop(model, corrupted, mask, cache, metric, act, axes, index).view(shape)
    assert max_diff(got, want) <= TOL
