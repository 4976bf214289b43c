"""Place every node of a program on the device of the weights its module owns (``graphs.placement``).

Problem: a model whose weights live on several devices (a ``device_map``) needs every program fxlens
builds from it (the passes' inputs and nodes included) to run each node on its block's device, with
moves at block boundaries and user-given values moved to the node they act on.

Mechanism: the spec is the table ``graphs.placement.module_devices`` reads off the bound weights
(``PlaceDevices.of(gm)``: None on one device, where nothing is added); the pass is
``graphs.placement.place``. It is no stage of a plan: ``engine.programs`` applies it after every plan,
so that the nodes other passes create are placed too.

Example::

    spec = PlaceDevices.of(gm)            # None on one device
    if spec is not None:
        gm = place_devices(gm, spec)

Gotchas: see ``graphs.placement`` (what each node's device is; outputs stay where they are computed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

import torch

from ..graphs.placement import module_device, module_devices, place, to_device

__all__ = ["PlaceDevices", "place_devices", "to_device"]


@dataclass(frozen=True)
class PlaceDevices:
    stage: ClassVar[str] = "devices"  # after every stage of a plan (``engine.programs`` applies it last)
    modules: tuple  # ((module path, device string), ...) for modules whose weights share one device
    default: str  # where the model's inputs are fed (its first weight's device: the embedding's)

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "PlaceDevices | None":
        """The table of ``gm``'s bound weights, or None when they all live on one device."""
        found = module_devices(gm)
        return None if found is None else cls(*found)

    @property
    def devices(self) -> tuple:
        return tuple(sorted({d for _, d in self.modules}))

    def device_of(self, node: fx.Node) -> torch.device | None:
        """Where ``node`` (of the captured graph) runs: its module's device, or None outside placed modules."""
        return module_device(node, {path: torch.device(d) for path, d in self.modules})


def place_devices(gm: fx.GraphModule, spec: PlaceDevices) -> fx.GraphModule:
    return place(gm, spec.modules, spec.default)
