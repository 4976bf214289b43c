"""A sweep on a long input stays within memory_budget, the base run's storage included.

Measured, not estimated: each case runs in a fresh process with big allocations forced to ``mmap``
(``MALLOC_MMAP_THRESHOLD_``), so the resident high-water mark (``VmHWM``, reset before the call through
``/proc/self/clear_refs``) follows live tensors; the peak over the sweep call, above what was resident
before it, must stay under the budget. The results must not depend on the budget.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, torch, transformers
sys.path.insert(0, sys.argv[2])
import fxlens
from fxlens import metrics, patching
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=4, vocab_size=1000, max_position_embeddings=1024)
model = fxlens.Model.from_hf(transformers.LlamaForCausalLM(cfg).eval())
g = torch.Generator().manual_seed(1)
clean, corrupted = torch.randint(0, 1000, (1, 512), generator=g), torch.randint(0, 1000, (1, 512), generator=g)
cells = [(l, p) for l in range(4) for p in (0, 128, 256, 384)]
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
with torch.inference_mode():
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    run = lambda: patching.generic_activation_patch(model, corrupted, cache, metrics.logit_diff(3, 7),
        patching.layer_pos_patch_setter, "resid_pre", index_df=cells, memory_budget=float(sys.argv[1]))
    run()
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    out = run()
    peak = status("VmHWM") - before
print(json.dumps({"peak": peak, "calls": model.last_sweep_stats["block_calls"], "values": out.tolist()}))
"""


def measure(budget_gib: float) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", CHILD, str(budget_gib), str(ROOT)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read the peak")
def test_a_long_sweep_keeps_its_peak_memory_within_the_budget():
    small, large = 48 / 1024, 1.0  # GiB; the base run of this input keeps about 11 MB, one row about 27 MB
    a, b = measure(small), measure(large)
    assert a["peak"] <= small * 2**30, f"{a['peak'] / 2**20:.1f} MB over a budget of {small * 1024:.0f} MB"
    assert b["peak"] <= large * 2**30
    assert a["calls"] > b["calls"]  # the small budget ran fewer rows per call
    assert max(abs(x - y) for x, y in zip(a["values"], b["values"])) <= 1e-4


def test_a_budget_below_the_base_run_and_one_row_is_said_and_changes_no_result():
    import torch
    from conftest import cached_model

    from fxlens import metrics

    _, model = cached_model("llama")
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(3))
    corrupted = ids.clone()
    corrupted[0, 2] = (corrupted[0, 2] + 5) % 100
    _, cache = model.run_with_cache(ids)
    from fxlens import patching

    want = patching.get_act_patch_resid_pre(model, corrupted, cache, metrics.logit_diff(3, 7))
    with pytest.warns(RuntimeWarning, match=r"memory_budget=1e-06 GiB is less than this sweep needs at the least"):
        got = patching.get_act_patch_resid_pre(model, corrupted, cache, metrics.logit_diff(3, 7), memory_budget=1e-6)
    assert (got - want).abs().max() <= 1e-5
