"""The circuit view of a model: senders, receivers and the graph nodes behind each.

Problem: a circuit edge (sender -> receiver) is "what the sender writes into the residual stream, as
the receiver reads it". Its senders are the token embedding, each attention head's output and each
MLP's output; its receivers are each head's query, key and value input, each MLP's input and the
logits. The residual stream must be a plain sum of what the senders write for this to mean anything.

Mechanism: from the structure analysis, each block contributes its heads (per-head results from the
output projection, ``split_heads``) and its MLP output as senders; each receiver names the spine node
its branch reads (``entry``) and how that read is replayed: for q/k/v, the nodes from the branch
entry to the q/k/v node (the norm and the projection, whatever the family fuses); for an MLP or the
logits, the nodes that read the entry inside the branch. Where the residual stream is not a sum of
component outputs the components still exist (path patching's textbook algorithm needs only heads' z
and MLP outputs), and ``not_additive`` says why. Two cases differ:

- a branch normalised before it is added (Gemma 2/3 and OLMo 2/3 "sandwich" norms): each such norm
  is a ``PostNorm`` (the node it reads, the branch's sum of head results plus bias or the MLP output,
  and the nodes from there to what is added), so an edge can be defined through it (``passes.edges``);
- the residual stream itself normalised after each branch (BERT, RoBERTa, ELECTRA): ``spine`` lists the
  residual stream as steps from the embedding (sums of component outputs, and norms; ``graphs.spine``),
  so an edge can be defined by replaying every norm between sender and receiver (``passes.edges``).
  Where that replay is impossible, ``no_edges`` says why and edges are refused (``require_edges``); so
  are branch norms that read more than the branch's output.

Example::

    cg = components(mg)
    cg.senders[:3]          # [Sender('input', -1), Sender('a0.h0', 0, 'head', 0), Sender('a0.h1', 0, 'head', 1)]
    cg.receiver("a1.h0<k>").cone     # node names replayed for head 0's keys
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention import View
from .layout import IDENTITY, Layout
from .nodes import scope, tensor_meta
from .sites import flat_view
from .spine import Spine, spine_steps

__all__ = ["Sender", "Receiver", "PostNorm", "Components", "components", "CircuitError"]


class CircuitError(ValueError):
    pass


@dataclass(frozen=True)
class Sender:
    name: str
    layer: int  # -1 for the input embedding
    kind: str  # "input", "head", "mlp"
    head: int | None = None
    stage: int = 0  # 0: attention half of the layer, 1: MLP half


@dataclass(frozen=True)
class Receiver:
    name: str
    layer: int  # n_layers for the logits
    kind: str  # "q", "k", "v", "mlp", "logits"
    head: int | None = None
    stage: int = 0
    entry: str = ""  # the residual node the receiver reads
    target: View | None = None  # q/k/v: the site the replay recomputes
    cone: tuple = ()  # q/k/v: nodes from entry to target; mlp: nodes shared with attention; graph order
    consumers: tuple = ()  # mlp/logits: nodes that read entry (or the cone) for this receiver
    entry_layout: Layout = IDENTITY  # how entry is held: [batch*pos, d] before OPT's MLP (``sites.flat_view``)


@dataclass(frozen=True)
class PostNorm:
    """A norm a branch's output passes through before it is added to the residual stream."""

    layer: int
    kind: str  # "attn" or "mlp"
    path: str  # HF module path of the norm
    input: str  # the node the norm reads: the sum of the head results (+ bias), or the MLP output
    cone: tuple  # nodes from ``input`` to what is added to the residual stream, graph order
    senders: tuple  # names of the senders whose outputs sum to ``input``
    value_site: str = ""  # the site holding ``input`` (always found for an MLP: its output before the norm)


@dataclass
class Components:
    senders: list
    receivers: list
    n_layers: int
    parallel: bool  # attention and MLP of a block read the same residual
    not_additive: str | None = None  # why the residual stream is not a sum of component outputs (or None)
    post_norms: tuple = ()  # of PostNorm: branches normalised before they are added
    no_edges: str | None = None  # why single components' edges are not defined here, or None
    spine: Spine | None = None  # the residual stream as steps, where it is normalised itself (BERT); else None

    def _range(self) -> str:
        heads = sum(1 for s in self.senders if s.kind == "head" and s.layer == 0)
        kv = sum(1 for r in self.receivers if r.kind == "k" and r.layer == 0)
        kv_note = f" (keys and values: heads 0-{kv - 1})" if kv != heads else ""
        return f"this model has layers 0-{self.n_layers - 1} and heads 0-{heads - 1}{kv_note}"

    def __post_init__(self):
        self._senders = {s.name: s for s in self.senders}
        self._receivers = {r.name: r for r in self.receivers}
        self._normed = {name: pn for pn in self.post_norms for name in pn.senders}

    def post_norm(self, sender: str) -> PostNorm | None:
        """The norm sender ``sender``'s branch passes through before it is added (None: added as it is)."""
        return self._normed.get(sender)

    def sender(self, name: str) -> Sender:
        if name in self._senders:
            return self._senders[name]
        raise CircuitError(
            f"unknown sender {name!r}; senders are 'input', 'a<layer>.h<head>', 'm<layer>' (e.g. 'a0.h1', 'm2'); {self._range()}"
        )

    def receiver(self, name: str) -> Receiver:
        if name in self._receivers:
            return self._receivers[name]
        raise CircuitError(
            f"unknown receiver {name!r}; receivers are 'a<layer>.h<head><q|k|v>', 'm<layer>' and 'logits' "
            f"(e.g. 'a1.h0<k>'); {self._range()}"
        )

    def require_additive(self, what: str) -> None:
        """Refuse ``what`` (path patching by layers) on a model whose residual stream is not a sum of
        component outputs as they are."""
        if self.not_additive is not None:
            through = "every norm between sender and receiver" if self.spine is not None else "each branch's norm"
            also = f"; so do edges, edge sweeps, EAP and ACDC (through {through})" if self.no_edges is None else ""
            raise CircuitError(
                f"{what} needs each component's output added to the residual stream as it is; {self.not_additive}. "
                "Path patching's default method (circuits.path_patch with method='auto' or 'rows', which freezes every "
                f"other head's z and recomputes the rest) and activation patching (fxlens.patching) work on this model{also}"
            )

    def require_edges(self, what: str) -> None:
        """Refuse ``what`` (an edge intervention, EAP, ...) where an edge from one component has no
        definition: the norms between sender and receiver cannot be replayed (``no_edges`` says why)."""
        if self.no_edges is not None:
            raise CircuitError(
                f"{what} is not defined on this model: {self.no_edges}. "
                "Path patching (circuits.path_patch, which freezes every other head's z and recomputes the rest) and "
                "activation patching (fxlens.patching) work on this model; edges, edge sweeps, EAP and ACDC need a "
                "residual stream that fxlens can recompute from the components' outputs: a sum of what the branches "
                "write, each normalised before the add or not (GPT-2, Llama, Gemma 2/3, OLMo 2/3), or normalised "
                "itself after each add (BERT, RoBERTa, ELECTRA)"
            )

    def reaches(self, s: Sender, r: Receiver) -> bool:
        """Whether sender ``s`` writes into the residual stream before receiver ``r`` reads it."""
        if r.kind == "logits":
            return True
        if s.layer < r.layer:
            return True
        return s.layer == r.layer and s.stage < r.stage

    def upstream(self, r: Receiver) -> list:
        return [s for s in self.senders if self.reaches(s, r)]


def _between(dg, source: str, sink: str, within: set) -> list:
    nodes = dg.between(source, sink, within) | {sink}
    return dg.sorted(nodes)


def _mlp_reads(dg, block) -> tuple:
    """(cone, consumers) of a block's MLP receiver.

    Usually the cone is empty and the consumers are the MLP nodes that read the entry. Where the MLP
    shares nodes with the attention branch (Phi: one input norm for both), those shared nodes are the
    cone, replayed on the receiver's input, and the consumers are the MLP-only nodes that read the
    entry or the cone; so an edge into the MLP leaves the heads of its layer alone.
    """
    mlp = block.mlp.nodes
    shared = mlp & block.attn.nodes
    cone = tuple(dg.sorted(shared))
    reads = {block.mlp.entry, *cone}
    consumers = tuple(
        dg.sorted({u.name for n in reads for u in dg.node(n).users if u.name in mlp and u.name not in shared})
    )
    return cone, consumers


def _post_norm(mg, i: int, br, senders: tuple) -> PostNorm | str:
    """The ``PostNorm`` of branch ``br`` of block ``i``, or why the norm cannot be replayed for edges."""
    dg = mg.dg
    inside = {n for n in br.nodes if scope(dg.node(n)) == br.post_norm or scope(dg.node(n)).startswith(br.post_norm + ".")}
    # what the norm reads from the branch (its weights, however cast, do not depend on the branch's input)
    reads = {src.name for n in inside for src in dg.node(n).all_input_nodes if src.name in br.nodes and src.name not in inside}
    why = f"{br.post_norm} does not read the {br.kind} output alone"
    if len(reads) != 1:
        return why
    (value,) = reads
    cone = tuple(_between(dg, value, br.output, set(br.nodes)))
    if any(src.name in br.nodes and src.name not in set(cone) | {value} for n in cone for src in dg.node(n).all_input_nodes):
        return why  # the norm mixes in another value of the branch
    if tuple(tensor_meta(dg.node(value)).shape) != tuple(tensor_meta(dg.node(br.output)).shape):
        return why
    site = next((x.name for x in mg.sites.values() if x.node == value and not x.layout.ops and not x.rewrite), "")
    if br.kind == "attn" and mg.attn[i].o_matmul != value:
        return f"{br.post_norm} reads something other than the attention output projection's result"
    if br.kind == "mlp" and not site:
        return f"the MLP output {br.post_norm} normalises is not a site fxlens can read"
    return PostNorm(i, br.kind, br.post_norm, value, cone, senders, site)


def components(mg) -> Components:
    st, dg = mg.structure, mg.dg
    syms = (mg.captured.batch_symbol, mg.captured.seq_symbol)
    senders = [Sender("input", -1, "input")]
    receivers = []
    parallel = False
    not_additive = None
    no_edges = None
    post_norms = []
    for i, block in enumerate(st.blocks):
        a = mg.attn[i]
        if block.attn is None or a is None or block.mlp is None:
            raise CircuitError(f"block {i} has no attention or no MLP branch that fxlens can decompose")
        if block.spine_norms and not_additive is None:
            not_additive = (
                "this model normalises the residual stream itself after each branch (post-norm, as BERT does), "
                "so the residual stream is not a sum of what the components write"
            )
        parallel = block.attn.entry == block.mlp.entry
        mlp_stage = 0 if parallel else 1
        for br in (block.attn, block.mlp):
            if br.post_norm is None:
                continue
            if not_additive is None:
                not_additive = (
                    f"{br.post_norm} normalises the {br.kind} output before it is added (Gemma 2/3 and OLMo 2 style), "
                    "so per-head outputs do not sum to what the layer writes"
                )
            names = tuple(f"a{i}.h{h}" for h in range(a.n_heads)) if br.kind == "attn" else (f"m{i}",)
            pn = _post_norm(mg, i, br, names)
            if isinstance(pn, str):
                no_edges = no_edges or f"{pn}, so fxlens cannot replay the norm for a single component's edges"
            else:
                post_norms.append(pn)
        for h in range(a.n_heads):
            senders.append(Sender(f"a{i}.h{h}", i, "head", h, 0))
        senders.append(Sender(f"m{i}", i, "mlp", None, mlp_stage))
        within = set(block.nodes) | {block.resid_pre}
        held = flat_view(dg, syms, block.attn.entry).layout
        for kind, view, n in (("q", a.q, a.n_heads), ("k", a.k, a.n_kv_heads), ("v", a.v, a.n_kv_heads)):
            cone = tuple(_between(dg, block.attn.entry, view.node, within))
            for h in range(n):
                receivers.append(Receiver(f"a{i}.h{h}<{kind}>", i, kind, h, 0, block.attn.entry, view, cone, (), held))
        cone, consumers = _mlp_reads(dg, block)
        held = flat_view(dg, syms, block.mlp.entry).layout
        receivers.append(Receiver(f"m{i}", i, "mlp", None, mlp_stage, block.mlp.entry, None, cone, consumers, held))
    spine = None
    if no_edges is None:
        spine = _spine(mg, st, post_norms)
        if isinstance(spine, str):
            no_edges, spine = spine, None
        if spine is not None or no_edges is not None:
            not_additive = not_additive or (
                "this model normalises the residual stream itself after each branch (post-norm, as BERT does) or "
                "otherwise changes it between branches, so the residual stream is not a sum of what the components write"
            )
    last = st.blocks[-1].resid_post
    blocks = set().union(*(b.nodes for b in st.blocks))
    consumers = tuple(u.name for u in dg.node(last).users if u.name not in blocks and u.op != "output")
    receivers.append(Receiver("logits", len(st.blocks), "logits", None, 0, last, None, (), consumers, flat_view(dg, syms, last).layout))
    return Components(senders, receivers, len(st.blocks), parallel, not_additive, tuple(post_norms), no_edges, spine)


def _spine(mg, st, post_norms) -> Spine | str | None:
    """The residual stream of a model that normalises it after each branch; why edges are refused there;
    or None where the residual stream is a sum of what the branches write (each normalised or not)."""
    heads = {i: mg.attn[i].n_heads for i in range(len(st.blocks))}
    names = {("attn", i): tuple(f"a{i}.h{h}" for h in range(n)) for i, n in heads.items()}
    names.update({("mlp", i): (f"m{i}",) for i in heads})
    spine = spine_steps(mg, names)
    if not spine.transformed and not any(b.spine_norms for b in st.blocks):
        return None
    why = ("this model normalises the residual stream itself after each branch (post-norm, as BERT does) or otherwise "
           "changes it between branches, and ")
    if post_norms:
        return why + "each branch's output before it is added as well, which fxlens cannot replay for a single component's edges"
    if any(b.resid_pre != prev.resid_post for prev, b in zip(st.blocks, st.blocks[1:])):
        return why + "something between its blocks changes the residual stream, which fxlens cannot replay for edges"
    return why + spine.why + ", which fxlens cannot replay for a single component's edges" if spine.why else spine
