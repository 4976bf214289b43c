"""The plan builder: the only path from sites and intents to ``(plan, feed)``.

Problem: a call that caches, hooks, intervenes, patches edges, runs a block on a KV prefix or packed
rows, or unembeds a few vocabulary entries needs several passes in the right order, the rewrites that
materialise the values its sites name (an explicit pattern under SDPA, per-head results, a decomposed
norm), and graph inputs for its tensors. Assembled by hand at each call site, graph-input names drift
apart, a rewrite gets forgotten, or passes run in an order that silently drops an edit.

Mechanism: a ``PlanBuilder`` collects intents (``cache``, ``hook``, ``edit``, ``edges``, ``kv_prefix``,
``pack_rows``, ``select_vocab``, ``fuse_gelu``). Every tensor or callable a pass reads enters through
``input(value)``, which names the graph input (``fxl_in0``, ``fxl_in1``, ...) in the order the intents
arrive, so the same request always yields the same plan and reuses its program. ``build()`` adds one
materialising rewrite per kind for the sites touched (the replacing form for sites that are written),
orders the passes by stage (``passes.STAGES``) and returns ``(plan, feed)``.

Example::

    b = PlanBuilder(model.graph)
    b.edit(site, ADD, (vector,), mask=pos_mask)
    b.cache([model.site("blocks.3.hook_resid_post")])
    plan, feed = b.build()
    out = programs.get(plan)(**tokens_feed, **feed)

Gotchas: a plan holds no tensors, so memoising it per request (``Derived.plan``) is safe; the feed must
be rebuilt for each call.
"""

from __future__ import annotations

from ..graphs.sites import ModelGraph, Site
from ..passes import (
    STAGES,
    Cache,
    DecomposeNorm,
    Edges,
    Edit,
    ExpandAttention,
    FuseGelu,
    HookAt,
    Hooks,
    Intervene,
    KVPrefix,
    PackRows,
    Read,
    SelectVocab,
    SplitExperts,
    SplitHeads,
    check_order,
)
from ..passes.split_experts import Experts
from ..passes.edges import receiver_specs
from ..passes.split_inputs import InputSplit, SplitInputs
from ..passes.split_heads import Head
from ..passes.stack_states import Scan, StackStates

__all__ = ["PlanBuilder", "rewrites_for"]

_REWRITES = (("expand_attention", ExpandAttention), ("decompose_norm", DecomposeNorm), ("split_heads", SplitHeads),
             ("split_experts", SplitExperts), ("split_inputs", SplitInputs), ("ssm_state", StackStates))


def rewrites_for(mg: ModelGraph, sites, write=()) -> tuple:
    """The materialising rewrites ``sites`` need, one pass per kind, in a stable order.

    A site in ``write`` (one that is patched or hooked) gets the replacing form of its rewrite, so the
    model uses the materialised value; otherwise the value is computed beside the fused node and the
    model's outputs stay bit-identical to the captured graph.
    """
    write = {s.name for s in write}
    found: dict = {kind: {} for kind, _ in _REWRITES}
    for site in sites:
        if site.rewrite is None:
            continue
        kind, target = site.rewrite
        if kind not in found:
            raise ValueError(f"unknown rewrite {kind!r} for site {site.name}")
        entry = target
        if kind == "split_heads":
            # an encoder-decoder has several attentions per layer index (graphs/seq2seq.py)
            a = mg.attention_of(site) if hasattr(mg, "attention_of") else mg.attn[site.layer]
            entry = Head(target, a.z.node, a.z.layout, a.n_heads, a.d_head)
        elif kind == "split_experts":
            m = mg.moe[site.layer]
            entry = Experts(m.contributions, m.indices.node, m.combine, m.n_experts)
        elif kind == "split_inputs":
            entry = input_split(mg, site.layer, site.kind, target)
        elif kind == "ssm_state":
            entry = Scan(target, mg.scans[site.layer])
        found[kind][entry] = found[kind].get(entry, False) or site.name in write
    specs = []
    for kind, cls in _REWRITES:
        for replace in (False, True):
            entries = tuple(e for e, r in found[kind].items() if r == replace)
            if entries:
                specs.append(cls(entries, replace=replace))
    return tuple(specs)


def input_split(mg: ModelGraph, layer: int, kind: str, entry: str) -> InputSplit:
    """What ``passes.split_inputs`` needs for the input copies ``kind`` of ``layer``: the circuit receivers
    (``graphs.components``) that read them, with the copy each reads."""
    comp = mg.components
    mine = [r for r in comp.receivers if r.layer == layer]
    if kind == "mlp_in":
        chosen, n = [r for r in mine if r.kind == "mlp"], 0
    else:
        kinds = ("q", "k", "v") if kind == "attn_in" else (kind[0],)
        chosen = [r for r in mine if r.kind in kinds]
        n = mg.attn[layer].n_kv_heads if kind in ("k_input", "v_input") else mg.attn[layer].n_heads
    specs = receiver_specs(comp, [r.name for r in chosen])
    columns = tuple(0 if r.head is None else r.head for r in specs)
    return InputSplit(kind, entry, specs, columns, n)


class PlanBuilder:
    """Collects one call's intents; ``build()`` returns the checked plan and its feed."""

    def __init__(self, graph: ModelGraph):
        self.graph = graph
        self.feed: dict = {}
        self._specs: dict = {stage: [] for stage in STAGES}
        self._touched: dict = {}  # site name -> (site, written)
        self._reads: list = []
        self._keep_outputs = True
        self._edits: list = []
        self._hooks: list = []
        self._hook_fns: list = []

    # ---- graph inputs ---------------------------------------------------------------------------
    def input(self, value) -> str:
        """Feed ``value`` (a tensor, or any object a pass hands to a function) as a new graph input."""
        name = f"fxl_in{len(self.feed)}"
        self.feed[name] = value
        return name

    def _touch(self, sites, write: bool = False) -> None:
        for site in sites:
            old = self._touched.get(site.name)
            self._touched[site.name] = (site, write or (old is not None and old[1]))

    # ---- intents --------------------------------------------------------------------------------
    def cache(self, sites=(), *, reads=(), keep_outputs: bool = True) -> "PlanBuilder":
        """Return the values of ``sites`` (and of raw ``Read``s) under ``"cache"``; with
        ``keep_outputs=False`` nothing after the last read is computed."""
        self._touch(sites)
        self._reads += [Read(s.name, s.node, s.layout) for s in sites] + list(reads)
        self._keep_outputs = self._keep_outputs and keep_outputs
        return self

    def edit(self, site: Site, fn, inputs=(), mask=None) -> "PlanBuilder":
        """``site`` becomes ``fn(value, *inputs)`` where ``mask`` is true (everywhere without one)."""
        self._touch([site], write=True)
        fn_name = self.input(fn)
        names = tuple(self.input(v) for v in inputs)
        mask_name = self.input(mask) if mask is not None else None
        self._edits.append(Edit(site.name, site.node, site.layout, fn_name, names, mask_name, site.bypass))
        return self

    def hook(self, site: Site, fn, point, dir: str = "fwd", anchor=None) -> "PlanBuilder":
        """Call ``fn(value, point)`` at ``site``; a returned tensor replaces the value. ``dir="bwd"``:
        call ``fn(grad, point)`` on the site's gradient in the backward pass (a returned tensor replaces it).
        Either way the site is materialised in its replacing form, so the model computes through it.
        ``anchor``: a scalar leaf requiring grad that a backward hook's node takes as an input (see
        ``passes.hooks``)."""
        self._touch([site], write=True)
        self._hooks.append(HookAt(site.name, site.node, site.layout, len(self._hook_fns), dir, site.bypass))
        self._hook_fns.append((fn, point) if anchor is None else (fn, point, anchor))
        return self

    def edges(self, senders: tuple, receivers: tuple, mode: str = "edges", *, mask=None, alt=None, deltas=None,
              result_sites=(), post_norms=(), spine=None) -> "PlanBuilder":
        """Edge interventions (``passes.edges``): ``mask`` and ``alt`` in "edges" mode, ``deltas``
        ({entry node: tensor}) in "delta" and "absolute" mode. ``result_sites``: the per-head result
        sites the senders read, materialised beside the projections. ``post_norms``: the norms some
        senders' branches pass through before the add (``EdgePostNorm``s); ``spine``: the residual stream's
        steps where it is normalised itself (an ``EdgeSpine``, BERT)."""
        self._touch(result_sites)
        mask_name = self.input(mask) if mask is not None else None
        alt_name = self.input(alt) if alt is not None else None
        named = tuple((entry, self.input(t)) for entry, t in (deltas or {}).items())
        self._specs["edit"].append(Edges(tuple(senders), tuple(receivers), mode, mask_name, alt_name, named, tuple(post_norms),
                                         spine))
        return self

    def kv_prefix(self, uses) -> "PlanBuilder":
        """Attention reads ``prefix`` keys/values before its own: ``uses`` = [(operand, consumer, tensor)]."""
        self._specs["layout"].append(KVPrefix(tuple((op, consumer, self.input(t)) for op, consumer, t in uses)))
        return self

    def pack_rows(self, cores, row, pos, grid) -> "PlanBuilder":
        """Packed rows (``passes.pack_rows``): ``cores`` = [(q_in, k_in, v_in, z_heads, tag, (k fill,
        v fill, q workspace, k workspace, v workspace))] with tensors (or None) for the last five."""
        attention = tuple((*core[:5], tuple(self.input(t) for t in core[5])) for core in cores)
        self._specs["layout"].append(PackRows(attention, self.input(row), self.input(pos), self.input(grid)))
        return self

    def select_vocab(self, unembed: str, ids) -> "PlanBuilder":
        """The unembedding computes only the vocabulary entries ``ids``."""
        self._specs["output"].append(SelectVocab(unembed, self.input(ids)))
        return self

    def fuse_gelu(self) -> "PlanBuilder":
        self._specs["kernels"].append(FuseGelu())
        return self

    # ---- the plan -------------------------------------------------------------------------------
    def build(self) -> tuple[tuple, dict]:
        sites = [s for s, _ in self._touched.values()]
        written = [s for s, w in self._touched.values() if w]
        specs = dict(self._specs)
        specs["materialise"] = list(rewrites_for(self.graph, sites, write=written))
        edit = list(specs["edit"])
        if self._edits:
            edit.append(Intervene(tuple(self._edits)))
        if self._hooks:
            edit.append(Hooks(tuple(self._hooks), self.input(self._hook_fns)))
        specs["edit"] = edit
        if self._reads:
            specs["read"] = [Cache(tuple(self._reads), keep_outputs=self._keep_outputs)]
        plan = tuple(spec for stage in STAGES for spec in specs[stage])
        check_order(plan)
        return plan, self.feed

