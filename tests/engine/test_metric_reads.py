"""Plain metric callables run on the logits they read, with the results they give on full logits.

References: the callable itself on full logits (for the traced graph), a sweep whose metric is forced
onto full logits (the path that never traces), and the declared metric of ``fxlens.metrics`` (the
same selected logits: results identical, not close).
"""

import warnings

import pytest
import torch
from conftest import cached_model
from families import tokens
from hypothesis import given, settings
from hypothesis import strategies as st

import fxlens.engine.metric_reads as mr
from fxlens import metrics, patching
from fxlens.engine.metric_reads import TracedMetric, Untraceable, traced

B, S, V = 3, 6, 11
ANSWERS = torch.tensor([1, 2, 3])

STYLES = {
    "tl_demo": (lambda l: (l[:, -1, 5] - l[:, -1, 7]).mean(), (5,), (5, 7)),
    "ioi_per_prompt": (lambda l: (l[torch.arange(3), -1, ANSWERS] - l[:, -2, 4]).mean(), (4, 5), (1, 2, 3, 4)),
    "log_softmax_after_select": (lambda l: l[:, -1].log_softmax(-1)[:, 3].mean(), (5,), tuple(range(V))),
    "gather": (lambda l: l[:, -1].gather(-1, ANSWERS[:, None]).mean(), (5,), (1, 2, 3)),
    "two_positions_sum": (lambda l: l[0, 2, 9] * 2 + l[1:, 3, 0].sum(), (2, 3), (0, 9)),
    "float_cast": (lambda l: l[:, -1, 4].double().mean().float(), (5,), (4,)),
}


def from_selected_on(reads: TracedMetric, logits: torch.Tensor) -> torch.Tensor:
    pos, tok = reads.select(S, B)
    sel = logits[torch.arange(B)[:, None, None], pos[:, :, None], tok[:, None, :]]
    return reads.from_selected(sel[None])[0]


@pytest.mark.parametrize("style", list(STYLES))
def test_traced_reads_are_what_the_callable_indexes_and_give_its_value(style):
    fn, positions, toks = STYLES[style]
    reads = traced(fn, (B, S, V), torch.float32)
    assert isinstance(reads, TracedMetric)
    assert reads.positions == positions and reads.tokens == toks
    for seed in range(3):
        logits = torch.randn(B, S, V, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(from_selected_on(reads, logits), fn(logits))


@pytest.mark.parametrize("fn, why", [
    (lambda l: l.sum() if l[0, 0, 0] > 0 else l.mean(), "could not be traced"),  # a branch on a value
    (lambda l: l[0, -1, l[0, -1].argmax()], "could not be traced"),  # an index computed from values
])
def test_value_dependent_metrics_are_not_traced(fn, why):
    result = traced(fn, (B, S, V), torch.float32)
    assert isinstance(result, Untraceable) and why in result


@pytest.mark.parametrize("fn", [
    lambda l: l.log_softmax(-1)[:, -1, 3].mean(),  # a reduction over every position first
    lambda l: l.view(-1, V)[-1, 3],  # a view the coordinates cannot take: reads everything
    lambda l: l[:, -1, 2:4],  # neither a scalar nor one value per prompt: full logits, where the sweep says so
    lambda l: "not a tensor",
])
def test_metrics_reading_everything_keep_full_logits(fn):
    assert traced(fn, (B, S, V), torch.float32) is None


def test_a_metric_with_one_value_per_prompt_is_traced_as_such():
    fn = lambda l: l[:, -1, 2] - l[:, 0, 4]  # noqa: E731
    reads = traced(fn, (B, S, V), torch.float32)
    assert reads.per_prompt and reads.positions == (0, 5) and reads.tokens == (2, 4)
    logits = torch.randn(B, S, V)
    assert torch.equal(from_selected_on(reads, logits), fn(logits))


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4), seq=st.integers(1, 7), vocab=st.integers(2, 9),
    data=st.data(),
)
def test_property_random_index_metrics_equal_themselves_on_full_logits(batch, seq, vocab, data):
    p = data.draw(st.lists(st.integers(-seq, seq - 1), min_size=1, max_size=3))
    v = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=3))
    weights = torch.tensor(data.draw(st.lists(st.floats(-2, 2), min_size=len(p), max_size=len(p))))

    def fn(logits):
        return sum(w * logits[:, pi, vi].mean() for w, pi, vi in zip(weights, p, (v + v)[: len(p)]))

    reads = traced(fn, (batch, seq, vocab), torch.float32)
    if reads is None:  # it reads every logit: nothing to select
        assert {pi % seq for pi in p} == set(range(seq)) and set((v + v)[: len(p)]) == set(range(vocab))
        return
    assert isinstance(reads, TracedMetric)
    logits = torch.randn(batch, seq, vocab, generator=torch.Generator().manual_seed(batch * seq))
    pos, tok = reads.select(seq, batch)
    sel = logits[torch.arange(batch)[:, None, None], pos[:, :, None], tok[:, None, :]]
    assert torch.equal(reads.from_selected(sel[None])[0], fn(logits))


# ---- in sweeps ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    _, model = cached_model("gpt2")
    clean = tokens(2, 8, seed=1)
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 7) % 100
    _, cache = model.run_with_cache(clean)
    return model, corrupted, cache


def full_logits_sweep(monkeypatch, fn, *args):
    """The sweep with tracing switched off: every row gets full logits (a new callable: no trace kept)."""
    *rest, metric = args
    with monkeypatch.context() as m:
        m.setattr(mr, "traced", lambda *a, **k: None)
        return fn(*rest, lambda logits: metric(logits))


SWEEPS = ["get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos", "get_act_patch_mlp_out"]


@pytest.mark.parametrize("sweep", SWEEPS)
def test_the_transformer_lens_lambda_equals_the_declared_metric_exactly(setup, sweep):
    model, corrupted, cache = setup
    fn = getattr(patching, sweep)
    declared = fn(model, corrupted, cache, metrics.logit_diff(5, 9))
    plain = fn(model, corrupted, cache, lambda logits: (logits[:, -1, 5] - logits[:, -1, 9]).mean())
    assert model.last_sweep_stats["metric_reads"] == "1 positions x 2 tokens"
    assert torch.equal(plain, declared)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_traced_sweeps_equal_the_full_logits_sweep(setup, sweep, monkeypatch):
    model, corrupted, cache = setup
    ans = torch.tensor([3, 4])

    def metric(logits):
        return logits[torch.arange(2), -1, ans].mean() - logits[:, -3].log_softmax(-1)[:, 7].mean()

    fn = getattr(patching, sweep)
    got = fn(model, corrupted, cache, metric)
    assert model.last_sweep_stats["metric_reads"] == f"2 positions x {model.cfg.d_vocab_out} tokens"
    want = full_logits_sweep(monkeypatch, fn, model, corrupted, cache, metric)
    assert model.last_sweep_stats["metric_reads"] == "full logits"
    assert (got - want).abs().max() <= 1e-5


def test_an_untraceable_metric_is_said_once_and_runs_on_full_logits(setup, monkeypatch):
    model, corrupted, cache = setup

    def metric(logits):
        return logits[0, -1, logits[0, -1].argmax()]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
        again = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    told = [w for w in caught if "runs on full logits" in str(w.message)]
    assert len(told) == 1 and "could not be traced" in str(told[0].message)
    assert model.last_sweep_stats["metric_reads"] == "full logits"
    assert torch.equal(got, again)
