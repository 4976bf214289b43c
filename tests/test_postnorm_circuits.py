"""Circuits on models whose residual stream is not a sum of component outputs (Gemma 2's and OLMo 2's
norms after each branch, BERT's post-norm): path patching's textbook algorithm against plain HF hooks,
and a clear refusal where single-component edges cannot be replayed (edges through Gemma 2's and OLMo 2's
branch norms are tested in test_postnorm_edges.py, through BERT's residual norms in test_bert_postnorm_edges.py).

The reference (Wang et al.), with hooks on the HF modules only: (1) a clean and a corrupted run record
every layer's attention output-projection input z (and MLP outputs); (2) a path run of the clean input
in which every head's z is frozen at its clean value except the sender's, taken from the corrupted
run (an MLP sender's output is the corrupted one; other MLPs are recomputed, or frozen with
``freeze_mlps``), recording the receiver head's query as the model computes it (after OLMo 2's q norm);
(3) a clean run whose receiver head reads that query. A logits receiver reads the path run's logits.
"""

import dataclasses
import functools

import pytest
import torch
import transformers as T

import fxlens
from fxlens import circuits, metrics
from fxlens.circuits import CircuitError

TOL = 1e-5
COMMON = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=128, max_position_embeddings=64)
BUILD = {
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**COMMON, head_dim=16)),
    "olmo2": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**COMMON, eos_token_id=2, pad_token_id=1)),
}
D_HEAD = 16
METRIC = metrics.logit_diff(5, 7)


@functools.cache
def pair(family):
    return perturbed(BUILD[family])


def perturbed(build):
    """(hf, fxlens model) of ``build()`` with seed 0, norm weights perturbed and matrices scaled up so
    that the norms and paths matter."""
    torch.manual_seed(0)
    hf = build().eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(5.0)
    return hf, fxlens.Model.from_hf(hf)


def ids(seed):
    return torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(seed))


def query_module(family, blk):
    """The module whose output is the query as attention uses it, before the head split."""
    return blk.self_attn.q_norm if family == "olmo2" else blk.self_attn.q_proj


def hooked(hf, x, *, z=None, mlp=None, q=None):
    """Logits of one HF forward with ``z(layer, x)``, ``mlp(layer, out)`` and ``q(layer, out)`` editing
    (returning a replacement) or recording (returning None) the o_proj input, MLP output and query."""
    handles = []
    for layer, blk in enumerate(hf.model.layers):
        if z:
            handles.append(blk.self_attn.o_proj.register_forward_pre_hook(lambda m, a, layer=layer: (lambda r: None if r is None else (r,))(z(layer, a[0]))))
        if mlp:
            handles.append(blk.mlp.register_forward_hook(lambda m, a, out, layer=layer: mlp(layer, out)))
        if q:
            handles.append(query_module(hf._family, blk).register_forward_hook(lambda m, a, out, layer=layer: q(layer, out)))
    try:
        with torch.no_grad():
            return hf(x).logits
    finally:
        for h in handles:
            h.remove()


def textbook(family, sender, receiver, freeze_mlps):
    hf, _ = pair(family)
    hf._family = family
    clean, corrupt = ids(1), ids(2)
    zc, zx, mc, mx = {}, {}, {}, {}
    hooked(hf, clean, z=lambda l, v: zc.__setitem__(l, v.clone()), mlp=lambda l, o: mc.__setitem__(l, o.clone()))
    hooked(hf, corrupt, z=lambda l, v: zx.__setitem__(l, v.clone()), mlp=lambda l, o: mx.__setitem__(l, o.clone()))
    kind, layer = ("head", int(sender[1:].split(".h")[0])) if sender.startswith("a") else ("mlp", int(sender[1:]))
    head = int(sender.split(".h")[1]) if kind == "head" else None

    def freeze(l, v):
        new = zc[l].clone()
        if kind == "head" and l == layer:
            new[..., head * D_HEAD : (head + 1) * D_HEAD] = zx[l][..., head * D_HEAD : (head + 1) * D_HEAD]
        return new

    def mlps(l, out):
        if kind == "mlp" and l == layer:
            return mx[l]
        return mc[l] if freeze_mlps else None

    recorded = {}
    r_layer, r_head = (None, None) if receiver == "logits" else (int(receiver[1:].split(".h")[0]), int(receiver.split(".h")[1][:-3]))
    logits = hooked(hf, clean, z=freeze, mlp=mlps, q=lambda l, out: recorded.__setitem__(l, out.clone()))
    if receiver == "logits":
        return float(METRIC(logits))

    def read(l, out):
        if l != r_layer:
            return None
        new = out.clone()
        sl = slice(r_head * D_HEAD, (r_head + 1) * D_HEAD)
        new[..., sl] = recorded[l][..., sl]
        return new

    return float(METRIC(hooked(hf, clean, q=read)))


@pytest.mark.parametrize("freeze_mlps", [False, True])
@pytest.mark.parametrize("receiver", ["logits", "a1.h0<q>"])
@pytest.mark.parametrize("family", list(BUILD))
def test_path_patching_equals_the_textbook_algorithm_with_hf_hooks(family, receiver, freeze_mlps):
    _, model = pair(family)
    senders = ["a0.h1", "a0.h3", "m0"] + (["a1.h2", "m1"] if receiver == "logits" else [])
    got = circuits.path_patch(model, ids(1), ids(2), METRIC, receivers=[receiver], senders=senders, freeze_mlps=freeze_mlps)
    want = {s: textbook(family, s, receiver, freeze_mlps) for s in senders}
    assert max(abs(got[s] - want[s]) for s in senders) <= TOL, (got, want)
    base = float(METRIC(model(ids(1))))
    assert max(abs(v - base) for v in want.values()) > 1e-3  # the paths matter: the check is not vacuous


@pytest.mark.parametrize("family", list(BUILD))
def test_path_patching_by_layers_refuses_with_the_reason_and_what_works(family):
    # edges, edge sweeps, EAP and ACDC work here (tests/test_postnorm_edges.py); path patching by layers
    # adds sender differences to the residual as they are, so it refuses
    _, model = pair(family)
    with pytest.raises(CircuitError, match=r"normalises the \w+ output before it is added.*circuits.path_patch.*so do edges") as err:
        circuits.path_patch(model, ids(1), ids(2), METRIC, receivers=["logits"], method="layers")
    assert "add_" not in str(err.value) and "linear_" not in str(err.value)  # no graph node names


def test_edges_refuse_where_the_residual_stream_cannot_be_replayed_with_the_reason_and_what_works(monkeypatch):
    """BERT's residual stream is replayed step by step for edges (tests/test_bert_postnorm_edges.py); where a
    model's steps cannot be replayed, edges refuse with the reason and what works, naming no graph node."""
    from families import make

    from fxlens.graphs import components

    real = components.spine_steps

    def unreplayable(mg, names):  # as if block 0's norm reshaped the residual stream
        spine = real(mg, names)
        steps = list(spine.steps)
        steps[1] = dataclasses.replace(steps[1], why="block 0 reshapes the residual stream between its branches")
        return dataclasses.replace(spine, steps=tuple(steps))

    monkeypatch.setattr(components, "spine_steps", unreplayable)
    model = fxlens.Model.from_hf(make("bert"))
    tokens = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    for call in (
        lambda: circuits.run_with_edges(model, tokens, ["input->logits"]),
        lambda: circuits.eap_scores(model, tokens, tokens, lambda logits: logits.sum()),
        lambda: circuits.edge_sweep(model, tokens, [["input->logits"]], lambda logits: logits.sum()),
        lambda: circuits.acdc(model, tokens, tokens, threshold=0.1),
    ):
        with pytest.raises(CircuitError, match=r"normalises the residual stream itself.*reshapes.*circuits.path_patch.*BERT") as err:
            call()
        assert "add_" not in str(err.value) and "layer_norm" not in str(err.value)  # no graph node names
