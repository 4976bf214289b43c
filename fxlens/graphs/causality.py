"""Is a captured model causal? Asked of what the graph computes, not of the model's class name.

Problem: a patching sweep may skip the positions before a patch only if nothing earlier reads later
tokens. A class name does not say so: ``BertForTokenClassification``, ``RobertaForTokenClassification``,
``ElectraForPreTraining`` and ``BertLMHeadModel(is_decoder=False)`` are bidirectional encoders whose
names look like nothing in particular, and a wrong guess makes sweeps silently drop the effect of a
patch on earlier positions.

Mechanism: run the captured program on a small probe input and again with only the last token
changed, recording every node that has exactly one sequence axis (hidden states, queries, keys,
values, MLP activations, logits). The model is causal only if, at every such node, every position
before the last is unchanged between the two runs, up to rounding: the largest change relative to
the node's largest value must stay under 1e-4 in float32 (``_noise``). Dense causal models match
bit for bit; a mixture-of-experts model regroups every token by expert when the last token's routing
changes, which moves earlier rows by a few units of the last place (4e-7 to 6e-7 measured on Mixtral
and Qwen3-MoE); a bidirectional encoder moves them by 0.2-0.3. Nodes with two sequence axes (scores,
masks) are not compared: a causal model's raw scores do read the later key before it is masked.
Memory a model allocates and has not written yet reads as NaN in both runs (``_filled``) and counts
as equal. Should noise ever make a causal model look otherwise, the error is on the safe side: sweeps
then recompute earlier positions.

The first run also returns the graph's outputs, so that capture's self-check (``selfcheck``)
compares them with the HF model without a third forward of the graph.

Example::

    probe_causal(cg.module, cg.seq_symbol, vocab=30522)             # False for any BERT head
    probe_causal(cg.module, cg.seq_symbol, vocab=50257)             # True for GPT-2
    p = probe(cg.module, cg.seq_symbol, vocab=50257)                # p.ids, p.outputs["logits"], p.causal

Gotchas: the probe runs the graph once per input on the model's device (a [1, 6] input; positions
are capped by ``max_len``). A model whose vocabulary or context holds a single entry cannot be
probed for causality and is treated as not causal (``probe`` then runs the graph once).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from .nodes import tensor_meta

__all__ = ["Probe", "probe", "probe_causal", "sequence_axes"]

PROBE_LENGTH = 6


def sequence_axes(graph: fx.Graph, seq_symbol) -> dict[str, int]:
    """{node name: axis} for every tensor node with exactly one axis equal to the sequence symbol
    and no other axis that involves it (a flattened batch*pos axis is left out)."""
    out = {}
    for node in graph.nodes:
        val = tensor_meta(node)
        if node.op in ("placeholder", "get_attr", "output") or not isinstance(val, torch.Tensor):
            continue
        axes, involved = [], 0
        for i, d in enumerate(val.shape):
            expr = d.node.expr if isinstance(d, torch.SymInt) else d
            if expr == seq_symbol:
                axes.append(i)
            elif seq_symbol is not None and hasattr(expr, "free_symbols") and seq_symbol in expr.free_symbols:
                involved += 1
        if len(axes) == 1 and not involved:
            out[node.name] = axes[0]
    return out


def _watching(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A copy of ``gm`` whose output is (the named nodes' values, ``gm``'s own output) (generated
    code, so the probe costs two plain forwards rather than two interpreted ones)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    by_name = {n.name: n for n in gm.graph.nodes}
    graph.output((tuple(env[by_name[name]] for name in names), out))
    return fx.GraphModule(gm, graph)


def _relative(a, b) -> float:
    if a.shape == b.shape and a.numel() == 0:
        return 0.0  # nothing before the last position (a node whose sequence axis is cut to nothing)
    if a.shape != b.shape or not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    a, b = a.detach().double(), b.detach().double()
    unset = a.isnan() & b.isnan()  # memory no op has written yet (filled with NaN in both runs: ``_filled``)
    if bool((a.isnan() | b.isnan())[~unset].any()):
        return float("inf")
    return float((a - b).abs().masked_fill(unset, 0).max() / a.abs().masked_fill(unset, 0).max().clamp_min(1e-30))


@contextlib.contextmanager
def _filled():
    """Uninitialised memory filled with NaN (integers with their largest value) while the probe runs.

    DeepSeek-V3.2 builds its keys in a ``new_empty`` tensor and copies both halves in: before the second
    copy, half of that node holds whatever the allocator returned, which differed between the probe's two
    runs, so the model was taken for non-causal in some captures and causal in others. torch fills new
    tensors only while deterministic algorithms are on (``warn_only``: an op without a deterministic
    kernel warns rather than raises); the previous setting is restored.
    """
    on, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
            yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(on, warn_only=warn_only)


def _noise(dtype: torch.dtype) -> float:
    """The largest relative change at earlier positions still taken for rounding: 1e-4 in float32 and
    float64, four units of the last place in half precision."""
    if dtype in (torch.float32, torch.float64):
        return 1e-4
    return 4 * torch.finfo(dtype).eps


@dataclass
class Probe:
    """What the probe ran and saw: its input, the graph's output on it, and the causality verdict."""

    ids: torch.Tensor  # [1, length] on the model's device
    outputs: dict  # the graph's output on ``ids`` (an all-ones attention mask where the graph takes one)
    causal: bool


def probe(gm: fx.GraphModule, seq_symbol, vocab: int | None, *, max_len: int | None = None, device=None,
          length: int | None = None, min_len: int = 1) -> Probe:
    """Run the graph on a small probe input (twice when causality can be probed; see the module docstring).

    ``length``: the probe's length for a graph that takes one length only; else ``PROBE_LENGTH`` within
    ``min_len..max_len``.
    """
    if length is None:
        length = PROBE_LENGTH if max_len is None else min(PROBE_LENGTH, int(max_len))
        length = max(length, 1, int(min_len))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(int(vocab or 1), 1), (1, length), generator=g)
    changed = ids.clone()
    if vocab is not None and vocab >= 2:
        changed[0, -1] = (ids[0, -1] + 1 + torch.randint(0, vocab - 1, (1,), generator=g)) % vocab
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    axes = sequence_axes(gm.graph, seq_symbol)
    probing = bool(axes) and vocab is not None and vocab >= 2 and length >= 2
    watch = _watching(gm, list(axes) if probing else [])
    runs, outputs = [], None
    with torch.no_grad(), _filled():
        for tokens in (ids, changed) if probing else (ids,):
            feed = {"input_ids": tokens.to(device)}
            if "attention_mask" in placeholders:
                feed["attention_mask"] = torch.ones_like(feed["input_ids"])
            values, out = watch(*(feed[name] for name in placeholders))
            outputs = out if outputs is None else outputs
            runs.append([v.narrow(axes[name], 0, length - 1) for name, v in zip(axes, values)])
    dtype = next((v.dtype for v in runs[0] if v.is_floating_point()), torch.float32) if runs and runs[0] else torch.float32
    causal = probing and max((_relative(a, b) for a, b in zip(*runs)), default=0.0) <= _noise(dtype)
    return Probe(ids=ids.to(device), outputs=outputs, causal=causal)


def probe_causal(gm: fx.GraphModule, seq_symbol, vocab: int | None, *, max_len: int | None = None, device=None) -> bool:
    """Whether no position before the last depends on the last token (see the module docstring)."""
    return probe(gm, seq_symbol, vocab, max_len=max_len, device=device).causal
