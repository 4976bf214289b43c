"""``fxlens.circuits`` on padded batches against textbook references written with plain HF hooks.

Every reference run (tests/circuit_references.py) is an HF forward given its own attention mask: the
clean run the clean mask, the corrupted or reference run the reference mask, which is the clean mask
unless a test gives another (the rule of issue 9 item 4: the reference run uses ``attention_mask``
unless ``reference_attention_mask`` / ``corrupted_attention_mask`` says otherwise). Batches hold 2-3
prompts of different lengths, padded on the left and on the right; outputs are compared at real
positions only and metrics read real positions only (a pad position's output is nobody's answer).

- Edge interventions (``run_with_edges``, ``run_with_circuit``; zero, corrupted and mean ablations) on
  llama with grouped-query attention, GPT-2 and GPT-NeoX, against ``hf_edges``; a reference mask that
  differs from the clean one; the error when the reference batch needs a mask of its own.
- ``path_patch`` (head and MLP senders; q, k, v and logits receivers; MLPs recomputed and frozen; both
  methods) against Wang et al.'s three steps with hooks; Gemma-1 with ``method="rows"``.
- ``edge_sweep`` rows against one ``run_with_edges`` each and against ``hf_edges``.
- ``eap_scores`` against autograd on the HF model (a zero added to each receiver's input).
- ``acdc``: the metric values it sees and the circuit it returns, against the HF reference; its default
  metric against the mask-aware one.
- Pad-token invariance of every function: with masks honoured, the ids under the mask change nothing.

Before issue 9 the reference run dropped its mask: with left padding the logits were off by 0.71-1.71
(corrupted) and 0.64-0.99 (mean), EAP scores by 0.16-0.38, and other pad ids changed 3 of ACDC's edges.
With right padding a causal model's real positions never read a pad, so a dropped mask shows there only
through a mean ablation, which must count only the reference rows' real tokens at each position.
"""

import functools

import pytest
import torch
from circuit_references import hf_alternatives, hf_eap, hf_edges, hf_path_patch, hf_sender_outputs, parse
from families import hf_logits, make, tokens
from test_circuits import PARALLEL, PP_CASES, WEIGHT_SCALE, edge_sets, full_edges_by_hand, model_for, upstream_heads

import fxlens
from fxlens import circuits
from fxlens.circuits import Circuit, acdc, eap_scores, edge_sweep, path_patch, run_with_circuit, run_with_edges

TOL = 1e-5
S = 6
SIDES = ("left", "right")
CLEAN_LENGTHS = (6, 4, 3)
# the corrupted prompts are longer than the clean ones, so that every position the reference pads is
# padded in the clean prompt too: a real clean position never reads a pad of the reference run
REF_LENGTHS = (6, 5, 4)
MEAN_LENGTHS = (5, 6)  # a mean-ablation set of another batch size



# ---- inputs ----------------------------------------------------------------------------------------


def mask_of(lengths, side):
    m = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            m[i, S - n :] = 1
        else:
            m[i, :n] = 1
    return m


def clean_ids():
    return tokens(3, S, seed=1)


def corrupt_ids():
    return tokens(3, S, seed=2)


def mean_ids():
    return tokens(2, S, seed=3)


def repad(ids, mask, seed=7):
    """``ids`` with other token ids under the mask (every padded id changes)."""
    g = torch.Generator().manual_seed(seed)
    new = ids.clone()
    pad = mask == 0
    new[pad] = 3 + (ids[pad] - 3 + torch.randint(1, 96, (int(pad.sum()),), generator=g)) % 97
    assert (new[pad] != ids[pad]).all() and torch.equal(new[~pad], ids[~pad])
    return new


def last_real(mask):
    return (mask * torch.arange(mask.shape[1])).argmax(1)


def real_metric(mask):
    """A metric reading each row's last two real positions."""
    rows, last = torch.arange(mask.shape[0]), last_real(mask)

    def metric(logits):
        return logits[rows, last].log_softmax(-1)[:, 5].mean() + logits[rows, last - 1, 7].mean()

    return metric


def kl_metric(full_logits, mask):
    """KL divergence of each row's last real position from the full model's (ACDC's metric, mask-aware)."""
    rows, last = torch.arange(mask.shape[0]), last_real(mask)
    ref = full_logits[rows, last].log_softmax(-1)

    def metric(logits):
        return torch.nn.functional.kl_div(logits[rows, last].log_softmax(-1), ref, log_target=True, reduction="batchmean")

    return metric


def real_diff(a, b, mask):
    """Largest difference of two [batch, pos, ...] outputs at the mask's real positions."""
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b)[mask.bool()].abs().max().item()


def full_edges(family, model):
    c = model.cfg
    return full_edges_by_hand(c.n_layers, c.n_heads, c.n_key_value_heads or c.n_heads, family in PARALLEL)


# ---- 1. edge interventions ---------------------------------------------------------------------------

EDGE_FAMILIES = ("llama", "gpt2", "neox", "opt")  # OPT: its MLP reads and writes a flattened residual
# (ablation, reference mask): "default" gives the reference no mask of its own (it takes the clean mask),
# "own" passes the reference batch's mask (different prompt lengths; for the mean another batch size)
EDGE_VARIANTS = [("zero", "default"), ("corrupted", "default"), ("corrupted", "own"), ("mean", "default"), ("mean", "own")]
EDGE_PARAMS = [
    pytest.param(f, side, a, rm, id=f"{f}-{side}-{a}-{rm}")
    for f in EDGE_FAMILIES for side in SIDES for a, rm in EDGE_VARIANTS
]


def reference_for(ablation, refmask, side):
    """(reference tokens, their mask for the HF reference, keyword arguments for fxlens)."""
    if ablation == "zero":
        return None, None, {}
    if ablation == "mean" and refmask == "own":
        ref, rm = mean_ids(), mask_of(MEAN_LENGTHS, side)
    elif refmask == "own":
        ref, rm = corrupt_ids(), mask_of(REF_LENGTHS, side)
    else:
        ref, rm = corrupt_ids(), mask_of(CLEAN_LENGTHS, side)
    return ref, rm, ({"reference_attention_mask": rm} if refmask == "own" else {})


@pytest.mark.parametrize("family, side, ablation, refmask", EDGE_PARAMS)
def test_edge_interventions_with_padding_equal_the_hooked_reference(family, side, ablation, refmask):
    hf, model = model_for(family)
    ids, cm = clean_ids(), mask_of(CLEAN_LENGTHS, side)
    ref, rm, kw = reference_for(ablation, refmask, side)
    alt = hf_alternatives(family, hf, ablation, ref, rm, ids)
    clean_logits = hf_logits(hf, ids, cm)
    for name in ("spanning", "one_layer"):
        edges = edge_sets(family)[name]
        want = hf_edges(family, hf, ids, cm, edges, alt)
        got = run_with_edges(model, ids, edges, ablation=ablation, reference=ref, attention_mask=cm, **kw)
        off = real_diff(got, want, cm)
        assert off <= TOL, (name, off)
        assert real_diff(want, clean_logits, cm) > 1e-3  # the edges matter
    # a circuit: every edge outside it replaced
    kept = edge_sets(family)["spanning"] + edge_sets(family)["one_layer"]
    outside = full_edges(family, model) - {tuple(e.split("->")) for e in kept}
    want = hf_edges(family, hf, ids, cm, outside, alt)
    got = run_with_circuit(model, ids, Circuit(kept), ablation=ablation, reference=ref, attention_mask=cm, **kw)
    off = real_diff(got, want, cm)
    assert off <= TOL, ("circuit", off)
    if ablation != "zero" and side == "left":
        # the check can tell a reference run without its mask from one with it
        dropped = hf_alternatives(family, hf, ablation, ref, None, ids)
        assert real_diff(want, hf_edges(family, hf, ids, cm, outside, dropped), cm) > 1e-2


@pytest.mark.parametrize("side", SIDES)
def test_hooked_reference_without_edges_is_the_masked_hf_forward(side):
    # anchors the reference: no edge replaced gives the HF logits, and its sender outputs are fxlens'
    hf, model = model_for("llama")
    ids, cm = clean_ids(), mask_of(CLEAN_LENGTHS, side)
    assert real_diff(hf_edges("llama", hf, ids, cm, [], {}), hf_logits(hf, ids, cm), cm) == 0.0
    values = hf_sender_outputs("llama", hf, ids, cm)
    got = circuits.sender_values(model, ids, cm)
    for i, s in enumerate(circuits.model_components(model).senders):
        assert real_diff(got[:, :, i], values[s.name], cm) <= TOL, s.name


@pytest.mark.parametrize("call", ["run_with_edges", "run_with_circuit", "edge_sweep"])
def test_a_reference_batch_of_another_shape_asks_for_its_mask(call):
    _, model = model_for("llama")
    ids, cm = clean_ids(), mask_of(CLEAN_LENGTHS, "left")
    kw = dict(ablation="mean", reference=mean_ids(), attention_mask=cm)
    with pytest.raises(ValueError, match="reference_attention_mask"):
        if call == "run_with_edges":
            run_with_edges(model, ids, ["input->m1"], **kw)
        elif call == "run_with_circuit":
            run_with_circuit(model, ids, Circuit(["input->m1"]), **kw)
        else:
            edge_sweep(model, ids, [["input->m1"], ["a0.h1->logits"]], real_metric(cm), **kw)


# ---- 2. path patching -----------------------------------------------------------------------------

PP_FAMILIES = ("llama", "gpt2", "neox", "opt")
PP_PARAMS = [(f, side, c, fr) for f in PP_FAMILIES for side in SIDES for c in PP_CASES for fr in (False, True)]


def check_path_patch(family, hf, model, side, case, freeze_mlps, methods, corrupt_lengths=CLEAN_LENGTHS, kw=None):
    receivers, senders = PP_CASES[case]
    clean, corrupt = clean_ids(), corrupt_ids()
    cm, rm = mask_of(CLEAN_LENGTHS, side), mask_of(corrupt_lengths, side)
    metric = real_metric(cm)
    first = min(parse(r)[1] if r != "logits" else model.cfg.n_layers for r in receivers)
    expected = senders if senders is not None else upstream_heads(model, first)
    want = {s: hf_path_patch(family, hf, clean, corrupt, cm, rm, metric, receivers, s, freeze_mlps) for s in expected}
    for method in methods:
        got = path_patch(model, clean, corrupt, metric, receivers=receivers, senders=senders, freeze_mlps=freeze_mlps,
                         attention_mask=cm, method=method, **(kw or {}))
        assert sorted(got) == sorted(expected)
        for s in expected:
            assert abs(got[s] - want[s]) <= TOL, (method, s, got[s], want[s])
    base = float(metric(hf_logits(hf, clean, cm)))
    assert max(abs(v - base) for v in want.values()) > 1e-4  # some path matters
    return want


@pytest.mark.parametrize("family, side, case, freeze_mlps", PP_PARAMS,
                         ids=[f"{f}-{side}-{c}-{'frozen' if fr else 'mlps'}" for f, side, c, fr in PP_PARAMS])
def test_path_patch_with_padding_equals_the_three_step_algorithm(family, side, case, freeze_mlps):
    hf, model = model_for(family)
    check_path_patch(family, hf, model, side, case, freeze_mlps, ("auto", "rows"))


@pytest.mark.parametrize("family", ["llama", "neox"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", ["kv_and_mlp_senders", "logits"])
def test_path_patch_with_a_corrupted_mask_of_its_own(family, side, case):
    hf, model = model_for(family)
    rm = mask_of(REF_LENGTHS, side)
    want = check_path_patch(family, hf, model, side, case, False, ("auto", "rows"), REF_LENGTHS,
                            {"corrupted_attention_mask": rm})
    if side == "right":
        return  # causal: a right pad comes after every real position, the corrupted mask changes no real output
    # the corrupted mask matters: the same algorithm with the clean mask on the corrupted run differs
    receivers, senders = PP_CASES[case]
    cm = mask_of(CLEAN_LENGTHS, side)
    other = {s: hf_path_patch(family, hf, clean_ids(), corrupt_ids(), cm, cm, real_metric(cm), receivers, s, False) for s in want}
    assert max(abs(want[s] - other[s]) for s in want) > 1e-4


@functools.cache
def gemma():
    hf = make("gemma", n_layers=3, n_kv_heads=2)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(WEIGHT_SCALE)
    return hf, fxlens.Model.from_hf(hf)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", ["kv_and_mlp_senders", "logits"])
def test_gemma_path_patch_rows_with_padding_equals_the_three_step_algorithm(side, case):
    # method="auto" refuses Gemma-1 today ("the MLP of model.layers.0 reads ... besides the residual
    # stream", issue 10); the literal rows method accepts it
    hf, model = gemma()
    check_path_patch("gemma", hf, model, side, case, False, ("rows",))


# ---- 3. edge sweeps ---------------------------------------------------------------------------------


def sweep_sets(family):
    sets = [edge_sets(family)[k] for k in ("q", "k", "v", "mlp", "one_receiver", "logits", "one_layer", "spanning")]
    return sets + [["input->a1.h0<q>", "a0.h1->a1.h2<q>"], ["input->m2"], []]


SWEEP_VARIANTS = [("zero", "default"), ("corrupted", "default"), ("corrupted", "own"), ("mean", "default")]
SWEEP_PARAMS = [(f, side, a, rm) for f in EDGE_FAMILIES for side in SIDES for a, rm in SWEEP_VARIANTS]


@pytest.mark.parametrize("family, side, ablation, refmask", [
    pytest.param(*p, id="-".join(p))
    for p in SWEEP_PARAMS])
def test_edge_sweep_rows_with_padding_equal_one_run_with_edges_each(family, side, ablation, refmask):
    _, model = model_for(family)
    ids, cm = clean_ids(), mask_of(CLEAN_LENGTHS, side)
    ref, _, kw = reference_for(ablation, refmask, side)
    metric = real_metric(cm)
    sets = sweep_sets(family)
    kw = dict(ablation=ablation, reference=ref, attention_mask=cm, **kw)
    got = edge_sweep(model, ids, sets, metric, **kw)
    with torch.no_grad():
        want = torch.tensor([float(metric(run_with_edges(model, ids, e, **kw))) for e in sets])
    assert got.shape == (len(sets),)
    assert (got.float() - want).abs().max().item() <= TOL
    got = edge_sweep(model, ids, [sets[0], sets[-2]], metric, **kw)  # one receiver per set: cells
    assert (got.float() - want[[0, -2]]).abs().max().item() <= TOL


@pytest.mark.parametrize("family, side, ablation, refmask", [
    pytest.param(*p, id="-".join(p)) for p in SWEEP_PARAMS])
def test_edge_sweep_with_padding_equals_the_hooked_reference(family, side, ablation, refmask):
    hf, model = model_for(family)
    ids, cm = clean_ids(), mask_of(CLEAN_LENGTHS, side)
    ref, rm, kw = reference_for(ablation, refmask, side)
    metric = real_metric(cm)
    alt = hf_alternatives(family, hf, ablation, ref, rm, ids)
    sets = [edge_sets(family)[k] for k in ("q", "one_layer", "spanning")] + [["input->m2"]]
    got = edge_sweep(model, ids, sets, metric, ablation=ablation, reference=ref, attention_mask=cm, **kw)
    want = [float(metric(hf_edges(family, hf, ids, cm, e, alt))) for e in sets]
    for g, w, e in zip(got.tolist(), want, sets):
        assert abs(g - w) <= TOL, (e, g, w)


# ---- 4. edge attribution patching -------------------------------------------------------------------

EAP_VARIANTS = {
    # variant: (keyword arguments for the corrupted run's mask, corrupted prompt lengths)
    "default": (lambda rm: {}, CLEAN_LENGTHS),
    "corrupted_mask": (lambda rm: {"corrupted_mask": rm}, CLEAN_LENGTHS),  # the old keyword, clean mask
    "corrupted_mask_own": (lambda rm: {"corrupted_mask": rm}, REF_LENGTHS),  # the old keyword, own mask
    "corrupted_attention_mask": (lambda rm: {"corrupted_attention_mask": rm}, REF_LENGTHS),
}
EAP_PARAMS = [pytest.param(f, side, v, id=f"{f}-{side}-{v}")
              for f in ("llama", "gpt2", "opt") for side in SIDES for v in EAP_VARIANTS]


@pytest.mark.parametrize("family, side, variant", EAP_PARAMS)
def test_eap_scores_with_padding_equal_autograd_on_the_hf_model(family, side, variant):
    hf, model = model_for(family)
    kw, lengths = EAP_VARIANTS[variant]
    clean, corrupt = clean_ids(), corrupt_ids()
    cm, rm = mask_of(CLEAN_LENGTHS, side), mask_of(lengths, side)
    metric = real_metric(cm)
    edges = full_edges(family, model)
    want = hf_eap(family, hf, clean, corrupt, cm, rm, metric, edges)
    got = eap_scores(model, clean, corrupt, metric, attention_mask=cm, **kw(rm))
    assert set(got) == set(want)
    scale = max(abs(v) for v in want.values())
    assert scale > 1e-2
    worst = max(abs(got[e] - want[e]) for e in want)
    # sums of batch x pos x d_model float32 products, in another order: 1e-5 of the largest score
    assert worst <= TOL * max(1.0, scale), worst


# ---- 5. ACDC ----------------------------------------------------------------------------------------

ACDC_THRESHOLD = 0.05  # at 0.05 the pad ids of a dropped mask change the circuit (left padding)


@functools.cache
def acdc_model():
    """llama with 2 layers, 2 query heads and 1 key/value head: 36 edges, so that ACDC runs in seconds."""
    hf = make("llama", n_layers=2, n_heads=2, n_kv_heads=1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(WEIGHT_SCALE)
    return hf, fxlens.Model.from_hf(hf)


def recording(metric):
    """``metric`` that also writes down every value it returns."""
    seen = []

    def fn(logits):
        value = metric(logits)
        seen.append(float(value))
        return value

    return fn, seen


@functools.cache
def acdc_run(side, repadded=False, own_mask=False, default_metric=False):
    """(circuit, metric values acdc saw) with a mask-aware KL metric (or acdc's default metric)."""
    hf, model = acdc_model()
    clean, corrupt = clean_ids(), corrupt_ids()
    cm, rm = mask_of(CLEAN_LENGTHS, side), mask_of(REF_LENGTHS if own_mask else CLEAN_LENGTHS, side)
    if repadded:
        clean, corrupt = repad(clean, cm, seed=11), repad(corrupt, rm, seed=12)
    metric, seen = recording(kl_metric(hf_logits(hf, clean_ids(), cm), cm))
    kw = {"corrupted_attention_mask": rm} if own_mask else {}
    found = acdc(model, clean, corrupt, threshold=ACDC_THRESHOLD, metric=None if default_metric else metric,
                 attention_mask=cm, **kw)
    return found, tuple(seen)


@pytest.mark.parametrize("side, own_mask", [
    ("left", False), ("right", False), ("left", True), ("right", True),
])
def test_acdc_circuit_with_padding_gives_the_metric_acdc_saw(side, own_mask):
    hf, model = acdc_model()
    clean, corrupt = clean_ids(), corrupt_ids()
    cm, rm = mask_of(CLEAN_LENGTHS, side), mask_of(REF_LENGTHS if own_mask else CLEAN_LENGTHS, side)
    found, seen = acdc_run(side, own_mask=own_mask)
    full = full_edges_by_hand(2, 2, 1, False)
    assert found.edges < full and len(found) > 0  # it prunes, and not everything
    metric = kl_metric(hf_logits(hf, clean, cm), cm)
    alt = hf_alternatives("llama", hf, "corrupted", corrupt, rm, clean)
    assert abs(seen[0] - float(metric(hf_edges("llama", hf, clean, cm, [], alt)))) <= TOL  # the full model: KL 0
    final = float(metric(hf_edges("llama", hf, clean, cm, full - found.edges, alt)))
    # acdc's running score is the metric of the circuit it keeps: the final circuit's metric is one it saw
    off = min(abs(final - v) for v in seen)
    assert off <= TOL, (final, off)
    # and every removal it accepted added less than the threshold
    n_receivers = len({r for _, r in full})
    assert final - seen[0] < ACDC_THRESHOLD * n_receivers


@pytest.mark.parametrize("side", ["left", "right"])
def test_acdc_with_padding_ignores_the_ids_under_the_mask(side):
    found, seen = acdc_run(side)
    again, seen_again = acdc_run(side, repadded=True)
    assert found == again
    assert len(seen) == len(seen_again)
    assert max(abs(a - b) for a, b in zip(seen, seen_again)) <= TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_acdc_default_metric_reads_each_rows_last_real_position(side):
    # the default is the KL divergence of the last position's distribution from the full model's; the
    # last position of a right-padded row is a pad
    found, want = acdc_run(side, default_metric=True)[0], acdc_run(side)[0]
    assert found == want, sorted(found.edges ^ want.edges)


# ---- 6. pad-token invariance of every function ----------------------------------------------------


def pointwise_mean(model, clean, corrupt, cm):
    # edges into the last MLP and the logits only, compared where every row is real: a per-position mean
    # over a padded reference batch mixes its rows' pad positions into the others' real ones
    edges = ["m1->m2", "a2.h3->logits", "input->logits"]
    every = cm.min(0, keepdim=True).values.expand_as(cm)
    return {"logits": (run_with_edges(model, clean, edges, ablation="mean", reference=corrupt, attention_mask=cm), every)}


# name -> fn(model, clean, corrupt, mask) returning {output: (value, the mask under which a tensor's
# entries are compared, or None to compare all of a value: a scalar, a dict of them, a circuit)}
INVARIANCE_CALLS = {
    "run_with_edges-zero": lambda model, clean, corrupt, cm: {"logits": (
        run_with_edges(model, clean, edge_sets("llama")["spanning"], ablation="zero", attention_mask=cm), cm)},
    "run_with_edges-corrupted": lambda model, clean, corrupt, cm: {"logits": (
        run_with_edges(model, clean, edge_sets("llama")["spanning"], ablation="corrupted", reference=corrupt,
                       attention_mask=cm), cm)},
    "run_with_edges-mean": pointwise_mean,
    "run_with_circuit-corrupted": lambda model, clean, corrupt, cm: {"logits": (
        run_with_circuit(model, clean, Circuit(edge_sets("llama")["spanning"]), ablation="corrupted", reference=corrupt,
                         attention_mask=cm), cm)},
    "edge_sweep-corrupted": lambda model, clean, corrupt, cm: {"rows": (
        edge_sweep(model, clean, sweep_sets("llama"), real_metric(cm), ablation="corrupted", reference=corrupt,
                   attention_mask=cm), None)},
    "path_patch-auto": lambda model, clean, corrupt, cm: {"senders": (
        path_patch(model, clean, corrupt, real_metric(cm), receivers=["a2.h1<k>", "a2.h0<v>"],
                   senders=["a0.h0", "a1.h2", "m0", "m1"], attention_mask=cm, method="auto"), None)},
    "path_patch-rows": lambda model, clean, corrupt, cm: {"senders": (
        path_patch(model, clean, corrupt, real_metric(cm), receivers=["logits"], senders=["a0.h0", "a1.h2", "m0", "a2.h1"],
                   attention_mask=cm, method="rows"), None)},
    "eap_scores": lambda model, clean, corrupt, cm: {"scores": (
        eap_scores(model, clean, corrupt, real_metric(cm), attention_mask=cm), None)},
    "sender_values": lambda model, clean, corrupt, cm: {"values": (circuits.sender_values(model, clean, cm), cm)},
    "acdc": None,  # on acdc_model(), through acdc_run
}
INVARIANCE_PARAMS = [pytest.param(n, side, id=f"{n}-{side}")
                     for n in INVARIANCE_CALLS for side in SIDES]


def outputs(name, side, repadded):
    if name.startswith("acdc"):
        found, seen = acdc_run(side, repadded=repadded)
        return {"circuit": (found, None)} | ({"metric values": (torch.tensor(seen), None)} if seen else {})
    _, model = model_for("llama")
    clean, corrupt, cm = clean_ids(), corrupt_ids(), mask_of(CLEAN_LENGTHS, side)
    if repadded:
        clean, corrupt = repad(clean, cm, seed=11), repad(corrupt, cm, seed=12)
    with torch.no_grad():
        return INVARIANCE_CALLS[name](model, clean, corrupt, cm)


@pytest.mark.parametrize("name, side", INVARIANCE_PARAMS)
def test_ids_under_the_mask_change_nothing(name, side):
    before, after = outputs(name, side, False), outputs(name, side, True)
    for key, (a, where) in before.items():
        b = after[key][0]
        if isinstance(a, Circuit):
            assert a == b, (key, sorted(a.edges ^ b.edges)[:5])
        elif isinstance(a, dict):
            assert a.keys() == b.keys()
            worst = max(abs(a[k] - b[k]) for k in a)
            assert worst <= TOL, (key, worst)
        elif where is None:
            assert a.shape == b.shape and (a - b).abs().max().item() <= TOL, (key, (a - b).abs().max().item())
        else:
            assert real_diff(a, b, where) <= TOL, (key, real_diff(a, b, where))
