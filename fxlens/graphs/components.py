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
component outputs (BERT's post-norm, Gemma 2's and OLMo 2's norms after each branch) the components
still exist (path patching's textbook algorithm needs only heads' z and MLP outputs), and
``not_additive`` says why edges from single components are not defined there.

Example::

    cg = components(mg)
    cg.senders[:3]          # [Sender('input', -1), Sender('a0.h0', 0, 'head', 0), Sender('a0.h1', 0, 'head', 1)]
    cg.receiver("a1.h0<k>").cone     # node names replayed for head 0's keys
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention import View

__all__ = ["Sender", "Receiver", "Components", "components", "CircuitError"]


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


@dataclass
class Components:
    senders: list
    receivers: list
    n_layers: int
    parallel: bool  # attention and MLP of a block read the same residual
    not_additive: str | None = None  # why the residual stream is not a sum of component outputs (or None)

    def _range(self) -> str:
        heads = sum(1 for s in self.senders if s.kind == "head" and s.layer == 0)
        kv = sum(1 for r in self.receivers if r.kind == "k" and r.layer == 0)
        kv_note = f" (keys and values: heads 0-{kv - 1})" if kv != heads else ""
        return f"this model has layers 0-{self.n_layers - 1} and heads 0-{heads - 1}{kv_note}"

    def __post_init__(self):
        self._senders = {s.name: s for s in self.senders}
        self._receivers = {r.name: r for r in self.receivers}

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
        """Refuse ``what`` (an edge intervention, EAP, ...) on a model whose residual stream is not a sum
        of component outputs: an edge from one head has no meaning there."""
        if self.not_additive is not None:
            raise CircuitError(
                f"{what} needs each component's output added to the residual stream as it is; {self.not_additive}. "
                "Path patching (circuits.path_patch, which freezes every other head's z and recomputes the rest) and "
                "activation patching (fxlens.patching) work on this model"
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


def components(mg) -> Components:
    st, dg = mg.structure, mg.dg
    senders = [Sender("input", -1, "input")]
    receivers = []
    parallel = False
    not_additive = None
    for i, block in enumerate(st.blocks):
        a = mg.attn[i]
        if block.attn is None or a is None or block.mlp is None:
            raise CircuitError(f"block {i} has no attention or no MLP branch that fxlens can decompose")
        if block.spine_norms and not_additive is None:
            not_additive = (
                "this model normalises the residual stream itself after each branch (post-norm, as BERT does), "
                "so the residual stream is not a sum of what the components write"
            )
        for br in (block.attn, block.mlp):
            if br.post_norm is not None and not_additive is None:
                not_additive = (
                    f"{br.post_norm} normalises the {br.kind} output before it is added (Gemma 2/3 and OLMo 2 style), "
                    "so per-head outputs do not sum to what the layer writes"
                )
        parallel = block.attn.entry == block.mlp.entry
        mlp_stage = 0 if parallel else 1
        for h in range(a.n_heads):
            senders.append(Sender(f"a{i}.h{h}", i, "head", h, 0))
        senders.append(Sender(f"m{i}", i, "mlp", None, mlp_stage))
        within = set(block.nodes) | {block.resid_pre}
        for kind, view, n in (("q", a.q, a.n_heads), ("k", a.k, a.n_kv_heads), ("v", a.v, a.n_kv_heads)):
            cone = tuple(_between(dg, block.attn.entry, view.node, within))
            for h in range(n):
                receivers.append(Receiver(f"a{i}.h{h}<{kind}>", i, kind, h, 0, block.attn.entry, view, cone))
        cone, consumers = _mlp_reads(dg, block)
        receivers.append(Receiver(f"m{i}", i, "mlp", None, mlp_stage, block.mlp.entry, None, cone, consumers))
    last = st.blocks[-1].resid_post
    blocks = set().union(*(b.nodes for b in st.blocks))
    consumers = tuple(u.name for u in dg.node(last).users if u.name not in blocks and u.op != "output")
    receivers.append(Receiver("logits", len(st.blocks), "logits", None, 0, last, None, (), consumers))
    return Components(senders, receivers, len(st.blocks), parallel, not_additive)
