"""The intervention protocol, and its standard vocabulary: Patch, Ablate, Steer, Scale, Apply.

Problem: say *where* (a site and an index: positions, heads, neurons, batch rows) separately from
*what* (replace from a source, zero/mean/resample, add a vector, scale, any function), check it all
before any compute, and run everything as one program whose tensors are graph inputs. Researchers also
write interventions of their own (a learned rotation, a projection out of a subspace), and those must
be as fast and as checked as the built-in ones.

Mechanism: an ``Intervention`` is a where (``site`` and index fields) plus ``lower(site, shape, ctx)``,
which returns a ``Lowered``: a function ``fn(value, *inputs) -> new value`` and the ``inputs`` it
reads (tensors, or objects). ``prepare`` resolves each spec's site, builds a boolean mask over the
site's axes from its index, lowers it, and hands ``(site, fn, inputs, mask)`` to the plan builder,
which makes every input a graph input; the Intervene pass applies ``where(mask, fn(value, *inputs),
value)``. A subclass of ``Intervention`` with its own ``lower`` is a new intervention; its inputs may
be parameters that require grad, and gradients flow to them through the program.

Example::

    model.run_with_interventions(tokens, [
        fxlens.Patch("blocks.4.hook_resid_pre", source=clean_cache, pos=3),
        fxlens.Ablate("blocks.2.attn.hook_z", head=[1, 5]),                  # zero
        fxlens.Steer("blocks.6.hook_resid_post", vec, scale=4.0, pos=-1),
    ])

    @dataclass
    class Project(fxlens.Intervention):        # remove a direction, as one graph node
        direction: torch.Tensor = None
        def lower(self, site, shape, ctx):
            d = self.direction / self.direction.norm()
            return fxlens.Lowered(lambda x, d: x - (x @ d)[..., None] * d, (d.to(ctx.dtype),))

Gotchas: indices are ints, sequences of ints, slices or integer tensors; a float or a bool index is
refused rather than rounded. ``Ablate(how="mean")`` with no reference averages the batch itself,
counting only real (unpadded) tokens at each position; on a batch of one row it would change nothing
and is refused.
"""

from __future__ import annotations

import numbers
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Callable

import torch

from ..graphs.sites import Site
from ..passes.intervene import add_to, batch_mean, call_fn, scale_by, set_to, take_rows
from .ablation import ABLATIONS, AblationError, masked_mean, replacement

__all__ = ["Intervention", "Lowered", "Patch", "Ablate", "Steer", "Scale", "Apply", "InterventionError", "prepare"]

_FEATURE_AXES = ("d_model", "d_mlp", "d_head", "one")


class InterventionError(ValueError):
    pass


@dataclass(frozen=True)
class Lowered:
    """What an intervention does: ``fn(value, *inputs)`` replaces the selected part of the site."""

    fn: Callable
    inputs: tuple = ()


@dataclass
class LowerContext:
    """What ``Intervention.lower`` may need about the run it joins."""

    model: Any
    batch: int
    seq: int
    attention_mask: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.captured.dtype

    @property
    def device(self) -> torch.device:
        return self.model.captured.device

    def value_from(self, source, site: Site, spec) -> torch.Tensor:
        """``source`` as a tensor for ``site``: itself, or its value in an ActivationCache."""
        if isinstance(source, torch.Tensor):
            return source
        if hasattr(source, "keys"):
            if site.name in source:
                return source[site.name]
            table = self.model.site_table
            for key in source.keys():
                other = table._sites.get(key)
                if other is not None and other.node == site.node and other.layout == site.layout:
                    return source[key]
            raise InterventionError(f"{_spec_text(spec)}: the source cache holds no value for {site.name}; cache it in that run")
        raise InterventionError(f"{_spec_text(spec)}: expected a tensor or an ActivationCache; got {type(source).__name__}")


def _spec_text(spec) -> str:
    fields = [f"{getattr(spec, 'site', '?')!r}"]
    for key in ("pos", "head", "expert", "neuron", "batch", "query_pos", "key_pos"):
        value = getattr(spec, key, None)
        if value is not None:
            fields.append(f"{key}={value!r}")
    return f"{type(spec).__name__}({', '.join(fields)})"


@dataclass
class Intervention:
    """Where an intervention applies; subclasses say what it does in ``lower``."""

    site: Any
    _: KW_ONLY
    pos: Any = None
    head: Any = None
    neuron: Any = None
    batch: Any = None
    query_pos: Any = None
    key_pos: Any = None
    expert: Any = None  # a mixture-of-experts site's expert axis (hook_expert_out, hook_router_logits, ...)
    mask: Any = None  # an explicit boolean mask broadcastable to the site (and-ed with the indices)

    def lower(self, site: Site, shape: tuple, ctx: LowerContext) -> Lowered:
        raise NotImplementedError(f"{type(self).__name__} must define lower(site, shape, ctx) -> Lowered")


@dataclass
class Patch(Intervention):
    """Replace a site's value (or a slice of it) with ``source``.

    ``source``: a tensor in the site's layout (full shape or broadcastable), an ``ActivationCache`` from
    another run (its value at this site), or None with ``from_rows``: row i takes row ``from_rows[i]``
    of the same batch.
    """

    source: Any = None
    from_rows: Any = None

    def lower(self, site, shape, ctx):
        if self.from_rows is not None:
            rows = torch.as_tensor(self.from_rows).flatten()
            if rows.numel() != ctx.batch:
                raise InterventionError(f"{_spec_text(self)}: from_rows needs one source row per batch row ({ctx.batch}); got {rows.numel()}")
            return Lowered(take_rows, (_indices(rows, ctx.batch, "batch row", self, "from_rows"),))
        if self.source is None:
            raise InterventionError(f"{_spec_text(self)}: give a source (tensor or ActivationCache) or from_rows")
        source = ctx.value_from(self.source, site, self).to(ctx.dtype)
        return Lowered(set_to, (_broadcastable(source, shape, self, "the source"),))


@dataclass
class Ablate(Intervention):
    """``how="zero"``, ``"mean"`` (over ``reference``, or over the batch's real tokens), ``"resample"``
    (a random other row of the batch, or a row of ``reference``; ``seed`` fixes the draw) or
    ``"corrupted"`` (``reference``'s value in the same row). The vocabulary is ``circuits``' too."""

    how: str = "zero"
    reference: Any = None
    reference_attention_mask: Any = None
    seed: int = 0

    def lower(self, site, shape, ctx):
        what = _spec_text(self)
        if not isinstance(self.how, str) or self.how not in ABLATIONS:
            raise InterventionError(f"{what}: how must be one of {', '.join(map(repr, ABLATIONS))}; got {self.how!r}")
        pos_axis = _pos_axis(site)
        if self.reference is None:
            if self.how == "zero":
                return Lowered(set_to, (torch.zeros((), dtype=ctx.dtype),))
            if self.how == "corrupted":
                raise InterventionError(f"{what}: how='corrupted' takes the values of another run: give reference= (its cache)")
            if ctx.batch < 2:
                raise InterventionError(
                    f"{what}: how={self.how!r} without a reference uses the other rows of the batch, and this batch has one "
                    "row, so nothing would change; give reference= (a cache or tensor of other inputs' activations)"
                )
            if self.how == "resample":
                return Lowered(take_rows, (_derangement(ctx.batch, self.seed),))
            if ctx.attention_mask is not None and pos_axis is not None and not bool(ctx.attention_mask.all()):
                return Lowered(_real_token_mean, (ctx.attention_mask.to(ctx.device), pos_axis))
            return Lowered(batch_mean)
        ref = ctx.value_from(self.reference, site, self).to(ctx.dtype)
        ref_mask = self.reference_attention_mask
        if ref_mask is not None:
            ref_mask = torch.as_tensor(ref_mask).to(ref.device)
        try:
            value = replacement(self.how, ref, batch=ctx.batch, seed=self.seed, reference_mask=ref_mask, pos_axis=pos_axis, what=what)
        except AblationError as err:
            raise InterventionError(str(err)) from None
        return Lowered(set_to, (_broadcastable(value, shape, self, "the ablation value"),))


def _real_token_mean(x: torch.Tensor, mask: torch.Tensor, pos_axis: int) -> torch.Tensor:
    return masked_mean(x, mask, pos_axis)


@dataclass
class Steer(Intervention):
    """Add ``scale * vector`` (broadcast to the site, e.g. a [d_model] direction) where selected."""

    vector: Any = None
    scale: float = 1.0

    def lower(self, site, shape, ctx):
        if self.vector is None:
            raise InterventionError(f"{_spec_text(self)}: give the vector to add")
        vec = torch.as_tensor(self.vector).to(ctx.dtype) * self.scale
        return Lowered(add_to, (_broadcastable(vec, shape, self, "the steering vector"),))


@dataclass
class Scale(Intervention):
    """Multiply the selected part of the site by ``factor``."""

    factor: Any = 1.0

    def lower(self, site, shape, ctx):
        factor = torch.as_tensor(self.factor).to(ctx.dtype)
        return Lowered(scale_by, (_broadcastable(factor, shape, self, "the factor"),))


@dataclass
class Apply(Intervention):
    """Replace the selected part of the site with ``fn(value)`` (value in the site's layout)."""

    fn: Callable | None = None

    def lower(self, site, shape, ctx):
        if not callable(self.fn):
            raise InterventionError(f"{_spec_text(self)}: fn must be callable")
        return Lowered(call_fn, (self.fn,))


# ---- where ---------------------------------------------------------------------------------------
def _indices(value, size: int, what: str, spec, key: str) -> torch.Tensor:
    """Integer indices in 0..size-1 from an int, a sequence of ints, a slice or an integer tensor."""
    if isinstance(value, slice):
        return torch.arange(size)[value]
    items = value.flatten().tolist() if isinstance(value, torch.Tensor) else value
    items = items if isinstance(items, (list, tuple, range)) else [items]
    flat = []
    for item in items:
        if isinstance(item, (list, tuple)):
            flat.extend(item)
        else:
            flat.append(item)
    for item in flat:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise InterventionError(
                f"{_spec_text(spec)}: {key}={value!r} is not an index; {key} takes an int, a list of ints, a slice or an "
                f"integer tensor (a {type(item).__name__} such as {item!r} is neither rounded nor read as a mask; use "
                "mask= for a boolean mask)"
            )
    idx = torch.tensor([int(i) for i in flat], dtype=torch.long)
    bad = idx[(idx >= size) | (idx < -size)]
    if bad.numel():
        raise InterventionError(f"{_spec_text(spec)}: {what} {int(bad[0])} is out of range; valid {what}s are 0..{size - 1} (or -{size}..-1)")
    return idx % size


def _pos_axis(site: Site) -> int | None:
    for name in ("pos", "query_pos"):
        if name in site.axes:
            return site.axes.index(name)
    return None


def _axis_for(spec, key: str, site: Site) -> int:
    axes = site.axes
    if key == "pos":
        axis = _pos_axis(site)
        if axis is not None:
            return axis
    elif key == "neuron":
        if axes and (axes[-1] in _FEATURE_AXES or axes[-1].startswith("dim")):
            return len(axes) - 1
    elif key in axes:
        return axes.index(key)
    raise InterventionError(
        f"{_spec_text(spec)}: site {site.name} has no {key} axis (its axes are {', '.join(axes)}); "
        f"drop {key}= or choose a site that has one"
    )


def mask_for(spec, site: Site, shape: tuple) -> torch.Tensor | None:
    """A boolean mask broadcastable to ``shape`` selecting the spec's index, or None (everything)."""
    mask = None
    for key in ("batch", "pos", "query_pos", "key_pos", "head", "expert", "neuron"):
        value = getattr(spec, key, None)
        if value is None:
            continue
        axis = _axis_for(spec, key, site)
        what = {"batch": "batch row", "neuron": "neuron", "head": "head", "expert": "expert"}.get(key, "position")
        idx = _indices(value, shape[axis], what, spec, key)
        m = torch.zeros(shape[axis], dtype=torch.bool)
        m[idx] = True
        view = [1] * len(shape)
        view[axis] = shape[axis]
        m = m.view(view)
        mask = m if mask is None else mask & m
    explicit = getattr(spec, "mask", None)
    if explicit is not None:
        explicit = torch.as_tensor(explicit)
        if explicit.dtype != torch.bool:
            raise InterventionError(f"{_spec_text(spec)}: mask must be a boolean tensor; got {explicit.dtype}")
        _broadcastable(explicit, shape, spec, "the mask")
        mask = explicit if mask is None else mask & explicit
    return mask


def _broadcastable(t: torch.Tensor, shape: tuple, spec, what: str) -> torch.Tensor:
    try:
        torch.broadcast_shapes(tuple(t.shape), shape)
        if len(t.shape) > len(shape):
            raise RuntimeError
    except RuntimeError:
        raise InterventionError(
            f"{_spec_text(spec)}: {what} has shape {tuple(t.shape)}, but the site {spec.site!r} has shape {shape} "
            "here; pass a tensor of the site's shape or one that broadcasts to it"
        ) from None
    return t


def _derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of 0..n-1 with no fixed point (n >= 2)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    for i in range(n):
        if perm[i] == i:
            j = (i + 1) % n
            perm[i], perm[j] = perm[j].clone(), perm[i].clone()
    return perm


@dataclass
class Prepared:
    """Interventions checked and lowered: per intervention (site, fn, inputs, mask)."""

    items: list = field(default_factory=list)

    @property
    def sites(self) -> list:
        return [site for site, *_ in self.items]

    def add_to(self, builder) -> None:
        for site, fn, inputs, mask in self.items:
            builder.edit(site, fn, inputs, mask)


def prepare(specs, model, batch: int, seq: int, attention_mask=None) -> Prepared:
    """Check every spec against the site shapes for this input and lower it."""
    out = Prepared()
    table = model.site_table
    ctx = LowerContext(model, batch, seq, attention_mask)
    device = model.captured.device
    placement = model._active.placement  # a model spread over devices (None on one device)
    for spec in specs:
        if not isinstance(spec, Intervention):
            raise InterventionError(
                f"interventions are fxlens.Patch, Ablate, Steer, Scale, Apply or a subclass of fxlens.Intervention; "
                f"got {type(spec).__name__}"
            )
        site = table[spec.site]
        shape = model.graph.shape(site, batch, seq)
        mask = mask_for(spec, site, shape)
        lowered = spec.lower(site, shape, ctx)
        if not isinstance(lowered, Lowered) or not callable(lowered.fn):
            raise InterventionError(f"{type(spec).__name__}.lower must return fxlens.Lowered(fn, inputs); got {lowered!r}")
        at = (_site_device(placement, model, site) if placement is not None else None) or device  # the node's device
        inputs = tuple(v.to(at) if isinstance(v, torch.Tensor) else v for v in lowered.inputs)
        out.items.append((site, lowered.fn, inputs, None if mask is None else mask.to(at)))
    return out


def _site_device(placement, model, site) -> torch.device | None:
    """The device of the site's node in a model spread over devices (None outside placed modules)."""
    node = model.graph.dg.nodes.get(site.node)  # a materialised site (a pattern beside SDPA) is placed in the graph
    return placement.device_of(node) if node is not None else None
