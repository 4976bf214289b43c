"""Mixture-of-experts models against the HF model with plain hooks.

- ``hook_mlp_out`` is the HF sparse-MoE block's output (shared experts included), ``hook_resid_mid``
  the block's input to it; logits equal HF's with right and left padding.
- Router sites: ``hook_router_logits`` and ``hook_expert_indices`` are what the HF router module returns,
  ``hook_expert_weights`` the softmax of the logits the top-k reads (where the family has one).
- ``hook_expert_out`` [batch, pos, expert, d_model]: expert e's part is the HF experts module run with
  every routing weight but expert e's set to zero; the parts sum to the routed experts' output.
- Ablating one expert at one position equals an HF forward whose experts module gets that routing
  weight zeroed; a resid_pre sweep equals a loop of HF forwards with a pre-hook; path patching and
  edge sweeps treat the MoE layer as the sender/receiver ``m{l}`` and agree with their literal forms.
"""

import functools

import pytest
import torch
import transformers as T

import fxlens
from fxlens import circuits, metrics, patching

TOL = 1e-5
COMMON = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
BUILD = {
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32,
                                                                 shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32,
                                                                 num_experts=4, num_experts_per_tok=2)),
    "olmoe": lambda: T.OlmoeForCausalLM(T.OlmoeConfig(**COMMON, intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                                      eos_token_id=2, pad_token_id=1)),
}
FAMILIES = list(BUILD)
B, S = 2, 6


@functools.cache
def pair(family):
    torch.manual_seed(0)
    hf = BUILD[family]().eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(4.0)  # routing and experts must matter at these sizes
    return hf, fxlens.Model.from_hf(hf)


def ids(seed=1):
    return torch.randint(3, 100, (B, S), generator=torch.Generator().manual_seed(seed))


def mask(side):
    m = torch.ones(B, S, dtype=torch.long)
    if side == "right":
        m[1, 4:] = 0
    else:
        m[1, :2] = 0
    return m


def moe(hf, layer):
    return hf.model.layers[layer].mlp


def router(block):
    return block.gate if hasattr(block, "gate") and hasattr(block.gate, "weight") and block.gate.weight.dim() == 2 and \
        block.gate.weight.shape[0] != 1 else block.router


def hf_record(hf, layer, x, attention_mask=None):
    """What the HF MoE block of ``layer`` sees and returns: input, router outputs, experts' input, output."""
    seen = {}
    block = moe(hf, layer)
    hooks = [
        block.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out)),
        block.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0])),
        router(block).register_forward_hook(lambda m, a, out: seen.__setitem__("router", out)),
        block.experts.register_forward_pre_hook(lambda m, a: seen.__setitem__("experts_in", a), with_kwargs=False),
    ]
    try:
        with torch.no_grad():
            hf(x, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return seen


def max_diff(a, b):
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_mlp_out_and_resid_mid_equal_the_hf_moe_block(family, side):
    hf, model = pair(family)
    x, m = ids(), mask(side)
    real = m.bool()
    with torch.no_grad():
        want = hf(x, attention_mask=m).logits
    logits, cache = model.run_with_cache(x, m)
    assert max_diff(logits[real], want[real]) <= TOL
    for layer in range(2):
        seen = hf_record(hf, layer, x, m)
        assert max_diff(cache["mlp_out", layer][real], seen["out"][real]) <= TOL
        assert "blocks.%d.hook_resid_mid" % layer in model.sites
    assert (model.cfg.num_experts, model.cfg.experts_per_token) == (4, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_sites_equal_what_the_hf_router_returns(family):
    hf, model = pair(family)
    x = ids()
    _, cache = model.run_with_cache(x, names_filter=lambda n: ".mlp.hook_" in n)
    for layer in range(2):
        logits, weights, indices = hf_record(hf, layer, x)["router"]
        assert max_diff(cache["router_logits", layer], logits.view(B, S, -1)) <= TOL
        assert torch.equal(cache["expert_indices", layer], indices.view(B, S, -1))
        probs = torch.softmax(logits.float(), dim=-1).view(B, S, -1)
        assert max_diff(cache["expert_weights", layer], probs) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_each_experts_output_is_the_hf_experts_module_with_only_that_expert_weighted(family):
    hf, model = pair(family)
    x = ids()
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_expert_out") or n.endswith("hook_mlp_out"))
    for layer in range(2):
        seen = hf_record(hf, layer, x)
        hidden, idx, w = seen["experts_in"]
        got = cache["expert_out", layer]
        assert got.shape == (B, S, 4, model.cfg.d_model)
        with torch.no_grad():
            routed = moe(hf, layer).experts(hidden, idx, w).view(B, S, -1)
            for e in range(4):
                want = moe(hf, layer).experts(hidden, idx, w * (idx == e)).view(B, S, -1)
                assert max_diff(got[:, :, e], want) <= TOL, e
        assert max_diff(got.sum(2), routed) <= TOL
        assert (got.abs().sum(-1) > 0).sum(-1).le(2).all()  # at most top-k experts per token


@pytest.mark.parametrize("family", FAMILIES)
def test_ablating_one_expert_at_one_position_equals_zeroing_its_routing_weight_in_hf(family):
    hf, model = pair(family)
    x = ids()
    layer, pos = 1, 3
    experts = moe(hf, layer).experts
    chosen = hf_record(hf, layer, x)["router"][2].view(B, S, -1)
    e = int(chosen[0, pos, 0])  # an expert token (0, pos) uses

    def zero(m, args):
        hidden, idx, w = args
        w = w.clone()
        tokens = torch.arange(B * S).view(B, S)[:, pos]
        w[tokens] = torch.where(idx[tokens] == e, torch.zeros_like(w[tokens]), w[tokens])
        return hidden, idx, w

    h = experts.register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            want = hf(x).logits
    finally:
        h.remove()
    got = model.run_with_interventions(x, [fxlens.Ablate(f"blocks.{layer}.mlp.hook_expert_out", expert=e, pos=pos)])
    assert max_diff(got, want) <= TOL
    assert max_diff(want, model(x)) > 1e-4  # the expert mattered


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_pre_sweep_equals_a_loop_of_hf_pre_hooks(family):
    hf, model = pair(family)
    clean, corrupted = ids(1)[:1], ids(2)[:1]
    metric = metrics.logit_diff(5, 7)
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    got = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    want = torch.zeros_like(got)
    for layer in range(2):
        for p in range(S):
            value = cache["resid_pre", layer][:, p]

            def pre(m, args, kwargs, p=p, value=value):
                h = args[0].clone()
                h[:, p] = value
                return (h, *args[1:]), kwargs

            handle = hf.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
            try:
                with torch.no_grad():
                    want[layer, p] = metric(hf(corrupted).logits)
            finally:
                handle.remove()
    assert max_diff(got, want) <= TOL


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_layers_are_circuit_components_and_agree_with_the_literal_algorithms(family):
    _, model = pair(family)
    clean, corrupted = ids(1), ids(2)
    metric = metrics.logit_diff(5, 7)
    names = [s.name for s in circuits.model_components(model).senders]
    assert "m0" in names and "m1" in names
    layered = circuits.path_patch(model, clean, corrupted, metric, receivers=["a1.h0<q>"], senders=["m0", "a0.h1"])
    literal = circuits.path_patch(model, clean, corrupted, metric, receivers=["a1.h0<q>"], senders=["m0", "a0.h1"], method="rows")
    assert max(abs(layered[k] - literal[k]) for k in layered) <= TOL
    sets = [["m0->a1.h0<q>"], ["a0.h1->m1", "m0->m1"], ["m0->logits", "m1->logits"], ["m0->a1.h1<k>", "m0->m1"]]
    got = circuits.edge_sweep(model, clean, sets, metric, ablation="corrupted", reference=corrupted)
    with torch.no_grad():
        want = torch.tensor([float(metric(circuits.run_with_edges(model, clean, s, ablation="corrupted", reference=corrupted))) for s in sets])
    assert max_diff(got, want) <= TOL


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_sweeps_equal_a_loop_of_hf_forwards_swapping_one_experts_output(family):
    hf, model = pair(family)
    clean, corrupted = ids(1)[:1], ids(2)[:1]
    metric = metrics.logit_diff(5, 7)
    names = [f"blocks.{layer}.mlp.hook_expert_out" for layer in range(2)]
    _, cache = model.run_with_cache(clean, names_filter=names)
    zeros = {n: torch.zeros_like(cache[n]) for n in names}  # patching in zeros: a zero-ablation sweep

    def hf_value(layer, expert, source, pos=None):
        """HF forward of ``corrupted`` whose experts module of ``layer`` returns expert ``expert``'s part
        taken from ``source`` ([1, S, d]) at ``pos`` (every position if None)."""
        experts = moe(hf, layer).experts

        def swap(m, args, out):
            hidden, idx, w = args
            own = m.forward(hidden, idx, w * (idx == expert)).view(1, S, -1)  # forward: no hooks, no recursion
            new = out.view(1, S, -1).clone()
            where = slice(None) if pos is None else pos
            new[:, where] += source[:, where] - own[:, where]
            return new.view_as(out)

        handle = experts.register_forward_hook(swap)
        try:
            with torch.no_grad():
                return float(metric(hf(corrupted).logits))
        finally:
            handle.remove()

    for source in (cache, zeros):
        got = patching.get_act_patch_expert_out_all_pos(model, corrupted, source, metric)
        assert got.shape == (2, 4)
        want = torch.tensor([[hf_value(layer, e, source[names[layer]][:, :, e]) for e in range(4)] for layer in range(2)])
        assert max_diff(got, want) <= TOL
    got = patching.get_act_patch_expert_out_by_pos(model, corrupted, cache, metric)
    assert got.shape == (2, S, 4)
    want = torch.tensor([[[hf_value(layer, e, cache[names[layer]][:, :, e], p) for e in range(4)] for p in range(S)] for layer in range(2)])
    assert max_diff(got, want) <= TOL
