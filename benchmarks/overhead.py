"""Overhead of fxlens against a plain HF forward and TransformerLens, on the same weights.

GPT-2-small-shaped model (random weights), inputs 1x16 and 8x64, all in one process with the variants
interleaved round by round (the machines are shared and noisy, so only ratios are reported):

  hf                plain HuggingFace forward (SDPA)
  fxlens            fxlens forward (the captured graph)
  fxlens_cache_all  run_with_cache of every site (patterns computed beside SDPA)
  fxlens_cache_resid run_with_cache of the resid_post sites only
  tl_cache_all      TransformerLens 4.x TransformerBridge.run_with_cache (eager attention)

Peak extra memory is measured in a fresh subprocess per variant: big allocations are forced to mmap
(MALLOC_MMAP_THRESHOLD_) so RSS follows live tensors, the peak-RSS counter is reset after set-up
(/proc/self/clear_refs), and the peak over one call is reported next to the bytes the call returns.

Run: python benchmarks/overhead.py [--threads 1] [--rounds 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SIZES = ((1, 16), (8, 64))
VARIANTS = ("hf", "fxlens", "fxlens_cache_all", "fxlens_cache_resid", "tl_cache_all")


def build(variants=VARIANTS):
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    import fxlens

    model = fxlens.Model.from_hf(hf)
    resid = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    fns = {
        "hf": lambda ids: hf(input_ids=ids, use_cache=False).logits,
        "fxlens": lambda ids: model(ids),
        "fxlens_cache_all": lambda ids: model.run_with_cache(ids),
        "fxlens_cache_resid": lambda ids: model.run_with_cache(ids, names_filter=resid),
    }
    if "tl_cache_all" in variants:
        fns["tl_cache_all"] = tl_runner(hf)
    return {k: v for k, v in fns.items() if k in variants}


def tl_runner(hf):
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformer_lens.model_bridge import TransformerBridge

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(10)}, unk_token="t0"))
    path = tempfile.mkdtemp()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", pad_token="t2", unk_token="t0").save_pretrained(path)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf), tokenizer=AutoTokenizer.from_pretrained(path))
    return lambda ids: bridge.run_with_cache(ids)


def returned_bytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(returned_bytes(o) for o in out)
    if hasattr(out, "items"):
        seen, total = set(), 0
        for v in out.values():
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                total += v.untyped_storage().nbytes()
        return total
    return 0


def timings(fns, rounds: int, sizes=SIZES) -> dict:
    out = {}
    for b, s in sizes:
        ids = torch.randint(0, 50257, (b, s), generator=torch.Generator().manual_seed(1))
        times = {k: [] for k in fns}
        with torch.inference_mode():
            for fn in fns.values():
                fn(ids)  # build programs, warm caches
            names = list(fns)
            for r in range(rounds):
                for k in names[r % len(names):] + names[: r % len(names)]:
                    t = time.perf_counter()
                    fns[k](ids)
                    times[k].append(time.perf_counter() - t)
        out[f"{b}x{s}"] = {k: statistics.median(v) for k, v in times.items()}
    return out


def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def child_memory(variant: str, b: int, s: int) -> dict:
    fns = build((variant,))
    fn = fns[variant]
    ids = torch.randint(0, 50257, (b, s), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fn(ids)  # warm up (builds fxlens programs); with MALLOC_MMAP_THRESHOLD_ the memory goes back to the OS
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = fn(ids)
        peak = _status("VmHWM") - base
    return {"peak_extra": peak, "returned": returned_bytes(out)}


def memory(sizes=SIZES) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = {}
    for b, s in sizes:
        for variant in VARIANTS:
            res = subprocess.run(
                [sys.executable, __file__, "--child", variant, str(b), str(s)], capture_output=True, text=True, env=env, check=True
            )
            out.setdefault(f"{b}x{s}", {})[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "B", "S"))
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    fns = build()
    t = timings(fns, args.rounds)
    mem = {} if args.no_memory else memory()
    print(f"GPT-2-small shape, random weights, torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} interleaved rounds")
    print(f"{'variant':22s}" + "".join(f"{size:>22s}" for size in t))
    for k in fns:
        row = f"{k:22s}"
        for size, res in t.items():
            row += f"{res[k] * 1e3:9.1f} ms {res[k] / res['hf']:6.3f}x  "
        print(row)
    if mem:
        print("peak extra memory over the call (MB) / bytes returned (MB)")
        for k in fns:
            row = f"{k:22s}"
            for size in t:
                m = mem[size][k]
                row += f"{m['peak_extra'] / 2**20:10.1f} / {m['returned'] / 2**20:8.1f}  "
            print(row)


if __name__ == "__main__":
    main()
