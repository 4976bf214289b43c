"""Requests that used to fail with a raw internal error, or silently mean nothing, in sweeps and
circuits: each now gets a message that names the problem and the fix (issue 9's list)."""

import math

import pytest
import torch
from conftest import cached_model
from families import tokens

from fxlens import circuits, metrics, patching
from fxlens.circuits import Circuit, CircuitError
from fxlens.patching import SweepError


def gpt2():
    return cached_model("gpt2")[1]


def test_path_patch_with_no_receivers_says_what_a_receiver_is():
    model = gpt2()
    with pytest.raises(CircuitError, match=r"at least one receiver.*'a9.h6<q>'.*'logits'"):
        circuits.path_patch(model, tokens(1, 5, seed=1), tokens(1, 5, seed=2), metrics.logit(3), receivers=[])


def test_a_bare_edge_string_is_one_edge_not_its_characters():
    c = Circuit("a0.h0->a1.h0<k>")
    assert c.edges == {("a0.h0", "a1.h0<k>")}
    with pytest.raises(CircuitError, match="an edge is 'sender->receiver'"):
        Circuit("a0.h0")


@pytest.mark.parametrize("fn", ["eap", "acdc", "path_patch"])
def test_clean_and_corrupted_inputs_of_different_shapes_are_refused(fn):
    model = gpt2()
    clean, corrupted = tokens(2, 5, seed=1), tokens(2, 6, seed=2)
    call = {
        "eap": lambda: circuits.eap_scores(model, clean, corrupted, metrics.logit(3)),
        "acdc": lambda: circuits.acdc(model, clean, corrupted, threshold=0.1),
        "path_patch": lambda: circuits.path_patch(model, clean, corrupted, metrics.logit(3), receivers=["logits"]),
    }[fn]
    with pytest.raises(CircuitError, match=r"clean tokens have shape \(2, 5\) and the corrupted \(2, 6\).*same shape"):
        call()
    with pytest.raises(CircuitError, match=r"\(2, 5\) and the corrupted \(3, 5\)"):
        {"eap": lambda: circuits.eap_scores(model, clean, tokens(3, 5), metrics.logit(3)),
         "acdc": lambda: circuits.acdc(model, clean, tokens(3, 5), threshold=0.1),
         "path_patch": lambda: circuits.path_patch(model, clean, tokens(3, 5), metrics.logit(3), receivers=["logits"])}[fn]()


def test_run_with_circuit_refuses_a_reference_of_another_length_or_batch():
    model = gpt2()
    circuit = Circuit(["a0.h0->logits"])
    with pytest.raises(CircuitError, match="reference tokens have 6 positions and the input 5"):
        model.run_with_circuit(tokens(2, 5), circuit, ablation="corrupted", reference=tokens(2, 6))
    with pytest.raises(CircuitError, match=r"how='corrupted' takes each row's value from the same row .* 3 rows for 2"):
        model.run_with_circuit(tokens(2, 5), circuit, ablation="corrupted", reference=tokens(3, 5))
    with pytest.raises(CircuitError, match="needs reference activations"):
        model.run_with_circuit(tokens(2, 5), circuit, ablation="mean")


def test_a_reference_of_another_shape_than_the_mask_asks_for_its_own_mask():
    model = gpt2()
    mask = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(CircuitError, match="pass the reference's own mask as reference_attention_mask"):
        circuits.run_with_edges(model, tokens(2, 5), ["a0.h0->logits"], ablation="mean", reference=tokens(4, 5), attention_mask=mask)


@pytest.mark.parametrize("threshold", [math.nan, -0.1, "0.1", None])
def test_acdc_refuses_a_threshold_that_is_not_a_non_negative_number(threshold):
    with pytest.raises(CircuitError, match="threshold must be a number >= 0"):
        circuits.acdc(gpt2(), tokens(1, 5, seed=1), tokens(1, 5, seed=2), threshold=threshold)


def test_eap_with_a_metric_that_is_not_a_scalar_says_so():
    with pytest.raises(ValueError, match=r"must return a scalar; it returned shape \(2,\)"):
        circuits.eap_scores(gpt2(), tokens(2, 5, seed=1), tokens(2, 5, seed=2), lambda logits: logits[:, -1, 3])


def _sweep(metric, batch=2):
    model = gpt2()
    clean, corrupted = tokens(batch, 5, seed=1), tokens(batch, 5, seed=2)
    _, cache = model.run_with_cache(clean)
    return patching.get_act_patch_resid_pre(model, corrupted, cache, metric)


def test_a_metric_returning_a_string_is_refused_by_name():
    with pytest.raises(SweepError, match="must return a number or a scalar tensor; it returned str"):
        _sweep(lambda logits: "logit diff")


def test_a_metric_token_outside_the_vocabulary_is_refused_in_a_sweep():
    with pytest.raises(SweepError, match=r"reads token id 100, but the logits have 100 entries \(ids 0..99\)"):
        _sweep(metrics.logit_diff(100, 3))


def test_per_row_answers_of_the_wrong_batch_size_are_refused():
    with pytest.raises(SweepError, match="per-row answers or positions have 3 rows; the input has 2"):
        _sweep(metrics.logit_diff(torch.tensor([4, 5, 6]), torch.tensor([7, 8, 9])))


def test_a_metric_position_outside_the_input_is_refused():
    with pytest.raises(SweepError, match="reads position 9"):
        _sweep(metrics.logit(3, pos=9))
