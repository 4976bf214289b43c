"""ActivationCache: cached activations indexed as in TransformerLens.

Problem: users of TransformerLens write ``cache["pattern", 3]``, ``cache["blocks.3.attn.hook_z"]`` and
``cache.stack_activation("resid_post")``; fxlens also accepts raw HF module paths
(``cache["model.layers.3.mlp"]``). Unknown names must say what exists.

Example::

    logits, cache = model.run_with_cache("The Eiffel Tower is in")
    cache["resid_post", 3].shape          # [batch, pos, d_model]
    cache.accumulated_resid().shape       # [n_layers + 1, batch, pos, d_model]

The analysis helpers (``decompose_resid``, ``apply_ln_to_stack``, ``logit_attrs``, ``stack_head_results``,
``get_full_resid_decomposition``, ...) live in ``cache_analysis.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..graphs.sites import SiteError, SiteTable
from .cache_analysis import CacheAnalysis
from .slices import Slice

__all__ = ["ActivationCache"]


class ActivationCache(CacheAnalysis):
    def __init__(self, values: dict, sites: SiteTable, model=None, has_batch_dim: bool = True):
        self._values = dict(values)
        self._sites = sites
        self.model = model
        self.has_batch_dim = has_batch_dim

    @property
    def cache_dict(self) -> dict:
        """The cached tensors by site name (the dict itself, as TransformerLens' ``cache.cache_dict``)."""
        return self._values

    # ---- mapping ------------------------------------------------------------------------------
    def _key(self, key) -> str:
        if isinstance(key, tuple):
            return self._sites.get_act_name(*key)
        if key in self._values or key in self._sites:
            return key
        return self._sites.get_act_name(key)

    def __getitem__(self, key) -> torch.Tensor:
        name = self._key(key)
        if name in self._values:
            return self._values[name]
        if name in self._sites:
            raise SiteError(f"{name!r} is a valid site but was not cached; include it in names_filter")
        raise SiteError(self._sites.unknown(name))

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self._values
        except SiteError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self):
        return self._values.keys()

    def values(self):
        return self._values.values()

    def items(self):
        return self._values.items()

    def __repr__(self) -> str:
        return f"ActivationCache with {len(self)} sites: {', '.join(list(self._values)[:6])}{', ...' if len(self) > 6 else ''}"

    # ---- TransformerLens conveniences ---------------------------------------------------------
    def to(self, device) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self._values.items()}, self._sites, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> "ActivationCache":
        if not self.has_batch_dim:
            return self
        out = {}
        for k, v in self._values.items():
            site = self._sites._sites.get(k)
            batch_axis = site.axis("batch") if site is not None else 0
            if batch_axis is None:
                out[k] = v  # no batch axis (rotary tables, [1, pos, d] positional embeddings)
                continue
            if v.shape[batch_axis] != 1:
                raise ValueError(f"cannot remove the batch dim of {k}: its batch size is {v.shape[batch_axis]}, not 1")
            out[k] = v.squeeze(batch_axis)
        return ActivationCache(out, self._sites, self.model, has_batch_dim=False)

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        """A cache of the batch rows ``batch_slice`` selects (TransformerLens' Slice forms: an int drops the
        batch dim, as ``remove_batch_dim`` does)."""
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch dim to slice (remove_batch_dim was applied)")
        rows = Slice(batch_slice)
        out = {}
        for k, v in self._values.items():
            site = self._sites._sites.get(k)
            axis = site.axis("batch") if site is not None else 0
            out[k] = v if axis is None else rows.apply(v, dim=axis)
        return ActivationCache(out, self._sites, self.model, has_batch_dim=rows.mode != "int")

    def _upto(self, layer: int | None, what: str) -> int:
        """TransformerLens' ``layer=`` argument of the stacking helpers as a count of layers: None and -1
        mean every layer (``n_layers``), another negative value counts from the end (-2: ``n_layers - 1``)."""
        n = self._sites.n_layers
        if layer is None:
            return n
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"{what}: layer must be an int or None; got {layer!r}")
        upto = n + 1 + layer if layer < 0 else layer
        if not 0 <= upto <= n:
            raise ValueError(f"{what}: layer={layer} is out of range; use 0..{n} (or -{n + 1}..-1, None: every layer)")
        return upto

    def stack_activation(self, name: str, layer: int | None = -1) -> torch.Tensor:
        """Stack ``name`` over the layers before ``layer`` (every layer for None or -1): [layers, ...]."""
        n = self._upto(layer, "stack_activation")
        if n == 0:
            raise ValueError("stack_activation: layer=0 selects no layer; use layer=1 or more (None: every layer)")
        return torch.stack([self[name, i] for i in range(n)])
