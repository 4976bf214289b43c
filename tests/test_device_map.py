"""Models dispatched by accelerate (``device_map``): what runs on a CPU-only machine, and what is refused.

A model loaded with a device_map carries accelerate's ``AlignDevicesHook`` on every block (moving each
block's inputs to its device). On one device the capture must go through those hooks and give caches,
interventions and sweeps equal to plain HF hooks on the same dispatched model. Weights offloaded to the
meta device are refused at capture with the fix. Blocks on several devices: ``test_several_devices``.
"""

import pytest
import torch
from families import make, tokens
from hf_hooks import hf_cache, hf_run

import fxlens
from fxlens import metrics, patching
from fxlens.graphs.capture import CaptureError

accelerate = pytest.importorskip("accelerate")

TOL = 1e-5


def dispatched(family="llama"):
    """The family's tiny model dispatched block by block onto the CPU, with accelerate's hooks on every block."""
    hf = make(family)
    body = "model" if family == "llama" else "transformer"
    blocks = "layers" if family == "llama" else "h"
    device_map = {name: "cpu" for name, _ in hf.named_children() if name != body}
    for name, child in hf.get_submodule(body).named_children():
        if name == blocks:
            device_map.update({f"{body}.{blocks}.{i}": "cpu" for i in range(len(child))})
        else:
            device_map[f"{body}.{name}"] = "cpu"
    out = accelerate.dispatch_model(hf, device_map=device_map, force_hooks=True)  # hooks although one device
    assert hasattr(out.get_submodule(f"{body}.{blocks}.0"), "_hf_hook")
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_model_with_accelerate_hooks_caches_patches_and_sweeps_as_plain_hf(family):
    hf = dispatched(family)
    model = fxlens.Model.from_hf(hf)
    ids = tokens(2, 6, seed=1)
    corrupted = ids.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 7) % 100
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= TOL
        _, cache = model.run_with_cache(ids)
        ref = hf_cache(hf, ids, None, ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"])
        for name, value in ref.items():
            assert (cache[name] - value).abs().max() <= TOL, name
        # an intervention: block 1's input at position 3 takes the clean run's value
        clean = cache["blocks.1.hook_resid_pre"]
        got = model.run_with_interventions(corrupted, [fxlens.Patch("blocks.1.hook_resid_pre", source=cache, pos=3)])

        def put(v):
            v[:, 3] = clean[:, 3]
            return v

        want = hf_run(hf, corrupted, None, {"blocks.1.hook_resid_pre": put})
        assert (got - want).abs().max() <= TOL
        grid = patching.get_act_patch_resid_pre(model, corrupted, cache, metrics.logit_diff(5, 9))
        want = want[:, -1, 5] - want[:, -1, 9]
        assert abs(float(grid[1, 3]) - float(want.mean())) <= TOL


def test_weights_offloaded_to_the_meta_device_are_refused_with_the_fix():
    hf = make("llama")
    hf.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(torch.empty_like(hf.model.layers[1].mlp.down_proj.weight, device="meta"))
    with pytest.raises(CaptureError, match=r"meta device.*device_map=\{'': 'cuda:0'\}"):
        fxlens.Model.from_hf(hf)
