"""What every pass shares: copy the input, find size nodes, add inputs and outputs, check the result.

Problem: a pass must never mutate the GraphModule it is given (the engine caches programs and the
captured graph is shared), must keep parameters shared rather than copied, and must leave a graph
that lints. Doing that by hand in each pass invites drift.

Mechanism: ``rewrite(gm)`` is a context manager yielding a ``Rewrite`` over a copy of ``gm.graph``;
on exit the graph is linted and a new GraphModule (sharing ``gm``'s parameters) is built. Node names
of the copy equal the original's, so specs can name nodes.

Example::

    with rewrite(gm) as rw:
        x = rw.node("view_6")
        rw.add_output("cache", "q0", x)
    new_gm = rw.result
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx as fx

__all__ = ["Rewrite", "rewrite", "prune", "PassError", "SIZE_BATCH", "SIZE_SEQ"]

aten = torch.ops.aten
SIZE_BATCH = "fxl_batch_size"
SIZE_SEQ = "fxl_seq_size"


class PassError(ValueError):
    """A pass spec that cannot apply to this graph; the message names the spec."""


def prune(graph: fx.Graph) -> None:
    """Dead-code elimination that knows the captured graph has no side effects.

    fx counts ops with random-number arguments (SDPA's dropout) as impure and would keep them and all
    their inputs; in an eval-mode capture nothing is impure but the inputs and the output.
    """
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))


@dataclass
class Rewrite:
    root: fx.GraphModule
    graph: fx.Graph
    result: fx.GraphModule | None = None

    def __post_init__(self):
        self.by_name = {n.name: n for n in self.graph.nodes}

    def node(self, name: str) -> fx.Node:
        try:
            return self.by_name[name]
        except KeyError:
            raise PassError(f"node {name!r} is not in this graph") from None

    def has(self, name: str) -> bool:
        return name in self.by_name

    def create(self, target, args, kwargs=None, name: str | None = None, like: fx.Node | None = None) -> fx.Node:
        node = self.graph.create_node("call_function", target, tuple(args), kwargs or {}, name=name)
        if name is not None and node.name != name:
            raise PassError(f"cannot name a node {name!r}: the name is taken")
        if like is not None:
            for key in ("nn_module_stack", "stack_trace"):
                if key in like.meta:
                    node.meta[key] = like.meta[key]
        self.by_name[node.name] = node
        return node

    def after(self, node: fx.Node):
        """Insert new nodes right after ``node``, in creation order (fx's inserting_after reverses them).

        After a graph input means after the last graph input, so inputs added later stay in front.
        """
        if node.op == "placeholder":
            node = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        return self.graph.inserting_before(node.next)

    def erase_dead(self, node: fx.Node) -> None:
        """Erase ``node`` if nothing reads it, then its inputs that became unread (call_function only).

        Passes use this instead of blanket dead-code elimination, which would also delete the
        side-branch nodes (a pattern computed beside SDPA) that a later cache pass reads.
        """
        stack = [node]
        while stack:
            n = stack.pop()
            if n.op != "call_function" or n.users or n.graph is not self.graph:
                continue
            inputs = list(n.all_input_nodes)
            self.by_name.pop(n.name, None)
            self.graph.erase_node(n)
            stack.extend(inputs)

    def placeholder(self, name: str) -> fx.Node:
        """Add a graph input after the existing ones (callers feed it by keyword)."""
        if name in self.by_name:
            return self.by_name[name]
        last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.after(last):
            node = self.graph.placeholder(name)
        if node.name != name:
            raise PassError(f"graph input {name!r} clashes with an existing node")
        self.by_name[name] = node
        return node

    def read(self, layout, node: fx.Node) -> fx.Node:
        """``layout.read`` of ``node`` at the insertion point, given the (batch, seq) sizes where it needs them."""
        return layout.read(self.graph, node, self.sizes() if layout.needs_sizes else None)

    def write(self, layout, value: fx.Node) -> fx.Node:
        """``layout.write`` of a user-layout ``value`` (the inverse of ``read``), sizes given where it needs them."""
        return layout.write(self.graph, value, self.sizes() if layout.needs_sizes else None)

    def sizes(self) -> tuple[fx.Node, fx.Node]:
        """(batch, seq) size nodes of the token input, created once right after the inputs."""
        if SIZE_BATCH in self.by_name:
            return self.by_name[SIZE_BATCH], self.by_name[SIZE_SEQ]
        source = self.by_name.get("input_ids")
        if source is None:
            source = next((n for n in self.graph.nodes if n.op == "placeholder" and n.meta.get("fxl_role") == "fxl_hidden"), None)
        if source is None:
            raise PassError("this graph has no input_ids (or residual) input to take sizes from")
        last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.after(last):
            b = self.create(aten.sym_size.int, (source, 0), name=SIZE_BATCH)
            s = self.create(aten.sym_size.int, (source, 1), name=SIZE_SEQ)
        return b, s

    def outputs(self) -> dict:
        return self.graph.output_node().args[0]

    def set_outputs(self, value: dict) -> None:
        out = self.graph.output_node()
        out.args = (value,)

    def add_output(self, group: str, key: str, node: fx.Node) -> None:
        out = dict(self.outputs())
        bucket = dict(out.get(group, {}))
        bucket[key] = node
        out[group] = bucket
        self.set_outputs(out)

    def swap_names(self, a: fx.Node, b: fx.Node) -> None:
        """Exchange two nodes' names, so that a site's name follows the value the model now uses."""
        ns = self.graph._graph_namespace
        na, nb = a.name, b.name
        a.name, b.name = nb, na
        ns._obj_to_name[a], ns._obj_to_name[b] = nb, na
        self.by_name[na], self.by_name[nb] = b, a

    def supersede(self, old: fx.Node, new: fx.Node, keep: set | None = None) -> None:
        """Make ``new`` stand for ``old``: it takes old's users (except ``keep``) and old's name."""
        self.replace_uses(old, new, keep)
        if new is not old:
            self.swap_names(old, new)

    def readers(self, node: fx.Node, names) -> set:
        """The nodes named in ``names`` that read ``node`` in this graph (a block's own program lacks the
        readers outside the block): the readers a site's edit leaves on the unedited value."""
        return {self.by_name[n] for n in names if n in self.by_name and node in self.by_name[n].all_input_nodes}

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        """Replace ``old`` entirely: users, name, and the node itself is erased."""
        if "val" in old.meta and "val" not in new.meta:
            new.meta["val"] = old.meta["val"]
        old.replace_all_uses_with(new)
        self.swap_names(old, new)
        self.by_name.pop(old.name, None)
        self.graph.erase_node(old)

    def replace_uses(self, old: fx.Node, new: fx.Node, keep: set | None = None) -> None:
        """Point every user of ``old`` at ``new``, except ``new`` itself and nodes in ``keep``."""
        keep = set(keep or ()) | {new}
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in keep)


@contextlib.contextmanager
def rewrite(gm: fx.GraphModule):
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = gm.graph._codegen
    rw = Rewrite(gm, graph)
    yield rw
    graph.lint()
    rw.result = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
