"""Run each node of a program on the device of the weights its module owns (a model spread over devices).

Problem: a model loaded with a ``device_map`` keeps each block's weights on its own device (block 0-11
on ``cuda:0``, 12-23 on ``cuda:1``); HF runs it because accelerate's hooks move every block's inputs
to the block's device. fxlens' programs are more than the captured forward: passes add inputs (patch
values, steering vectors, masks, cached activations of another run), the layered engine runs each
block as a program of its own and feeds it rows built outside the graph, and factory nodes
(``arange``, ``full``) carry the device they were traced on. Without moving all of those, a program
fails with a device mismatch, or silently computes a whole block on the wrong device.

Mechanism: the spec is a table from module path to device, for every module whose weights all live on
one device (``PlaceDevices.of(gm)`` reads it off the bound tensors; None when they share one device,
where nothing changes). The pass gives every node a device, in graph order:

- a weight (``get_attr``): its own device;
- a computation: the device of the innermost module of its ``nn_module_stack`` in the table (nodes
  that passes create copy the stack of the node they stand beside); else, outside any placed module
  (the model's own glue, a pass's node without a stack), the device of its first activation input,
  else of its first weight, else ``default`` (the device the inputs are fed on: the embedding's);
- ``getitem``: its tuple's device; a graph input: none (it is moved where it is read);
- an explicit transfer to one of the weights' devices (what torch.export records of accelerate's
  hooks on a dispatched model): that device, as traced. A transfer to any other device is the
  trace's own choice (``x.to(inv_freq.device)`` captured on one device) and is placed as above.

Then every input that lives elsewhere (or may: graph inputs, whose tensors the engine feeds) is moved
by a ``to_device`` node right before it is read, once per (value, device), and a node's device
arguments (a factory's ``device=``, a traced ``to(x, device)``) are set to its own device. Outputs stay where they were computed: an activation
is cached on its block's device and logits come from the LM head's device, as HF returns them.

Example::

    spec = PlaceDevices.of(gm)            # None on one device
    if spec is not None:
        gm = place_devices(gm, spec)      # every program of a multi-device model, after its plan

Gotchas: a graph input that is not a tensor (a hook function) passes through ``to_device``
unchanged; a value read on several devices is copied once to each. The pass is the last rewrite
of a program (``engine.programs``): a later pass would create nodes that no one places.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from .base import rewrite

__all__ = ["PlaceDevices", "place_devices", "to_device"]


def to_device(value, device: torch.device):
    """``value`` on ``device`` (itself when it is there already, or not a tensor)."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class PlaceDevices:
    stage: ClassVar[str] = "devices"  # after every stage of a plan (``engine.programs`` applies it last)
    modules: tuple  # ((module path, device string), ...) for modules whose weights share one device
    default: str  # where the model's inputs are fed (its first weight's device: the embedding's)

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "PlaceDevices | None":
        """The table of ``gm``'s bound weights, or None when they all live on one device."""
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
        return cls(table, str(first))

    @property
    def devices(self) -> tuple:
        return tuple(sorted({d for _, d in self.modules}))


def _value_device(node: fx.Node):
    val = node.meta.get("val")
    return val.device if isinstance(val, torch.Tensor) else None


def place_devices(gm: fx.GraphModule, spec: PlaceDevices) -> fx.GraphModule:
    table = {path: torch.device(d) for path, d in spec.modules}
    default = torch.device(spec.default)
    with rewrite(gm) as rw:
        graph = rw.graph
        where: dict[fx.Node, torch.device | None] = {}
        moved: dict[tuple, fx.Node] = {}
        known = set(table.values())

        def own(node: fx.Node) -> torch.device:
            for path, _ in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
                if path in table:
                    return table[path]
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
                where[node] = _device(rw.root, node)
            elif node.op == "output" or node.target is to_device:
                continue
            elif node.op == "call_function" and node.target is operator.getitem:
                where[node] = where.get(node.args[0])
            elif _transfer(node) in known:  # a transfer traced from accelerate's hooks: it moves its input itself
                where[node] = _transfer(node)
            else:
                device = where[node] = own(node)
                node.args, node.kwargs = _on(node.args, device), _on(node.kwargs, device)
                for inp in node.all_input_nodes:
                    at = where.get(inp, _value_device(inp))
                    if at != device and not _sizes_only(inp):
                        node.replace_input_with(inp, moved_to(inp, device, node))
    return rw.result


_TRANSFERS = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device)


def _transfer(node: fx.Node):
    """The device an explicit transfer node moves its input to (None for any other node)."""
    if node.op != "call_function" or node.target not in _TRANSFERS:
        return None
    device = node.kwargs.get("device", node.args[1] if node.target == torch.ops.aten.to.device and len(node.args) > 1 else None)
    return torch.device(device) if isinstance(device, (torch.device, str)) else None


def _on(args, device: torch.device):
    """``args`` with every device in them (``arange(..., device=...)``, ``to(x, device)``) set to ``device``."""
    return fx.node.map_aggregate(args, lambda a: device if isinstance(a, torch.device) else a)


def _device(gm: fx.GraphModule, node: fx.Node):
    value = _attr(gm, node.target)
    return value.device if isinstance(value, torch.Tensor) else None


def _sizes_only(node: fx.Node) -> bool:
    """A value that is no tensor (a size, a shape): nothing to move."""
    val = node.meta.get("val")
    return val is not None and not isinstance(val, (torch.Tensor, tuple, list))
