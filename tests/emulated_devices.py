"""Several accelerator devices emulated on a CPU-only machine, with real values and real device checks.

``FakeTensorMode`` checks devices but computes no values, so an engine that reads values (``.item()``,
``nonzero``) cannot run under it. ``Emulated()`` is a dispatch mode in which a tensor may carry a device
of another type (``OnDevice``: a CPU tensor labelled ``cuda:1``): every operator runs on the CPU data,
refuses non-scalar inputs on different devices as CUDA does (``DeviceMismatch``), and labels its outputs
with its inputs' device; ``x.to("cuda:1")`` relabels, and a factory call with ``device="cuda:0"`` makes a
labelled tensor. Results are bit-identical to the CPU computation.

Example::

    with Emulated():
        a = torch.ones(2, 3, device="cuda:0")
        a @ torch.ones(3, 2, device="cuda:1")      # DeviceMismatch, as on two GPUs

``placed(model, device_of)`` is the fxlens Model computing with its weights labelled ``device_of(path)``
(a capture on the CPU, bound like a ``device_map`` would leave the weights).

Limits: C++ sees a CPU tensor (a CUDA device guard is missing on a CPU build), so what C++ allocates from
a tensor's options (autograd's gradient buffers, index tensors made from Python lists) is unlabelled: the
CPU. Gradients across emulated devices are therefore not checked; index tensors are (CUDA takes CPU ones).
``.to("cpu")``/``.cpu()`` are handled in Python, since C++ takes the tensor for a CPU one already.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map


class DeviceMismatch(RuntimeError):
    """An operator read non-scalar tensors on different devices (CUDA raises here too)."""


class OnDevice(torch.Tensor):
    """A CPU tensor labelled with another device; only usable inside ``Emulated()``."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, device):
        # a CPU tensor to C++ (device guards, and index tensors made from Python lists, are the CPU's; a CUDA
        # guard is missing on a CPU build), the labelled device to Python
        r = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(),
                                                dtype=data.dtype, device=torch.device("cpu"), requires_grad=False)
        r.cpu_data = data
        r.label = torch.device(device)
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self):
        return self.label

    def tolist(self):  # torch refuses tolist on subclasses
        return self.cpu_data.tolist()

    def to(self, *args, **kwargs):
        # C++ takes this for a CPU tensor already: a move to the CPU is made here
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type == "cpu":
            return self.cpu_data.to(dtype=dtype or self.dtype, copy=True)
        return super().to(*args, **kwargs)

    def cpu(self):
        return self.to("cpu")

    def untyped_storage(self):
        return self.cpu_data.untyped_storage()

    def __repr__(self):
        return f"OnDevice({self.device}, {self.cpu_data!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"an emulated-device tensor was used outside Emulated() ({func})")


def label(t: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    data = t.cpu_data if isinstance(t, OnDevice) else t
    return data if device.type == "cpu" else OnDevice(data, device)


aten = torch.ops.aten
_CPU_INDICES = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


class Emulated(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0
        self.transfers = 0

    def __enter__(self):
        torch._C._ensureCUDADeviceGuardSet()
        self._lift = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        self._lazy = torch.cuda._lazy_init
        torch.cuda._lazy_init = lambda: None  # factory calls with device="cuda:N" reach this mode
        return super().__enter__()

    def __exit__(self, *exc):
        torch._C._set_only_lift_cpu_tensors(self._lift)
        torch.cuda._lazy_init = self._lazy
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        seen, scalars = set(), set()

        def unwrap(x):
            if isinstance(x, torch.Tensor):
                (seen if x.dim() > 0 else scalars).add(x.device)
                return x.cpu_data if isinstance(x, OnDevice) else x
            return x

        if func in _CPU_INDICES:  # CUDA takes CPU index tensors here
            a = (unwrap(args[0]), tree_map(lambda x: unwrap(x) if isinstance(x, OnDevice) else x, args[1]),
                 *tree_map(unwrap, tuple(args[2:])))
        else:
            a = tree_map(unwrap, args)
        k = tree_map(unwrap, kwargs)
        target = k.get("device")
        if target is not None:
            target = torch.device(target)
            k["device"] = torch.device("cpu")
        if target is None and len(seen) > 1:
            raise DeviceMismatch(f"{func} read tensors on {', '.join(sorted(map(str, seen)))}")
        self.ops += 1
        out = func(*a, **k)
        if target is not None and (seen or scalars) and target not in seen | scalars:
            self.transfers += 1
        device = target or next(iter(seen), None) or next((d for d in scalars if d.type != "cpu"), torch.device("cpu"))
        return tree_map(lambda x: label(x, device) if isinstance(x, torch.Tensor) else x, out)


def placed(model, device_of):
    """``model`` (an fxlens Model captured on the CPU) computing with each weight of the captured graph
    labelled ``device_of(path)``; inputs are fed on the first weight's device, as a capture would record."""
    d = model.derived
    paths = [n.target for n in d.captured.module.graph.nodes if n.op == "get_attr"]
    overrides = {p: label(d.binding.current(p), device_of(p)) for p in d.binding.graph_paths}
    new = d.rebound(overrides)
    first = torch.device(device_of(paths[0]))
    captured = dataclasses.replace(new.captured, device=first)
    new.captured = captured
    new.graph = dataclasses.replace(new.graph, captured=captured)
    out = model._with_derived(new)
    out.cfg = dataclasses.replace(model.cfg, device=first)
    return out


def blocks_on(n_layers: int, devices=("cuda:0", "cuda:1"), layers: str = "layers"):
    """``device_of`` for a device_map that puts the first half of the blocks (and what comes before them) on
    ``devices[0]`` and the rest (and the final norm and LM head) on ``devices[1]``."""
    half = n_layers // 2

    def device_of(path: str):
        parts = path.split(".")
        if layers in parts:
            i = int(parts[parts.index(layers) + 1])
            return devices[0] if i < half else devices[1]
        before = any(w in path for w in ("embed", "wte", "wpe", "rotary"))
        return devices[0] if before else devices[1]

    return device_of
