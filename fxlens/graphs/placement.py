"""Which device each node of a graph runs on, for a model whose weights live on several devices.

Problem: a model loaded with a ``device_map`` keeps each block's weights on its own device (blocks 0-11
on ``cuda:0``, 12-23 on ``cuda:1``); HF runs it because accelerate's hooks move every block's inputs
to the block's device. fxlens' programs are more than the captured forward: passes add inputs (patch
values, steering vectors, masks, cached activations of another run), the layered engine runs each
block as a program of its own and feeds it rows built outside the graph, and factory nodes
(``arange``, ``full``) carry the device they were traced on. Without moving all of those, a program
fails with a device mismatch, or silently computes a whole block on the wrong device.

Mechanism: ``module_devices(gm)`` reads a table off the bound tensors: module path -> device, for
every module whose weights all live on one device (None when all weights share one device, where
nothing changes), and the default device (the first weight's: the embedding's, where inputs are
fed). ``place(gm, table, default)`` gives every node a device, in graph order:

- a weight (``get_attr``): its own device;
- a computation: the device of the innermost module of its ``nn_module_stack`` in the table (nodes
  that passes create copy the stack of the node they stand beside); else, outside any placed module
  (the model's own glue, a pass's node without a stack), the device of its first activation input,
  else of its first weight, else ``default``;
- ``getitem``: its tuple's device; a graph input: none (it is moved where it is read).

Then every input that lives elsewhere (or may: graph inputs, whose tensors the engine feeds) is moved
by a ``to_device`` node right before it is read, once per (value, device), and a node's device
arguments (a factory's ``device=``, a traced ``to(x, device)``) are set to its own device. Outputs stay
where they were computed: an activation is cached on its block's device and logits come from the LM
head's device.

Capture exports a dispatched model through accelerate's hooks, whose moves torch.export records as
``_to_copy`` nodes; ``strip_transfers`` removes them (and any other move that changes only the
device), so the captured graph is the one a single-device capture gives, and every analysis of it
(sites, the residual stream, blocks) is the same. Placement puts the moves back where they are needed.

Example::

    found = module_devices(gm)            # None on one device
    if found is not None:
        gm = place(gm, *found)

Gotchas: a graph input that is not a tensor (a hook function) passes through ``to_device``
unchanged; a value read on several devices is copied once to each. Placement is the last rewrite
of a program (``engine.programs``): a later pass would create nodes that no one places.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .nodes import tensor_meta

__all__ = ["module_device", "module_devices", "place", "strip_transfers", "to_device"]

aten = torch.ops.aten
_TRANSFERS = (aten._to_copy.default, aten.to.dtype_layout, aten.to.device, aten.to.dtype, aten.to.other)


def to_device(value, device: torch.device):
    """``value`` on ``device`` (itself when it is there already, or not a tensor)."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def module_devices(gm: fx.GraphModule) -> tuple[tuple, str] | None:
    """(((module path, device), ...), default device) of ``gm``'s bound weights, or None on one device."""
    devices: dict[str, set] = {}
    first = None
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = _attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        first = first or value.device
        parts = node.target.split(".")[:-1]
        for i in range(len(parts) + 1):
            devices.setdefault(".".join(parts[:i]), set()).add(value.device)
    if len(devices.get("", ())) <= 1:
        return None
    table = tuple(sorted((path, str(next(iter(d)))) for path, d in devices.items() if len(d) == 1 and path))
    return table, str(first)


def module_device(node: fx.Node, table: dict):
    """The device of the innermost module of ``node``'s ``nn_module_stack`` in ``table`` (path -> device), or None."""
    for path, _ in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        if path in table:
            return table[path]
    return None


def _value_device(node: fx.Node):
    val = node.meta.get("val")
    return val.device if isinstance(val, torch.Tensor) else None


def place(gm: fx.GraphModule, modules: tuple, default: str) -> fx.GraphModule:
    """A new GraphModule of ``gm``'s graph with every node on its device (see the module docstring)."""
    table = {path: torch.device(d) for path, d in modules}
    default = torch.device(default)
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen
    where: dict[fx.Node, torch.device | None] = {}
    moved: dict[tuple, fx.Node] = {}

    def own(node: fx.Node) -> torch.device:
        found = module_device(node, table)
        if found is not None:
            return found
        inputs = node.all_input_nodes
        for kind in (lambda n: n.op != "get_attr", lambda n: n.op == "get_attr"):
            found = next((where[n] for n in inputs if kind(n) and where.get(n) is not None), None)
            if found is not None:
                return found
        return default

    def moved_to(value: fx.Node, device: torch.device, before: fx.Node) -> fx.Node:
        key = (value, device)
        if key not in moved:
            with graph.inserting_before(before):
                node = graph.call_function(to_device, (value, device))
            node.meta.update({k: value.meta[k] for k in ("val", "nn_module_stack") if k in value.meta})
            moved[key] = node
            where[node] = device
        return moved[key]

    for node in list(graph.nodes):
        if node.op == "placeholder":
            where[node] = None
        elif node.op == "get_attr":
            value = _attr(gm, node.target)
            where[node] = value.device if isinstance(value, torch.Tensor) else None
        elif node.op == "output" or node.target is to_device:
            continue
        elif node.op == "call_function" and node.target is operator.getitem:
            where[node] = where.get(node.args[0])
        else:
            device = where[node] = own(node)
            node.args, node.kwargs = _on(node.args, device), _on(node.kwargs, device)
            for inp in node.all_input_nodes:
                at = where.get(inp, _value_device(inp))
                if at != device and not _sizes_only(inp):
                    node.replace_input_with(inp, moved_to(inp, device, node))
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def strip_transfers(graph: fx.Graph) -> int:
    """Remove the nodes that only move a tensor to another device (accelerate's hooks, recorded by
    torch.export on a dispatched model); return how many. A move that also casts keeps its cast."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _TRANSFERS or not node.args:
            continue
        source, out = node.args[0], tensor_meta(node)
        before = tensor_meta(source) if isinstance(source, fx.Node) else None
        if not (isinstance(out, torch.Tensor) and isinstance(before, torch.Tensor)) or out.device == before.device:
            continue
        if out.dtype == before.dtype:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            removed += 1
        else:  # keep the cast, drop the move
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "device"}
            if node.target is aten.to.device:
                node.target, node.args = aten.to.dtype, (source, out.dtype, *node.args[3:])
    return removed


def _on(args, device: torch.device):
    """``args`` with every device in them (``arange(..., device=...)``, ``to(x, device)``) set to ``device``."""
    return fx.node.map_aggregate(args, lambda a: device if isinstance(a, torch.device) else a)


def _sizes_only(node: fx.Node) -> bool:
    """A value that is no tensor (a size, a shape): nothing to move."""
    val = node.meta.get("val")
    return val is not None and not isinstance(val, (torch.Tensor, tuple, list))
