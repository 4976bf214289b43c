"""benchmarks/gpu.sh stays runnable: its CPU path on two tiny random models, end to end.

The script is what a session with a GPU runs without time to debug it, so every task it has (overhead,
sweeps, the long sequence, path patching, generation) runs here through the shell entry point, and the
table must show every fxlens result agreeing with its plain-HF reference.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_sh_runs_every_task_on_cpu_and_agrees_with_hf():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--quick", "--models", "tiny", "--long-seq", "64"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = [line for line in res.stdout.splitlines() if line.startswith("| tiny")]
    tasks = {line.split(" | ")[1].split(" (")[0].split(",")[0] for line in table}
    assert {"forward 1x16", "run_with_cache", "resid_pre", "attn_head_out_all_pos", "path patching", "generate"} <= tasks, tasks
    assert not [line for line in table if "FAILED" in line or "DIFFER" in line or "OVER" in line], table
    assert sum("same tokens" in line for line in table) == 2
    # every comparison with a hooked HF run agrees to float rounding
    diffs = [float(line.split("|diff| ")[1].split()[0]) for line in table if "|diff| " in line]
    assert len(diffs) >= 11 and max(diffs) < 1e-4, diffs


def test_gpu_sh_refuses_cuda_without_a_gpu_and_says_what_to_do():
    import torch

    if torch.cuda.is_available():
        return
    env = dict(os.environ)
    env.pop("PYTHON", None)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cuda"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=ROOT)
    assert res.returncode != 0
    assert "--device cpu" in res.stderr + res.stdout
