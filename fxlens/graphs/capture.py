"""Capture a HuggingFace model as a plain torch.fx graph.

Problem: every intervention in fxlens is a rewrite of one graph, so the model must first become a
graph that is exact, shape-generic and easy to rewrite. ``torch.fx.symbolic_trace`` fails on HF
models; ``torch.export`` (non-strict) works, but its ``ep.module()`` guards its inputs with a pytree
spec and a ``_guards_fn`` call, wraps no-grad regions (rotary embeddings) in higher-order ops, and
returns a ``ModelOutput``.

Mechanism: export once in eval mode with ``use_cache=False`` and dynamic batch and sequence
dimensions, then rebuild the graph: plain ``CodeGen`` (so passes may add placeholders), the guard
and metadata-assert nodes dropped, higher-order no-grad wrappers inlined, and the output a dict
``{"outputs": {field: node}}`` keyed by the model output's field names. Parameters stay shared with
the user's model (no copy); the user's model object is left exactly as it was found.

Sequence lengths: the sequence dimension is declared ``Dim("seq", min=1, max=max_positions)``. When
torch refuses that range, ``graphs.bounds`` reads its error and capture retries with torch's suggested
range, or lets torch narrow the range itself (``Dim.DYNAMIC``); the range exported is recorded
(``min_seq``/``max_seq``) and inputs outside it are refused before they run. A model whose code fixes
the length (state-space models) is captured at one length with a dynamic batch (``static_seq``,
``static_reason``; ``seq_len=L`` captures at ``L``); ``graphs.lengths`` explains how such captures are
used per input length and keep their axis labels sound. A failed export is explained by
``graphs.explain``: torch's message trimmed, the fix named, and a model whose own forward fails on
the example input refused as a config problem.

Example::

    cg = capture(hf_model)
    out = cg.module(input_ids=ids, attention_mask=mask)["outputs"]["logits"]

Several devices: a model dispatched over devices by accelerate (``device_map``) is exported through
its hooks; the moves they make are stripped from the graph (``graphs.placement.strip_transfers``), so
that it is the graph a one-device capture gives, and the engine places every program it builds on the
blocks' devices (``graphs.placement``; the probe and self-check run placed too). ``device`` is the
first weight's (the embedding's), where inputs are fed.

Gotchas: the graph is specialised to the model's dtype and device (``.to(float32)`` on a float32
tensor is traced as an alias), so capture again after moving the model; a model whose forward
takes no ``attention_mask`` is captured with ``input_ids`` only.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.graph import CodeGen

from .bounds import REFINE, STATIC, max_positions, next_bounds
from .causality import Probe, probe
from .explain import explain
from .functional import functionalize, is_mutation
from .nodes import is_assert, tensor_meta
from .placement import module_devices, place, strip_transfers
from .selfcheck import compare
from .vocab import input_vocab

__all__ = ["CapturedGraph", "CaptureError", "capture"]


class CaptureError(RuntimeError):
    """The model could not be turned into a graph; the message says what failed and what to do."""


def _several_devices(model) -> bool:
    return len({t.device for t in list(model.parameters()) + list(model.buffers())}) > 1


def _check_devices(model) -> None:
    """Refuse weights offloaded to the meta device, or spread over several devices with nothing to move
    activations between them, naming the fix. A model dispatched by accelerate (``device_map``) is
    captured through its hooks, whose transfers torch.export records; the engine then places every
    program on its blocks' devices (``passes.place_devices``)."""
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    name = type(model).__name__
    if any(d.type == "meta" for d in devices):
        raise CaptureError(
            f"{name} has weights on the meta device (offloaded by a device_map with 'cpu' or 'disk' entries, or not "
            "loaded yet): fxlens needs every weight in memory. Load it with device_map={'': 'cuda:0'} (or 'cpu'), "
            "or without a device_map and move it with .to(device)"
        )
    if len(devices) > 1 and not any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise CaptureError(
            f"{name}'s weights live on several devices ({', '.join(sorted(map(str, devices)))}) but no accelerate hooks "
            "move activations between them, so the model itself cannot run. Load it with device_map='auto' (or a "
            "dict of module paths to devices), which dispatches it with those hooks, or move it with .to(device)"
        )


@dataclass
class CapturedGraph:
    """A captured model: the graph module and what its inputs and outputs mean."""

    module: fx.GraphModule
    inputs: tuple[str, ...]  # placeholder names, in order
    outputs: tuple[str, ...]  # ModelOutput field names, in order
    batch_symbol: object = None  # the sympy symbol of the batch dimension
    seq_symbol: object = None  # the sympy symbol of the sequence dimension
    attn_implementation: str = "sdpa"
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_causal: bool = False  # no position reads a later token (probed on the graph: ``causality``)
    min_seq: int = 1  # the shortest input the graph takes
    max_seq: int | None = None  # the longest (the model's positions, or the bound torch.export needed)
    static_seq: int | None = None  # the one length the graph takes, when the model fixes it (else None)
    static_reason: str | None = None  # why a dynamic length could not be captured (set on such captures)

    @property
    def logits(self) -> str | None:
        """The output field that holds logits: "logits", else the first ending in "logits"
        (BertForPreTraining's "prediction_logits"); None for a model without a head."""
        if "logits" in self.outputs:
            return "logits"
        return next((name for name in self.outputs if name.endswith("logits")), None)

    @property
    def logits_meta(self) -> torch.Tensor | None:
        """The logits output's fake tensor (its dtype: some models cast logits to float32; its rank: a
        sequence-classification head gives [batch, labels]), or None."""
        out = next(n for n in self.module.graph.nodes if n.op == "output").args[0]["outputs"]
        node = out.get(self.logits) if self.logits is not None else None
        meta = tensor_meta(node) if node is not None else None
        return meta if isinstance(meta, torch.Tensor) else None

    @property
    def logits_dtype(self) -> torch.dtype:
        meta = self.logits_meta
        return meta.dtype if meta is not None else self.dtype


@contextlib.contextmanager
def _borrowed(model: torch.nn.Module, attn_implementation: str | None):
    """Put the model in eval mode, ``use_cache=False`` on its configs (some families read only the
    config's flag) and an attention implementation, and restore all of it exactly."""
    modes = {m: m.training for m in model.modules()}
    config = getattr(model, "config", None)
    saved_attn = getattr(config, "_attn_implementation", None) if config is not None else None
    # Every config the model's modules hold (the top one and sub-configs such as text_config):
    # whether each had its own use_cache attribute, and its value.
    configs = {id(c): c for c in [config, *(getattr(m, "config", None) for m in model.modules())] if c is not None}
    saved_cache = {key: _flag(c) for key, c in configs.items() if hasattr(c, "use_cache")}
    try:
        model.eval()
        for key, (name, _) in saved_cache.items():
            with contextlib.suppress(AttributeError, TypeError):  # a read-only flag stays as it is
                setattr(configs[key], name, False)
        if attn_implementation is not None and config is not None and saved_attn != attn_implementation:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(attn_implementation)
            else:
                config._attn_implementation = attn_implementation
        yield
    finally:
        for m, was_training in modes.items():
            m.training = was_training
        for key, (name, value) in saved_cache.items():
            if value is _MISSING:
                configs[key].__dict__.pop(name, None)
            else:
                configs[key].__dict__[name] = value
        if config is not None and getattr(config, "_attn_implementation", None) != saved_attn:
            if hasattr(model, "set_attn_implementation") and saved_attn is not None:
                model.set_attn_implementation(saved_attn)
            else:
                config._attn_implementation = saved_attn


_MISSING = object()


def _flag(config) -> tuple[str, object]:
    """The attribute that holds ``config.use_cache`` (through the config's attribute_map) and its own
    value there (``_MISSING`` when it comes from the class), so that it can be put back exactly."""
    name = (getattr(config, "attribute_map", None) or {}).get("use_cache", "use_cache")
    return name, config.__dict__.get(name, _MISSING)


EXAMPLE_LENGTH = 5
MAX_RETRIES = 4  # narrower sequence ranges tried after a "Constraints violated (seq)" error


def _max_positions(model) -> int | None:
    return max_positions(getattr(model, "config", None))


def _example_inputs(model, accepts: set[str], length: int = EXAMPLE_LENGTH, bounds: tuple[int, int] | None = None,
                    refine: bool = False):
    """Example kwargs, their dynamic shapes (sequence range ``bounds``; None: the length is static;
    ``refine``: a range torch may narrow, ``bounds.REFINE``) and the fixed flags."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or 2
    # Batch 2 and length 5: neither is 0 or 1 (torch.export specialises those) and they differ.
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = {"input_ids": ids}
    batch = torch.export.Dim("batch", min=1)
    axes = {0: batch}
    if bounds is not None:
        axes[1] = (torch.export.Dim.DYNAMIC(min=bounds[0], max=bounds[1]) if refine
                   else torch.export.Dim("seq", min=bounds[0], max=bounds[1]))
    dynamic = {"input_ids": axes}
    if "attention_mask" in accepts:
        kwargs["attention_mask"] = torch.ones_like(ids)
        dynamic["attention_mask"] = dict(axes)
    extra = {}
    if "use_cache" in accepts:
        extra["use_cache"] = False
    if "return_dict" in accepts:
        extra["return_dict"] = True
    return kwargs, dynamic, extra


def _accepted_kwargs(model) -> set[str]:
    params = inspect.signature(model.forward).parameters
    return {name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _export(model, kwargs, dynamic, extra):
    # Export with the fixed flags bound by a wrapper so that dynamic_shapes names only tensors.
    class _Bound(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            kw = dict(extra)
            if attention_mask is not None:
                kw["attention_mask"] = attention_mask
            return self.inner(input_ids=input_ids, **kw)

    bound = _Bound(model)
    args = (kwargs["input_ids"],) + ((kwargs["attention_mask"],) if "attention_mask" in kwargs else ())
    shapes = (dynamic["input_ids"],) + ((dynamic["attention_mask"],) if "attention_mask" in dynamic else ())
    return torch.export.export(bound, args, dynamic_shapes=shapes, strict=False)


def _explain(model, err: Exception, seq_bounds: tuple[int, int] | None = None) -> CaptureError:
    return CaptureError(explain(model, err, seq_bounds=seq_bounds, own_error=_own_error(model)))


def _own_error(model) -> Exception | None:
    """What the model's own forward raises on the example input (None when it runs): an export error
    is then the model's or its config's, not the capture's."""
    accepts = _accepted_kwargs(model)
    if "decoder_input_ids" in accepts:  # an encoder-decoder: a call with input_ids alone proves nothing
        return None
    kwargs, _, extra = _example_inputs(model, accepts, EXAMPLE_LENGTH, None)
    try:
        with torch.no_grad():
            model(**kwargs, **extra)
    except Exception as err:  # noqa: BLE001 - reported, not raised
        return err
    return None


def _export_with_bounds(model, accepts: set[str], seq_len: int | None):
    """(exported program, extra flags, (min_seq, max_seq) or None for a static length, why static).

    ``seq_len=None``: a dynamic sequence dimension over the model's positions, narrowed as torch's
    errors ask (``bounds``); when the model fixes the length, None is returned for the program and the
    reason, so that the caller captures per length. ``seq_len=L``: the length is static at L.
    """
    if seq_len is not None:
        kwargs, dynamic, extra = _example_inputs(model, accepts, seq_len, None)
        try:
            return _export(model, kwargs, dynamic, extra), extra, None, None
        except Exception as err:  # noqa: BLE001 - re-raised with an explanation
            raise _explain(model, err) from err
    max_pos = _max_positions(model)
    lo, hi = 1, max(max_pos or 4096, EXAMPLE_LENGTH + 1)
    refine, tried, last = False, [], None
    for _ in range(MAX_RETRIES + 1):
        kwargs, dynamic, extra = _example_inputs(model, accepts, EXAMPLE_LENGTH, (lo, hi), refine)
        try:
            ep = _export(model, kwargs, dynamic, extra)
        except Exception as err:  # noqa: BLE001 - narrowed and retried, or re-raised with an explanation
            tried.append(REFINE if refine else (lo, hi))
            step = next_bounds(str(err), lo, hi, tried)
            if step == STATIC:
                return None, extra, None, _static_reason(str(err))
            if step is None or (step != REFINE and not step[0] <= EXAMPLE_LENGTH <= step[1]):
                raise _explain(model, err, (lo, hi)) from err
            if step == REFINE:
                refine = True
            else:
                lo, hi = step
            last = err
            continue
        return ep, extra, _seq_range(ep, lo, hi), None
    raise _explain(model, last, (lo, hi)) from last


def _seq_range(ep, lo: int, hi: int) -> tuple[int, int]:
    """The sequence lengths the exported program takes: its range constraint on the sequence symbol."""
    ids = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name.endswith("input_ids"))
    size = ids.meta["val"].shape[1]
    expr = size.node.expr if isinstance(size, torch.SymInt) else None
    vr = ep.range_constraints.get(expr) if expr is not None else None
    if vr is None:
        return lo, hi
    lower = int(vr.lower) if vr.lower.is_finite else lo
    upper = int(vr.upper) if vr.upper.is_finite else hi
    return max(lo, lower), min(hi, upper)


def _static_reason(text: str) -> str:
    """torch's line saying that the code fixed the sequence length, with the model code it names."""
    line = next((ln.strip(" -") for ln in text.splitlines() if "specialized" in ln), "")
    line = line.split(". If you")[0]  # torch's advice on mark_dynamic is not the user's to follow
    return f"its code fixes the sequence length (torch.export: {line})" if line else "its code fixes the sequence length"


def _strip_inner(name: str) -> str:
    # The wrapper adds one level ("inner.") to every module path and attribute; drop it.
    return name[len("inner.") :] if name.startswith("inner.") else ("" if name == "inner" else name)


def _fix_module_stack(meta: dict) -> None:
    stack = meta.get("nn_module_stack")
    if not stack:
        return
    fixed = {}
    for key, (path, cls) in stack.items():
        if path in ("", None) and "_Bound" in str(cls):
            continue
        fixed[key] = (_strip_inner(path), cls)
    meta["nn_module_stack"] = fixed


def _rebuild(gm: fx.GraphModule, output_names: list[str]) -> tuple[fx.Graph, list[str]]:
    """Copy ``gm``'s graph without guards and asserts, with HOP no-grad regions inlined."""
    new = fx.Graph()
    env: dict[fx.Node, object] = {}
    inputs = []

    def copy(node: fx.Node, mapping) -> fx.Node:
        out = new.node_copy(node, lambda n: mapping[n])
        _fix_module_stack(out.meta)
        return out

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if not node.users and node.name not in ("input_ids", "attention_mask"):
                continue
            env[node] = copy(node, env)
            inputs.append(env[node].name)
        elif node.op == "call_module" and node.target == "_guards_fn":
            continue
        elif node.op == "call_function" and is_assert(node):
            continue
        elif node.op == "call_function" and "wrap_with_set_grad_enabled" in str(node.target):
            sub = getattr(gm, node.args[1].target)
            sub_env: dict[fx.Node, object] = {}
            sub_args = iter(node.args[2:])
            result = None
            for inner in sub.graph.nodes:
                if inner.op == "placeholder":
                    sub_env[inner] = env[next(sub_args)]
                elif inner.op == "output":
                    result = fx.node.map_arg(inner.args[0], lambda n: sub_env[n])
                elif inner.op == "call_function" and is_assert(inner):
                    continue
                else:
                    sub_env[inner] = copy(inner, sub_env)
                    if not sub_env[inner].meta.get("nn_module_stack"):
                        sub_env[inner].meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
                        _fix_module_stack(sub_env[inner].meta)
            env[node] = result
        elif node.op == "get_attr" and isinstance(env.get(node.args[0]) if node.args else None, tuple):
            env[node] = copy(node, env)
        elif node.op == "call_function" and node.target is __import__("operator").getitem and isinstance(
            env.get(node.args[0]), (tuple, list)
        ):
            env[node] = env[node.args[0]][node.args[1]]
        elif node.op == "output":
            flat = node.args[0]
            flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
            outputs = {}
            for name, value in zip(output_names, flat):
                if isinstance(value, fx.Node) and isinstance(tensor_meta(value), torch.Tensor):
                    outputs[name] = env[value]
            new.output({"outputs": outputs})
        else:
            env[node] = copy(node, env)
    return new, inputs


def _output_names(ep) -> list[str]:
    spec = ep.call_spec.out_spec
    if spec is None:
        return ["output"]
    context = getattr(spec, "context", None)
    if isinstance(context, (list, tuple)) and all(isinstance(c, str) for c in context):
        return list(context)
    return [f"output_{i}" for i in range(spec.num_leaves)]


def capture(model: torch.nn.Module, *, attn_implementation: str | None = None, seq_len: int | None = None) -> CapturedGraph:
    """Export ``model`` and return its rebuilt graph (see the module docstring).

    ``seq_len``: None captures every sequence length at once (a dynamic dimension); an int captures that
    length only (what ``fxlens.graphs.lengths`` does for models that fix the length). A model that
    fixes the length is captured at ``EXAMPLE_LENGTH`` with ``static_reason`` set.
    """
    accepts = _accepted_kwargs(model)
    if "input_ids" not in accepts:
        raise CaptureError(
            f"{type(model).__name__}.forward takes no input_ids; fxlens captures token-in models. "
            "Wrap the model so that its forward takes input_ids (and attention_mask)."
        )
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"seq_len must be a positive length; got {seq_len}")
    _check_devices(model)
    with _borrowed(model, attn_implementation):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
        ep, extra, bounds, why = _export_with_bounds(model, accepts, seq_len)
        if ep is None:  # the model's code fixes the sequence length: capture at the example length
            seq_len = EXAMPLE_LENGTH
            ep, extra, _, _ = _export_with_bounds(model, accepts, seq_len)
        gm = ep.module()
        names = _output_names(ep)
        graph, inputs = _rebuild(gm, names)
        functionalize(graph)
        several = _several_devices(model)
        if several:  # accelerate's moves: placement puts them back where each program needs them
            strip_transfers(graph)
        # Whatever mutation functionalize left in place still runs: only unread pure nodes are dead.
        graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or is_mutation(n))
        graph.set_codegen(CodeGen())
        module = fx.GraphModule(gm, graph, class_name=f"Captured{type(model).__name__}")
        _rename_attrs(module)
        ids_val = next(n for n in module.graph.nodes if n.op == "placeholder" and n.name == "input_ids").meta["val"]
        batch_sym, seq_sym = (s.node.expr if isinstance(s, torch.SymInt) else s for s in ids_val.shape)
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        config = getattr(model, "config", None)
        vocab = input_vocab(module.graph) or getattr(config, "vocab_size", None)
        max_pos = _max_positions(model)
        if bounds is not None:
            max_pos = bounds[1] if max_pos is None else min(max_pos, bounds[1])
        found = module_devices(module) if several else None
        placed = place(module, *found) if found is not None else module  # the probe runs on the model's devices
        seen = probe(placed, seq_sym, vocab, max_len=max_pos, device=device, length=seq_len,
                     min_len=bounds[0] if bounds else 1)
        _self_check(model, seen, inputs, extra, names)
    return CapturedGraph(
        module=module,
        inputs=tuple(inputs),
        outputs=tuple(graph.output_node().args[0]["outputs"].keys()),
        batch_symbol=batch_sym,
        seq_symbol=seq_sym,
        attn_implementation=impl,
        dtype=param.dtype if param is not None else torch.float32,
        device=device,
        is_causal=seen.causal,
        min_seq=bounds[0] if bounds else 1,
        max_seq=max_pos,
        static_seq=seq_len,
        static_reason=why,
    )


def _self_check(model, seen: Probe, inputs: list[str], extra: dict, names: list[str]) -> None:
    """Refuse a graph that does not compute what the model computes on the probe input (``selfcheck``)."""
    feed = {"input_ids": seen.ids}
    if "attention_mask" in inputs:
        feed["attention_mask"] = torch.ones_like(seen.ids)
    with torch.no_grad():
        reference = model(**feed, **extra)
    if not isinstance(reference, Mapping):  # a model that returns a tuple: fields in the export's order
        reference = dict(zip(names, pytree.tree_leaves(reference)))
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    mismatch = compare(seen.outputs["outputs"], reference, dtype, length=seen.ids.shape[1])
    if mismatch is not None:
        raise CaptureError(mismatch.describe(type(model).__name__))


def _rename_attrs(module: fx.GraphModule) -> None:
    """Drop the wrapper's ``inner.`` prefix from get_attr targets so they read as HF paths."""
    for node in module.graph.nodes:
        if node.op == "get_attr" and node.target.startswith("inner."):
            target = _strip_inner(node.target)
            value = module.get_submodule("inner")
            for part in target.split("."):
                value = getattr(value, part)
            _set_attr(module, target, value)
            node.target = target
    if hasattr(module, "inner"):
        del module.inner
    module.recompile()


def _set_attr(module: torch.nn.Module, target: str, value) -> None:
    *path, last = target.split(".")
    owner = module
    for part in path:
        if not hasattr(owner, part) or not isinstance(getattr(owner, part), torch.nn.Module):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(last, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(last, value, persistent=False)
    else:
        setattr(owner, last, value)
