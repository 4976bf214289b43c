"""Edges, edge sweeps, EAP and ACDC on post-norm models (Gemma 2, OLMo 2: each branch normalised before
it is added), against the definition written with plain HF hooks (``postnorm_reference``), right and
left padding with the corrupted run's own mask.

Definition (``fxlens.circuits.edges``): receiver r reads its entry plus, for each upstream branch l,
``post_norm_l(branch_l + D_{l,r}) - post_norm_l(branch_l)`` with ``D_{l,r}`` the sum of the replaced
edges' differences from that branch (values before the norm); the embedding's difference is added as
it is.
"""

import copy
import functools
import warnings

import pytest
import torch
import postnorm_reference
import transformers as T
from postnorm_reference import (all_receivers, all_senders, hf_alternatives, hf_eap, hf_edges, hf_run, hf_sender_values,
                                reaches, receiver_input)
from test_postnorm_circuits import BUILD, COMMON, ids, perturbed
from test_postnorm_circuits import pair as base_pair

from fxlens import circuits, metrics
from fxlens.circuits import Circuit

FAMILIES = list(BUILD)
# more sandwich-norm layouts, on fewer cases: grouped-query attention, Gemma 3's per-head q/k norms, OLMo 3
MORE = {
    "gemma2-gqa": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**{**COMMON, "num_key_value_heads": 2}, head_dim=16)),
    "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**{**COMMON, "num_key_value_heads": 2}, head_dim=16)),
    "olmo3": lambda: T.Olmo3ForCausalLM(T.Olmo3Config(**{**COMMON, "num_key_value_heads": 2}, eos_token_id=2, pad_token_id=1)),
}


@functools.cache
def pair(family):
    return base_pair(family) if family in BUILD else perturbed(MORE[family])
CLEAN_MASKS = {
    "none": None,
    "right": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
    "left": torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]),
}
CORRUPT_MASKS = {
    "none": None,
    "right": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
    "left": torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]),
}
EDGE_SETS = {
    "head->head q": ["a0.h1->a1.h0<q>"],
    "head->head k": ["a0.h2->a1.h1<k>"],
    "head->head v": ["a0.h3->a1.h1<v>"],
    "head->mlp": ["a0.h0->m0"],
    "mlp->head": ["m0->a1.h2<q>"],
    "head->logits": ["a1.h3->logits"],
    "one layer, one receiver": ["a0.h0->a1.h1<q>", "a0.h2->a1.h1<q>", "a0.h3->a1.h1<q>", "m0->a1.h1<q>", "input->a1.h1<q>"],
    "several layers": ["a0.h1->a1.h0<k>", "a0.h1->m1", "a0.h2->m1", "m1->logits", "a1.h3->logits", "a0.h0->logits",
                       "input->m0"],
}


def last_real(mask):
    return torch.tensor([5, 5]) if mask is None else (mask * torch.arange(mask.shape[1])).argmax(-1)


def metric_for(mask):
    return metrics.logit_diff(5, 7, pos=last_real(mask))


def real(logits, mask):
    """The logits at real (not padding) positions."""
    return logits if mask is None else logits[mask.bool()]


CASES = [(f, n, p) for f in FAMILIES for n in EDGE_SETS for p in CLEAN_MASKS]
CASES += [(f, n, p) for f in MORE for n in ("head->head k", "mlp->head", "one layer, one receiver", "several layers")
          for p in ("none", "left")]


def check_edges(reference, family, hf, model, edges, padding, input_normed=False):
    """``run_with_edges`` (corrupted and zero ablations, the corrupted run's own mask) equals
    ``reference.hf_edges`` (postnorm_reference or bert_reference) at real positions; the edges matter, and
    so does replaying the norms (the differences added after them give another run; ``input_normed``: the
    input's edges pass norms too, as the residual stream's own norms in BERT)."""
    clean, corrupt = ids(1), ids(2)
    mask, corrupt_mask = CLEAN_MASKS[padding], CORRUPT_MASKS[padding]
    with torch.no_grad():
        base = real(hf(input_ids=clean, attention_mask=mask).logits, mask)
    for ablation in ("corrupted", "zero"):
        got = circuits.run_with_edges(model, clean, edges, ablation=ablation, reference=corrupt, attention_mask=mask,
                                      reference_attention_mask=corrupt_mask)
        alt = reference.hf_alternatives(family, hf, ablation, corrupt, corrupt_mask, clean)
        want = reference.hf_edges(family, hf, clean, mask, edges, alt)
        torch.testing.assert_close(real(got, mask), real(want, mask), atol=2e-5, rtol=1e-5)
        assert (real(want, mask) - base).abs().max() > 1e-3  # the edges matter
        if input_normed or any(not e.startswith("input") for e in edges):
            wrong = reference.hf_edges(family, hf, clean, mask, edges, alt, after_norm=True)
            assert (real(wrong, mask) - real(want, mask)).abs().max() > 1e-3


@pytest.mark.parametrize("family, name, padding", CASES)
def test_edges_equal_the_definition_with_hf_hooks(family, name, padding):
    hf, model = pair(family)
    check_edges(postnorm_reference, family, hf, model, EDGE_SETS[name], padding)


@pytest.mark.parametrize("family", FAMILIES + list(MORE))
def test_edges_with_the_corrupted_run_itself_change_nothing(family):
    _, model = pair(family)
    edges = Circuit.full(model)
    got = circuits.run_with_edges(model, ids(1), edges, ablation="corrupted", reference=ids(1))
    torch.testing.assert_close(got, model(ids(1)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, padding", [(f, p) for f in FAMILIES for p in CLEAN_MASKS] + [(f, "left") for f in MORE])
def test_eap_is_the_gradient_of_the_definition_through_hf_hooks(family, padding):
    hf, model = pair(family)
    mask, corrupt_mask = CLEAN_MASKS[padding], CORRUPT_MASKS[padding]
    metric = metric_for(mask)
    got = circuits.eap_scores(model, ids(1), ids(2), metric, attention_mask=mask, corrupted_attention_mask=corrupt_mask)
    want = hf_eap(family, hf, ids(1), ids(2), mask, corrupt_mask, metric)
    assert got.keys() == want.keys()
    scale = max(abs(v) for v in want.values())
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= 1e-4 * scale, (worst, scale)
    # the norm's Jacobian matters: heads' scores are not their raw differences dotted with the gradient
    assert scale > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_eap_as_the_gradient_of_a_zero_edge_mask_equals_the_reference(family, monkeypatch):
    """Without norm programs EAP differentiates the Edges pass's mask itself: the same linearisation."""
    from fxlens.circuits import eap

    def unavailable(*args):
        raise RuntimeError("no norm programs")

    monkeypatch.setattr(eap, "_norm_jacobians", unavailable)
    hf, model = pair(family)
    mask, corrupt_mask = CLEAN_MASKS["right"], CORRUPT_MASKS["right"]
    metric = metric_for(mask)
    with pytest.warns(RuntimeWarning, match="gradient of the edge mask"):
        got = circuits.eap_scores(model, ids(1), ids(2), metric, attention_mask=mask, corrupted_attention_mask=corrupt_mask)
    want = hf_eap(family, hf, ids(1), ids(2), mask, corrupt_mask, metric)
    assert got.keys() == want.keys()
    scale = max(abs(v) for v in want.values())
    assert max(abs(got[k] - want[k]) for k in want) <= 1e-4 * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_eap_scores_are_the_slopes_of_the_definition(family):
    """Central differences of the reference (float64 weights; the HF norms compute in float32, hence the
    step of 1e-3): the metric with one edge's weight at +-eps moves by 2 eps * score."""
    hf, model = pair(family)
    metric = metric_for(None)
    got = circuits.eap_scores(model, ids(1), ids(2), metric)
    hf64 = copy.deepcopy(hf).double()
    alt = hf_alternatives(family, hf64, "corrupted", ids(2), None, ids(1))
    eps = 1e-3

    def at(e, w):
        def read(r, entry, cur):
            return receiver_input(hf64, r, entry, cur, {e[0]: w}, alt) if r == e[1] else None

        with torch.no_grad():
            return float(metric(hf_run(family, hf64, ids(1), None, read)[0]))

    for e in [("a0.h1", "a1.h0<q>"), ("m0", "a1.h2<v>"), ("a1.h3", "logits"), ("a0.h2", "m0"), ("input", "a1.h1<k>")]:
        slope = (at(e, eps) - at(e, -eps)) / (2 * eps)
        assert abs(slope - got[e]) <= 1e-4 + 1e-2 * abs(got[e]), (e, slope, got[e])


LAYERED_SETS = [EDGE_SETS[k] for k in ("head->head q", "mlp->head", "head->mlp", "head->logits", "one layer, one receiver")]
LAYERED_SETS += [[], ["a0.h1->a1.h2<q>", "a0.h1->a1.h2<k>", "m0->a1.h2<k>"], ["a1.h0->logits", "a1.h2->logits", "m1->logits"]]


@pytest.mark.parametrize("several_layers", [False, True])
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_edge_sweep_equals_single_interventions_of_the_reference(family, padding, several_layers):
    """Sets with receivers at one layer each run as rows of the layered engine (their differences
    normalised by the norm programs); one set with receivers at several layers sends every set to
    whole-model rows (the Edges pass)."""
    hf, model = pair(family)
    mask, corrupt_mask = CLEAN_MASKS[padding], CORRUPT_MASKS[padding]
    metric = metric_for(mask)
    sets = LAYERED_SETS + ([EDGE_SETS["several layers"]] if several_layers else [])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback from the layered engine
        got = circuits.edge_sweep(model, ids(1), sets, metric, ablation="corrupted", reference=ids(2), attention_mask=mask,
                                  reference_attention_mask=corrupt_mask)
    alt = hf_alternatives(family, hf, "corrupted", ids(2), corrupt_mask, ids(1))
    want = torch.tensor([float(metric(hf_edges(family, hf, ids(1), mask, s, alt))) for s in sets])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def check_acdc(reference, family, hf, model):
    """ACDC's circuit (corrupted ablation, threshold 0.05) evaluates to the KL ``reference.hf_edges`` gives it,
    and stays well below the full ablation's KL (every pruning step kept the metric within the threshold)."""
    clean, corrupt = ids(1), ids(2)
    with torch.no_grad():
        full_logits = hf(input_ids=clean).logits
    ref = full_logits[:, -1].log_softmax(-1)

    def kl(logits):
        return torch.nn.functional.kl_div(logits[:, -1].log_softmax(-1), ref, log_target=True, reduction="batchmean")

    found = circuits.acdc(model, clean, corrupt, threshold=0.05)
    full = Circuit.full(model)
    assert 0 < len(found) < len(full) and found.edges <= full.edges
    alt = reference.hf_alternatives(family, hf, "corrupted", corrupt, None, clean)
    want = float(kl(reference.hf_edges(family, hf, clean, None, full - found, alt)))
    got = float(kl(circuits.run_with_circuit(model, clean, found, ablation="corrupted", reference=corrupt).detach()))
    assert abs(got - want) <= 1e-5 * max(1.0, want)
    assert want < float(kl(reference.hf_edges(family, hf, clean, None, full, alt)))


def test_acdc_finds_a_circuit_on_gemma2_and_its_edges_evaluate_as_the_reference_says():
    check_acdc(postnorm_reference, "gemma2", *pair("gemma2"))


def test_senders_are_read_before_the_post_norm():
    hf, model = pair("gemma2")
    values = circuits.sender_values(model, ids(1))
    names = [s.name for s in circuits.model_components(model).senders]
    want = hf_sender_values("gemma2", hf, ids(1), None)
    torch.testing.assert_close(values[:, :, names.index("m0")], want["m0"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[:, :, names.index("a1.h2")], want["a1.h2"], atol=1e-5, rtol=1e-5)
    assert all_senders(hf) == names
    assert all_receivers(hf) == [r.name for r in circuits.model_components(model).receivers]
    assert reaches("a0.h0", "m0") and not reaches("m0", "a0.h0<q>")
