"""Rows across processes: under ``torchrun`` every rank runs its share of a run's rows, and every rank
returns the full result.

Problem: large sweeps (thousands of cells, many prompt pairs) are embarrassingly parallel over rows,
and big runs use several GPUs or machines. A researcher's script should not change: the same
``patching.get_act_patch_*`` call under ``torchrun --nproc-per-node 2`` should take half the time and
give every rank the same tensor it gives in one process.

Mechanism: ``Shard.of(n)`` looks at ``torch.distributed``: with an initialised process group of more
than one rank (and sharding not switched off with ``local()``), rank ``r`` of ``w`` takes rows ``r, r + w,
r + 2w, ...`` (a stride, so that every rank gets rows of every layer and start, the cost spread evenly);
``gather`` all-gathers each rank's values (padded to one length) and puts them back in row order. The
row engine calls it around its run of rows (``RowEngine.run``), so sweeps, path patching and edge
sweeps shard alike. gloo carries CPU tensors, NCCL CUDA tensors (values move to the rank's device
for the collective and come back to the CPU).

Example::

    # torchrun --nproc-per-node 2 sweep.py   (each rank: torch.distributed.init_process_group("gloo"))
    out = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)   # the full grid on every rank
    with fxlens.engine.distributed.local():   # this rank's own run, unsharded
        ...

Gotchas: every rank must make the same calls with the same inputs in the same order (as with any
collective); a rank that raises leaves the others waiting in the collective, as torch.distributed does.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

__all__ = ["Shard", "local"]

_state = threading.local()


@contextlib.contextmanager
def local():
    """Runs inside are not sharded across ranks (each rank computes everything it asks for)."""
    before = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = before


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    @staticmethod
    def of(n: int) -> "Shard":
        """This process's share of ``n`` rows (the whole of them outside a process group)."""
        dist = torch.distributed
        if getattr(_state, "off", False) or n < 2 or not (dist.is_available() and dist.is_initialized()):
            return Shard(0, 1)
        world = dist.get_world_size()
        return Shard(dist.get_rank(), world) if world > 1 else Shard(0, 1)

    def indices(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    def gather(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's ``values`` (this rank's rows, in ``indices`` order) as the full [n, ...] result."""
        if self.world == 1:
            return values
        dist = torch.distributed
        width = -(-n // self.world)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        mine = torch.zeros(width, *values.shape[1:], dtype=values.dtype, device=device)
        mine[: values.shape[0]] = values.to(device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        out = torch.empty(n, *values.shape[1:], dtype=values.dtype)
        for rank, part in enumerate(parts):
            idx = list(range(rank, n, self.world))
            out[idx] = part[: len(idx)].cpu()
        return out
