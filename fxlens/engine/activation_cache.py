"""ActivationCache: cached activations indexed as in TransformerLens.

Problem: users of TransformerLens write ``cache["pattern", 3]``, ``cache["blocks.3.attn.hook_z"]`` and
``cache.stack_activation("resid_post")``; fxlens also accepts raw HF module paths
(``cache["model.layers.3.mlp"]``). Unknown names must say what exists.

Example::

    logits, cache = model.run_with_cache("The Eiffel Tower is in")
    cache["resid_post", 3].shape          # [batch, pos, d_model]
    cache.accumulated_resid().shape       # [n_layers + 1, batch, pos, d_model]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..graphs.sites import SiteError, SiteTable

__all__ = ["ActivationCache"]


class ActivationCache:
    def __init__(self, values: dict, sites: SiteTable, model=None):
        self._values = dict(values)
        self._sites = sites
        self.model = model

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
        return ActivationCache({k: v.to(device) for k, v in self._values.items()}, self._sites, self.model)

    def remove_batch_dim(self) -> "ActivationCache":
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
        return ActivationCache(out, self._sites, self.model)

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

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, return_labels: bool = False):
        """The residual stream up to and including the input of ``layer``: [components, batch, pos, d_model].

        As in TransformerLens: ``resid_pre`` of layers ``0..layer``, where layer ``n_layers`` means the
        stream after the last block (``final_post``, before the final norm); None and -1 mean ``n_layers``.
        ``incl_mid`` adds ``resid_mid`` of each layer before ``layer``."""
        n = self._upto(layer, "accumulated_resid")
        labels, out = [], []
        for i in range(min(n + 1, self._sites.n_layers)):
            labels.append(f"{i}_pre")
            out.append(self["resid_pre", i])
            if incl_mid and i < n and self._sites.get_act_name("resid_mid", i) in self._sites:
                labels.append(f"{i}_mid")
                out.append(self["resid_mid", i])
        if n == self._sites.n_layers:
            labels.append("final_post")
            out.append(self["resid_post", self._sites.n_layers - 1])
        stacked = torch.stack(out)
        return (stacked, labels) if return_labels else stacked

    def decompose_resid(self, layer: int | None = None, mode: str = "all", return_labels: bool = False):
        """What each component wrote into the residual stream before ``layer``: [components, ...].

        First the embedding terms: one per embedding site (``embed``, ``pos_embed``, ``token_type_embed``)
        when those sites are every term summed into the first residual; otherwise (a model without a
        table whose positional embedding has no canonical name) the residual entering layer 0,
        ``blocks.0.hook_resid_pre``, as one term labelled ``embeddings``. Then ``{i}_attn_out`` and
        ``{i}_mlp_out`` per layer (and ``{i}_cross_attn_out`` between them in an encoder-decoder's decoder). Every term must have been cached: a missing one raises ``SiteError``
        naming the sites to add to ``names_filter`` (leaving a term out would make the components
        silently not sum to the residual).
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp'; got {mode!r}")
        n = self._upto(layer, "decompose_resid")
        embeds = self._embedding_terms()
        wanted = [name for name, _ in embeds]
        # an encoder-decoder's decoder block writes its cross-attention's output too
        cross = [i for i in range(n) if self._sites.get_act_name("cross_attn_out", i) in self._sites]
        for i in range(n):
            if mode in ("all", "attn"):
                wanted.append(self._sites.get_act_name("attn_out", i))
                if i in cross:
                    wanted.append(self._sites.get_act_name("cross_attn_out", i))
            if mode in ("all", "mlp"):
                wanted.append(self._sites.get_act_name("mlp_out", i))
        missing = [name for name in wanted if name not in self._values]
        if missing:
            raise SiteError(
                f"decompose_resid needs {', '.join(missing)}, which {'was' if len(missing) == 1 else 'were'} not cached; "
                "add them to names_filter (or run_with_cache with names_filter=None)"
            )
        labels, out = [], []
        for name, label in embeds:
            labels.append(label)
            out.append(self._values[name])
        for i in range(n):
            if mode in ("all", "attn"):
                labels.append(f"{i}_attn_out")
                out.append(self["attn_out", i])
                if i in cross:
                    labels.append(f"{i}_cross_attn_out")
                    out.append(self["cross_attn_out", i])
            if mode in ("all", "mlp"):
                labels.append(f"{i}_mlp_out")
                out.append(self["mlp_out", i])
        shape = torch.broadcast_shapes(*(t.shape for t in out))
        stacked = torch.stack([t.expand(shape) for t in out])
        return (stacked, labels) if return_labels else stacked

    def _embedding_terms(self) -> list[tuple[str, str]]:
        """(site name, label) of the terms that make the residual entering layer 0 (see decompose_resid)."""
        named = [(name, name[5:]) for name in ("hook_embed", "hook_pos_embed", "hook_token_type_embed") if name in self._sites]
        structure = getattr(getattr(self.model, "graph", None), "structure", None)
        terms = {node for _, node in getattr(structure, "embed_terms", ())}
        if named and (not terms or terms == {self._sites[name].node for name, _ in named}):
            return named
        return [(self._sites.get_act_name("resid_pre", 0), "embeddings")]
