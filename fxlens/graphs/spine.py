"""The residual stream of a post-norm model as a chain of steps: sums of component outputs, and norms.

Problem: a model that normalises the residual stream itself after each branch (BERT, RoBERTa, ELECTRA:
``LayerNorm(x + attn(x))``, then ``LayerNorm(h + mlp(h))``) has no residual that is a sum of what the
components write. A circuit edge s -> r is still well defined: with every other component's output
frozen, recompute what r reads with only s's output changed, replaying every norm between s and r.
That replay needs the residual stream as a list of steps from the embedding to each receiver.

Mechanism: walking each block's spine (``structure.Block.spine``), consecutive spine nodes bound a
segment. A segment holding a branch is an ``"add"`` step: its junction is the previous spine value plus
the branches' outputs (``structure._sum_terms`` must find exactly the block's attention and MLP outputs
there, nothing else), and ``senders`` names the components whose outputs sum into it. Any other segment
is a ``"map"`` step: a position-wise function of the previous spine value alone (the norm), whose nodes
(``cone``) are replayed on a changed input. A receiver's chain is the steps up to the spine node it reads.

Example::

    chain = spine_steps(mg, {("attn", 0): ("a0.h0", ...), ("mlp", 0): ("m0",), ...})
    chain.start, chain.steps[:2]   # 'dropout', (SpineStep('add', 'add_6', 'dropout', ...), SpineStep('map', 'layer_norm_1', 'add_6', ...))
    chain.upto("layer_norm_1")     # the steps a receiver reading that node replays

A norm need not be one op: DeBERTa's and I-BERT's LayerNorms are written out (mean, subtract, sqrt,
divide), so the spine passes through each of their steps and each is a map step; ``transformed`` says
whether any step changes the residual stream other than by adding to it (for a pre-norm model every map
step is an alias, a dropout, a cast or a reshape, such as OPT's flattening of positions around its MLP,
and the residual stream is a plain sum).

Gotchas: a map step's nodes may not reshape or read the positions axis's size (the replay stacks
receivers along the positions axis), nor read any activation besides the spine value; a step that
does says why in ``why``, and ``Spine.why`` is the first such reason (edges are then refused). So does
a sum step that adds something besides the block's attention and MLP outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .nodes import LAYOUT_OPS, op_name
from .structure import _passes_value, _sum_terms

__all__ = ["SpineStep", "Spine", "spine_steps", "steps_upto"]

# layout ops that change a tensor's shape (the replay stacks receivers along the positions axis)
_RESHAPES = LAYOUT_OPS - {"contiguous", "clone", "alias", "to", "type_as", "_to_copy", "dropout", "detach", "lift_fresh_copy"}


@dataclass(frozen=True)
class SpineStep:
    kind: str  # "add": output = input + the senders' branch outputs; "map": output = f(input), f replayable
    output: str  # the spine node after the step
    input: str  # the spine node before it
    senders: tuple = ()  # "add": names of the senders whose outputs are summed here
    cone: tuple = ()  # "map": nodes from input (excluded) to output (included), graph order
    identity: bool = False  # "map": no node changes a value (an alias, dropout, a cast, a reshape: OPT's flattening)
    why: str = ""  # why the step cannot be replayed for an edge ("" if it can)


@dataclass(frozen=True)
class Spine:
    start: str  # the residual stream's first node: block 0's input (the embedding sender's value)
    steps: tuple  # of SpineStep, in order

    @property
    def transformed(self) -> bool:
        """Whether the residual stream is changed other than by adding to it (a norm on it: BERT)."""
        return any(step.kind == "map" and not step.identity for step in self.steps)

    @property
    def why(self) -> str:
        """Why edges cannot be replayed on this residual stream ("" if they can)."""
        return next((step.why for step in self.steps if step.why), "")

    def upto(self, node: str) -> tuple:
        """The steps before spine node ``node`` (a receiver's entry) is read."""
        found = steps_upto(self.start, self.steps, node)
        if found is None:
            raise ValueError(f"{node} is not on the residual stream")
        return found


def steps_upto(start: str, steps: tuple, node: str) -> tuple | None:
    """The ``steps`` (each with an ``output`` node) from ``start`` up to the one giving ``node``; None if none does."""
    if node == start:
        return ()
    k = next((k for k, step in enumerate(steps) if step.output == node), None)
    return None if k is None else steps[: k + 1]


def _activation(node, memo: dict) -> bool:
    """Whether ``node`` depends on a graph input (parameters and constants do not)."""
    if node.name not in memo:
        memo[node.name] = node.op == "placeholder" or any(_activation(a, memo) for a in node.all_input_nodes)
    return memo[node.name]


def spine_steps(mg, branch_senders: dict) -> Spine:
    """The residual stream of ``mg`` as a ``Spine``; a step that cannot be replayed for an edge says why.

    ``branch_senders``: {(kind, layer): sender names} for each block's "attn" and "mlp" branch."""
    dg = mg.dg
    blocks = mg.structure.blocks
    memo: dict = {}
    steps = []
    for i, block in enumerate(blocks):
        outputs = {block.attn.output: ("attn", i), block.mlp.output: ("mlp", i)}
        region = dg.between(block.resid_pre, block.resid_post, set(block.nodes)) | {block.resid_post}
        for a, b in zip(block.spine, block.spine[1:]):
            interior = dg.between(a, b, region)
            terms = _sum_terms(dg, b, a, interior) if interior else []
            if any(t in outputs for t in terms):
                extra = "" if set(terms) <= set(outputs) else (
                    f"block {i} adds to the residual stream something besides its attention and MLP outputs")
                names = tuple(n for t in terms if t in outputs for n in branch_senders[outputs[t]])
                steps.append(SpineStep("add", b, a, senders=names, why=extra))
                continue
            cone = tuple(dg.sorted(interior | {b}))
            identity = all(op_name(dg.node(n)) in LAYOUT_OPS or _passes_value(dg.node(n)) for n in cone)
            steps.append(SpineStep("map", b, a, cone=cone, identity=identity, why="" if identity else _unreplayable(dg, i, a, cone, memo)))
    return Spine(blocks[0].resid_pre, tuple(steps))


def _unreplayable(dg, i: int, a: str, cone: tuple, memo: dict) -> str:
    """Why the map step from ``a`` through ``cone`` cannot be replayed on stacked receivers ("" if it can)."""
    for name in cone:
        node = dg.node(name)
        if op_name(node) in _RESHAPES or op_name(node) == "sym_size":
            return f"block {i} reshapes the residual stream between its branches"
        if any(src.name not in cone and src.name != a and _activation(src, memo) for src in node.all_input_nodes):
            return f"block {i} normalises the residual stream with something besides the residual itself"
    return ""
