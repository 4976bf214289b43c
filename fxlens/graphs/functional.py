"""Rewrite the in-place operations of a captured graph as out-of-place ones (functionalisation).

Problem: ``torch.export``'s graph keeps the model's in-place operations. DeepSeek's attention fills
a ``new_empty`` tensor with ``copy_`` into two slices of it; Gemma-3n's AltUp adds into a slice
(``x[1:] += y``); MoE routing writes an inverse permutation with ``index_put_``. Their results are
read through aliases (the base tensor, another view of it), not through the mutating node's users.
Dead-code elimination therefore deletes them (the capture then computes from uninitialised memory:
wrong logits, different on every call), and every rewrite that reasons by use-def (patch a node,
cache a node, prune what a read-out does not need) sees a dataflow that is not the one that runs.

Mechanism: the fake tensors export records in ``meta["val"]`` share a storage exactly when the
traced tensors did. A node that shares its first argument's storage is a view of it; following
views back leads to a *base* and a chain of view nodes. One walk in program order then rewrites
``t.op_(...)`` as ``r = op(t, ...)`` (cast back to ``t``'s dtype, as in-place ops do) and gives the
base a new value: ``r`` scattered back up the chain (slice -> ``slice_scatter``, select ->
``select_scatter``, a split's piece -> ``slice_scatter``, permute -> the inverse permute, a
reshape-like view -> ``reshape_as``, a same-layout alias such as ``to``/``type_as``/``contiguous``
-> itself). Every later read of the base or of any view of it reads that view replayed on the new
value. The graph that comes out has no mutation left, so its use-def edges are its whole dataflow.

Example::

    left = functionalize(graph)      # [] when every mutation was rewritten
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or is_mutation(n))

Gotchas: a mutation of a graph input, parameter or buffer, or one written through a view that
cannot be inverted (``expand``, ``as_strided``, a split with symbolic sizes), is left in place and
described in the returned list; a graph with such leftovers must keep mutating nodes
(``is_mutation``) through any dead-code elimination. The rewrite relies on the fake tensors'
storages, so it runs on the graph ``torch.export`` produced, before anything replaces ``meta["val"]``.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import optimization_hint, statically_known_true
from torch.multiprocessing.reductions import StorageWeakRef

from .nodes import op_name, tensor_meta

__all__ = ["functionalize", "is_mutation"]

aten = torch.ops.aten

_SPLITS = ("split", "split_with_sizes", "chunk", "unbind")
_RESHAPES = ("view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")


def is_mutation(node: fx.Node) -> bool:
    """Whether the node writes into one of its arguments (its schema marks an argument ``(a!)``)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


@dataclass(frozen=True)
class _Origin:
    base: fx.Node  # the node that created the storage
    chain: tuple[fx.Node, ...]  # view nodes from the base (exclusive) to this node (inclusive)


def _storage(node) -> StorageWeakRef | None:
    val = tensor_meta(node) if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return StorageWeakRef(val.untyped_storage())
    except Exception:  # noqa: BLE001 - a tensor without a storage aliases nothing
        return None


def _bound(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _source(node: fx.Node) -> fx.Node | None:
    """The tensor a view node reads: its first argument, or the split's input for a split's piece."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    first = node.args[0]
    if node.target is operator.getitem:
        return first.args[0] if first.op == "call_function" and op_name(first) in _SPLITS and first.args else None
    return first


def _functional(target):
    """The out-of-place overload of an in-place aten op (``add_.Tensor`` -> ``add.Tensor``), or None."""
    packet = getattr(target, "_overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if not name.endswith("_") or name.endswith("__"):
        return None
    functional = getattr(aten, name[:-1], None)
    return getattr(functional, target._overloadname, None) if functional is not None else None


def _known_equal(a, b) -> bool:
    """Sizes equal for every value of the symbols, decided without adding a guard (comparing
    ``s0 == 2`` as Python bools would specialise the batch symbol to the example's size)."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _same_layout(node: fx.Node, source: fx.Node) -> bool:
    a, b = tensor_meta(node), tensor_meta(source)
    try:
        return (a.dtype == b.dtype and _known_equal(a.shape, b.shape) and _known_equal(a.stride(), b.stride())
                and _known_equal((a.storage_offset(),), (b.storage_offset(),)))
    except Exception:  # noqa: BLE001 - a layout that cannot be compared is not the same
        return False


def _result_dtype(functional, node: fx.Node) -> torch.dtype:
    """The dtype ``functional`` gives on the node's arguments, from a run on meta tensors of the
    example's sizes (no fake-tensor run: that could add guards to the capture's shapes)."""

    def meta(arg):
        val = tensor_meta(arg)
        if isinstance(val, torch.Tensor):
            return torch.empty_strided([optimization_hint(d) for d in val.shape],
                                       [optimization_hint(d) for d in val.stride()], dtype=val.dtype, device="meta")
        if isinstance(val, torch.SymInt):
            return optimization_hint(val)
        return val

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), meta)
    return functional(*args, **kwargs).dtype


def _inverse(step: fx.Node):
    """How to write a value of ``step`` back into its source: ``fn(graph, parent, src) -> node``, or None."""
    name = op_name(step)
    if step.target is operator.getitem:
        split, index = step.args[0], step.args[1]
        kind = op_name(split)
        args = _bound(split)
        dim = args.get("dim", 0)
        if kind == "unbind":
            return lambda g, parent, src: g.call_function(aten.select_scatter.default, (parent, src, dim, index))
        if kind == "split_with_sizes" and all(isinstance(s, int) for s in args["split_sizes"]):
            start = sum(args["split_sizes"][:index])
            end = start + args["split_sizes"][index]
        elif kind == "split" and isinstance(args.get("split_size"), int):
            start, end = index * args["split_size"], (index + 1) * args["split_size"]
        elif kind == "chunk" and isinstance(tensor_meta(split.args[0]).shape[dim], int):
            size = -(-tensor_meta(split.args[0]).shape[dim] // args["chunks"])
            start, end = index * size, (index + 1) * size
        else:
            return None
        return lambda g, parent, src: g.call_function(aten.slice_scatter.default, (parent, src, dim, start, end))
    if _same_layout(step, _source(step)):
        return lambda g, parent, src: src
    if name == "slice":
        a = _bound(step)
        return lambda g, parent, src: g.call_function(
            aten.slice_scatter.default, (parent, src, a["dim"], a["start"], a["end"], a["step"]))
    if name == "select":
        a = _bound(step)
        return lambda g, parent, src: g.call_function(aten.select_scatter.default, (parent, src, a["dim"], a["index"]))
    if name == "diagonal":
        a = _bound(step)
        return lambda g, parent, src: g.call_function(
            aten.diagonal_scatter.default, (parent, src, a["offset"], a["dim1"], a["dim2"]))
    if name == "permute":
        dims = list(_bound(step)["dims"])
        inverse = sorted(range(len(dims)), key=lambda i: dims[i] % len(dims))
        return lambda g, parent, src: g.call_function(aten.permute.default, (src, inverse))
    if name == "transpose":
        a = _bound(step)
        return lambda g, parent, src: g.call_function(aten.transpose.int, (src, a["dim0"], a["dim1"]))
    if name == "t":
        return lambda g, parent, src: g.call_function(aten.t.default, (src,))
    if name in _RESHAPES:
        # These views keep the row-major order of the elements, so the inverse is a reshape back.
        return lambda g, parent, src: g.call_function(aten.reshape_as.default, (src, parent))
    return None


class _Functionalizer:
    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.origin: dict[fx.Node, _Origin] = {}
        self.mutations: list[fx.Node] = []
        self.left: list[str] = []
        self.splits: dict[tuple, fx.Node] = {}
        self.dtypes: dict[fx.Node, torch.dtype] = {}  # each rewritten mutation's out-of-place result dtype

    # -- analysis: which storage each node belongs to, and which mutations can be rewritten --
    def analyse(self) -> set[fx.Node]:
        base_of: dict[StorageWeakRef, fx.Node] = {}
        bad: dict[fx.Node, str] = {}
        for node in self.graph.nodes:
            storage = _storage(node)
            if storage is None:
                continue
            if is_mutation(node):
                self.mutations.append(node)
                written = [a.name for a in node.target._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
                target = node.args[0] if node.args else None
                if written != [node.target._schema.arguments[0].name] or target not in self.origin or _storage(target) != storage:
                    base = base_of.get(storage)
                    if base is not None:
                        bad[base] = f"{node.name} ({op_name(node)}) writes an argument other than its first"
                    self.left.append(f"{node.name} ({op_name(node)}): writes an argument other than its first")
                    continue
                self.origin[node] = self.origin[target]
                continue
            source = _source(node)
            if source is not None and source in self.origin and _storage(source) == storage:
                parent = self.origin[source]
                self.origin[node] = _Origin(parent.base, parent.chain + (node,))
            elif storage in base_of:  # shares a storage with no view relation we can replay
                base = base_of[storage]
                bad.setdefault(base, f"{node.name} ({op_name(node)}) aliases {base.name} in a way fxlens cannot follow")
            else:
                base_of[storage] = node
                self.origin[node] = _Origin(node, ())
        rewritable = set()
        for node in self.mutations:
            origin = self.origin.get(node)
            if origin is None:
                continue
            why = bad.get(origin.base)
            if why is None and origin.base.op in ("placeholder", "get_attr"):
                why = f"writes into the graph input or parameter {origin.base.target}"
            if why is None and _functional(node.target) is None:
                why = "has no out-of-place form"
            if why is None:
                try:
                    self.dtypes[node] = _result_dtype(_functional(node.target), node)
                except Exception as err:  # noqa: BLE001 - an op we cannot model stays in place
                    why = f"cannot be modelled out of place ({type(err).__name__})"
            if why is None:
                step = next((s for s in origin.chain if _inverse(s) is None), None)
                if step is not None:
                    why = f"writes through {step.name} ({op_name(step)}), a view fxlens cannot invert"
            if why is not None:
                bad.setdefault(origin.base, why)
        for node in self.mutations:
            origin = self.origin.get(node)
            if origin is None:
                continue
            if origin.base in bad:
                self.left.append(f"{node.name} ({op_name(node)}): {bad[origin.base]}")
            else:
                rewritable.add(node)
        return rewritable

    # -- rewrite, in program order --
    def run(self) -> list[str]:
        rewritable = self.analyse()
        bases = {self.origin[m].base for m in rewritable}
        if not bases:
            return self.left
        version = dict.fromkeys(bases, 0)
        current = {b: b for b in bases}
        made: dict[fx.Node, int] = {}
        cache: dict[tuple, fx.Node] = {}

        def value(base: fx.Node, chain: tuple, at: fx.Node) -> fx.Node:
            """The chain's view of the base's current value (nodes inserted before ``at``)."""
            if not chain:
                return current[base]
            key = (chain[-1], version[base])
            if key not in cache:
                parent = value(base, chain[:-1], at)
                cache[key] = self._replay(chain[-1], parent, at, read)
            return cache[key]

        def read(x: fx.Node, at: fx.Node) -> fx.Node:
            origin = self.origin.get(x)
            if origin is None or origin.base not in bases or made.get(x, version[origin.base]) == version[origin.base]:
                return x
            return value(origin.base, origin.chain, at)

        for node in list(self.graph.nodes):
            for x in list(node.all_input_nodes):
                fresh = read(x, node)
                if fresh is not x:
                    node.replace_input_with(x, fresh)
            origin = self.origin.get(node)
            if origin is None or origin.base not in bases:
                continue
            if node in rewritable:
                base = origin.base
                with self.graph.inserting_before(node):
                    new = self._scatter(node, origin, lambda chain: value(base, chain, node))
                made[node] = version[base]
                version[base] += 1
                current[base] = new
            else:
                made[node] = version[origin.base]
        for node in reversed(list(self.graph.nodes)):
            if node in rewritable:
                assert not node.users, f"{node.name} is still read after functionalisation"
                self.graph.erase_node(node)
        return self.left

    def _replay(self, step: fx.Node, parent: fx.Node, at: fx.Node, read) -> fx.Node:
        """A copy of view node ``step`` that reads ``parent`` (its other inputs read as of now)."""
        with self.graph.inserting_before(at):
            if step.target is operator.getitem:
                split = step.args[0]
                key = (split, parent)
                if key not in self.splits:
                    self.splits[key] = self.graph.node_copy(split, lambda a: parent if a is split.args[0] else read(a, at))
                pieces = self.splits[key]
                return self.graph.node_copy(step, lambda a: pieces if a is split else read(a, at))
            source = step.args[0]
            return self.graph.node_copy(step, lambda a: parent if a is source else read(a, at))

    def _scatter(self, node: fx.Node, origin: _Origin, value) -> fx.Node:
        """Insert ``op(t, ...)`` for ``t.op_(...)`` and write it back up the view chain; the base's new value."""
        g = self.graph
        target = node.args[0]
        functional = _functional(node.target)
        result = g.call_function(functional, node.args, node.kwargs)
        result.meta = copy.copy(node.meta)
        want = tensor_meta(target)
        got = want.to(self.dtypes[node])
        result.meta["val"] = got
        if got.dtype != want.dtype:
            result = g.call_function(aten._to_copy.default, (result,), {"dtype": want.dtype})
            result.meta = {**copy.copy(node.meta), "val": want}
        src = result
        for i in reversed(range(len(origin.chain))):
            step = origin.chain[i]
            parent = value(origin.chain[:i])
            written = _inverse(step)(g, parent, src)
            if written is not src:
                written.meta = {**copy.copy(node.meta), "val": tensor_meta(_source(step))}
            src = written
        return src


def functionalize(graph: fx.Graph) -> list[str]:
    """Rewrite ``graph``'s in-place ops as out-of-place ones, in place; what was left, one line each."""
    return _Functionalizer(graph).run()
