"""Blocks are layer *calls*, and a model whose layers are no single residual stream says so.

Reference: plain ``register_forward_pre_hook(with_kwargs=True)`` hooks on the HF decoder layers, recording
every call's hidden-states input in the order the calls run (``test_coverage.hf_forward``), and a loop of
hooked HF forwards for the sweeps (``test_coverage.hf_resid_pre_sweep``). Before the fixes:

- ALBERT (one layer shared across depth) and Dory (a looped middle layer) had one block per layer
  *module*: ``blocks.0`` mixed several calls (ALBERT: 1 block for 2 calls, sweep off by 0.235);
- HRM's high-level stack (same layer class as the low-level one, calls interleaved) was not blocks at all;
- XLM splits a layer over parallel lists (``attentions.i``, ``ffns.i``, ``layer_norm{1,2}.i``): the block
  was the attention module alone, its "resid_post" the attention output (off by 3.4 from the layer's);
- Inkling2's layers also read a stack of earlier residual states beside the hidden states: patching the
  hidden states is not patching what a layer reads (sweep off by 0.95 from the hooked loop);
- Dory's head scales the logits by a per-entry vector after the unembedding: the whole-model sweep
  asked the vocabulary-selection pass for an unembedding that was None.
"""

import warnings

import pytest
import torch

import all_families as A
import fxlens
from fxlens import patching
from fxlens.graphs.sites import SiteError
from test_coverage import hf_forward, hf_resid_pre_sweep, sweep_metric


def _wrap(family):
    hf = A.build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf, fxlens.Model.from_hf(hf)


def _resid_pre_equal_layer_calls(hf, model, ids):
    paths = [b.path for b in model.graph.structure.blocks]
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
    _, inputs, _ = hf_forward(hf, ids, None, paths)  # the k-th block at a path is the k-th call of that layer
    for i, want in enumerate(inputs):
        assert (cache[f"blocks.{i}.hook_resid_pre"] - want).abs().max() <= 1e-5, i


@pytest.mark.parametrize("family,calls", [("albert", 2), ("dory", 4), ("hrm_text", 16)])
def test_each_call_of_a_layer_is_a_block(family, calls):
    hf, model = _wrap(family)
    blocks = model.graph.structure.blocks
    assert len(blocks) == model.cfg.n_layers == calls
    assert len({b.path for b in blocks}) < calls  # some layer runs more than once
    _resid_pre_equal_layer_calls(hf, model, A.probe_ids(2, 5, seed=2))


@pytest.mark.parametrize("family", ["albert", "dory"])
def test_sweep_over_layer_calls_equals_a_hooked_hf_loop(family):
    """Dory's also runs whole-model with a head that is not one unembedding."""
    hf, model = _wrap(family)
    clean, corrupted = A.probe_ids(1, 5, seed=3), A.probe_ids(1, 5, seed=4)
    with torch.no_grad():
        metric = sweep_metric(hf(input_ids=clean).logits.shape[-1])
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    want = hf_resid_pre_sweep(hf, clean, corrupted, [b.path for b in model.graph.structure.blocks], metric)
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("family,says", [
    ("xlm", "split over parallel module lists (transformer.attentions, transformer.ffns"),
    ("inkling2_text", "a stack of earlier residual states"),
])
def test_layers_without_one_residual_stream_offer_no_residual_sites_and_say_why(family, says):
    hf = A.build(family)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = fxlens.Model.from_hf(hf)
    assert any(says in str(w.message) for w in seen)
    with pytest.raises(SiteError, match="not offered for this model") as err:
        model.run_with_cache(A.probe_ids(1, 5), names_filter=["blocks.1.hook_resid_post"])
    assert says in str(err.value)
    # the layers' own modules still read exactly what HF's forward hooks see
    last = model.graph.structure.blocks[-1].path
    ids = A.probe_ids(2, 5, seed=2)
    _, cache = model.run_with_cache(ids, names_filter=[last])
    _, _, want = hf_forward(hf, ids, None, [b.path for b in model.graph.structure.blocks])
    assert (cache[last] - want).abs().max() <= 1e-5


def _call_outputs(hf, paths, ids, edit=None):
    """Every call's output of each module path, by plain forward hooks; ``edit = (path, k, fn)`` replaces
    the k-th call's output of ``path`` (first element of a tuple output) by ``fn(output)``."""
    modules, outs, handles = dict(hf.named_modules()), {p: [] for p in paths}, []

    def hook(path):
        def fn(_mod, _args, out):
            first = out[0] if isinstance(out, tuple) else out
            if edit is not None and edit[0] == path and len(outs[path]) == edit[1]:
                first = edit[2](first)
                out = (first, *out[1:]) if isinstance(out, tuple) else first
            outs[path].append(first.detach().clone())
            return out
        return fn

    for p in paths:
        handles.append(modules[p].register_forward_hook(hook(p)))
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return outs, logits


@pytest.mark.parametrize("family", ["albert", "dory"])
def test_raw_sites_name_each_call_of_a_module(family):
    """``path`` is a module's first call, ``path@k`` its (k+1)-th, read and written."""
    hf, model = _wrap(family)
    modules = dict(hf.named_modules())
    looped = sorted({n.split("@")[0] for n in model.sites if "@" in n})
    assert looped and all(p in modules for p in looped)
    ids = A.probe_ids(2, 5, seed=5)
    outs, _ = _call_outputs(hf, looped, ids)
    names = [p if k == 0 else f"{p}@{k}" for p in looped for k in range(len(outs[p]))]
    assert set(names) >= {n for n in model.sites if "@" in n}
    assert any(len(outs[p]) > 2 for p in looped) or family == "albert"
    _, cache = model.run_with_cache(ids, names_filter=names)
    for p in looped:
        for k, want in enumerate(outs[p]):
            name = p if k == 0 else f"{p}@{k}"
            assert (cache[name] - want).abs().max() <= 1e-5, name
    # a write at the second call only
    layer = max(looped, key=lambda p: (len(outs[p]), -len(p)))
    _, want = _call_outputs(hf, [layer], ids, edit=(layer, 1, lambda t: t * 0.5))
    got = model.run_with_hooks(ids, fwd_hooks=[(f"{layer}@1", lambda t, hook: t * 0.5)])
    assert (got - want).abs().max() <= 1e-5
    _, first_only = _call_outputs(hf, [layer], ids, edit=(layer, 0, lambda t: t * 0.5))
    assert (got - first_only).abs().max() > 1e-3  # the two calls are told apart
