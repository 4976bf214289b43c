"""Edges, EAP, edge sweeps and ACDC on post-norm encoders (BERT, RoBERTa, ELECTRA: the residual stream
itself normalised after each branch), against the definition written with plain HF hooks
(``bert_reference``), with no padding, right and left padding and the corrupted run's own mask.

Definition (``fxlens.circuits.edges``): receiver r reads the residual stream recomputed from the
embedding with every other component's output frozen at this run's value and the replaced edges'
senders' outputs replaced, every LayerNorm between sender and receiver replayed.
"""

import copy
import functools
import warnings

import pytest
import torch
import transformers as T
import bert_reference
from bert_reference import hf_alternatives, hf_eap, hf_edges, hf_run, hf_sender_values, receiver_input
from postnorm_reference import all_receivers, all_senders
from test_postnorm_circuits import ids, perturbed
from test_postnorm_edges import CLEAN_MASKS, CORRUPT_MASKS, EDGE_SETS, check_acdc, check_edges, metric_for

import fxlens
from fxlens import circuits, metrics
from fxlens.circuits import Circuit, CircuitError

COMMON = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=64)
BUILD = {
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(**COMMON)),
    "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(**COMMON, pad_token_id=1)),
    "electra": lambda: T.ElectraForMaskedLM(T.ElectraConfig(**COMMON, embedding_size=64)),
    # relative attention: every layer also reads the relative embeddings' norm
    "deberta-v2": lambda: T.DebertaV2ForMaskedLM(T.DebertaV2Config(**COMMON, relative_attention=True, max_relative_positions=8,
                                                                   pos_att_type=["c2p", "p2c"])),
    # LayerNorm written out by hand (mean, subtract, sqrt, divide): several steps of the residual stream.
    # q, k and v come from one fused projection, which the reference does not split: their receivers are
    # not compared
    "deberta": lambda: T.DebertaForMaskedLM(T.DebertaConfig(**COMMON)),
    "distilbert": lambda: T.DistilBertForMaskedLM(T.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                                     max_position_embeddings=64)),
}
SETS = {
    **EDGE_SETS,
    "many layers into the logits": ["input->logits", "a0.h1->logits", "m0->logits", "a1.h2->logits", "m1->logits"],
    "heads of two layers into an MLP": ["a0.h0->m1", "m0->m1", "a1.h3->m1", "a1.h0->m1", "input->m1"],
    "one layer's heads, several receivers": ["a0.h0->a1.h1<q>", "a0.h0->a1.h1<k>", "a0.h2->a1.h3<v>", "a0.h1->m1",
                                             "m0->a1.h1<k>"],
}


@functools.cache
def pair(family):
    return perturbed(BUILD[family])


CASES = [("bert", n, p) for n in SETS for p in CLEAN_MASKS]
CASES += [(f, n, p) for f in ("roberta", "electra", "deberta-v2", "distilbert") for n in ("head->head k", "mlp->head", "several layers",
                                                                           "many layers into the logits") for p in ("none", "right")]
CASES += [("deberta", n, p) for n in ("head->mlp", "head->logits", "many layers into the logits", "heads of two layers into an MLP")
          for p in ("none", "left")]


def fused_qkv(family, key) -> bool:
    """Whether the reference cannot compute this EAP key (a q/k/v receiver of DeBERTa v1)."""
    return family == "deberta" and key[1].endswith(("<q>", "<k>", "<v>"))


@pytest.mark.parametrize("family, name, padding", CASES)
def test_edges_equal_the_definition_with_hf_hooks(family, name, padding):
    """Every norm between sender and receiver replayed (``check_edges`` also checks that replaying them matters)."""
    hf, model = pair(family)
    check_edges(bert_reference, family, hf, model, SETS[name], padding, input_normed=True)


@pytest.mark.parametrize("family", list(BUILD))
def test_edges_with_the_corrupted_run_itself_change_nothing(family):
    _, model = pair(family)
    got = circuits.run_with_edges(model, ids(1), Circuit.full(model), ablation="corrupted", reference=ids(1))
    torch.testing.assert_close(got, model(ids(1)), atol=1e-5, rtol=1e-5)


def test_senders_and_receivers_are_the_references():
    hf, model = pair("bert")
    comp = circuits.model_components(model)
    assert [s.name for s in comp.senders] == all_senders(hf)
    assert [r.name for r in comp.receivers] == all_receivers(hf)
    values = circuits.sender_values(model, ids(1))
    want = hf_sender_values("bert", hf, ids(1), None)
    for name in ("input", "a1.h2", "m0"):
        torch.testing.assert_close(values[:, :, all_senders(hf).index(name)], want[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, padding", [("bert", p) for p in CLEAN_MASKS] + [("roberta", "left"), ("electra", "right"),
                                                                                ("deberta-v2", "right"), ("deberta", "left"),
                                                                                ("distilbert", "left")])
def test_eap_is_the_gradient_of_the_definition_through_hf_hooks(family, padding):
    hf, model = pair(family)
    mask, corrupt_mask = CLEAN_MASKS[padding], CORRUPT_MASKS[padding]
    metric = metric_for(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the designed path: no fallback message
        got = circuits.eap_scores(model, ids(1), ids(2), metric, attention_mask=mask, corrupted_attention_mask=corrupt_mask)
    want = hf_eap(family, hf, ids(1), ids(2), mask, corrupt_mask, metric)
    assert got.keys() == want.keys()
    want = {k: v for k, v in want.items() if not fused_qkv(family, k)}
    scale = max(abs(v) for v in want.values())
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= 1e-4 * scale, (worst, scale)
    assert scale > 1e-3


def test_eap_scores_are_the_slopes_of_the_definition():
    """Central differences of the reference in float64: the metric with one edge's weight at +-eps moves
    by 2 eps * score."""
    hf, model = pair("bert")
    metric = metric_for(None)
    got = circuits.eap_scores(model, ids(1), ids(2), metric)
    hf64 = copy.deepcopy(hf).double()
    alt = hf_alternatives("bert", hf64, "corrupted", ids(2), None, ids(1))
    eps = 1e-4

    def at(e, w):
        def read(r, entry, cur):
            return receiver_input(hf64, r, entry, cur, {e[0]: w}, alt) if r == e[1] else None

        with torch.no_grad():
            return float(metric(hf_run("bert", hf64, ids(1), None, read)[0]))

    for e in [("a0.h1", "a1.h0<q>"), ("m0", "a1.h2<v>"), ("a0.h3", "logits"), ("a0.h2", "m0"), ("input", "a1.h1<k>"),
              ("a0.h0", "m1")]:
        slope = (at(e, eps) - at(e, -eps)) / (2 * eps)
        assert abs(slope - got[e]) <= 1e-5 + 1e-3 * abs(got[e]), (e, slope, got[e])


SWEEP_SETS = [SETS[k] for k in ("head->head q", "mlp->head", "head->mlp", "head->logits", "one layer, one receiver",
                                "several layers", "many layers into the logits")]
SWEEP_SETS += [[], ["a0.h1->a1.h2<q>", "a0.h1->a1.h2<k>", "m0->a1.h2<k>"]]


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_edge_sweep_equals_single_interventions_of_the_reference(padding):
    hf, model = pair("bert")
    mask, corrupt_mask = CLEAN_MASKS[padding], CORRUPT_MASKS[padding]
    metric = metric_for(mask)
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        got = circuits.edge_sweep(model, ids(1), SWEEP_SETS, metric, ablation="corrupted", reference=ids(2),
                                  attention_mask=mask, reference_attention_mask=corrupt_mask, max_rows=4)
    assert all("add_" not in str(w.message) and "layer_norm_" not in str(w.message) for w in told)
    alt = hf_alternatives("bert", hf, "corrupted", ids(2), corrupt_mask, ids(1))
    want = torch.tensor([float(metric(hf_edges("bert", hf, ids(1), mask, s, alt))) for s in SWEEP_SETS])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_edge_sweeps_say_once_that_they_run_whole_model_rows():
    _, model = fxlens_bert()
    metric = metrics.logit_diff(5, 7)
    with pytest.warns(RuntimeWarning, match="normalises the residual stream itself.*whole-model row"):
        circuits.edge_sweep(model, ids(1), [["a0.h1->a1.h0<q>"]], metric)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        circuits.edge_sweep(model, ids(1), [["a0.h1->a1.h0<q>"]], metric)


@functools.cache
def fxlens_bert():
    """A capture of its own, so that the one-time message is not used up by other tests."""
    hf, _ = pair("bert")
    return hf, fxlens.Model.from_hf(hf)


def test_acdc_finds_a_circuit_on_bert_and_its_edges_evaluate_as_the_reference_says():
    check_acdc(bert_reference, "bert", *pair("bert"))


def test_path_patching_by_layers_refuses_and_names_what_works():
    _, model = pair("bert")
    with pytest.raises(CircuitError, match=r"normalises the residual stream itself.*so do edges.*every norm") as err:
        circuits.path_patch(model, ids(1), ids(2), metrics.logit_diff(5, 7), receivers=["logits"], method="layers")
    assert "add_" not in str(err.value) and "layer_norm_" not in str(err.value)  # no graph node names


def test_pre_norm_residual_streams_stay_sums_and_a_hand_written_norm_is_several_steps():
    from families import make

    for family in ("gpt2", "llama", "opt"):  # OPT flattens the residual around its MLP: a reshape, still a sum
        comp = fxlens.Model.from_hf(make(family)).derived.components
        assert comp.spine is None and comp.no_edges is None and comp.not_additive is None
    _, model = pair("deberta")  # mean, subtract, sqrt, divide, scale: each a step replayed in turn
    steps = model.derived.components.spine.steps
    assert sum(s.kind == "map" and not s.identity for s in steps) > 2 * 2
    _, model = pair("bert")
    assert [s.kind for s in model.derived.components.spine.steps] == ["add", "map"] * 4
