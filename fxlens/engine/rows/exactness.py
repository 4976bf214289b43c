"""Can rows start after position 0? Asked of the blocks themselves, on the base run, once per capture.

Problem: a row that starts at position ``s`` runs each block on positions ``s..`` only, reading the
base run's keys and values for the positions before (a KV prefix, or the fills of packed rows). That is
exact only if attention's keys and values are the block's sole path from earlier positions. Some
blocks mix positions elsewhere: Inkling convolves keys, values and both branch outputs over the last
few positions (a short causal convolution) and builds its relative-position bias from its own
``arange`` of the positions it is given; Doge's dynamic mask is a per-key bias computed from the
values, so the prefix keys' bias columns are missing; a state-space scan keeps a running state. The
graph does not say so in one recognisable op, and such a block gives numbers close to, not equal to,
the right ones (Doge's resid_pre sweep was off by 4e-4, Inkling's by 2.5e-5).

Mechanism: ``suffix_mismatch(engine, base)`` runs every block on the base run's own residual from a
later position on (the last position alone, as the last block and a cached decode step run it, and
from the middle), padded with the base's KV prefix and, where the engine packs rows, packed beside a
row that starts at 0, with no edit, and compares each with the block's output in the base run. An
unedited row must reproduce it up to rounding (relative 1e-5 in float32, four units of the last place
in half precision; dense and mixture-of-experts blocks measured 0 to 2e-7): the base run feeds only the
prefix's keys and values and the input-derived context, so a block that passes computes an edited row's
suffix from that row's own values alone. The first block that does not is named, with its largest
relative difference; the engine then starts every row at position 0 (``RowEngine.suffixes``), which is
exact on any block, and says so once, and generation recomputes instead of stepping from cached keys and
values (``decode.cache_reason``). A block that raises in every suffix layout fails the check too:
DeepSeek-V3.2's sparse-attention indexer scores every query against keys of its own, computed from the
block's input at every position, so a suffix run lacks the earlier positions' indexer keys and its
scores do not fit the mask. One layout that raises while another runs is skipped here: the engine falls
back from it when it raises in a sweep.

Example::

    why = suffix_mismatch(engine, base)    # None, or "block 0 (model.layers.0) run on positions 4.. alone, ..."

Gotchas: the verdict comes from the first base run that keeps keys and values and is long enough to
hold a suffix (two positions or more), and is kept for the capture; where the model is not causal or
the run too short, no verdict is kept (``UNDECIDED``) and the next base run asks again.
"""

from __future__ import annotations

import torch

from .layouts import Packed, Padded

__all__ = ["suffix_mismatch", "UNDECIDED"]

UNDECIDED = ""


def _tolerance(dtype: torch.dtype) -> float:
    if dtype in (torch.float32, torch.float64):
        return 1e-5
    return 4 * torch.finfo(dtype).eps


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def suffix_mismatch(engine, base) -> str | None:
    """Why a row starting after position 0 would not compute what the base run does; None where it would,
    or ``UNDECIDED`` where this base run cannot tell (no verdict: the engine asks again on the next base run)."""
    blocks = engine.blocks
    if not engine.causal or base.seq < 2:
        return UNDECIDED
    tol = _tolerance(base.hidden[0].dtype)
    packing = blocks.packing() is not None
    kept = dict(engine.stats)
    try:
        for layer in range(blocks.n_layers):
            ran, raised = False, None
            path = engine.graph.structure.blocks[layer].path
            for how, run, want in _runs(engine, base, layer, packing):
                try:
                    with torch.no_grad():
                        got = run()
                except Exception as err:  # noqa: BLE001 - one layout that raises is the engine's to fall back from
                    raised = raised or (how, err)
                    continue
                ran = True
                d = _relative(got, want)
                if not d <= tol:
                    return (f"block {layer} ({path}) run {how}, with the earlier positions' keys and values given, differs "
                            f"from its full run by {d:.2g} (relative): it mixes positions outside attention's keys and values")
            if not ran:
                how, err = raised
                first = str(err).splitlines()[0] if str(err) else ""
                return (f"block {layer} ({path}) cannot run {how} with the earlier positions' keys and values given "
                        f"({type(err).__name__}: {first}): it reads earlier positions outside attention's keys and values")
    finally:
        engine.stats.update(kept)
    return None


def _runs(engine, base, layer: int, packing: bool):
    """(what, a call of block ``layer``, the base run's output it must give): the last position alone (as the
    last block runs the positions a metric reads), the positions from the middle on, and both packed
    beside a row that starts at 0."""
    h = base.hidden[layer]
    want = base.hidden[layer + 1] if layer + 1 < engine.blocks.n_layers else base.final
    for start in sorted({base.seq - 1, base.seq // 2}, reverse=True):
        yield (f"on positions {start}.. alone", lambda s=start: engine._block(layer, h[:, s:], base, [], Padded(s, 1)),
               want[:, start:])
        if packing:
            row = torch.cat([torch.zeros(base.seq, dtype=torch.long), torch.ones(base.seq - start, dtype=torch.long)])
            pos = torch.cat([torch.arange(base.seq), torch.arange(start, base.seq)])
            yield (f"on positions {start}.. packed", lambda s=start, row=row, pos=pos: engine._block(
                layer, torch.cat([h, h[:, s:]], dim=1), base, [], Packed(row, pos, 2, base.seq)),
                torch.cat([want, want[:, start:]], dim=1))
