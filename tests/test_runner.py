"""engine.runner: a program as straight-line Python computes bit for bit what fx's own forward computes.

References: the GraphModule's own ``forward`` (fx's generated code) on the same graph, and the HF model
for in-place weight edits seen through the runner.
"""

import math

import pytest
import torch
import torch.fx as fx
import transformers as T

import fxlens
from fxlens.engine.runner import Runner
from fxlens.passes import Cache, Read


def _tiny_llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return T.LlamaForCausalLM(cfg).eval()


def _same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("plan", ["plain", "cache"])
def test_a_captured_model_runs_bit_identically(plan):
    model = fxlens.Model.from_hf(_tiny_llama())
    gm = model.captured.module
    if plan == "cache":
        nodes = [n.name for n in gm.graph.nodes if n.op == "call_function"][5:40:7]
        gm = model.programs.build((Cache(tuple(Read(f"r{i}", n) for i, n in enumerate(nodes))),))
    run = Runner(gm)
    assert run.forward is not gm, "the runner fell back to fx's forward"
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        _same(run(input_ids=ids, attention_mask=mask), gm(input_ids=ids, attention_mask=mask))


def test_every_node_kind_and_constant():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.register_buffer("scale", torch.tensor([2.0, -1.0, 0.5]))

        def forward(self, x, y=None):
            z = self.lin(x) * self.scale  # call_module, get_attr
            z = z.clamp(min=-math.inf, max=0.25)  # call_method with kwargs and an infinite float
            z = torch.ops.aten.add.Tensor(z, x, alpha=3)  # an OpOverload with a keyword
            w = z[:, 1:, None]  # getitem with slices and None
            return {"z": z, "pair": (w, x.shape[0]), "y": y}

    gm = fx.symbolic_trace(M())
    kinds = {n.op for n in gm.graph.nodes}
    assert {"call_module", "get_attr", "call_method", "call_function", "placeholder"} <= kinds
    run = Runner(gm)
    assert run.forward is not gm
    x = torch.randn(4, 3)
    _same(run(x), gm(x))
    _same(run(x, y=None), gm(x, None))


def test_values_are_dropped_after_their_last_use():
    gm = fx.symbolic_trace(lambda x: ((x + 1) * 2).sum())
    src = Runner(gm).source
    body = src.splitlines()[1:]
    assert any("= None" in line for line in body[1:-1]), src


def test_in_place_weight_edits_are_seen():
    hf = _tiny_llama()
    model = fxlens.Model.from_hf(hf)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    model(ids)  # the program is built and kept
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight.mul_(3.0)
        got = model(ids)
        want = hf(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-5


def test_a_graph_fx_cannot_name_runs_through_fx():
    class Star(torch.nn.Module):
        def forward(self, *xs):
            return xs[0] + 1

    gm = fx.symbolic_trace(Star())
    run = Runner(gm)
    x = torch.ones(2)
    assert torch.equal(run(x), gm(x))


def test_swapped_parameters_are_followed():
    hf = _tiny_llama()
    model = fxlens.Model.from_hf(hf)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    model(ids)
    model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))  # another kept program
    old = hf.model.layers[0].self_attn.o_proj.weight
    hf.model.layers[0].self_attn.o_proj.weight = torch.nn.Parameter(old.detach() * -2.0)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = model(ids)
        got_cached, _ = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert (got - want).abs().max() < 1e-5
    assert (got_cached - want).abs().max() < 1e-5
