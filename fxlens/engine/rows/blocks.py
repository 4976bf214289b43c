"""The captured model as separately runnable pieces: prelude, one program cache per block, head.

Problem: rows join a run at some layer, so each block must run on its own, fed the residual stream
and the positional context (masks, rotary tables) the prelude computed, sliced to the positions a
row computes or gathered at packed tokens. What each context tensor's sequence axes are, which nodes
hold each attention's keys and values, whether a block can run packed rows, and what one block call
costs are facts about the captured graph, found once per capture.

Mechanism: ``Blocks(derived)`` splits the graph (``graphs.segments``) and keeps one ``Programs`` per
block and for the head; ``feed`` makes a block's inputs; ``packing`` checks once per capture that rows
of different starts can share a call (``passes.pack_rows``); ``mlp_programs`` are each block's MLP as
a program of its input (path patching). A ``Blocks`` is a derived item of ``engine.derived.Derived``,
so an edited, copied or rebound model never runs another model's blocks.

Example::

    blocks = Blocks.of(model.derived)
    out = blocks.call(3, plan, blocks.feed(3, h, base.context, start=5, rows=4), inputs)
"""

from __future__ import annotations

import torch

from ...graphs.nodes import sym_dims
from ...passes import PassError
from ...passes.pack_rows import PackRows, core_contexts
from ..plan import PlanBuilder
from ..programs import Programs

__all__ = ["Blocks", "BlockError"]


class BlockError(RuntimeError):
    pass


class Blocks:
    def __init__(self, derived):
        self.derived = derived
        self.graph = derived.graph
        self.captured = derived.captured
        seg = derived.segments
        self.seg = seg
        self.n_layers = len(seg.blocks)
        place = self.placement = derived.placement  # a model spread over devices: each program on its blocks' devices
        self.programs = [Programs(gm, placement=place) for gm in seg.blocks]
        self.head = Programs(seg.head, placement=place)
        self.prelude = seg.prelude if place is None else Programs(seg.prelude, placement=place).build(())
        self.causal = derived.captured.is_causal
        syms = (self.captured.batch_symbol, self.captured.seq_symbol)
        nodes = {n.name: n for n in seg.prelude.graph.nodes}
        self.seq_dims = {}  # context -> its positions axes: one (query positions), or two ([.., q, k] mask)
        self.key_only = set()  # contexts over keys alone, broadcast over queries: never sliced or gathered
        for names in list(seg.block_context) + [seg.head_context]:
            for c in names:
                dims = sym_dims(nodes[c], *syms)
                seq = [i for i, d in enumerate(dims) if d == "S"]
                if seq == [len(dims) - 1] and len(dims) >= 3 and dims[-2] == 1:
                    # ALiBi's [batch*heads, 1, key] bias: a row's queries read every key. A wrong guess here is
                    # caught by the suffix-exactness probe (``exactness.py``), which then runs rows whole-model.
                    self.key_only.add(c)
                    seq = []
                self.seq_dims[c] = seq
        # per block: ((k node, its attention consumer), (v node, its consumer)), or None without attention
        self.kv_uses = [None if a is None else ((a.k_in, a.k_consumer), (a.v_in, a.v_consumer)) for a in self.graph.attn]
        self._packing = False
        self._mlps: dict = {}
        self._post_norms: dict = {}
        self.break_even: float | None = None  # measured by the cost model on first use

    @classmethod
    def of(cls, derived) -> "Blocks":
        return derived.item("blocks", lambda: cls(derived))

    # ---- feeding a block ---------------------------------------------------------------------------
    def feed(self, layer: int, h: torch.Tensor, context: dict, start: int = 0, rows: int = 1) -> dict:
        """Block ``layer``'s inputs: residual ``h`` for positions ``start..``, its context for those
        positions, tiled over ``rows`` rows of the base batch."""
        out = {self.seg.hidden[layer]: h}
        for c in self.seg.block_context[layer]:
            out[c] = self.context(c, context[c], start, rows)
        return out

    def context(self, name: str, value: torch.Tensor, start: int, rows: int) -> torch.Tensor:
        dims = self.seq_dims.get(name, [])
        if start and dims:
            # a [.., q, k] mask keeps every key; every other positional tensor is sliced to the suffix
            axis = dims[-2] if len(dims) == 2 else dims[0]
            value = value.narrow(axis, start, value.shape[axis] - start)
        if rows > 1 and value.shape[0] > 1:
            value = value.repeat(rows, *([1] * (value.dim() - 1)))
        return value

    def call(self, layer: int, plan: tuple, feed: dict, inputs: dict | None = None, compile: bool = False) -> dict:
        return self.programs[layer].get(plan, compile)(**feed, **(inputs or {}))

    def head_feed(self, h: torch.Tensor, context: dict) -> dict:
        return {self.seg.head_input: h, **{c: context[c] for c in self.seg.head_context}}

    # ---- packed rows ----------------------------------------------------------------------------
    def packing(self):
        """Per block, (cores for ``PackRows``, contexts the attention reads, contexts the rest reads);
        None where rows of different starts cannot share a call (not causal, or an unusual block)."""
        if self._packing is not False:
            return self._packing
        packing = [] if self.causal else None
        syms = (self.captured.batch_symbol, self.captured.seq_symbol)
        for i, programs in enumerate(self.programs if self.causal else ()):
            a = self.graph.attn[i]
            contexts = frozenset(self.seg.block_context[i])
            if a is None:
                if any(len(self.seq_dims.get(c, [])) > 1 for c in contexts):
                    packing = None  # attention not recognised, yet the block reads a [q, k] mask: nothing places it
                    break
                packing.append((None, frozenset(), contexts))
                continue
            core = (a.q_in, a.k_in, a.v_in, a.z_heads, str(i))
            nodes = {n.name: n for n in programs.base.graph.nodes}
            dims = [sym_dims(nodes[n], *syms) for n in core[:4]]
            if not all(len(d) == 4 and d[0] == "B" and d[2] == "S" for d in dims):
                packing = None  # the attention's operands are not [batch, heads, seq, d]: unpack cannot place them
                break
            try:
                inside, outside = core_contexts(programs.base, PackRows((core + ((),),)), self.seg.hidden[i])
            except PassError:
                packing = None
                break
            if any(len(self.seq_dims.get(c, [])) > 1 for c in outside):
                packing = None  # a [q, k]-shaped input outside attention: no per-token gather exists
                break
            packing.append((core, inside & contexts, outside & contexts))
        self._packing = packing
        return packing

    # ---- MLPs as programs of their input (path patching) -------------------------------------
    def mlp_programs(self, fused: bool = True) -> list:
        """Each block's MLP as a program of its input. ``fused``: a spelled-out GELU runs as one kernel
        (for rows of differences); unfused, values are bit-identical to the model's own."""
        if not self._mlps:
            for block in self.graph.structure.blocks:
                members = set(block.mlp.nodes) | _local_inputs(self.graph.dg, block)
                self._mlps[block.index] = self._piece(members, block.mlp.entry, "mlp", block.mlp.output,
                                                      f"the MLP of {block.path} reads a value computed elsewhere in the block besides the "
                                                      "residual stream, so it cannot run on its own")
        plan = PlanBuilder(self.graph).fuse_gelu().build()[0] if fused else ()
        return [self._mlps[i].get(plan) for i in range(self.n_layers)]

    def post_norm_programs(self) -> dict:
        """{(layer, "attn" | "mlp"): program}: each norm a branch passes through before the add
        (``graphs.components.PostNorm``) as a program of the branch's sum (edge sweeps on Gemma 2/3 and
        OLMo 2/3). Called with ``{pn.input: x}``; ``["outputs"]["normed"]`` is what it adds."""
        if not self._post_norms:
            by_name = {n.name: n for n in self.captured.module.graph.nodes}
            for pn in self.derived.components.post_norms:
                members = set(pn.cone) | _constants([by_name[n] for n in pn.cone], {pn.input, *pn.cone})
                self._post_norms[(pn.layer, pn.kind)] = self._piece(
                    members, pn.input, "normed", pn.cone[-1], f"the norm {pn.path} reads an input besides its branch's output")
        return {key: programs.get(()) for key, programs in self._post_norms.items()}

    def _piece(self, members: set, entry: str, out: str, output: str, refusal: str) -> Programs:
        """Programs of the captured graph's nodes ``members`` as a function of node ``entry``, returning
        node ``output`` as ``out``; ``refusal`` when they read anything else from outside."""
        from ...graphs.segments import _subgraph

        gm = self.captured.module
        by_name = {n.name: n for n in gm.graph.nodes}
        nodes = [n for n in gm.graph.nodes if n.name in members]
        syms = (self.captured.batch_symbol, self.captured.seq_symbol)
        sub, ctx = _subgraph(gm, nodes, by_name[entry], {out: by_name[output]}, syms)
        if ctx:
            raise BlockError(refusal)  # ctx holds graph node names: not for a user's eyes
        return Programs(sub, placement=self.placement)


def _constants(nodes: list, inside: set) -> set:
    """Names of the nodes outside ``inside`` that ``nodes`` read and that depend on parameters only (a
    norm's weight cast, Gemma's ``1 + weight``): a program of the norm recomputes them."""
    memo: dict = {}

    def constant(n) -> bool:
        if n.name not in memo:
            memo[n.name] = n.op == "get_attr" or (n.op == "call_function" and all(constant(a) for a in n.all_input_nodes))
        return memo[n.name]

    out, stack = set(), [a for n in nodes for a in n.all_input_nodes if a.name not in inside]
    while stack:
        n = stack.pop()
        if n.name in out or n.op != "call_function" or not constant(n):
            continue
        out.add(n.name)
        stack.extend(n.all_input_nodes)
    return out


def _local_inputs(dg, block) -> set:
    """Nodes of the block that the MLP reads without a data path from the residual stream: a weight
    transposed, an index range over the tokens (a mixture-of-experts MLP). They are recomputed in the
    MLP's program; anything else it reads from outside becomes an input (and is refused)."""
    out, stack = set(), [a for n in block.mlp.nodes for a in dg.data_inputs(n)]
    entry_side = dg.downstream([block.resid_pre]) | {block.resid_pre}
    while stack:
        name = stack.pop()
        if name in out or name in block.mlp.nodes or name not in block.nodes or name in entry_side:
            continue
        out.add(name)
        stack.extend(dg.data_inputs(name))
    return out
