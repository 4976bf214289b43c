"""The site table: every named place in a captured graph where a value can be read or replaced.

Problem: users name activations as TransformerLens does (``blocks.3.attn.hook_pattern``) or by HF
module path (``model.layers.3.mlp``); passes need a graph node and a layout. One table must answer
both, list what exists, and say how to materialise what the fast graph does not compute.

Mechanism: ``analyse`` runs the structure, attention, MLP and norm finders and names what they
found: raw sites (each module's output under its HF path), the residual stream, and TransformerLens'
canonical sites. A site that the fast graph lacks (the pattern under SDPA, per-head results, a fused
LayerNorm's scale) carries ``rewrite=(kind, node)``; the pass named by ``kind`` creates the node named
``site.node``.

A canonical site is offered only where its layout turns the node's shape into the site's axes; the
rest go to ``SiteTable.left_out`` with the reason in the user's terms (one grouped warning at capture,
and the unknown-site error repeats it). Gemma-3n keeps four residual streams stacked [4, batch, pos,
d_model] (AltUp): its residual, attn_out and MLP sites are left out, its attention is found in its module.

Example::

    mg = analyse(captured, table)
    mg.sites["blocks.0.attn.hook_q"]       # Site(node="view_6", layout=..., axes=("batch", "pos", "head", "d_head"))
    mg.sites.get_act_name("pattern", 3)    # "blocks.3.attn.hook_pattern"
"""

from __future__ import annotations

import difflib
import functools
import warnings
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import sympy

from .attention import Attention, AttentionError, View, find_attention
from .capture import CapturedGraph
from .dataflow import DataGraph
from .layout import IDENTITY, Layout
from .mlp import Mlp, find_mlp
from .module_sites import module_outputs
from .moe import Moe, find_moe
from .nodes import ATTENTION_OPS, op_name, scope, sym_dims, tensor_meta
from .norms import Norm, find_norm
from .ssm import find_scan
from .structure import (Structure, StructureError, _module_nodes, _norm_modules, attention_module_branch,
                        find_structure)
from .vocab import input_vocab, token_embedding

__all__ = ["Site", "SiteTable", "ModelGraph", "analyse", "rewritten", "SiteError"]

QKV_AXES = ("batch", "pos", "head", "d_head")
PATTERN_AXES = ("batch", "head", "query_pos", "key_pos")
RESID_AXES = ("batch", "pos", "d_model")


class SiteError(KeyError):
    """An unknown or malformed site name; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def rewritten(kind: str, target: str, part: str) -> str:
    """Name of the node that rewrite ``kind`` of node ``target`` creates for ``part``."""
    return f"{target}__{part}"


@dataclass(frozen=True)
class Site:
    name: str
    node: str
    layout: Layout = IDENTITY
    axes: tuple = ()
    layer: int | None = None
    kind: str = "module"
    rewrite: tuple | None = None  # (rewrite kind, target node) needed before ``node`` exists
    expensive: bool = False  # left out of "every site" unless asked for by name
    # readers of ``node`` that an edit or hook at this site leaves on the unedited value: block 0's input is
    # also the embedding that Zamba's shared blocks read on their own path, which the block's input is not
    bypass: tuple = ()

    def layer_index(self) -> int | None:
        return self.layer

    @property
    def canonical(self) -> bool:
        """A TransformerLens-named site (``blocks.3.attn.hook_z``), not a raw HF module path."""
        return self.kind != "module"

    def axis(self, name: str) -> int | None:
        return self.axes.index(name) if name in self.axes else None


# TransformerLens' short names: cache["pattern", 3] -> blocks.3.attn.hook_pattern
_SHORT = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mixer_out": "hook_mixer_out",
    "mlp_out": "hook_mlp_out",
    "normalized_resid_post": "hook_normalized_resid_post",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "attn_scores": "attn.hook_attn_scores",
    "scores": "attn.hook_attn_scores",
    "attn": "attn.hook_pattern",
    "pattern": "attn.hook_pattern",
    "pre": "mlp.hook_pre",
    "pre_linear": "mlp.hook_pre_linear",
    "post": "mlp.hook_post",
    "mid": "mlp.hook_mid",
    "router_logits": "mlp.hook_router_logits",
    "expert_weights": "mlp.hook_expert_weights",
    "expert_indices": "mlp.hook_expert_indices",
    "expert_out": "mlp.hook_expert_out",
}
_GLOBAL = {"embed": "hook_embed", "pos_embed": "hook_pos_embed", "token_type_embed": "hook_token_type_embed"}


class SiteTable:
    """An ordered mapping of site names to ``Site``s with helpful errors for unknown names."""

    def __init__(self, sites: "OrderedDict[str, Site]", n_layers: int, left_out: dict | None = None):
        self._sites = sites
        self.n_layers = n_layers
        self.left_out = dict(left_out or {})  # canonical name -> why this model does not offer it

    def __contains__(self, name) -> bool:
        return name in self._sites

    def __iter__(self):
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def names(self) -> list[str]:
        return list(self._sites)

    def values(self):
        return self._sites.values()

    def items(self):
        return self._sites.items()

    def get_act_name(self, name: str, layer: int | None = None, layer_type: str | None = None) -> str:
        """TransformerLens' ``utils.get_act_name``: ``("pattern", 3)`` -> ``blocks.3.attn.hook_pattern``.

        A negative layer counts from the end, as TransformerLens' ``cache["resid_post", -1]`` does."""
        if name in self._sites and layer is None:
            return name
        if layer is not None and not -self.n_layers <= layer < self.n_layers:
            raise SiteError(f"layer {layer} is out of range: this model has layers 0..{self.n_layers - 1} "
                            f"(or -{self.n_layers}..-1 from the end)")
        if layer is not None and layer < 0:
            layer += self.n_layers
        key = name
        if layer_type is not None:
            lt = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": ""}.get(layer_type, layer_type)
            if name in ("scale", "normalized"):
                key = f"{lt}.hook_{name}"
            elif lt:
                key = f"{lt}.hook_{name}" if not name.startswith("hook_") else f"{lt}.{name}"
        if layer is None:
            if name in _GLOBAL:
                return _GLOBAL[name]
            if name in ("scale", "normalized"):
                return f"ln_final.hook_{name}"
            return name
        suffix = _SHORT.get(key, key if "." in key or key.startswith("hook_") else f"hook_{key}")
        return f"blocks.{layer}.{suffix}"

    def __getitem__(self, key) -> Site:
        if isinstance(key, tuple):
            key = self.get_act_name(*key)
        site = self._sites.get(key)
        if site is None:
            raise SiteError(self.unknown(key))
        return site

    def unknown(self, key: str) -> str:
        if key in self.left_out:
            return f"site {key!r} is not offered for this model: {self.left_out[key]}"
        m = re.match(r"blocks\.(\d+)\.", str(key))
        if m and int(m.group(1)) >= self.n_layers:
            return f"unknown site {key!r}: layer {m.group(1)} is out of range, this model has layers 0..{self.n_layers - 1}"
        close = difflib.get_close_matches(str(key), list(self._sites), n=5, cutoff=0.5)
        hint = f" Closest valid names: {', '.join(close)}." if close else ""
        return f"unknown site {key!r}.{hint} See model.sites for every name."


@dataclass
class ModelGraph:
    """Everything known about a captured graph: structure, component analyses and the site table."""

    captured: CapturedGraph
    dg: DataGraph
    structure: Structure
    attn: list  # per block: Attention | None
    mlp: list  # per block: Mlp | None
    norms: dict  # module path -> Norm
    sites: SiteTable
    dims: dict = field(default_factory=dict)
    moe: list = field(default_factory=list)  # per block: Moe | None (a mixture-of-experts MLP)
    scans: dict = field(default_factory=dict)  # block -> its mixer's state nodes, one per position (graphs.ssm)

    @property
    def n_layers(self) -> int:
        return len(self.structure.blocks)

    @functools.cached_property
    def mixes_outside_attention(self) -> bool:
        """Whether some block mixes positions outside attention (a state-space or linear-attention layer,
        ``hook_mixer_out``): its running state is no key/value prefix, so it must see every position."""
        return any(s.kind == "mixer_out" for s in self.sites.values())

    @functools.cached_property
    def components(self):
        """Circuit senders and receivers (``graphs.components``), found once per graph; raises
        ``CircuitError`` where the blocks cannot be decomposed."""
        from .components import components

        return components(self)

    def shape(self, site: Site, batch: int, seq: int) -> tuple:
        """The site's shape, in the user's layout, for an input of ``batch`` x ``seq`` tokens."""
        if site.rewrite is not None:
            d = self.dims
            kv = site.kind in ("k_input", "v_input")
            sizes = {"batch": batch, "pos": seq, "query_pos": seq, "key_pos": seq, "one": 1,
                     "head": d.get("n_key_value_heads" if kv else "n_heads"), "d_model": d.get("d_model"),
                     "d_head": d.get("d_head"), "expert": d.get("n_experts"), "d_inner": d.get("d_inner"),
                     "d_state": d.get("d_state")}
            return tuple(sizes[a] for a in site.axes)
        dims = sym_dims(self.dg.node(site.node), *(self.captured.batch_symbol, self.captured.seq_symbol))
        user = site.layout.shape(dims)
        out = []
        for d in user:
            if d == "B":
                out.append(batch)
            elif d == "S":
                out.append(seq)
            elif isinstance(d, int):
                out.append(d)
            else:  # a product of the symbols (a flattened batch*pos axis)
                syms = {self.captured.batch_symbol: batch, self.captured.seq_symbol: seq}
                # a length-fixing model's sequence "symbol" is an int: never substitute a number
                out.append(int(d.subs({k: v for k, v in syms.items() if isinstance(k, sympy.Basic) and k.is_Symbol})))
        return tuple(out)


def flat_view(dg: DataGraph, syms, name: str) -> View:
    """A [batch*pos, d] node (OPT flattens before its MLP) seen as [batch, pos, d]; others as they are."""
    dims = sym_dims(dg.node(name), *syms)
    if len(dims) == 2 and dims[0] not in ("B", "S"):
        return View(name, Layout((("unflatten_bs",),)))
    return View(name)


def _axes(dims: tuple) -> tuple:
    out = []
    for i, d in enumerate(dims):
        out.append("batch" if d == "B" else "pos" if d == "S" else f"dim{i}")
    return tuple(out)


def analyse(cg: CapturedGraph, table=None) -> ModelGraph:
    graph = cg.module.graph
    dg = DataGraph(graph)
    syms = (cg.batch_symbol, cg.seq_symbol)
    st = find_structure(graph, dg)
    if table is not None:
        table = table.for_blocks_at(st.blocks_path)  # a base model: its paths lack the head's prefix
    by_scope = _module_nodes(graph)
    norms = {}
    for path in _norm_modules(by_scope):
        norm = find_norm(dg, path, by_scope[path], syms)
        if norm is not None:
            norms[path] = norm
    attns, mlps, moes, unfound = [], [], [], {}
    for block in st.blocks:
        a = m = None
        if block.attn is not None:
            try:
                a = find_attention(dg, block, block.attn, syms, norms)
            except AttentionError as err:
                if table is not None:
                    raise StructureError(f"block {block.index} of a {table.model_types[0]} model: {err}") from err
                # stacked residual streams (AltUp) hide attention from the residual sum: find it in its module.
                # Only there: elsewhere a branch the sum does not isolate would feed circuits a wrong entry.
                a = _attention_by_module(dg, block, by_scope, syms, norms) if _stacked(dg, syms, block.resid_pre) else None
                if a is None:
                    unfound[block.index] = f"attention not recognised ({_plain(err)})"
        if block.mlp is not None:
            moe = find_moe(dg, block.mlp, syms)
            # a mixture of experts has no per-position hidden layer: its sites are the router's and experts'
            m = find_mlp(dg, block.mlp, syms) if moe is None else None
        else:
            moe = None
        attns.append(a)
        mlps.append(m)
        moes.append(moe)
    if table is not None:
        _check_table(st, table)
    scans = {}
    for block in st.blocks:
        if block.attn is not None and is_mixer(dg, block.attn):
            chain = find_scan(dg, block.attn.nodes, cg.static_seq)
            if chain is not None:
                scans[block.index] = chain
    builder = _Builder(dg, syms, st, attns, mlps, norms, table, moes, scans)
    sites = builder.build()
    for i, why in unfound.items():
        if is_mixer(dg, st.blocks[i].attn):
            why = (f"block {i} mixes positions without attention (a state-space or convolution layer); its output "
                   f"is blocks.{i}.hook_mixer_out")
        for suffix in ATTN_SUFFIXES:
            builder.left_out[f"blocks.{i}.attn.{suffix}"] = why
    if builder.left_out:
        warnings.warn(_left_out_message(builder.left_out), stacklevel=2)
    dims = _dims(dg, syms, st, attns, mlps, moes)
    if scans:
        dims["d_inner"], dims["d_state"] = tuple(tensor_meta(dg.node(next(iter(scans.values()))[0])).shape[1:3])
    return ModelGraph(cg, dg, st, attns, mlps, norms, SiteTable(sites, len(st.blocks), builder.left_out), dims, moes, scans)


def is_mixer(dg: DataGraph, branch) -> bool:
    """Whether a branch that mixes positions holds no attention op (softmax or fused attention): a
    state-space or convolution mixer (Mamba, Mamba2, the SSM layers of hybrids, LFM2's convolutions)."""
    if branch is None:
        return False
    ops = {op_name(dg.node(n)) for n in branch.nodes}
    return not (ops & set(ATTENTION_OPS)) and not ops & {"softmax", "_softmax", "_safe_softmax"}


def _stacked(dg, syms, name: str) -> int | None:
    """The number of residual streams a [n, batch, pos, d_model] node stacks (Gemma-3n's AltUp), else None."""
    dims = sym_dims(dg.node(name), *syms)
    if len(dims) == 4 and isinstance(dims[0], int) and dims[1:3] == ("B", "S"):
        return dims[0]
    return None


def _attention_by_module(dg, block, by_scope, syms, norms) -> Attention | None:
    """Attention found inside its own module, where the block's residual sum does not isolate it (AltUp)."""
    branch = attention_module_branch(dg, block, by_scope)
    if branch is None:
        return None
    try:
        return find_attention(dg, block, branch, syms, norms)
    except AttentionError:
        return None


# the output projections passes/split_heads.py can split per head (graphs/ must not import passes/)
SPLITTABLE_PROJECTIONS = ("linear", "addmm")
STACKED_SUFFIXES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                    "mlp.hook_pre", "mlp.hook_post", "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale",
                    "ln2.hook_normalized")
ATTN_SUFFIXES = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_attn_scores", "hook_pattern", "hook_result")


def _plain(err: Exception) -> str:
    """An analysis error without graph node names, which mean nothing to a user."""
    return re.sub(r"\s+(behind|after|before|around|in)\s+\S+$", "", str(err))


def _left_out_message(left_out: dict) -> str:
    """One line per reason and layers: ``blocks.{0,1}.attn.hook_k: reason``, ``blocks.{0,1}.{hook_a, hook_b}: reason``."""
    groups: dict = {}
    for name, why in left_out.items():
        m = re.match(r"blocks\.(\d+)\.(.+)$", name)
        key = (m.group(2) if m else name, why)
        groups.setdefault(key, []).append(m.group(1) if m else None)
    # then the sites left out for one reason in the same layers share a line
    lines_by: dict = {}
    for (suffix, why), layers in groups.items():
        lines_by.setdefault((tuple(layers), why), []).append(suffix)
    lines = []
    for (layers, why), suffixes in lines_by.items():
        where = f"blocks.{{{','.join(layers)}}}." if layers[0] is not None else ""
        what = suffixes[0] if len(suffixes) == 1 else "{" + ", ".join(suffixes) + "}"
        lines.append(f"  {where}{what}: {why}")
    return (f"{len(left_out)} TransformerLens sites are not offered for this model (raw module sites still work):\n"
            + "\n".join(lines))


def _check_table(st: Structure, table) -> None:
    problems = []
    if st.blocks_path != table.blocks:
        problems.append(f"blocks at {st.blocks_path!r}, table says {table.blocks!r}")
    else:
        b = st.blocks[0]
        want = {
            "attention": (b.attn and b.attn.module, f"{b.path}.{table.attn}"),
            "mlp": (b.mlp and b.mlp.module, f"{b.path}.{table.mlp}" if table.mlp else b.path),
        }
        for what, (found, expected) in want.items():
            if found != expected:
                problems.append(f"{what} at {found!r}, table says {expected!r}")
    if problems:
        raise StructureError(
            "the dataflow analysis disagrees with this family's architecture table: "
            + "; ".join(problems)
            + ". Please report this; raw module sites still work with table=None."
        )


def _dims(dg, syms, st, attns, mlps, moes=()) -> dict:
    first = st.blocks[0]
    d_model = sym_dims(dg.node(first.resid_pre), *syms)[-1]
    a = next((x for x in attns if x is not None), None)
    m = next((x for x in mlps if x is not None), None)
    out = {"n_layers": len(st.blocks), "d_model": d_model}
    if a is not None:
        out.update(n_heads=a.n_heads, n_key_value_heads=a.n_kv_heads, d_head=a.d_head)
    if m is not None:
        out["d_mlp"] = sym_dims(dg.node(m.post.node), *syms)[-1]
    e = next((x for x in moes if x is not None), None)
    if e is not None:
        out.update(n_experts=e.n_experts, experts_per_token=e.top_k)
    # d_vocab: the token ids the model accepts (the input embedding's rows, TransformerLens' meaning);
    # d_vocab_out: the last axis of the main output (num_labels for a classification head)
    vocab = input_vocab(dg.graph)
    if vocab is not None:
        out["d_vocab"] = vocab
    if st.unembed is not None:
        out["d_vocab_out"] = sym_dims(dg.node(st.unembed), *syms)[-1]
    return out


class _Builder:
    def __init__(self, dg, syms, st, attns, mlps, norms, table, moes=None, scans=None):
        self.dg, self.syms, self.st = dg, syms, st
        self.scans = scans or {}
        self.attns, self.mlps, self.norms, self.table = attns, mlps, norms, table
        self.moes = moes or [None] * len(st.blocks)
        self.sites: list[Site] = []
        self.left_out: dict = {}  # canonical name -> why it cannot be laid out
        self.d_model = sym_dims(dg.node(st.blocks[0].resid_pre), *syms)[-1] if st.blocks else None

    def add(self, name, view: View | str, axes=None, layer=None, kind="module", rewrite=None, expensive=False,
            sizes=None, unfit=None, bypass=()):
        """Add a site. A canonical site (``axes`` given) is offered only if its layout turns the node's
        shape into ``axes``; ``sizes`` gives the int an axis must have (None: any), beyond batch, positions
        and d_model. A rewrite's node does not exist yet: the caller checks what it is built from and
        passes the reason it cannot be laid out as ``unfit``."""
        if isinstance(view, str):
            view = View(view)
        if axes is not None and rewrite is None:
            view = self._sequence_first(view, axes)
        if axes is None:
            dims = sym_dims(self.dg.node(view.node), *self.syms)
            axes = _axes(view.layout.shape(dims))
        else:
            why = unfit if rewrite is not None else self._misfit(view, axes, sizes or {})
            if why is not None:
                self.left_out[name] = why
                return
        self.sites.append(Site(name, view.node, view.layout, tuple(axes), layer, kind, rewrite, expensive, bypass))

    def _outside(self, block) -> tuple:
        """Readers of the block's input outside the block: the block's input is what the block reads, so an
        edit of ``hook_resid_pre`` leaves them on the unedited value (as an HF hook on the layer's input does,
        and as the layered row engine, which feeds them from the base run, always has)."""
        return tuple(sorted(u.name for u in self.dg.node(block.resid_pre).users if u.name not in block.nodes))

    def _sequence_first(self, view: View, axes: tuple) -> View:
        """A node the graph holds sequence-first, [pos, batch, ...] (XLNet, FSMT), seen as [batch, pos, ...]."""
        if view.layout.is_identity and axes[:2] == ("batch", "pos"):
            dims = sym_dims(self.dg.node(view.node), *self.syms)
            if len(dims) == len(axes) and dims[:2] == ("S", "B"):
                return View(view.node, Layout((("permute", (1, 0) + tuple(range(2, len(dims)))),)))
        return view

    def _misfit(self, view: View, axes: tuple, sizes: dict) -> str | None:
        """Why ``view`` cannot be shown with ``axes``, or None when it can."""
        dims = sym_dims(self.dg.node(view.node), *self.syms)
        try:
            user = view.layout.shape(dims)
        except (IndexError, TypeError):
            user = None
        want = {"batch": "B", "pos": "S", "query_pos": "S", "key_pos": "S", "one": 1, "d_model": self.d_model, **sizes}
        if user is not None and len(user) == len(axes) and all(
            (d == want[a]) if want.get(a) is not None else isinstance(d, int) for a, d in zip(axes, user)
        ):
            return None
        why = self._residual_reason(dims) if tuple(axes) == RESID_AXES else None
        return why or f"the graph holds it as [{self._describe(dims)}], which does not lay out as [{', '.join(axes)}]"

    def _residual_reason(self, dims: tuple) -> str | None:
        """Why a residual-shaped node is no [batch, pos, d_model] stream, in the user's terms."""
        held = f"the graph holds it as [{self._describe(dims)}]"
        read = "; read the blocks' modules by their HF paths (raw module sites) instead"
        if len(dims) == 4 and dims[:2] == ("B", "S") and isinstance(dims[2], int) and dims[3] == self.d_model:
            return (f"{held}: the model keeps {dims[2]} residual streams side by side and mixes them in every "
                    f"layer (hyper-connections), so there is no single residual stream{read}")
        if len(dims) == 4 and dims[2] == "S" and isinstance(dims[0], int) and dims[3] == self.d_model:
            return (f"{held}: the model keeps {dims[0]} residual streams stacked and mixes them in every layer "
                    f"(AltUp), so there is no single residual stream{read}")
        if len(dims) == 3 and dims[0] in ("B", 1) and dims[1] != "S" and dims[2] == self.d_model:
            return (f"{held}: its blocks run over {self._describe(dims[1:2])} rows that are not the input's "
                    f"positions (latents, or positions the model adds to the input), so a position of the "
                    f"input has no residual vector{read}")
        return None

    def _describe(self, dims: tuple) -> str:
        named = {k: v for k, v in zip(self.syms, ("batch", "pos")) if isinstance(k, sympy.Basic) and k.is_Symbol}
        out = []
        for d in dims:
            if d in ("B", "S"):
                out.append("batch" if d == "B" else "pos")
            elif isinstance(d, int):
                out.append(str(d))
            else:
                out.append(str(d.subs({k: sympy.Symbol(v) for k, v in named.items()})))
        return ", ".join(out)

    def order(self, site: Site) -> tuple:
        node = site.rewrite[1] if site.rewrite else site.node
        return (self.dg.order.get(node, 0), 0 if site.rewrite is None else 1)

    def build(self) -> "OrderedDict[str, Site]":
        self._canonical()
        canonical = {s.name for s in self.sites}
        self._raw(canonical)
        ordered = sorted(self.sites, key=self.order)
        return OrderedDict((s.name, s) for s in ordered)

    # ---- raw ----------------------------------------------------------------------------------
    def _raw(self, taken) -> None:
        for name, node in module_outputs(self.dg.graph, self.dg, taken):
            self.add(name, node)

    # ---- canonical ----------------------------------------------------------------------------
    def _canonical(self) -> None:
        st, t = self.st, self.table
        self._embeddings()
        split = self._split_reason() or self._side_state_reason()
        for i, block in enumerate(st.blocks):
            p = f"blocks.{i}."
            stacked = split or self._stacked_reason(block.resid_pre)
            if stacked is not None:
                # the residual sum is over stacked streams: its terms are not the attention and MLP outputs
                for suffix in STACKED_SUFFIXES:
                    self.left_out[p + suffix] = stacked
                self._attention(i, p, self.attns[i])
                continue
            resid_mid, resid_post = block.resid_mid, block.resid_post
            if t is not None and t.post_ln and block.attn and block.mlp:
                resid_mid, resid_post = block.attn.junction, block.mlp.junction
                self.add(p + "hook_normalized_resid_post", block.resid_post, RESID_AXES, i, "normalized_resid_post")
            self.add(p + "hook_resid_pre", block.resid_pre, RESID_AXES, i, "resid_pre", bypass=self._outside(block))
            if resid_mid is not None:
                self.add(p + "hook_resid_mid", resid_mid, RESID_AXES, i, "resid_mid")
            self.add(p + "hook_resid_post", resid_post, RESID_AXES, i, "resid_post")
            if block.attn is not None and self.attns[i] is None and is_mixer(self.dg, block.attn):
                # a state-space (or convolution) token mixer: not attention, so not hook_attn_out
                self.add(p + "hook_mixer_out", block.attn.output, RESID_AXES, i, "mixer_out")
                if i in self.scans:
                    # the state after each position, stacked from the unrolled scan (passes.stack_states); seq
                    # times the size of the mixer's activations, so only when asked for by name
                    first = self.scans[i][0]
                    self.add(p + "mixer.hook_ssm_state", rewritten("ssm_state", first, "ssm_state"),
                             ("batch", "pos", "d_inner", "d_state"), i, "ssm_state", rewrite=("ssm_state", first),
                             expensive=True)
            elif block.attn is not None:
                self.add(p + "hook_attn_out", block.attn.output, RESID_AXES, i, "attn_out")
            if block.mlp is not None:
                self.add(p + "hook_mlp_out", self._unflat(block.mlp.output), RESID_AXES, i, "mlp_out")
            self._attention(i, p, self.attns[i])
            self._inputs(i, p, block, self.attns[i])
            self._mlp(i, p, self.mlps[i])
            self._moe(i, p, self.moes[i])
            self._block_norms(i, p, block)
        if st.final_norm is not None and st.final_norm in self.norms:
            self._norm("ln_final.", self.norms[st.final_norm], None)

    def _split_reason(self) -> str | None:
        """Why blocks have no residual sites when each layer is split over parallel module lists (XLM): the
        block module holds only a part of the layer, and its input and output are no residual stream."""
        lists = self.st.split_layers
        if not lists:
            return None
        return (f"each layer is split over parallel module lists ({', '.join(lists)}) and no module holds a whole "
                "layer, so fxlens finds no block boundaries to put residual sites at; read the modules by their HF "
                "paths (raw module sites, e.g. " + f"{lists[-1]}.0" + ") instead")

    def _side_state_reason(self) -> str | None:
        """Why blocks have no residual sites when the layers also read a stack of earlier residual states
        passed beside the hidden states (Inkling2's block attention residuals, ``block_states``, [batch, pos,
        k, d_model]): the hidden states are then not all the state a layer reads, and patching them is not
        patching the residual stream."""
        blocks = self.st.blocks
        for i, block in enumerate(blocks[1:], start=1):
            earlier = {b.resid_pre for b in blocks[:i]}
            for c in block.context:
                dims = sym_dims(self.dg.node(c), *self.syms)
                if (len(dims) == 4 and dims[:2] == ("B", "S") and isinstance(dims[2], int) and dims[3] == self.d_model
                        and self.dg.upstream([c]) & earlier):
                    return (f"block {i} reads, beside its hidden states, a stack of earlier residual states "
                            f"[{self._describe(dims)}] (block attention residuals), so no single tensor is the residual "
                            "stream and patching the hidden states is not patching all the state a layer reads; read "
                            "the blocks' modules by their HF paths (raw module sites) instead")
        return None

    def _stacked_reason(self, name: str) -> str | None:
        """Why a block has no single residual stream, when it keeps several stacked (Gemma-3n's AltUp)."""
        if _stacked(self.dg, self.syms, name) is not None:
            dims = sym_dims(self.dg.node(name), *self.syms)
            return (f"the model keeps {dims[0]} residual streams stacked as [{self._describe(dims)}] and mixes them "
                    "in every layer (AltUp): there is no single residual stream, nor an attention or MLP output added "
                    "to one; read modules by their HF paths")
        return None

    def _unflat(self, name: str) -> View:
        return flat_view(self.dg, self.syms, name)

    def _embeddings(self) -> None:
        t = self.table
        names = {}
        if t is not None:
            names = {t.embed: "hook_embed"}
            if t.pos_embed:
                names[t.pos_embed] = "hook_pos_embed"
            if t.token_type_embed:
                names[t.token_type_embed] = "hook_token_type_embed"
        token = token_embedding(self.dg.graph)
        token_path = scope(token) if token is not None else None
        for path, node in self.st.embed_terms:
            name = names.get(path)
            if name is None and t is None:
                # untabled: the token embedding is the one that reads input_ids (GPT-2's "wpe" has no
                # "pos" in its name, so a name test would call the positional embedding hook_embed)
                if token_path is not None:
                    name = "hook_embed" if path == token_path else None
                else:
                    name = "hook_embed" if "pos" not in path and "type" not in path else None
            if name is None:
                continue
            dims = sym_dims(self.dg.node(node), *self.syms)
            if self._stacked_reason(node) is not None:
                self.left_out[name] = self._stacked_reason(node)
                continue
            layout = Layout((("expand_batch",),)) if dims and dims[0] == 1 else IDENTITY
            self.add(name, View(node, layout), RESID_AXES, None, name[5:], sizes={"d_model": None})

    def _attention(self, i: int, p: str, a: Attention | None) -> None:
        if a is None:
            return
        ap = p + "attn."
        missing = dict(a.missing)
        for suffix, why in missing.items():
            self.left_out[ap + suffix] = why
        d_qk = a.d_head_qk or a.d_head
        q_sizes, k_sizes = {"head": a.n_heads, "d_head": d_qk}, {"head": a.n_kv_heads, "d_head": d_qk}
        v_sizes, z_sizes = {"head": a.n_kv_heads, "d_head": a.d_head}, {"head": a.n_heads, "d_head": a.d_head}

        def add(suffix, view, axes, kind, sizes=None, **kw):
            if suffix not in missing and view is not None:
                self.add(ap + suffix, view, axes, i, kind, sizes=sizes, **kw)

        add("hook_q", a.q, QKV_AXES, "q", q_sizes)
        add("hook_k", a.k, QKV_AXES, "k", k_sizes)
        add("hook_v", a.v, QKV_AXES, "v", v_sizes)
        add("hook_rot_q", a.rot_q, QKV_AXES, "rot_q", q_sizes)
        add("hook_rot_k", a.rot_k, QKV_AXES, "rot_k", k_sizes)
        if a.kind == "eager":
            add("hook_attn_scores", a.scores, PATTERN_AXES, "attn_scores", {"head": a.n_heads})
            add("hook_pattern", a.pattern, PATTERN_AXES, "pattern", {"head": a.n_heads})
        else:
            # the rewrite computes [batch, head, q, k] from SDPA's own [batch, head, pos, d] operands
            operands = (View(a.q_in), ("batch", "head", "pos", "d_head"), {"head": a.n_heads, "d_head": d_qk})
            unfit = self._misfit(*operands)
            rw = ("expand_attention", a.op)
            add("hook_attn_scores", rewritten(*rw, "scores"), PATTERN_AXES, "attn_scores", rewrite=rw, unfit=unfit)
            add("hook_pattern", rewritten(*rw, "pattern"), PATTERN_AXES, "pattern", rewrite=rw, unfit=unfit)
        add("hook_z", a.z, QKV_AXES, "z", z_sizes)
        # per-head results multiply z by W_O's head blocks: as well laid out as z is
        rw = ("split_heads", a.o_matmul)
        unfit = self._misfit(a.z, QKV_AXES, z_sizes)
        o_op = op_name(self.dg.node(a.o_matmul))
        if o_op not in SPLITTABLE_PROJECTIONS:
            unfit = f"the output projection is a {o_op}, which the per-head split handles only as linear or addmm"
        add("hook_result", rewritten(*rw, "result"), ("batch", "pos", "head", "d_model"), "result", rewrite=rw,
            unfit=unfit, expensive=True)

    def _inputs(self, i: int, p: str, block, a: Attention | None) -> None:
        """TransformerLens' input copies (``passes.split_inputs``): each head's copy of the residual it reads
        (``hook_q_input``/``k_input``/``v_input``; ``hook_attn_in`` for q, k and v together: query head h and
        key/value head h read copy h, as in TransformerLens) and the MLP's own copy (``hook_mlp_in``). Expensive: made only when
        asked for by name."""
        entry_axes = ("batch", "pos", "head", "d_model")
        if a is not None and block.attn is not None and block.attn.entry is not None:
            unfit = self._misfit(View(block.attn.entry), RESID_AXES, {})
            for kind in ("q_input", "k_input", "v_input"):
                rw = ("split_inputs", block.attn.entry)
                self.add(f"{p}hook_{kind}", rewritten(*rw, kind), entry_axes, i, kind, rw, expensive=True, unfit=unfit)
            # one copy per query head; a grouped model's key/value head g reads copy g (TransformerLens' meaning)
            rw = ("split_inputs", block.attn.entry)
            self.add(f"{p}hook_attn_in", rewritten(*rw, "attn_in"), entry_axes, i, "attn_in", rw, expensive=True,
                     unfit=unfit)
        if block.mlp is not None and block.mlp.entry is not None and self.mlps[i] is not None:
            rw = ("split_inputs", block.mlp.entry)
            entry = self._unflat(block.mlp.entry)  # OPT's MLP reads the residual flattened to [batch*pos, d]
            unfit = self._misfit(entry, RESID_AXES, {})
            self.add(f"{p}hook_mlp_in", View(rewritten(*rw, "mlp_in"), entry.layout), RESID_AXES, i, "mlp_in", rw,
                     expensive=True, unfit=unfit)

    def _moe(self, i: int, p: str, m: Moe | None) -> None:
        if m is None:
            return
        mp = p + "mlp."
        self.add(mp + "hook_router_logits", m.router, ("batch", "pos", "expert"), i, "router_logits")
        if m.probs is not None:
            self.add(mp + "hook_expert_weights", m.probs, ("batch", "pos", "expert"), i, "expert_weights")
        self.add(mp + "hook_expert_indices", m.indices, ("batch", "pos", "slot"), i, "expert_indices")
        rw = ("split_experts", m.combine)
        # [batch, pos, expert, d_model]: left out of "every site", like per-head results
        self.add(mp + "hook_expert_out", rewritten(*rw, "experts"), ("batch", "pos", "expert", "d_model"), i, "expert_out", rw,
                 expensive=True)

    def _mlp(self, i: int, p: str, m: Mlp | None) -> None:
        if m is None:
            return
        axes = ("batch", "pos", "d_mlp")
        self.add(p + "mlp.hook_pre", self._unflat(m.pre.node), axes, i, "pre")
        if m.pre_linear is not None:
            self.add(p + "mlp.hook_pre_linear", self._unflat(m.pre_linear.node), axes, i, "pre_linear")
        self.add(p + "mlp.hook_post", self._unflat(m.post.node), axes, i, "post")

    def _block_norms(self, i: int, p: str, block) -> None:
        t = self.table
        attn_norm = block.attn.norm if block.attn else None
        mlp_norm = block.mlp.norm if block.mlp else None
        if t is not None and t.post_ln:
            spine = [path for path, _ in block.spine_norms]
            attn_norm = spine[0] if len(spine) > 0 else None
            mlp_norm = spine[1] if len(spine) > 1 else None
        if attn_norm in self.norms:
            self._norm(p + "ln1.", self.norms[attn_norm], i)
        if mlp_norm in self.norms and mlp_norm != attn_norm:
            self._norm(p + "ln2.", self.norms[mlp_norm], i)
        for tag, br in (("ln1_post.", block.attn), ("ln2_post.", block.mlp)):
            if br is not None and br.post_norm in self.norms:
                self._norm(p + tag, self.norms[br.post_norm], i)

    def _norm(self, prefix: str, norm: Norm, layer) -> None:
        flat = self._unflat(norm.input).layout  # OPT normalises a [batch*pos, d] residual
        unfit = None
        if norm.fused is not None:
            rw = ("decompose_norm", norm.fused)
            scale, normalized = View(rewritten(*rw, "scale"), flat), View(rewritten(*rw, "normalized"), flat)
            unfit = self._misfit(View(norm.input, flat), RESID_AXES, {})
        else:
            rw = None
            scale = View(norm.scale.node, flat.then(*norm.scale.layout.ops))
            normalized = View(norm.normalized.node, flat.then(*norm.normalized.layout.ops))
        self.add(prefix + "hook_scale", scale, RESID_AXES[:2] + ("one",), layer, "scale", rw, unfit=unfit)
        self.add(prefix + "hook_normalized", normalized, RESID_AXES, layer, "normalized", rw, unfit=unfit)
