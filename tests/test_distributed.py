"""Sweeps, path patching and edge sweeps under torch.distributed: 2 CPU ranks (gloo), each returns the
single-process result.

Reference: the same calls in this process without a process group. The ranks are spawned with
``torch.multiprocessing`` (as torchrun's workers would be) and each writes what it got.
"""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))


def calls():
    """{name: tensor} of the sharded entry points on one model (the same in every process)."""
    from conftest import cached_model
    from families import tokens

    from fxlens import circuits, metrics, patching

    _, model = cached_model("llama")
    clean, corrupted = tokens(2, 6, seed=1), tokens(2, 6, seed=2)
    corrupted[:, :2] = clean[:, :2]
    _, cache = model.run_with_cache(clean)
    metric = metrics.logit_diff(5, 7)
    resid_pre = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    work = torch.tensor(float(model.last_sweep_stats["token_layers"]))
    return {
        "work": work,
        "resid_pre": resid_pre,
        "heads_by_pos": patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, lambda l: l[:, -1, 5].mean()),
        "per_prompt": patching.get_act_patch_resid_pre(model, corrupted, cache, metric, reduce="none"),
        "paths": torch.tensor(list(circuits.path_patch(model, clean, corrupted, metric, receivers=["a1.h0<q>"]).values())),
        "edges": circuits.edge_sweep(model, clean, [["a0.h1->a1.h0<q>"], ["a0.h0->a1.h1<k>"], ["m0->logits"]], metric,
                                     ablation="corrupted", reference=corrupted),
    }


def _worker(rank, world, port, out_dir):
    sys.path.insert(0, HERE)
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from fxlens.engine import distributed

        got = calls()
        with distributed.local():  # this rank alone: no collective, everything computed here
            alone = patching_resid_pre_alone()
        torch.save({"got": got, "alone": alone}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def patching_resid_pre_alone():
    from conftest import cached_model
    from families import tokens

    from fxlens import metrics, patching

    _, model = cached_model("llama")
    clean, corrupted = tokens(2, 6, seed=1), tokens(2, 6, seed=2)
    _, cache = model.run_with_cache(clean)
    return patching.get_act_patch_resid_pre(model, corrupted, cache, metrics.logit_diff(5, 7))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600) if hasattr(pytest.mark, "timeout") else (lambda f: f)
def test_two_ranks_each_return_the_single_process_results(tmp_path):
    want = calls()
    alone_want = patching_resid_pre_alone()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        # each rank ran part of the rows: less work than one process, and about half of it together
        assert saved["got"]["work"] < want["work"]
        for name, value in want.items():
            if name == "work":
                continue
            assert saved["got"][name].shape == value.shape, name
            assert (saved["got"][name] - value).abs().max() <= 1e-5, f"rank {rank}: {name}"
        assert (saved["alone"] - alone_want).abs().max() <= 1e-5
