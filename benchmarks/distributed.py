"""Sweeps on 2 ranks against one process, one thread each: the speed-up of sharding rows (gloo, CPU).

The GPT-2-small shape (random weights), a resid_pre sweep and a head sweep on 1x16 tokens with a
logit-difference metric. One process runs each sweep alone; then 2 ranks (``torch.multiprocessing``
workers in a gloo process group, as torchrun starts them) run the same calls, each timing its own call
(all ranks return the full result, checked equal to the single process's).

Run: python benchmarks/distributed.py [--ranks 2] [--repeats 3] [--tokens 16]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
import warnings

import torch
import torch.multiprocessing as mp

warnings.filterwarnings("ignore")
SWEEPS = ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos")


def setup(tokens: int = 16):
    import transformers

    import fxlens

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    model = fxlens.Model.from_hf(hf)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(100, 20000, (1, tokens), generator=g)
    corrupted = clean.clone()
    corrupted[0, 5:7] = torch.randint(100, 20000, (2,), generator=g)
    _, cache = model.run_with_cache(clean)
    return model, corrupted, cache


def measure(repeats: int, tokens: int = 16) -> dict:
    from fxlens import metrics, patching

    model, corrupted, cache = setup(tokens)
    metric = metrics.logit_diff(1234, 4321)
    out = {}
    with torch.inference_mode():
        for name in SWEEPS:
            fn = getattr(patching, name)
            fn(model, corrupted, cache, metric)
            times = []
            for _ in range(repeats):
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()
                start = time.perf_counter()
                res = fn(model, corrupted, cache, metric)
                times.append(time.perf_counter() - start)
            out[name] = (res, statistics.median(times))
    return out


def _worker(rank, world, port, repeats, tokens, folder):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(measure(repeats, tokens), os.path.join(folder, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16, help="prompt length (the sweeps grow with it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    single = measure(args.repeats, args.tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp()
    mp.spawn(_worker, args=(args.ranks, port, args.repeats, args.tokens, folder), nprocs=args.ranks, join=True)
    ranks = [torch.load(os.path.join(folder, f"{r}.pt")) for r in range(args.ranks)]
    print(f"torch {torch.__version__}, GPT-2-small shape, 1x{args.tokens} tokens, 1 thread per process, {args.ranks} gloo ranks")
    for name in SWEEPS:
        res, t1 = single[name]
        tn = max(r[name][1] for r in ranks)
        diff = max((r[name][0] - res).abs().max().item() for r in ranks)
        print(f"{name:38s} 1 process {t1:6.2f} s   {args.ranks} ranks {tn:6.2f} s   speed-up {t1 / tn:4.2f}x   (max |diff| {diff:.1e})")


if __name__ == "__main__":
    main()
