"""A model whose blocks live on several devices: each block runs on its weights' device, values move at
block boundaries, and results equal plain HF hooks on the same weights.

No machine here has two accelerators, so the devices are emulated (``emulated_devices``): the model is
captured on the CPU and its weights labelled ``cuda:0`` (embeddings, first half of the blocks) and
``cuda:1`` (second half, final norm, LM head), as a ``device_map`` leaves them. Every operator refuses
inputs on two devices as CUDA does, and computes with the real values, so each feature is checked twice:
no device mismatch anywhere, and the numbers equal the HF model's own (hooks on the HF forward).

Not covered here: gradients (attribution, EAP, ``incl_bwd``: autograd allocates on the C++ device, which
the emulation keeps on the CPU), a plain metric's tracing (``engine.metric_reads`` traces under fake
tensors, which cannot wrap an emulated one: the sweeps fall back to full logits here, exactly) and
torch.export of a model dispatched by accelerate (capture's path for it runs with every module placed
on the CPU, ``test_capture_of_a_spread_model_...``). ``benchmarks/gpu.sh`` runs a real two-GPU split.
"""

import pytest
import torch
from emulated_devices import DeviceMismatch, Emulated, OnDevice, blocks_on, label, placed
from families import make, tokens
from hf_hooks import hf_cache, hf_run

import fxlens
from fxlens import circuits, metrics, patching
from fxlens.graphs.capture import CaptureError
from fxlens.passes.place_devices import PlaceDevices, to_device

# a RuntimeWarning here is a fallback (a sweep off the layered engine): a failure
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
TOL = 1e-5
N_LAYERS = 4
FIRST, LAST = torch.device("cuda:0"), torch.device("cuda:1")
BLOCKS = {"llama": "layers", "gpt2": "h"}
FAMILIES = list(BLOCKS)
_MODELS: dict = {}


def models(family):
    """(hf, the fxlens model on the CPU, the same model with its blocks on two emulated devices)."""
    if family not in _MODELS:
        hf = make(family, n_layers=N_LAYERS)
        model = fxlens.Model.from_hf(hf)
        _MODELS[family] = (hf, model, placed(model, blocks_on(N_LAYERS, layers=BLOCKS[family])))
    return _MODELS[family]


def plain(t):
    return t.cpu_data if isinstance(t, OnDevice) else t


def diff(a, b) -> float:
    return float((plain(a).float() - plain(b).float()).abs().max())


def pair():
    clean = tokens(2, 6, seed=1)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 7) % 100
    return clean, corrupted


@pytest.mark.parametrize("family", FAMILIES)
def test_a_forward_runs_each_block_on_its_device_and_returns_logits_from_the_head(family):
    hf, model, spread = models(family)
    ids, _ = pair()
    with Emulated() as emu, torch.no_grad():
        logits = spread(ids)
    assert logits.device == LAST  # the LM head's device, where HF's own forward leaves them
    assert emu.transfers > 0
    assert diff(logits, hf(ids).logits) <= TOL


def test_a_model_on_one_device_gets_no_placement():
    hf, model, _ = models("llama")
    assert model.derived.placement is None
    gm = model.programs.get(()).graph_module
    assert not any(n.target is to_device for n in gm.graph.nodes)


def test_the_placement_table_follows_the_weights():
    _, _, spread = models("llama")
    table = dict(spread.derived.placement.modules)
    assert table["model.embed_tokens"] == "cuda:0" and table["model.layers.1"] == "cuda:0"
    assert table["model.layers.2"] == "cuda:1" and table["lm_head"] == "cuda:1"
    assert "model" not in table  # the whole model spans both
    assert PlaceDevices.of(spread.derived.captured.module).default == "cuda:0"


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_activations_stay_on_their_blocks_devices_and_equal_hf_hooks(family):
    hf, _, spread = models(family)
    ids, _ = pair()
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.2.hook_resid_pre", "blocks.3.hook_resid_post"]
    with Emulated(), torch.no_grad():
        _, cache = spread.run_with_cache(ids)
        devices = {n: cache[n].device for n in names}
        accumulated = cache.accumulated_resid()
    assert devices == {names[0]: FIRST, names[1]: FIRST, names[2]: FIRST, names[3]: LAST}  # resid_pre 2 is block 1's output
    assert accumulated.device == LAST
    ref = hf_cache(hf, ids, None, names)
    for name in names:
        assert diff(cache[name], ref[name]) <= TOL, name


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_patches_and_steering_take_values_from_any_device_and_equal_hf_hooks(family):
    hf, model, spread = models(family)
    clean, corrupted = pair()
    _, cpu_cache = model.run_with_cache(clean)  # a cache of another run, on the CPU
    seen = []
    vector = torch.randn(spread.cfg.d_model, generator=torch.Generator().manual_seed(3))

    def double(value, hook):
        seen.append(value.device)
        return value * 2

    with Emulated(), torch.no_grad():
        hooked = spread.run_with_hooks(corrupted, fwd_hooks=[("blocks.2.hook_resid_pre", double)])
        _, own_cache = spread.run_with_cache(clean)
        from_own = spread.run_with_interventions(corrupted, [fxlens.Patch("blocks.2.hook_resid_pre", source=own_cache, pos=3)])
        from_cpu = spread.run_with_interventions(corrupted, [fxlens.Patch("blocks.2.hook_resid_pre", source=cpu_cache, pos=3)])
        steered = spread.run_with_interventions(corrupted, [fxlens.Steer("blocks.1.hook_resid_post", vector=vector, scale=2.0)])
    assert seen == [FIRST]  # blocks.2.hook_resid_pre is block 2's output: on cuda:0
    clean_value = cpu_cache["blocks.2.hook_resid_pre"]

    def put(v):
        v[:, 3] = clean_value[:, 3]
        return v

    assert diff(hooked, hf_run(hf, corrupted, None, {"blocks.2.hook_resid_pre": lambda v: v * 2})) <= TOL
    want = hf_run(hf, corrupted, None, {"blocks.2.hook_resid_pre": put})
    assert diff(from_own, want) <= TOL and diff(from_cpu, want) <= TOL
    assert diff(steered, hf_run(hf, corrupted, None, {"blocks.1.hook_resid_post": lambda v: v + 2.0 * vector})) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_pre_sweep_equals_a_loop_of_hf_hooked_runs(family):
    hf, model, spread = models(family)
    clean, corrupted = pair()
    metric = metrics.logit_diff(5, 9)
    _, cache = model.run_with_cache(clean)
    with Emulated(), torch.no_grad():
        grid = spread.run_with_cache(clean)[1]
        got = patching.get_act_patch_resid_pre(spread, corrupted, grid, metric)
        plain_metric = patching.get_act_patch_resid_pre(spread, corrupted, cache, lambda lg: (lg[:, -1, 5] - lg[:, -1, 9]).mean())
    clean_values = hf_cache(hf, clean, None, [f"blocks.{i}.hook_resid_pre" for i in range(N_LAYERS)])
    want = torch.zeros(N_LAYERS, clean.shape[1])
    for layer in range(N_LAYERS):
        site = f"blocks.{layer}.hook_resid_pre"
        for pos in range(clean.shape[1]):
            def put(v, pos=pos, value=clean_values[site]):
                v[:, pos] = value[:, pos]
                return v

            logits = hf_run(hf, corrupted, None, {site: put})
            want[layer, pos] = (logits[:, -1, 5] - logits[:, -1, 9]).mean()
    assert diff(got, want) <= TOL
    assert diff(plain_metric, want) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_head_sweep_equals_a_loop_of_hf_hooked_runs(family):
    hf, model, spread = models(family)
    clean, corrupted = pair()
    _, cache = model.run_with_cache(clean)
    with Emulated(), torch.no_grad():
        got = patching.get_act_patch_attn_head_out_all_pos(spread, corrupted, cache, metrics.logit_diff(5, 9))
    z = hf_cache(hf, clean, None, [f"blocks.{i}.attn.hook_z" for i in range(N_LAYERS)])
    want = torch.zeros(N_LAYERS, spread.cfg.n_heads)
    for layer in range(N_LAYERS):
        site = f"blocks.{layer}.attn.hook_z"
        for head in range(spread.cfg.n_heads):
            def put(v, head=head, value=z[site]):
                v[:, :, head] = value[:, :, head]
                return v

            logits = hf_run(hf, corrupted, None, {site: put})
            want[layer, head] = (logits[:, -1, 5] - logits[:, -1, 9]).mean()
    assert diff(got, want) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_path_patching_and_edge_sweeps_equal_the_model_on_one_device(family):
    # references: the same calls on the CPU model (their own tests hold those to HF-hooked references)
    _, model, spread = models(family)
    clean, corrupted = pair()
    metric = metrics.logit_diff(5, 9)
    sets = [["a0.h1->a3.h0<q>"], ["a1.h0->logits", "input->m2"], ["m0->a2.h1<k>", "a1.h2->a3.h3<v>"]]
    calls = {
        "logits": lambda m: circuits.path_patch(m, clean, corrupted, metric, receivers="logits"),
        "rows": lambda m: circuits.path_patch(m, clean, corrupted, metric, receivers=["a3.h0<q>"], method="rows"),
        "layers": lambda m: circuits.path_patch(m, clean, corrupted, metric, receivers=["a3.h0<q>"], method="layers"),
        "edges": lambda m: circuits.edge_sweep(m, clean, sets, metric),
        "zero": lambda m: m.run_with_edges(clean, sets[0]),
        "corrupted": lambda m: m.run_with_edges(clean, sets[2], ablation="corrupted", reference=corrupted),
    }
    for name, call in calls.items():
        with torch.no_grad():
            want = call(model)
        with Emulated(), torch.no_grad():
            got = call(spread)
            got = {k: float(v) for k, v in got.items()} if isinstance(got, dict) else plain(got.to("cpu"))
        if isinstance(want, dict):
            assert got.keys() == want.keys()
            assert max(abs(got[k] - want[k]) for k in want) <= TOL, name
        else:
            assert diff(got, want) <= TOL, name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv", [True, False])
def test_generation_equals_hf_greedy_decoding(family, kv):
    hf, _, spread = models(family)
    ids, _ = pair()
    with Emulated(), torch.no_grad():
        out = spread.generate(ids, max_new_tokens=4, do_sample=False, stop_at_eos=False, use_past_kv_cache=kv)
        steered = spread.generate(ids, max_new_tokens=2, do_sample=False, stop_at_eos=False, use_past_kv_cache=kv,
                                  interventions=[fxlens.Steer("blocks.2.hook_resid_pre", vector=torch.ones(spread.cfg.d_model))])
    assert out.device == FIRST and steered.device == FIRST  # where the prompt was fed
    want = ids
    with torch.no_grad():
        for _ in range(4):
            want = torch.cat([want, hf(want).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(plain(out), want)


def test_a_sweep_budget_counts_the_device_that_keeps_the_most():
    from fxlens.engine.rows.base import Base

    a, b = torch.zeros(10), torch.zeros(30)
    with Emulated():
        base = Base(feed=None, batch=1, seq=1, hidden=[label(a, "cuda:0"), label(b, "cuda:1")], kv=[], context={}, final=None, values={})
        assert base.nbytes == b.untyped_storage().nbytes()


def test_weights_on_several_devices_without_accelerate_hooks_are_refused_with_the_fix():
    hf = make("llama")
    layer = hf.model.layers[1]
    with Emulated():
        for module in layer.modules():
            for key, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[key] = label(p.detach(), "cuda:1")
        with pytest.raises(CaptureError, match=r"several devices \(cpu, cuda:1\).*no accelerate hooks.*device_map"):
            fxlens.Model.from_hf(hf)


def test_emulated_devices_refuse_a_mismatch_as_cuda_does():
    with Emulated():
        a, b = torch.ones(2, 3, device="cuda:0"), torch.ones(3, 2, device="cuda:1")
        with pytest.raises(DeviceMismatch):
            a @ b
        assert (a @ b.to("cuda:0")).device == FIRST


def test_capture_strips_the_moves_accelerate_makes_and_keeps_casts():
    # what torch.export records of a dispatched model's hooks: x.to("cuda:1") at a block's entry
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxlens.graphs.placement import strip_transfers

    aten = torch.ops.aten
    with FakeTensorMode():
        x0, x1 = torch.empty(2, 3, device="cuda:0"), torch.empty(2, 3, device="cuda:1")
        h1 = torch.empty(2, 3, device="cuda:1", dtype=torch.float16)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = x0
    moved = g.call_function(aten._to_copy.default, (x,), {"device": torch.device("cuda:1")})
    moved.meta["val"] = x1
    cast = g.call_function(aten._to_copy.default, (x,), {"dtype": torch.float16, "device": torch.device("cuda:1")})
    cast.meta["val"] = h1
    y = g.call_function(aten.add.Tensor, (moved, 1))
    g.output((y, cast))
    assert strip_transfers(g) == 1
    assert y.args[0] is x
    assert cast.kwargs == {"dtype": torch.float16}


def test_capture_of_a_spread_model_probes_and_checks_the_placed_graph(monkeypatch):
    # capture's path for several devices (strip accelerate's moves, place, probe, self-check), with every
    # module placed on the CPU: export cannot run on emulated devices
    import fxlens.graphs.capture as cap
    from fxlens.graphs.placement import module_devices

    hf = make("llama")
    paths = {".".join(p.split(".")[:i]) for p, _ in hf.named_parameters() for i in range(1, p.count(".") + 1)}
    calls = []

    def table(gm):
        calls.append(gm)
        assert module_devices(gm) is None
        return tuple((p, "cpu") for p in sorted(paths)), "cpu"

    monkeypatch.setattr(cap, "_several_devices", lambda model: True)
    monkeypatch.setattr(cap, "module_devices", table)
    model = fxlens.Model.from_hf(hf)
    assert calls
    ids = tokens(2, 6)
    with torch.no_grad():
        assert diff(model(ids), hf(ids).logits) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_analysis_across_devices_equals_the_model_on_one_device(family):
    # references: the CPU model (test_cache_analysis_vs_tl holds it to TransformerLens)
    _, model, spread = models(family)
    ids, _ = pair()
    calls = {
        "accumulated_resid": lambda c: c.accumulated_resid(apply_ln=True),
        "decompose_resid": lambda c: c.decompose_resid(apply_ln=True),
        "stack_head_results": lambda c: c.stack_head_results(incl_remainder=True, apply_ln=True),
        "stack_neuron_results": lambda c: c.stack_neuron_results(2, incl_remainder=True, apply_ln=True),
        "get_full_resid_decomposition": lambda c: c.get_full_resid_decomposition(expand_neurons=True, apply_ln=True),
        "logit_attrs": lambda c: c.logit_attrs(c.decompose_resid(apply_ln=True), tokens=5, incorrect_tokens=9),
    }
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    with Emulated(), torch.no_grad():
        _, spread_cache = spread.run_with_cache(ids)
        got = {name: call(spread_cache).to("cpu") for name, call in calls.items()}
    for name, call in calls.items():
        with torch.no_grad():
            assert diff(got[name], call(cache)) <= TOL, name


def test_interventions_on_a_pattern_and_on_heads_across_devices_equal_the_model_on_one_device():
    _, model, spread = models("llama")
    clean, corrupted = pair()
    _, cache = model.run_with_cache(clean)
    specs = [fxlens.Ablate("blocks.3.attn.hook_pattern", head=1), fxlens.Patch("blocks.2.attn.hook_z", source=cache, head=0),
             fxlens.Scale("blocks.0.mlp.hook_post", factor=0.5), fxlens.Ablate("blocks.1.attn.hook_v", how="mean")]
    with torch.no_grad():
        want = model.run_with_interventions(corrupted, specs)
    with Emulated(), torch.no_grad():
        got = spread.run_with_interventions(corrupted, specs)
    assert got.device == LAST
    assert diff(got, want) <= TOL


def _spread_without_running(hf, module):
    """``hf`` with ``module``'s weights labelled cuda:1 and an accelerate-like hook attribute on it (capture
    refuses before anything runs)."""
    for sub in module.modules():
        for key, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[key] = label(p.detach(), "cuda:1")
    module._hf_hook = object()
    return hf


def test_an_encoder_decoder_on_several_devices_is_refused_with_the_fix():
    import transformers

    c = transformers.BartConfig(vocab_size=50, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    hf = transformers.BartForConditionalGeneration(c).eval()
    with Emulated():
        _spread_without_running(hf, hf.model.decoder.layers[1])
        with pytest.raises(CaptureError, match=r"encoder-decoders run on one device.*device_map=\{'': 'cuda:0'\}"):
            fxlens.Model.from_hf(hf)


@pytest.mark.parametrize("family", FAMILIES)
def test_placement_onto_the_cpu_alone_computes_bit_identical_results(family):
    # every program through the placement pass with a table of CPU devices: the moves it inserts are the
    # only change, and a move changes no value
    hf, model, _ = models(family)
    forced = fxlens.Model.from_hf(hf)
    table = PlaceDevices(tuple((path, "cpu") for path, _ in models(family)[2].derived.placement.modules), "cpu")
    forced.derived._items["placement"] = table
    clean, corrupted = pair()
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        assert torch.equal(forced(clean), hf(clean).logits)
        assert torch.equal(forced(clean), model(clean))
        for fn in (patching.get_act_patch_resid_pre, patching.get_act_patch_attn_head_out_all_pos):
            assert torch.equal(fn(forced, corrupted, cache, metrics.logit_diff(5, 9)), fn(model, corrupted, cache, metrics.logit_diff(5, 9)))
        out = forced.generate(clean, max_new_tokens=3, do_sample=False, stop_at_eos=False)
        assert torch.equal(out, model.generate(clean, max_new_tokens=3, do_sample=False, stop_at_eos=False))
    gm = forced.programs.get(()).graph_module
    assert any(n.target is to_device for n in gm.graph.nodes)
