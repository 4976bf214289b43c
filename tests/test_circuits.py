"""``fxlens.circuits`` and weight edits against references written out with plain hooks and HF modules.

- Edge interventions: the textbook algorithm, one hooked forward that records every sender's output
  as it is computed and, at each receiver, recomputes what the receiver computes (the HF input norm
  and q/k/v projection, the HF MLP, the HF final norm and unembedding) from the residual at its read
  point minus each edge's sender output plus the sender's replacement. Zero, corrupted and mean
  ablations; single edges of every receiver kind, several edges into one receiver, edges into
  different receivers of one layer, edges spanning layers; llama with grouped-query attention, GPT-2's
  fused QKV, GPT-NeoX's and Phi's parallel attention and MLP.
- Path patching: the three steps of Wang et al. with hooks (cache; path run with heads frozen and the
  sender corrupted, recording the receivers' q/k/v; a run reading them), MLPs recomputed or frozen,
  head and MLP senders, q/k/v and logits receivers, several receivers, both implementations.
- The Circuit object: construction, networkx, JSON, DOT, repr, set operations, equality, ``full``.
- run_with_circuit, EAP, ACDC on a hand-built model whose induction circuit is known; EAP against
  finite differences of the edge intervention it linearises.
- Malformed circuits and models without a sum-of-components residual stream.
- Weight edits: in place in a ``with`` block (restored exactly, exceptions included) and on a copy.
"""

import copy
import functools
import json
import re

import networkx as nx
import pytest
import torch
from circuit_references import parse
from circuit_models import POSITIONAL, TRUE_CIRCUIT, induction_metric, induction_model, repeated_tokens
from conftest import cached_model
from families import hf_logits, make, tokens

import fxlens
from fxlens import circuits, patching
from fxlens.circuits import Circuit, CircuitError, path_patch, run_with_circuit, run_with_edges, sender_values
from fxlens.engine.weights import WeightEditError

TOL = 1e-5
FAMILIES = {
    "llama": {"n_layers": 3, "n_kv_heads": 2},  # k/v receivers index the 2 key/value heads
    "gpt2": {"n_layers": 3},  # fused QKV (Conv1D)
    "neox": {"n_layers": 3},  # parallel attention and MLP, fused interleaved QKV
    "phi": {"n_layers": 3},  # parallel attention and MLP sharing one input norm
}
PARALLEL = {"neox", "phi"}
# checked only against tests/circuit_references.py (tests/test_circuits_padding.py), not this file's hand-written runs
REFERENCE_ONLY = {
    "opt": {"n_layers": 3},  # no MLP module; the residual is flattened to [batch*pos, d] around the MLP
}
B, S = 2, 6
WEIGHT_SCALE = 5.0


@functools.cache
def model_for(family):
    """(hf, Model) with weights scaled up from HF's 0.02 init, so that single edges move the logits."""
    hf = make(family, **{**FAMILIES, **REFERENCE_ONLY}[family])
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(WEIGHT_SCALE)
    return hf, fxlens.Model.from_hf(hf)


def clean_ids():
    return tokens(B, S, seed=1)


def corrupt_ids():
    return tokens(B, S, seed=2)


def max_diff(a, b):
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


# ---- the HF modules behind each receiver ------------------------------------------------------------


def _heads(t, d_head):
    return t.view(*t.shape[:-1], -1, d_head)


def hf_qkv(family, hf, layer, x):
    """{q, k, v}: [batch, pos, heads, d_head] computed by the HF modules from the residual ``x``
    (before rotary embeddings, like ``hook_q``/``hook_k``)."""
    c = hf.config
    if family == "gpt2":
        blk = hf.transformer.h[layer]
        d_head = c.n_embd // c.n_head
        q, k, v = blk.attn.c_attn(blk.ln_1(x)).split(c.n_embd, dim=-1)
        return {"q": _heads(q, d_head), "k": _heads(k, d_head), "v": _heads(v, d_head)}
    if family == "neox":
        blk = hf.gpt_neox.layers[layer]
        d_head = c.hidden_size // c.num_attention_heads
        qkv = _heads(blk.attention.query_key_value(blk.input_layernorm(x)), 3 * d_head)
        q, k, v = qkv.chunk(3, dim=-1)
        return {"q": q, "k": k, "v": v}
    blk = hf.model.layers[layer]  # llama, phi: separate projections
    d_head = c.hidden_size // c.num_attention_heads
    h = blk.input_layernorm(x)
    a = blk.self_attn
    return {"q": _heads(a.q_proj(h), d_head), "k": _heads(a.k_proj(h), d_head), "v": _heads(a.v_proj(h), d_head)}


def hf_mlp(family, hf, layer, x):
    """The MLP's output computed by the HF modules from the residual ``x`` it reads."""
    if family == "gpt2":
        blk = hf.transformer.h[layer]
        return blk.mlp(blk.ln_2(x))
    if family == "neox":
        blk = hf.gpt_neox.layers[layer]
        return blk.mlp(blk.post_attention_layernorm(x))
    blk = hf.model.layers[layer]
    if family == "phi":  # attention and MLP read one shared norm of the residual
        return blk.mlp(blk.input_layernorm(x))
    return blk.mlp(blk.post_attention_layernorm(x))


def hf_unembed(family, hf, x):
    """The logits from the final residual ``x``: HF final norm and unembedding."""
    if family == "gpt2":
        return hf.lm_head(hf.transformer.ln_f(x))
    if family == "neox":
        return hf.lm_head(hf.gpt_neox.final_layer_norm(x))
    if family == "phi":
        return hf.lm_head(hf.model.final_layernorm(x))
    return hf.lm_head(hf.model.norm(x))


# ---- the naive edge reference ---------------------------------------------------------------------


def sender_outputs(model, ids):
    """{sender name: [batch, pos, d_model]} from a plain cached run (the alternative values)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    names = ["blocks.0.hook_resid_pre"] + [model.get_act_name(k, l) for l in range(L) for k in ("result", "mlp_out")]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=names)
    out = {"input": cache["resid_pre", 0]}
    for l in range(L):
        for h in range(H):
            out[f"a{l}.h{h}"] = cache["result", l][:, :, h]
        out[f"m{l}"] = cache["mlp_out", l]
    return out


def alternatives(model, ablation, reference):
    if ablation == "corrupted":
        return sender_outputs(model, reference)
    if ablation == "mean":
        return {k: v.mean(0, keepdim=True) for k, v in sender_outputs(model, reference).items()}
    assert ablation == "zero"
    return {k: torch.zeros_like(v[:1]) for k, v in sender_outputs(model, reference).items()}


def naive_edges(family, hf, model, ids, edges, alt):
    """Logits with each edge replaced, by one hooked forward: every receiver reads the residual at its
    read point, minus each replaced edge's sender output in this run, plus the sender's alternative."""
    L = model.cfg.n_layers
    into: dict = {}
    for e in edges:
        s, r = e.split("->")
        into.setdefault(r, []).append(s)
    cur: dict = {}

    def current(s):
        kind, layer, head = parse(s)
        if kind == "input":
            return cur["input"]
        if kind == "head":
            return cur[("result", layer)][:, :, head]
        return cur[("mlp", layer)]

    def read(r, resid):
        return resid + sum(alt[s] - current(s) for s in into[r])

    def recorder(key):
        def fn(v, hook):
            cur[key] = v.clone()

        return fn

    hooks = [("blocks.0.hook_resid_pre", recorder("input"))]
    for l in range(L):
        hooks.append((f"blocks.{l}.hook_resid_pre", recorder(("pre", l))))
        if family not in PARALLEL:
            hooks.append((f"blocks.{l}.hook_resid_mid", recorder(("mid", l))))
        hooks.append((f"blocks.{l}.attn.hook_result", recorder(("result", l))))
        for kind in "qkv":
            rs = [(r, parse(r)[2]) for r in into if parse(r)[:2] == (kind, l)]
            if rs:

                def qkv_hook(v, hook, l=l, kind=kind, rs=rs):
                    v = v.clone()
                    for r, head in rs:
                        v[:, :, head] = hf_qkv(family, hf, l, read(r, cur[("pre", l)]))[kind][:, :, head]
                    return v

                hooks.append((f"blocks.{l}.attn.hook_{kind}", qkv_hook))

        def mlp_hook(v, hook, l=l):
            if f"m{l}" in into:
                resid = cur[("pre", l)] if family in PARALLEL else cur[("mid", l)]
                v = hf_mlp(family, hf, l, read(f"m{l}", resid))
            cur[("mlp", l)] = v.clone()
            return v

        hooks.append((f"blocks.{l}.hook_mlp_out", mlp_hook))
    hooks.append((f"blocks.{L - 1}.hook_resid_post", recorder("post")))
    with torch.no_grad():
        logits = model.run_with_hooks(ids, fwd_hooks=hooks)
        if "logits" in into:
            logits = hf_unembed(family, hf, read("logits", cur["post"]))
    return logits


def edge_sets(family):
    """Named edge sets for a 3-layer model with 4 heads (2 key/value heads for llama)."""
    sets = {
        "q": ["input->a1.h0<q>"],
        "k": ["a0.h3->a2.h1<k>"],  # llama: key/value head 1 (query heads 2 and 3)
        "v": ["m0->a1.h1<v>"],
        "mlp": ["a0.h1->m1"] + ([] if family in PARALLEL else ["a1.h2->m1"]),
        "logits": ["m2->logits", "a2.h3->logits", "input->logits"],
        "one_receiver": ["input->a1.h0<q>", "a0.h2->a1.h0<q>", "m0->a1.h0<q>"],
        "one_layer": ["input->a1.h0<q>", "a0.h2->a1.h0<q>", "a0.h1->a1.h2<q>", "a0.h0->a1.h1<k>",
                      "m0->a1.h0<k>", "m0->a1.h0<v>", "input->a1.h1<v>", "a0.h3->m1"],
        "spanning": ["input->a0.h1<v>", "input->m0", "a0.h0->a1.h3<q>", "a1.h0->a2.h0<k>", "a0.h0->m1",
                     "m1->a2.h1<v>", "a1.h2->logits", "m2->logits"] + ([] if family in PARALLEL else ["a0.h3->m0"]),
    }
    return sets


EDGE_CASES = [(f, s, a) for f in FAMILIES for s in edge_sets(f) for a in ("zero", "corrupted", "mean")]


@pytest.mark.parametrize("family, edge_set, ablation", EDGE_CASES, ids=["-".join(c) for c in EDGE_CASES])
def test_edge_intervention_equals_the_hooked_reference(family, edge_set, ablation):
    hf, model = model_for(family)
    edges = edge_sets(family)[edge_set]
    ids, ref = clean_ids(), corrupt_ids()
    if ablation == "mean":
        ref = tokens(3, S, seed=3)  # the mean is over another batch size
    want = naive_edges(family, hf, model, ids, edges, alternatives(model, ablation, ref))
    got = run_with_edges(model, ids, edges, ablation=ablation, reference=None if ablation == "zero" else ref)
    assert max_diff(got, want) <= TOL
    assert max_diff(got, hf_logits(hf, ids)) > 1e-3  # the edges matter: the check is not vacuous


def test_an_edge_into_a_parallel_mlp_leaves_its_layers_heads_alone():
    # Phi's attention and MLP read one shared input norm: an edge into m0 must change what the MLP reads
    # and nothing that the heads of layer 0 read
    _, model = model_for("phi")
    ids = clean_ids()
    heads = [f"input->a0.h{h}<{k}>" for h in range(model.cfg.n_heads) for k in "qkv"]
    mlp_only = run_with_edges(model, ids, ["input->m0"], ablation="zero")
    mlp_and_heads = run_with_edges(model, ids, ["input->m0"] + heads, ablation="zero")
    assert max_diff(mlp_only, mlp_and_heads) > 1e-3


def test_reference_recovers_the_hf_logits_and_model_method_matches():
    hf, model = model_for("llama")
    ids = clean_ids()
    assert max_diff(naive_edges("llama", hf, model, ids, [], {}), hf_logits(hf, ids)) <= TOL
    edges = edge_sets("llama")["spanning"]
    a = run_with_edges(model, ids, edges, ablation="corrupted", reference=corrupt_ids())
    b = model.run_with_edges(ids, edges, ablation="corrupted", reference=corrupt_ids())
    assert torch.equal(a, b)


def test_edge_ablation_with_a_tensor_of_sender_outputs():
    hf, model = model_for("gpt2")
    ids, ref = clean_ids(), corrupt_ids()
    edges = edge_sets("gpt2")["spanning"]
    alt = sender_values(model, ref)
    comp = circuits.model_components(model)
    assert alt.shape == (B, S, len(comp.senders), model.cfg.d_model)
    want = run_with_edges(model, ids, edges, ablation="corrupted", reference=ref)
    assert max_diff(run_with_edges(model, ids, edges, ablation=alt), want) <= TOL


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
@pytest.mark.parametrize("ablation", ["zero", "corrupted"])
def test_edge_sweep_rows_equal_one_run_with_edges_each(family, ablation):
    # one receiver per set (cells of a patching sweep), receivers at one point (rows join there) and
    # receivers spanning layers (full-model rows) all equal the plain edge intervention
    _, model = model_for(family)
    ids, ref = clean_ids(), corrupt_ids()
    sets = [edge_sets(family)[k] for k in ("q", "k", "v", "mlp", "one_receiver", "logits", "one_layer", "spanning")]
    # receivers at one point: queries only (a query at position 0 matters to nothing but itself) and
    # keys and values, whose changes at early positions reach every later one
    sets += [["input->a1.h0<q>", "a0.h1->a1.h2<q>"], ["a0.h0->a1.h1<k>", "input->a1.h1<v>", "m0->a1.h0<q>"], ["input->m2"], []]
    reference = None if ablation == "zero" else ref
    got = circuits.edge_sweep(model, ids, sets, pp_metric, ablation=ablation, reference=reference)
    with torch.no_grad():
        want = torch.tensor([float(pp_metric(run_with_edges(model, ids, e, ablation=ablation, reference=reference))) for e in sets])
    assert got.shape == (len(sets),)
    assert max_diff(got.float(), want) <= TOL
    got = circuits.edge_sweep(model, ids, [sets[0], sets[-2]], pp_metric, ablation=ablation, reference=reference)  # cells only
    assert max_diff(got.float(), want[[0, -2]]) <= TOL


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edge_rows_of_different_starts_share_calls_and_equal_one_run_with_edges_each(family):
    # an ablation tensor that differs from the clean sender outputs only from a chosen position on gives
    # each set its own first changed position: the sets' rows are packed into one call per layer
    _, model = model_for(family)
    ids = clean_ids()
    alt = sender_values(model, ids).clone()
    names = [s.name for s in circuits.model_components(model).senders]
    g = torch.Generator().manual_seed(4)
    for sender, start in (("a0.h1", 1), ("a0.h2", 3), ("m0", 4), ("input", 2)):
        i = names.index(sender)
        alt[:, start:, i] += torch.randn(alt[:, start:, i].shape, generator=g)
    sets = [["a0.h1->a1.h0<k>", "a0.h1->a1.h1<v>"], ["a0.h2->a1.h0<q>", "a0.h2->a1.h1<k>"],
            ["m0->a1.h1<v>", "m0->a1.h2<q>"], ["input->a1.h0<v>", "a0.h2->a1.h1<k>"]]
    got = circuits.edge_sweep(model, ids, sets, pp_metric, ablation=alt)
    assert model.last_sweep_stats["block_calls"] <= model.cfg.n_layers  # every start in one call per layer
    with torch.no_grad():
        want = torch.tensor([float(pp_metric(run_with_edges(model, ids, e, ablation=alt))) for e in sets])
    assert max_diff(got.float(), want) <= TOL


# ---- path patching -----------------------------------------------------------------------------------


def pp_metric(logits):
    return logits[:, -1].log_softmax(-1)[:, 5].mean() + logits[:, -2, 7].mean()


def naive_path_patch(model, clean, corrupt, metric, receivers, sender, freeze_mlps):
    """Wang et al.'s three steps with hooks."""
    L = model.cfg.n_layers
    names = [model.get_act_name(k, l) for l in range(L) for k in ("z", "mlp_out")]
    with torch.no_grad():
        _, cc = model.run_with_cache(clean, names_filter=names)
        _, rc = model.run_with_cache(corrupt, names_filter=names)
    s_kind, s_layer, s_head = parse(sender)
    recorded = {}
    path_hooks = []
    for l in range(L):
        z = model.get_act_name("z", l)

        def freeze(v, hook, z=z, l=l):
            v = cc[z].clone()
            if s_kind == "head" and s_layer == l:
                v[:, :, s_head] = rc[z][:, :, s_head]
            return v

        path_hooks.append((z, freeze))
        mlp = model.get_act_name("mlp_out", l)
        if s_kind == "mlp" and s_layer == l:
            path_hooks.append((mlp, lambda v, hook, mlp=mlp: rc[mlp]))
        elif freeze_mlps:
            path_hooks.append((mlp, lambda v, hook, mlp=mlp: cc[mlp]))
    sites = {}
    for r in receivers:
        if r == "logits":
            continue
        kind, layer, head = parse(r)
        sites.setdefault(model.get_act_name(kind, layer), []).append(head)
    for name in sites:
        path_hooks.append((name, lambda v, hook: recorded.__setitem__(hook.name, v.clone())))
    with torch.no_grad():
        logits = model.run_with_hooks(clean, fwd_hooks=path_hooks)
        if receivers == ["logits"]:
            return float(metric(logits))

        def put(v, hook):
            v = v.clone()
            for head in sites[hook.name]:
                v[:, :, head] = recorded[hook.name][:, :, head]
            return v

        logits = model.run_with_hooks(clean, fwd_hooks=[(name, put) for name in sites])
    return float(metric(logits))


def upstream_heads(model, layer):
    return [f"a{l}.h{h}" for l in range(layer) for h in range(model.cfg.n_heads)]


PP_CASES = {
    # name: (receivers, senders or None for the default, every head upstream)
    "q": (["a2.h0<q>"], None),
    "kv_and_mlp_senders": (["a2.h1<k>", "a2.h0<v>"], ["a0.h0", "a1.h2", "m0", "m1", "a0.h3"]),
    "several_layers": (["a2.h2<q>", "a1.h0<k>", "a1.h1<v>"], None),
    "logits": (["logits"], ["a0.h1", "a1.h0", "a2.h3", "m0", "m1", "m2"]),
}
PP_PARAMS = [(f, c, fr, meth) for f in FAMILIES for c in PP_CASES for fr in (False, True) for meth in ("auto", "rows")]


@pytest.mark.parametrize("family, case, freeze_mlps, method", PP_PARAMS,
                         ids=[f"{f}-{c}-{'frozen' if fr else 'mlps'}-{m}" for f, c, fr, m in PP_PARAMS])
def test_path_patch_equals_the_three_step_algorithm(family, case, freeze_mlps, method):
    _, model = model_for(family)
    receivers, senders = PP_CASES[case]
    clean, corrupt = clean_ids(), corrupt_ids()
    got = path_patch(model, clean, corrupt, pp_metric, receivers=receivers, senders=senders,
                     freeze_mlps=freeze_mlps, method=method)
    first = min(parse(r)[1] if r != "logits" else model.cfg.n_layers for r in receivers)
    expected_senders = senders if senders is not None else upstream_heads(model, first)
    assert sorted(got) == sorted(expected_senders)
    want = {s: naive_path_patch(model, clean, corrupt, pp_metric, receivers, s, freeze_mlps) for s in expected_senders}
    for s in expected_senders:
        assert abs(got[s] - want[s]) <= TOL, (s, got[s], want[s])
    with torch.no_grad():
        base = float(pp_metric(model(clean)))
    assert max(abs(v - base) for v in want.values()) > 1e-4  # some path matters


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", ["q", "kv_and_mlp_senders", "several_layers"])
@pytest.mark.parametrize("changed_from", [2, S - 1])
def test_path_patch_with_a_shared_prefix_equals_the_three_step_algorithm(family, case, changed_from):
    """Clean and corrupted prompts share their first tokens: rows run from the first changed position
    on the clean run's keys and values (and the metric's earlier position reads the clean logits)."""
    _, model = model_for(family)
    receivers, senders = PP_CASES[case]
    clean = clean_ids()
    corrupt = clean.clone()
    corrupt[:, changed_from:] = corrupt_ids()[:, changed_from:]
    got = path_patch(model, clean, corrupt, pp_metric, receivers=receivers, senders=senders)
    first = min(parse(r)[1] for r in receivers)
    for s in senders if senders is not None else upstream_heads(model, first):
        want = naive_path_patch(model, clean, corrupt, pp_metric, receivers, s, False)
        assert abs(got[s] - want) <= TOL, (s, got[s], want)


def test_freezing_mlps_changes_the_path_through_an_mlp():
    _, model = model_for("gpt2")
    clean, corrupt = clean_ids(), corrupt_ids()
    kw = dict(receivers=["a2.h0<q>"], senders=["a0.h1"])
    a = path_patch(model, clean, corrupt, pp_metric, freeze_mlps=False, **kw)["a0.h1"]
    b = path_patch(model, clean, corrupt, pp_metric, freeze_mlps=True, **kw)["a0.h1"]
    assert abs(a - b) > 1e-6


def test_path_patch_errors():
    _, model = model_for("llama")
    clean, corrupt = clean_ids(), corrupt_ids()
    with pytest.raises(CircuitError, match="not both"):
        path_patch(model, clean, corrupt, pp_metric, receivers=["logits", "a1.h0<q>"])
    with pytest.raises(CircuitError, match="run_with_edges"):
        path_patch(model, clean, corrupt, pp_metric, receivers=["m1"])
    with pytest.raises(CircuitError, match="input"):
        path_patch(model, clean, corrupt, pp_metric, receivers=["a1.h0<q>"], senders=["input"])
    with pytest.raises(CircuitError, match="does not reach"):
        path_patch(model, clean, corrupt, pp_metric, receivers=["a1.h0<q>"], senders=["a1.h2"])
    with pytest.raises(CircuitError, match="unknown receiver"):
        path_patch(model, clean, corrupt, pp_metric, receivers=["a1.h0<z>"])
    assert path_patch(model, clean, corrupt, pp_metric, receivers=["a0.h0<q>"]) == {}  # nothing upstream


# ---- the Circuit object ----------------------------------------------------------------------------

EDGES = ["input->a0.h0<q>", "a0.h0->a1.h0<k>", "a1.h0->logits", "m0->a1.h2<v>", "input->m1"]


def test_from_edges_accepts_strings_and_tuples_and_strips_spaces():
    a = Circuit.from_edges(EDGES)
    b = Circuit.from_edges([tuple(e.split("->")) for e in EDGES])
    c = Circuit([" input -> a0.h0<q>", *EDGES[1:], EDGES[0]])  # spaces, a duplicate
    assert a == b == c and len(a) == 5
    assert a.edges == frozenset(tuple(e.split("->")) for e in EDGES)
    assert list(a) == sorted(tuple(e.split("->")) for e in EDGES)
    assert "a0.h0->a1.h0<k>" in a and ("a0.h0", "a1.h0<k>") in a and "a0.h0->a1.h0<q>" not in a


def test_equality_hash_and_set_operations():
    a, b = Circuit(EDGES[:3]), Circuit(EDGES[2:])
    assert a | b == Circuit(EDGES)
    assert a - b == Circuit(EDGES[:2])
    assert a - EDGES[1:] == Circuit(EDGES[:1])  # a plain iterable of edges
    assert a & b == Circuit(EDGES[2:3]) and a & EDGES[:1] == Circuit(EDGES[:1]) and (a & Circuit()) == Circuit()
    assert a | EDGES[3:] == Circuit(EDGES[:3] + EDGES[3:])
    assert Circuit(EDGES) == Circuit(reversed(EDGES)) and hash(Circuit(EDGES)) == hash(Circuit(reversed(EDGES)))
    assert len({Circuit(EDGES), Circuit(list(EDGES)), Circuit(EDGES[1:])}) == 2
    assert Circuit(EDGES) != Circuit(EDGES[1:]) and Circuit(EDGES) != set(EDGES) and Circuit() == Circuit([])
    assert (a | b).edges is not a.edges and a == Circuit(EDGES[:3])  # operations leave the operands alone


def test_networkx_round_trip():
    c = Circuit(EDGES)
    g = c.to_networkx()
    assert isinstance(g, nx.DiGraph) and set(g.edges()) == c.edges
    assert Circuit.from_networkx(g) == c
    h = nx.DiGraph([("input", "m0"), ("m0", "a1.h0<q>")])  # "m0" is a sender and a receiver
    assert Circuit.from_networkx(h) == Circuit(["input->m0", "m0->a1.h0<q>"])


def test_json_round_trip_as_string_and_file(tmp_path):
    c = Circuit(EDGES)
    text = c.to_json()
    data = json.loads(text)
    assert data["format"] == "fxlens.circuit/1" and sorted(data["edges"]) == sorted(EDGES)
    assert Circuit.from_json(text) == c
    path = tmp_path / "circuit.json"
    assert c.to_json(str(path)) == text
    assert path.read_text() == text
    assert Circuit.from_json(str(path)) == c
    assert Circuit.from_json(path) == c  # a pathlib.Path
    c.to_json(tmp_path / "again.json")
    assert Circuit.from_json(tmp_path / "again.json") == c
    assert Circuit.from_json(Circuit().to_json()) == Circuit()


def test_json_with_the_wrong_format_is_refused(tmp_path):
    with pytest.raises(CircuitError, match="not an fxlens circuit"):
        Circuit.from_json(json.dumps({"format": "acdc/2", "edges": EDGES}))
    with pytest.raises(CircuitError, match="not an fxlens circuit"):
        Circuit.from_json(json.dumps({"edges": EDGES}))
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "fxlens.circuit/0", "edges": []}))
    with pytest.raises(CircuitError, match="format"):
        Circuit.from_json(str(path))


def test_to_dot_and_repr():
    c = Circuit(EDGES)
    dot = c.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    for e in EDGES:
        s, r = e.split("->")
        assert f'"{s}" -> "{r}";' in dot
    assert dot.count("->") == len(EDGES)
    text = repr(c)
    assert "5 edges" in text
    lines = text.splitlines()[1:]
    assert sorted(line.split("<-")[0].strip() for line in lines) == sorted({e.split("->")[1] for e in EDGES})
    assert "a0.h0<q>" in text and "a1.h2<v>" in text and "logits" in text


def full_edges_by_hand(L, H, K, parallel):
    """Every edge of a model from its dimensions: a receiver reads every sender that writes before it."""
    edges = set()
    for l in range(L):
        before = ["input"] + [f"a{j}.h{h}" for j in range(l) for h in range(H)] + [f"m{j}" for j in range(l)]
        for kind, n in (("q", H), ("k", K), ("v", K)):
            edges |= {(s, f"a{l}.h{h}<{kind}>") for s in before for h in range(n)}
        mlp_reads = before if parallel else before + [f"a{l}.h{h}" for h in range(H)]
        edges |= {(s, f"m{l}") for s in mlp_reads}
    edges |= {(s, "logits") for s in ["input"] + [f"a{l}.h{h}" for l in range(L) for h in range(H)] + [f"m{l}" for l in range(L)]}
    return edges


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_circuit_has_exactly_the_edges_that_point_forward(family):
    _, model = model_for(family)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    K = model.cfg.n_key_value_heads or H
    parallel = family in PARALLEL
    full = Circuit.full(model)
    # per layer l: q, k, v receivers read 1 + l (H + 1) senders; the MLP also H heads of its layer
    # unless attention and MLP run in parallel; the logits read all 1 + L (H + 1)
    count = sum((H + 2 * K) * (1 + l * (H + 1)) + 1 + l * (H + 1) + (0 if parallel else H) for l in range(L)) + 1 + L * (H + 1)
    assert len(full) == count
    assert full.edges == full_edges_by_hand(L, H, K, parallel)
    assert circuits.model_components(model).parallel == parallel
    assert Circuit.full(model).validate(model) == full


# ---- run_with_circuit ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_circuit_is_the_plain_forward_and_the_empty_one_the_corrupted_run(family):
    hf, model = model_for(family)
    ids, ref = clean_ids(), corrupt_ids()
    full = Circuit.full(model)
    for ablation in ("zero", "corrupted", "mean"):
        got = run_with_circuit(model, ids, full, ablation=ablation, reference=ref)
        assert max_diff(got, hf_logits(hf, ids)) <= TOL
    # every edge patched from the corrupted run: each receiver reads the corrupted senders' outputs,
    # so the whole forward is the corrupted one
    got = model.run_with_circuit(ids, Circuit(), ablation="corrupted", reference=ref)
    assert max_diff(got, hf_logits(hf, ref)) <= TOL
    # a list of edges is a circuit too
    assert torch.equal(run_with_circuit(model, ids, list(full.edges)), run_with_circuit(model, ids, full))


def test_run_with_circuit_is_run_with_edges_of_the_complement():
    _, model = model_for("gpt2")
    ids, ref = clean_ids(), corrupt_ids()
    full = Circuit.full(model)
    keep = Circuit(e for e in full if e[1] != "a2.h1<q>" and not e[0].startswith("a1"))
    a = run_with_circuit(model, ids, keep, ablation="mean", reference=ref)
    b = run_with_edges(model, ids, full - keep, ablation="mean", reference=ref)
    assert torch.equal(a, b)


@functools.cache
def induction():
    hf = induction_model()
    model = fxlens.Model.from_hf(hf)
    toks = repeated_tokens(4, seed=1)
    corr = repeated_tokens(4, seed=2)[:, torch.randperm(16, generator=torch.Generator().manual_seed(3))]
    return model, toks, corr, induction_metric(toks)


@torch.no_grad()
def test_true_induction_circuit_is_faithful_and_necessary():
    model, toks, corr, metric = induction()
    with torch.no_grad():
        full, corrupted = float(metric(model(toks))), float(metric(model(corr)))
    assert full > -0.5 and corrupted < -3.0  # the model does induction; the corrupted run cannot
    circuit = Circuit(TRUE_CIRCUIT)
    kept = float(metric(run_with_circuit(model, toks, circuit, ablation="corrupted", reference=corr)))
    assert abs(kept - full) <= TOL  # measured 5.4e-7
    removed = float(metric(run_with_edges(model, toks, circuit.edges, ablation="corrupted", reference=corr)))
    assert abs(removed - corrupted) <= TOL  # measured 4.8e-7
    # dropping any one edge of the circuit hurts
    for e in TRUE_CIRCUIT:
        without = float(metric(run_with_circuit(model, toks, circuit - [e], ablation="corrupted", reference=corr)))
        assert without < full - 0.5, e


@torch.no_grad()
def test_positional_edges_matter_under_zero_ablation_only():
    model, toks, corr, metric = induction()
    with torch.no_grad():
        full = float(metric(model(toks)))
    corrupted = float(metric(run_with_edges(model, toks, POSITIONAL, ablation="corrupted", reference=corr)))
    assert abs(corrupted - full) <= TOL  # the corrupted input has the same positions (measured 0.0)
    zero = float(metric(run_with_edges(model, toks, POSITIONAL, ablation="zero")))
    assert zero < full - 1.0
    with_pos = float(metric(run_with_circuit(model, toks, Circuit(TRUE_CIRCUIT + POSITIONAL), ablation="zero")))
    without = float(metric(run_with_circuit(model, toks, Circuit(TRUE_CIRCUIT), ablation="zero")))
    assert with_pos > without + 1.0


def test_eap_ranks_the_true_circuit_first():
    model, toks, corr, metric = induction()
    scores = circuits.eap_scores(model, toks, corr, metric)
    assert set(scores) == Circuit.full(model).edges
    top = sorted(scores, key=lambda e: -abs(scores[e]))[: len(TRUE_CIRCUIT)]
    assert Circuit(top) == Circuit(TRUE_CIRCUIT)


def test_acdc_recovers_the_true_circuit():
    model, toks, corr, metric = induction()
    found = circuits.acdc(model, toks, corr, threshold=0.05, metric=lambda logits: -metric(logits))
    assert found == Circuit(TRUE_CIRCUIT)


@functools.cache
def double_model():
    # GPT-2: its LayerNorm runs in float64 (Llama's RMSNorm computes in float32 whatever the dtype)
    hf = make("gpt2", n_layers=2).double()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(WEIGHT_SCALE)
    return hf, fxlens.Model.from_hf(hf)


def test_eap_scores_are_the_derivative_of_the_edge_intervention():
    # edge e patched with alt = clean + eps (corrupt - clean): d metric / d eps at 0 is e's score
    hf, model = double_model()
    ids, ref = clean_ids(), corrupt_ids()
    scores = circuits.eap_scores(model, ids, ref, pp_metric)
    comp = circuits.model_components(model)
    assert set(scores) == Circuit.full(model).edges
    clean_v, corrupt_v = sender_values(model, ids), sender_values(model, ref)
    eps = 1e-3  # central differences in float64: truncation error ~eps^2
    picked = ["input->a0.h0<q>", "input->a1.h1<k>", "a0.h2->a1.h0<v>", "a0.h3->a1.h3<q>", "m0->a1.h1<v>", "a0.h0->m0",
              "a0.h1->m0", "input->m1", "a1.h2->m1", "m0->logits", "a1.h0->logits", "m1->logits", "input->logits"]
    for e in picked:
        def at(t):
            with torch.no_grad():
                return float(pp_metric(run_with_edges(model, ids, [e], ablation=clean_v + t * (corrupt_v - clean_v))))

        fd = (at(eps) - at(-eps)) / (2 * eps)
        s = scores[tuple(e.split("->"))]
        assert abs(fd - s) <= 1e-3 * abs(fd) + 1e-8, (e, s, fd)
    assert len(comp.senders) == clean_v.shape[2]
    assert max(abs(v) for v in scores.values()) > 1e-3


# ---- malformed circuits -----------------------------------------------------------------------------

SENDER_SCHEME = "'input', 'a<layer>.h<head>', 'm<layer>'"
RECEIVER_SCHEME = "'a<layer>.h<head><q|k|v>', 'm<layer>' and 'logits'"
BAD = {
    "unknown sender": ("x0->logits", SENDER_SCHEME),
    "sender without layer": ("a.h0->logits", SENDER_SCHEME),
    "unknown receiver kind": ("input->a0.h0<z>", RECEIVER_SCHEME),
    "receiver not a name": ("input->output", RECEIVER_SCHEME),
    "sender head past the heads": ("a0.h4->logits", SENDER_SCHEME),
    "receiver head past the heads": ("input->a1.h4<q>", RECEIVER_SCHEME),
    "key head past the key/value heads": ("input->a1.h2<k>", RECEIVER_SCHEME),
    "sender layer past the layers": ("a3.h0->logits", SENDER_SCHEME),
    "mlp sender past the layers": ("m3->logits", SENDER_SCHEME),
    "receiver layer past the layers": ("input->a3.h0<v>", RECEIVER_SCHEME),
    "mlp receiver past the layers": ("input->m3", RECEIVER_SCHEME),
    "backwards": ("a1.h0->a0.h1<q>", "points backwards in depth"),
    "same layer head to head": ("a1.h0->a1.h1<q>", "points backwards in depth"),
    "mlp to its own layer's heads": ("m1->a1.h0<k>", "points backwards in depth"),
    "mlp to itself": ("m1->m1", "points backwards in depth"),
    "logits is not a sender": ("logits->m1", SENDER_SCHEME),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_edges_are_refused_with_the_naming_scheme(case):
    _, model = model_for("llama")  # 3 layers, 4 heads, 2 key/value heads
    edge, message = BAD[case]
    with pytest.raises(CircuitError, match=re.escape(message)):
        Circuit([edge]).validate(model)
    with pytest.raises(CircuitError, match=re.escape(message)):
        run_with_edges(model, clean_ids(), [edge])
    with pytest.raises(CircuitError):
        run_with_circuit(model, clean_ids(), Circuit([edge]))


@pytest.mark.parametrize("edge", ["a3.h0->logits", "input->a1.h4<q>", "input->m3"])
def test_unknown_names_are_told_the_models_layers_and_heads(edge):
    _, model = model_for("llama")  # 3 layers, 4 heads, 2 key/value heads
    with pytest.raises(CircuitError, match=re.escape("layers 0-2 and heads 0-3 (keys and values: heads 0-1)")):
        Circuit([edge]).validate(model)


def test_valid_neighbours_of_the_malformed_edges_are_accepted():
    _, model = model_for("llama")
    ok = ["a0.h3->logits", "input->a1.h3<q>", "input->a1.h1<k>", "a2.h0->logits", "input->m2", "a1.h0->m1", "m0->a1.h0<k>"]
    assert Circuit(ok).validate(model) == Circuit(ok)


def test_a_head_does_not_feed_its_own_layers_mlp_in_a_parallel_model():
    _, model = model_for("neox")
    with pytest.raises(CircuitError, match="points backwards in depth"):
        Circuit(["a0.h0->m0"]).validate(model)
    Circuit(["a0.h0->m1", "m0->m1"]).validate(model)


def test_an_edge_string_needs_an_arrow():
    with pytest.raises(CircuitError, match="sender->receiver"):
        Circuit(["a0.h1 a1.h0<k>"])
    with pytest.raises(CircuitError, match="sender->receiver"):
        Circuit.from_json(json.dumps({"format": "fxlens.circuit/1", "edges": ["a0.h1=>a1.h0<k>"]}))


def test_ablation_errors():
    _, model = model_for("gpt2")
    ids = clean_ids()
    for ablation in ("mean", "corrupted", "resample"):
        with pytest.raises(CircuitError, match="reference"):
            run_with_edges(model, ids, ["input->m0"], ablation=ablation)
    with pytest.raises(CircuitError, match="ablation must be"):
        run_with_edges(model, ids, ["input->m0"], ablation="gaussian", reference=ids)
    values = sender_values(model, ids)
    for bad in (values[:, :, 1:], values[:, 1:], values[0]):
        with pytest.raises(CircuitError, match="an ablation tensor holds every sender's output"):
            run_with_edges(model, ids, ["input->m0"], ablation=bad)
        with pytest.raises(CircuitError, match="an ablation tensor holds every sender's output"):
            circuits.edge_sweep(model, ids, [["input->m0"]], pp_metric, ablation=bad)


def test_sender_values_of_chosen_senders_are_columns_of_all_of_them():
    _, model = model_for("llama")
    ids = clean_ids()
    names = [s.name for s in circuits.model_components(model).senders]
    chosen = ["m1", "a0.h2", "input", "a2.h3"]
    got = sender_values(model, ids, senders=chosen)
    assert torch.equal(got, sender_values(model, ids)[:, :, [names.index(n) for n in chosen]])


def test_edges_on_bert_replay_the_norms_and_path_patching_by_layers_refuses():
    # the residual stream is not a sum of components, so path patching by layers refuses; edges replay
    # every norm between sender and receiver (checked against HF hooks in tests/test_bert_postnorm_edges.py)
    _, model = cached_model("bert")
    comp = circuits.model_components(model)
    assert comp.not_additive is not None and comp.no_edges is None and comp.spine is not None
    assert len(Circuit.full(model)) > 0
    assert run_with_edges(model, tokens(1, 5), ["input->logits"]).shape == model(tokens(1, 5)).shape


# ---- weight edits -----------------------------------------------------------------------------------


@functools.cache
def edit_model(family):
    """A model of its own: in-place edits must not touch the models other tests share."""
    hf = make(family, n_layers=2, n_kv_heads=2 if family == "llama" else None)
    return hf, fxlens.Model.from_hf(hf)


def state(hf):
    return {k: v.detach().clone() for k, v in hf.state_dict().items()}


def same_state(hf, saved):
    now = hf.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


def o_weight(family, hf, layer):
    return hf.transformer.h[layer].attn.c_proj.weight if family == "gpt2" else hf.model.layers[layer].self_attn.o_proj.weight


def o_path(family, layer):
    return f"transformer.h.{layer}.attn.c_proj.weight" if family == "gpt2" else f"model.layers.{layer}.self_attn.o_proj.weight"


def mlp_path(family, layer):
    return f"transformer.h.{layer}.mlp.c_fc.weight" if family == "gpt2" else f"model.layers.{layer}.mlp.down_proj.weight"


def zero_z(layer, head):
    def hook(v, hook):
        v = v.clone()
        v[:, :, head] = 0
        return v

    return (f"blocks.{layer}.attn.hook_z", hook)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero_head_equals_zeroing_the_heads_z(family):
    hf, model = edit_model(family)
    ids = clean_ids()
    before = state(hf)
    with torch.no_grad():
        want = model.run_with_hooks(ids, fwd_hooks=[zero_z(1, 2), zero_z(0, 3)])
    with model.edit_weights() as w:
        assert w.zero_head(1, 2) is w
        w.zero_head(0, 3)
        with torch.no_grad():
            got = model(ids)
        assert max_diff(got, want) <= TOL
        assert max_diff(hf_logits(hf, ids), want) <= TOL  # the HF model shares the edited tensors
        assert not same_state(hf, before)
    assert same_state(hf, before)
    assert max_diff(model(ids), hf_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_set_head_output_and_rank_one_equal_editing_a_copy_of_the_hf_model(family):
    hf, model = edit_model(family)
    d_model, d_head = model.cfg.d_model, model.cfg.d_head
    g = torch.Generator().manual_seed(5)
    new_o = torch.randn(d_head, d_model, generator=g)
    path = mlp_path(family, 1)
    shape = dict(hf.named_parameters())[path].shape
    u, v = torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g)
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        cols = slice(2 * d_head, 3 * d_head)
        if family == "gpt2":  # Conv1D: [in, out]
            o_weight(family, ref, 0)[cols, :] = new_o
        else:  # Linear: [out, in]
            o_weight(family, ref, 0)[:, cols] = new_o.T
        dict(ref.named_parameters())[path].add_(0.5 * torch.outer(u, v))
    ids = clean_ids()
    want = hf_logits(ref, ids)
    assert max_diff(want, hf_logits(hf, ids)) > 1e-3
    with model.edit_weights() as w:
        w.set_head_output(0, 2, new_o).rank_one(path, u, v, scale=0.5)
        with torch.no_grad():
            assert max_diff(model(ids), want) <= TOL
    assert max_diff(model(ids), hf_logits(hf, ids)) <= TOL
    edited = model.with_weight_edits(lambda w: w.set_head_output(0, 2, new_o).rank_one(path, u, v, scale=0.5))
    assert max_diff(edited(ids), want) <= TOL


def test_the_with_block_restores_every_tensor_exactly_even_after_an_exception():
    hf, model = edit_model("llama")
    before = state(hf)
    ids = clean_ids()
    clean = model(ids)
    path = mlp_path("llama", 0)
    p = dict(hf.named_parameters())[path]
    with pytest.raises(RuntimeError, match="inside"):
        with model.edit_weights() as w:
            w.zero_head(0, 1).zero_head(0, 1).zero_head(1, 0)  # one tensor edited twice
            w.rank_one(path, torch.ones(p.shape[0]), torch.ones(p.shape[1]), scale=1e-3)
            w.set("model.norm.weight", torch.zeros(model.cfg.d_model))
            assert not same_state(hf, before)
            raise RuntimeError("inside the block")
    assert same_state(hf, before)
    assert torch.equal(model(ids), clean)
    with model.edit_weights() as w:
        w.set(path, torch.zeros_like(p))
    assert same_state(hf, before)


def test_with_weight_edits_leaves_the_original_alone_and_the_copy_works():
    hf, model = edit_model("gpt2")
    before = state(hf)
    ids, ref_ids = clean_ids(), corrupt_ids()
    clean = model(ids)
    edited = model.with_weight_edits(lambda w: w.zero_head(1, 0).zero_head(0, 2))
    assert same_state(hf, before)
    assert torch.equal(model(ids), clean)
    assert edited.hf_model is hf  # only the touched tensors are copied, on the captured graph
    with torch.no_grad():
        want = model.run_with_hooks(ids, fwd_hooks=[zero_z(1, 0), zero_z(0, 2)])
    assert max_diff(edited(ids), want) <= TOL
    logits, cache = edited.run_with_cache(ids, names_filter=["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"])
    assert max_diff(logits, want) <= TOL
    _, orig_cache = model.run_with_cache(ids, names_filter=["blocks.1.hook_attn_out"])
    assert max_diff(cache["attn_out", 1], orig_cache["attn_out", 1]) > 1e-4
    # a sweep on the copy equals the same sweep on an HF model edited by hand
    ref_hf = copy.deepcopy(hf)
    d_head = model.cfg.d_head
    with torch.no_grad():
        ref_hf.transformer.h[1].attn.c_proj.weight[0:d_head] = 0
        ref_hf.transformer.h[0].attn.c_proj.weight[2 * d_head : 3 * d_head] = 0
    ref_model = fxlens.Model.from_hf(ref_hf)

    def metric(logits):
        return logits[:, -1, 5].mean()

    _, clean_cache = edited.run_with_cache(ids)
    _, ref_cache = ref_model.run_with_cache(ids)
    got = patching.get_act_patch_resid_pre(edited, ref_ids, clean_cache, metric)
    expected = patching.get_act_patch_resid_pre(ref_model, ref_ids, ref_cache, metric)
    assert max_diff(got, expected) <= TOL
    orig = patching.get_act_patch_resid_pre(model, ref_ids, model.run_with_cache(ids)[1], metric)
    assert max_diff(got, orig) > 1e-4
    assert same_state(hf, before)
    # circuits see the edit: the zeroed head's edges carry nothing
    assert float(circuits.sender_values(edited, ids)[:, :, 1 + 4 + 1].abs().max()) == 0.0  # a1.h0
    assert float(circuits.sender_values(model, ids)[:, :, 1 + 4 + 1].abs().max()) > 0.0


def test_weight_edit_errors():
    _, model = edit_model("llama")
    before = state(model.hf_model)
    with model.edit_weights() as w:
        with pytest.raises(WeightEditError, match=r"layer 2 is out of range.*0\.\.1"):
            w.zero_head(2, 0)
        with pytest.raises(WeightEditError, match=r"layer -1 is out of range"):
            w.zero_head(-1, 0)
        with pytest.raises(WeightEditError, match=r"head 4 is out of range.*0\.\.3"):
            w.zero_head(0, 4)
        with pytest.raises(WeightEditError, match=r"head 4 is out of range"):
            w.set_head_output(1, 4, torch.zeros(16, 64))
        with pytest.raises(WeightEditError, match=r"\(16, 64\)"):
            w.set_head_output(0, 1, torch.zeros(64, 16))
        with pytest.raises(WeightEditError, match="model.layers.0.mlp.down_proj.weight"):
            w.rank_one("model.layers.0.mlp.down_proj.weihgt", torch.ones(64), torch.ones(128))
        with pytest.raises(WeightEditError, match=r"\(64, 128\)"):
            w.rank_one("model.layers.0.mlp.down_proj.weight", torch.ones(128), torch.ones(64))
        with pytest.raises(WeightEditError, match=r"\(64, 128\)"):
            w.set("model.layers.0.mlp.down_proj.weight", torch.zeros(128, 64))
        with pytest.raises(WeightEditError, match="no parameter"):
            w.set("model.layers.9.mlp.down_proj.weight", torch.zeros(64, 128))
    assert same_state(model.hf_model, before)
    with pytest.raises(WeightEditError, match="out of range"):
        model.with_weight_edits(lambda w: w.zero_head(0, 7))
    assert same_state(model.hf_model, before)
