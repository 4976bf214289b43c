"""One owner of everything derived from a captured model, and of the facts it was derived under.

Problem: a Model builds programs, block splits, MLP programs, circuit components and plans from the
captured graph. Each holds references to the tensors that were the HF model's parameters when it was
built. If the user then swaps a parameter object (``module.weight = nn.Parameter(...)``,
``load_state_dict(..., assign=True)``), replaces a submodule, or moves the model to another dtype or
device, any of those derived objects silently computes with the old tensors. Caches written onto the
Model from several modules, each with its own invalidation, made that class of bug easy to add.

Mechanism: ``Derived`` holds the capture, its analysis and a dictionary of derived items, each built on
first use by ``item(key, build)``; nothing else keeps derived state. ``Binding`` records, at capture
time, every parameter and buffer of the HF model (object identity, dtype, device), every submodule
and the hooks on it; ``Binding.change()`` compares them with the model as it is now in a few tens of
microseconds. The Model asks at the start of every call and follows a change:

- values edited in place: nothing to do (the graph shares the tensors);
- parameter objects swapped, same shape, dtype and device: the captured module is rebound to the new
  tensors and every derived item is dropped (they rebuild on use);
- anything else (dtype or device moved, a submodule replaced, a tied weight untied): a fresh capture.

A Model made by ``with_weight_edits`` binds some paths to its own tensors (``overrides``); the HF
model's other tensors are followed as above, but a dtype, device or module change cannot be followed
(its own tensors would no longer fit) and raises ``StaleModelError``.

Example::

    d = Derived.capture(hf_model, attn_implementation=None, table=table)
    blocks = d.item(("blocks", False), lambda: [Programs(gm) for gm in d.segments.blocks])
    change = d.binding.change()        # None while the HF model is as it was captured

A model that fixes the sequence length (state-space models; ``graphs.lengths``) is captured once per
input length: ``at_length(L)`` returns the Derived captured at ``L``, kept among this one's items, so
that it follows the HF model with them (a rebind or recapture drops them; they are captured again on
use). The Model asks for the one of its input's length at every call.

Gotchas: forward hooks registered on the HF model after wrapping are not part of the captured graph;
``Binding`` notices them so that the Model can say so.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from collections import OrderedDict

import torch
import torch.fx as fx

from ..graphs.capture import CapturedGraph, CaptureError, capture
from ..graphs.lengths import ambiguous, model_sizes, nearby
from ..graphs.sites import ModelGraph, analyse
from .programs import Programs

__all__ = ["Derived", "Binding", "Change", "StaleModelError"]


class StaleModelError(RuntimeError):
    """A Model can no longer compute what it was made to compute; the message says what to redo."""


@dataclasses.dataclass(frozen=True)
class Change:
    """What differs between the HF model now and when it was captured."""

    swapped: tuple = ()  # paths whose tensor object changed, with equal shape, dtype and device
    moved: tuple = ()  # paths whose dtype, device or shape changed, or that were added or removed
    modules: tuple = ()  # module paths whose object changed
    hooks: bool = False  # forward hooks added or removed on some module

    @property
    def rebindable(self) -> bool:
        return bool(self.swapped) and not (self.moved or self.modules)

    def describe(self) -> str:
        parts = []
        if self.moved:
            parts.append(f"{_few(self.moved)} changed dtype, device or shape")
        if self.modules:
            parts.append(f"module {_few(self.modules)} was replaced")
        if self.swapped:
            parts.append(f"{_few(self.swapped)} is a new tensor object")
        return "; ".join(parts) or "nothing"


def _few(names) -> str:
    names = list(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


_HF_RECORDING = "transformers.utils.output_capturing"


class Binding:
    """The HF model's tensors, modules and hooks as they were when the graph was captured.

    ``overrides`` ({path: tensor}) are tensors of this Model's own that stand for the HF model's at
    those paths (``with_weight_edits``).
    """

    def __init__(self, hf_model: torch.nn.Module, module: fx.GraphModule, overrides: dict | None = None):
        self.hf_model = hf_model
        self.overrides = dict(overrides or {})
        owners, names, tensors = [], [], []
        for path, t in _tensors(hf_model):
            owner, name = _owner(hf_model, path)
            owners.append(owner)
            names.append(name)
            tensors.append(t)
        self.paths = [p for p, _ in _tensors(hf_model)]
        self._dicts = [o._parameters if n in o._parameters else o._buffers for o, n in zip(owners, names)]
        self._names = names
        self._tensors = tensors
        self._dtypes = [t.dtype for t in tensors]
        self._devices = [t.get_device() for t in tensors]
        mods = [(parent, name, child) for parent in hf_model.modules() for name, child in parent._modules.items()]
        self._mod_dicts = [p._modules for p, _, _ in mods]
        self._mod_names = [n for _, n, _ in mods]
        self._mods = [c for _, _, c in mods]
        self._all_modules = list(hf_model.modules())
        self._hooks = self._hook_count()
        # graph attribute paths that are the HF model's tensors: only these can be rebound
        self.graph_paths = {n.target for n in module.graph.nodes if n.op == "get_attr"} & set(self.paths)

    def acknowledge_hooks(self) -> None:
        """Take the HF model's current forward hooks as known (the Model has told the user about them)."""
        self._hooks = self._hook_count()

    def _hook_count(self) -> int:
        """The forward hooks on the model, less transformers' own output-capturing hooks (installed on the
        first call that asks for hidden states or attentions; they record outputs and change nothing)."""
        return sum(
            sum(1 for h in hooks.values() if getattr(h, "__module__", None) != _HF_RECORDING)
            for m in self._all_modules for hooks in (m._forward_hooks, m._forward_pre_hooks)
        )

    def change(self) -> Change | None:
        """None when the HF model is as captured; else what changed. Cheap: a few C-level passes."""
        now = list(map(dict.get, self._dicts, self._names))
        same = all(map(operator.is_, now, self._tensors))
        if same and list(map(_dtype, now)) == self._dtypes and list(map(_device, now)) == self._devices:
            mods_same = all(map(operator.is_, map(dict.get, self._mod_dicts, self._mod_names), self._mods))
            if mods_same:
                if self._hook_count() != self._hooks:
                    return Change(hooks=True)
                return None
        return self._explain()

    def _explain(self) -> Change:
        swapped, moved, modules = [], [], []
        for parent_dict, name, child, path in zip(self._mod_dicts, self._mod_names, self._mods, _module_paths(self)):
            if parent_dict.get(name) is not child:
                modules.append(path)
        current = dict(_tensors(self.hf_model))
        for path, t, dtype, device in zip(self.paths, self._tensors, self._dtypes, self._devices):
            now = current.get(path)
            if now is None:
                moved.append(path)
            elif now.dtype != dtype or _device(now) != device or now.shape != t.shape:
                moved.append(path)
            elif now is not t:
                swapped.append(path)
        moved += [p for p in current if p not in set(self.paths)]
        return Change(tuple(swapped), tuple(moved), tuple(modules), self._hook_count() != self._hooks)

    def untied(self, change: Change) -> bool:
        """Whether a swapped tensor was shared with a path that still holds it (weights untied)."""
        old = {id(self._tensors[self.paths.index(p)]) for p in change.swapped}
        now = dict(_tensors(self.hf_model))
        return any(id(t) in old for p, t in now.items() if p not in change.swapped)

    def current(self, path: str) -> torch.Tensor:
        """The tensor this Model computes with at ``path``: its own override, else the HF model's."""
        if path in self.overrides:
            return self.overrides[path]
        owner, name = _owner(self.hf_model, path)
        return owner._parameters[name] if name in owner._parameters else owner._buffers[name]


def _dtype(t):
    return t.dtype if t is not None else None


def _device(t):
    return t.get_device() if t is not None else None


def _module_paths(binding: Binding):
    paths = {id(m): p for p, m in binding.hf_model.named_modules(remove_duplicate=False)}
    for d, name in zip(binding._mod_dicts, binding._mod_names):
        owner = next((m for m in binding._all_modules if m._modules is d), None)
        prefix = paths.get(id(owner), "") if owner is not None else ""
        yield f"{prefix}.{name}" if prefix else name


def _tensors(model: torch.nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    for path, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            yield path, b


def _owner(model: torch.nn.Module, path: str):
    *parts, name = path.split(".")
    owner = model.get_submodule(".".join(parts)) if parts else model
    return owner, name


class Derived:
    """A capture, its analysis, the binding they rest on, and every item derived from them."""

    def __init__(self, captured: CapturedGraph, graph: ModelGraph, binding: Binding, attn_implementation, table,
                 sizes: frozenset | None = None):
        self.captured = captured
        self.graph = graph
        self.binding = binding
        self.attn_implementation = attn_implementation
        self.table = table
        self.sizes = sizes  # a model that fixes the length: its own sizes (``graphs.lengths``); else None
        self._items: dict = {}
        self._plans: OrderedDict = OrderedDict()

    @classmethod
    def capture(cls, hf_model, attn_implementation, table, overrides: dict | None = None, *,
                seq_len: int | None = None, sizes: frozenset | None = None) -> "Derived":
        """Capture ``hf_model``; one that fixes the sequence length is captured per length
        (``at_length``), and told once, here, with the reason (a UserWarning)."""
        from ..graphs.seq2seq import analyse_seq2seq, capture_seq2seq, is_encoder_decoder

        if is_encoder_decoder(hf_model):  # two stacks: graphs/seq2seq.py
            cg = capture_seq2seq(hf_model, attn_implementation=attn_implementation)
            graph = analyse_seq2seq(cg)
        else:
            cg = capture(hf_model, attn_implementation=attn_implementation, seq_len=seq_len)
            with warnings.catch_warnings():
                if seq_len is not None:  # a further length of a length-fixing model: its sites were told about once
                    warnings.simplefilter("ignore")
                graph = analyse(cg, table)
        derived = cls(cg, graph, Binding(hf_model, cg.module), attn_implementation, table, sizes)
        derived = derived.rebound(overrides) if overrides else derived
        if seq_len is None and getattr(cg, "static_seq", None) is not None:
            derived._per_length(cg.static_reason)
        return derived

    # ---- models that fix the sequence length (``graphs.lengths``) -------------------------------
    def _per_length(self, reason: str | None) -> None:
        """Find the model's own sizes from a second capture (kept for its length) and say once what
        happens: one capture per input length."""
        name = type(self.binding.hf_model).__name__
        here = self.captured.static_seq
        other = here + 2
        second = Derived.capture(self.binding.hf_model, self.attn_implementation, self.table, self.binding.overrides or None,
                                 seq_len=other)
        self.sizes = frozenset(model_sizes(self.captured.module.graph) & model_sizes(second.captured.module.graph))
        second.sizes = self.sizes
        self._items[("length", other)] = second
        if ambiguous(here, self.sizes):
            raise CaptureError(
                f"{name} fixes the sequence length, and at the example length {here} one of its own sizes equals the "
                "length, so fxlens cannot tell its sequence axis apart; please report this with the model's config"
            )
        warnings.warn(
            f"{name}: a capture that takes every sequence length is not possible ({reason or 'its code fixes the length'}); "
            "fxlens captures it once per input length instead (cached per length; each new length costs one capture). "
            "Every feature works; lengths equal to one of the model's own sizes are refused (the message says which).",
            UserWarning,
            stacklevel=4,
        )

    def usable_length(self, length: int) -> int:
        """The smallest length >= ``length`` that ``at_length`` accepts (``length`` itself for a model that
        takes every length): where to pad a sequence whose own length equals one of the model's sizes."""
        if getattr(self.captured, "static_seq", None) is None:
            return length
        sizes = self.sizes or frozenset()
        while ambiguous(length, sizes):
            length += 1
        return length

    def at_length(self, length: int | None) -> "Derived":
        """This Derived, or for a model that fixes the sequence length, the one captured at ``length``
        (captured on first use, cached here; a length equal to one of the model's sizes is refused)."""
        here = getattr(self.captured, "static_seq", None)
        if here is None or length is None or length == here:
            return self
        sizes = self.sizes or frozenset()
        if ambiguous(length, sizes):
            from .inputs import InputError

            up, down = nearby(length, set(sizes), self.captured.min_seq, self.captured.max_seq)
            pad = f"pad to {up} tokens and mark the padding 0 in attention_mask" if up is not None else "pad"
            cut = f", or truncate to {down}" if down is not None else ""
            raise InputError(
                f"{type(self.binding.hf_model).__name__} is captured per sequence length (its code fixes the length), "
                f"and a length of {length} equals one of the model's own sizes, so fxlens cannot tell which axes "
                f"are positions at this length. Use another length: {pad}{cut}."
            )
        key = ("length", length)
        if key not in self._items:
            self._items[key] = Derived.capture(self.binding.hf_model, self.attn_implementation, self.table,
                                               self.binding.overrides or None, seq_len=length, sizes=sizes)
        return self._items[key]

    # ---- following the HF model ---------------------------------------------------------------
    def rebound(self, overrides: dict | None = None) -> "Derived":
        """The same capture computing with the HF model's current tensors (and ``overrides``, path ->
        tensor, for a Model of its own); every derived item is rebuilt on use."""
        binding = Binding(self.binding.hf_model, self.captured.module, overrides if overrides is not None else self.binding.overrides)
        module = _with_tensors(self.captured.module, {p: binding.current(p) for p in binding.graph_paths})
        captured = dataclasses.replace(self.captured, module=module)
        graph = dataclasses.replace(self.graph, captured=captured)
        return Derived(captured, graph, binding, self.attn_implementation, self.table, self.sizes)

    def for_model(self, hf_model, overrides: dict | None = None) -> "Derived":
        """This capture bound to another HF model of the same structure (a deep copy of this one)."""
        binding = Binding(hf_model, self.captured.module)
        return Derived(self.captured, self.graph, binding, self.attn_implementation, self.table, self.sizes).rebound(overrides or {})

    # ---- derived items ------------------------------------------------------------------------
    def item(self, key, build):
        """The item stored under ``key``, built by ``build()`` on first use."""
        try:
            return self._items[key]
        except KeyError:
            value = self._items[key] = build()
            return value

    def plan(self, key, build, maxsize: int = 16):
        """A memoised plan: the same object for the same request, so its program lookup hashes it once."""
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build()
            while len(self._plans) > maxsize:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def no_logits(self, what: str) -> str:
        """What to say when ``what`` needs logits from a model without a head, and how to read its output."""
        cg, name = self.captured, type(self.binding.hf_model).__name__
        fields = ", ".join(cg.outputs) or "nothing"
        first = cg.outputs[0] if cg.outputs else None
        node = cg.module.graph.output_node().args[0]["outputs"].get(first) if first else None
        site = next((s.name for s in self.graph.sites.values() if node is not None and s.node == node.name and s.layout.is_identity), None)
        read = f"the site {site!r}" if site else "a site of model.sites"
        return (
            f"{what} needs logits, but {name} has no logits (no LM head): its output is {fields}. Read it with "
            f"model.run_with_cache(tokens, names_filter={site or '...'!r}, return_type=None) ({read}), or load a model "
            "with a head (AutoModelForCausalLM, AutoModelForMaskedLM)."
        )

    @property
    def programs(self) -> Programs:
        """Programs built from the whole captured graph, keyed by plan."""
        return self.item("programs", lambda: Programs(self.captured.module, placement=self.placement))

    @property
    def placement(self):
        """Where each module's nodes run when the weights live on several devices (``passes.place_devices``),
        read off the bound tensors; None on one device."""
        from ..passes.place_devices import PlaceDevices

        return self.item("placement", lambda: PlaceDevices.of(self.captured.module))

    @property
    def segments(self):
        """The graph split into prelude, blocks and head (``graphs.segments``)."""
        from ..graphs.segments import split

        self._one_stack("the layer-by-layer engine")
        return self.item("segments", lambda: split(self.graph))

    @property
    def components(self):
        """Circuit senders and receivers (``graphs.components``)."""
        self._one_stack("circuits (senders and receivers)")
        return self.graph.components

    def _one_stack(self, what: str) -> None:
        if getattr(self.graph, "stacks", None) is not None:  # an encoder-decoder (graphs/seq2seq.py)
            raise NotImplementedError(
                f"{what} is not offered for encoder-decoders yet ({type(self.binding.hf_model).__name__}); they offer "
                "model(tokens, decoder_input), run_with_cache, run_with_hooks, run_with_interventions and fxlens.patching sweeps"
            )


def _with_tensors(module: fx.GraphModule, tensors: dict) -> fx.GraphModule:
    """A GraphModule of ``module``'s graph whose attribute ``path`` is ``tensors[path]`` (the rest shared)."""
    attrs = {}
    for node in module.graph.nodes:
        if node.op == "get_attr" and node.target not in attrs:
            attrs[node.target] = tensors[node.target] if node.target in tensors else _attr(module, node.target)
    return fx.GraphModule(attrs, module.graph, class_name=type(module).__name__)


def _attr(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module
