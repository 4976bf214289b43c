"""The intervention vocabulary: Patch, Ablate, Steer, Scale, Apply.

Problem: say *where* (a site and an index: positions, heads, neurons, batch rows) separately from
*what* (replace from a source, zero/mean/resample, add a vector, scale, any function), check it all
before any compute, and turn it into one graph pass whose tensors are graph inputs.

Mechanism: each spec resolves its site, builds a boolean mask over the site's axes from its index,
prepares the value tensor, and becomes an ``Edit`` of the Intervene pass. ``compile`` turns a list of
specs into (plan pieces, feed dict); the engine adds the rewrites the sites need and runs one program.

Example::

    model.run_with_interventions(tokens, [
        fxlens.Patch("blocks.4.hook_resid_pre", source=clean_cache, pos=3),
        fxlens.Ablate("blocks.2.attn.hook_z", head=[1, 5]),                  # zero
        fxlens.Steer("blocks.6.hook_resid_post", vec, scale=4.0, pos=-1),
    ])
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Callable

import torch

from ..graphs.sites import Site
from ..passes import Edit

__all__ = ["Patch", "Ablate", "Steer", "Scale", "Apply", "InterventionError", "prepare"]

_FEATURE_AXES = ("d_model", "d_mlp", "d_head", "one")


class InterventionError(ValueError):
    pass


def _spec_text(spec) -> str:
    fields = [f"{spec.site!r}"]
    for key in ("pos", "head", "neuron", "batch", "query_pos", "key_pos"):
        value = getattr(spec, key, None)
        if value is not None:
            fields.append(f"{key}={value!r}")
    return f"{type(spec).__name__}({', '.join(fields)})"


@dataclass
class _Where:
    site: Any
    _: KW_ONLY
    pos: Any = None
    head: Any = None
    neuron: Any = None
    batch: Any = None
    query_pos: Any = None
    key_pos: Any = None
    mask: Any = None  # an explicit boolean mask broadcastable to the site (and-ed with the indices)


@dataclass
class Patch(_Where):
    """Replace a site's value (or a slice of it) with ``source``.

    ``source``: a tensor in the site's layout (full shape or broadcastable), an ``ActivationCache`` from
    another run (its value at this site), or None with ``from_rows``: row i takes row ``from_rows[i]``
    of the same batch.
    """

    source: Any = None
    from_rows: Any = None


@dataclass
class Ablate(_Where):
    """``how="zero"``, ``"mean"`` (over the batch, or over ``reference``) or ``"resample"`` (a random
    other row of the batch, or of ``reference``; ``seed`` fixes the draw)."""

    how: str = "zero"
    reference: Any = None
    seed: int = 0


@dataclass
class Steer(_Where):
    """Add ``scale * vector`` (broadcast to the site, e.g. a [d_model] direction) where selected."""

    vector: Any = None
    scale: float = 1.0


@dataclass
class Scale(_Where):
    """Multiply the selected part of the site by ``factor``."""

    factor: Any = 1.0


@dataclass
class Apply(_Where):
    """Replace the selected part of the site with ``fn(value)`` (value in the site's layout)."""

    fn: Callable | None = None


def _indices(value, size: int, what: str, spec) -> torch.Tensor:
    idx = torch.as_tensor(value if not isinstance(value, slice) else range(size)[value], dtype=torch.long).flatten()
    bad = idx[(idx >= size) | (idx < -size)]
    if bad.numel():
        raise InterventionError(f"{_spec_text(spec)}: {what} {int(bad[0])} is out of range; valid {what}s are 0..{size - 1}")
    return idx % size


def _axis_for(spec, key: str, site: Site) -> int:
    axes = site.axes
    if key == "pos":
        for name in ("pos", "query_pos"):
            if name in axes:
                return axes.index(name)
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
    for key in ("batch", "pos", "query_pos", "key_pos", "head", "neuron"):
        value = getattr(spec, key, None)
        if value is None:
            continue
        axis = _axis_for(spec, key, site)
        what = {"batch": "batch row", "neuron": "neuron", "head": "head"}.get(key, "position")
        idx = _indices(value, shape[axis], what, spec)
        m = torch.zeros(shape[axis], dtype=torch.bool)
        m[idx] = True
        view = [1] * len(shape)
        view[axis] = shape[axis]
        m = m.view(view)
        mask = m if mask is None else mask & m
    explicit = getattr(spec, "mask", None)
    if explicit is not None:
        explicit = torch.as_tensor(explicit, dtype=torch.bool)
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


def _from_cache(cache, site: Site, spec, sites) -> torch.Tensor:
    if hasattr(cache, "keys") and site.name in cache:
        return cache[site.name]
    for key in getattr(cache, "keys", lambda: [])():
        other = sites._sites.get(key)
        if other is not None and other.node == site.node and other.layout == site.layout:
            return cache[key]
    raise InterventionError(f"{_spec_text(spec)}: the source cache holds no value for {site.name}; cache it in that run")


def _derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of 0..n-1 with no fixed point (identity when n == 1)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    for i in range(n if n > 1 else 0):
        if perm[i] == i:
            j = (i + 1) % n
            perm[i], perm[j] = perm[j].clone(), perm[i].clone()
    return perm


@dataclass
class Prepared:
    edits: list = field(default_factory=list)
    feed: dict = field(default_factory=dict)
    sites: list = field(default_factory=list)


def prepare(specs, model, batch: int, seq: int, prefix: str = "fxl_e") -> Prepared:
    """Check every spec against the site shapes for this input and build (edits, feed)."""
    out = Prepared()
    table = model.site_table
    for i, spec in enumerate(specs):
        if not isinstance(spec, _Where):
            raise InterventionError(f"interventions must be Patch, Ablate, Steer, Scale or Apply; got {type(spec).__name__}")
        site = table[spec.site]
        shape = model.graph.shape(site, batch, seq)
        mask = mask_for(spec, site, shape)
        device = model.captured.device
        kind, value = _value(spec, site, shape, model, batch)
        edit = Edit(site.name, site.node, site.layout, kind, masked=mask is not None)
        out.edits.append(edit)
        out.sites.append(site)
        if kind != "batch_mean":
            out.feed[f"{prefix}{i}_value"] = value.to(device) if isinstance(value, torch.Tensor) else value
        if mask is not None:
            out.feed[f"{prefix}{i}_mask"] = mask.to(device)
    return out


def _value(spec, site: Site, shape: tuple, model, batch: int):
    dtype = model.captured.dtype
    if isinstance(spec, Patch):
        if spec.from_rows is not None:
            rows = torch.as_tensor(spec.from_rows, dtype=torch.long).flatten()
            if rows.numel() != batch:
                raise InterventionError(f"{_spec_text(spec)}: from_rows needs one source row per batch row ({batch})")
            return "rows", _indices(rows, batch, "batch row", spec)
        if spec.source is None:
            raise InterventionError(f"{_spec_text(spec)}: give a source (tensor or ActivationCache) or from_rows")
        source = spec.source if isinstance(spec.source, torch.Tensor) else _from_cache(spec.source, site, spec, model.site_table)
        return "replace", _broadcastable(source.to(dtype), shape, spec, "the source")
    if isinstance(spec, Ablate):
        if spec.how == "zero":
            return "replace", torch.zeros((), dtype=dtype)
        if spec.how == "mean":
            if spec.reference is None:
                return "batch_mean", None
            ref = spec.reference if isinstance(spec.reference, torch.Tensor) else _from_cache(spec.reference, site, spec, model.site_table)
            return "replace", _broadcastable(ref.to(dtype).mean(0, keepdim=True), shape, spec, "the reference mean")
        if spec.how == "resample":
            if spec.reference is None:
                if batch < 2:
                    raise InterventionError(
                        f"{_spec_text(spec)}: how='resample' draws from other rows of the batch and needs at least two; give reference= "
                        "(a cache or tensor of other inputs' activations) for a single input"
                    )
                return "rows", _derangement(batch, spec.seed)
            ref = spec.reference if isinstance(spec.reference, torch.Tensor) else _from_cache(spec.reference, site, spec, model.site_table)
            g = torch.Generator().manual_seed(spec.seed)
            picked = ref[torch.randint(0, ref.shape[0], (batch,), generator=g)]
            return "replace", _broadcastable(picked.to(dtype), shape, spec, "the resampled reference")
        raise InterventionError(f"{_spec_text(spec)}: how must be 'zero', 'mean' or 'resample'; got {spec.how!r}")
    if isinstance(spec, Steer):
        if spec.vector is None:
            raise InterventionError(f"{_spec_text(spec)}: give the vector to add")
        vec = torch.as_tensor(spec.vector, dtype=dtype) * spec.scale
        return "add", _broadcastable(vec, shape, spec, "the steering vector")
    if isinstance(spec, Scale):
        return "mul", _broadcastable(torch.as_tensor(spec.factor, dtype=dtype), shape, spec, "the factor")
    if isinstance(spec, Apply):
        if not callable(spec.fn):
            raise InterventionError(f"{_spec_text(spec)}: fn must be callable")
        return "fn", spec.fn
    raise InterventionError(f"unknown intervention {type(spec).__name__}")
