"""The rest of TransformerLens' model surface: stacked weights, circuits, handles, hooks by name, biases.

Problem: TransformerLens code reads ``model.W_Q`` [layer, head, d_model, d_head], ``model.OV``,
``model.blocks[i].attn.W_O``, ``model.hook_dict``, ``model.all_head_labels()``,
``model.accumulated_bias(layer)``, ``model.parameters()`` and ``cfg.normalization_type``. ``Model``
keeps its own file to running and caching; these are read-only views onto what it already has.

Mechanism: ``TransformerLensSurface`` is a mixin of ``Model``: each property delegates to one module
(``layer_weights`` for per-layer views, ``handles`` for the module-tree names, ``fxlens.factored`` for
circuits, ``processed_weights`` for folded copies). ``config_fields`` derives the ``cfg`` fields
TransformerLens code reads from the captured graph (norm kinds, rotary or learned positions, gated MLP)
and the HF config (``act_fn``).

Example::

    model.W_Q.shape                          # [n_layers, n_heads, d_model, d_head] (a stacked copy)
    model.blocks[0].attn.W_Q                 # layer 0's view of the same weights
    model.OV[1, 4].S                         # singular values of head 1.4's OV circuit
    model.all_head_labels()[:2]              # ['L0H0', 'L0H1']
    model.accumulated_bias(2, mlp_input=True)

Gotchas: the stacked ``model.W_*`` are copies (torch.stack); write through ``model.blocks[i]``'s views.
``hook_dict`` maps TransformerLens names to hook points (name and layer) whose ``add_hook`` and
``remove_hooks`` keep hooks on the model, as ``model.add_hook(name, fn)`` does. ``all_head_labels`` is a list that can also be
called (``model.all_head_labels()`` as HookedTransformer, ``model.all_head_labels`` as TransformerBridge).
"""

from __future__ import annotations

import torch

from . import layer_weights
from .handles import Blocks, EmbedHandle, NormHandle, UnembedHandle

__all__ = ["TransformerLensSurface", "config_fields", "HeadLabels"]


class HeadLabels(list):
    """``["L0H0", "L0H1", ...]``; calling it returns itself (HookedTransformer's method form)."""

    def __call__(self) -> list[str]:
        return list(self)


def _stacked(name: str, doc: str):
    def get(self):
        return layer_weights.stacked(self, name)

    get.__name__ = name
    get.__doc__ = doc + " Stacked over layers: a copy (``model.blocks[i]`` gives views)."
    return property(get)


class TransformerLensSurface:
    """Mixin of ``Model``: see the module docstring."""

    W_Q = _stacked("W_Q", "Query weights [n_layers, n_heads, d_model, d_head].")
    W_K = _stacked("W_K", "Key weights [n_layers, n_heads, d_model, d_head] (key/value heads repeated for grouped-query models).")
    W_V = _stacked("W_V", "Value weights [n_layers, n_heads, d_model, d_head] (key/value heads repeated for grouped-query models).")
    W_O = _stacked("W_O", "Output weights [n_layers, n_heads, d_head, d_model].")
    b_Q = _stacked("b_Q", "Query biases [n_layers, n_heads, d_head] (zeros where the model has none).")
    b_K = _stacked("b_K", "Key biases [n_layers, n_heads, d_head] (zeros where the model has none).")
    b_V = _stacked("b_V", "Value biases [n_layers, n_heads, d_head] (zeros where the model has none).")
    b_O = _stacked("b_O", "Attention output biases [n_layers, d_model] (zeros where the model has none).")
    _W_K = _stacked("_W_K", "Key weights of the key/value heads [n_layers, n_kv_heads, d_model, d_head].")
    _W_V = _stacked("_W_V", "Value weights of the key/value heads [n_layers, n_kv_heads, d_model, d_head].")
    _b_K = _stacked("_b_K", "Key biases of the key/value heads [n_layers, n_kv_heads, d_head].")
    _b_V = _stacked("_b_V", "Value biases of the key/value heads [n_layers, n_kv_heads, d_head].")
    W_in = _stacked("W_in", "MLP input weights [n_layers, d_model, d_mlp] (the ungated, linear input of a gated MLP).")
    W_out = _stacked("W_out", "MLP output weights [n_layers, d_mlp, d_model].")
    b_in = _stacked("b_in", "MLP input biases [n_layers, d_mlp] (zeros where the model has none).")
    b_out = _stacked("b_out", "MLP output biases [n_layers, d_model] (zeros where the model has none).")

    @property
    def W_gate(self) -> torch.Tensor | None:
        """Gate weights [n_layers, d_model, d_mlp] of a gated MLP (what the activation reads); None without a gate."""
        if layer_weights.mlp(self, 0)["W_gate"] is None:
            return None
        return layer_weights.stacked(self, "W_gate")

    @property
    def W_pos(self) -> torch.Tensor:
        """The learned positional embedding [n_ctx, d_model] (the HF parameter); AttributeError without one."""
        return layer_weights.positional_embedding(self)

    @property
    def W_E_pos(self) -> torch.Tensor:
        """``[W_E; W_pos]`` [d_vocab + n_ctx, d_model] (a copy)."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def OV(self):
        """The OV circuits ``W_V @ W_O`` as a ``FactoredMatrix`` [n_layers, n_heads, d_model, d_model]."""
        from ..factored import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self):
        """The QK circuits ``W_Q @ W_K.T`` as a ``FactoredMatrix`` [n_layers, n_heads, d_model, d_model]
        (before rotary embeddings, which make the real scores depend on the distance between positions)."""
        from ..factored import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    # ---- module-tree names -------------------------------------------------------------------------
    @property
    def blocks(self) -> Blocks:
        """``model.blocks[i]`` with ``.attn``, ``.mlp``, ``.ln1``, ``.ln2``: handles reading this block's weights."""
        return Blocks(self)

    @property
    def embed(self) -> EmbedHandle:
        return EmbedHandle(self)

    @property
    def pos_embed(self) -> EmbedHandle:
        return EmbedHandle(self)

    @property
    def unembed(self) -> UnembedHandle:
        return UnembedHandle(self)

    @property
    def ln_final(self) -> NormHandle:
        return NormHandle(self, self.derived.graph.structure.final_norm, "ln_final")

    # ---- the HF model's parameters --------------------------------------------------------------
    def parameters(self, recurse: bool = True):
        """The HF model's parameters (``hf_model.parameters()``)."""
        return self.hf_model.parameters(recurse)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The HF model's named parameters, under HF's names (``model.layers.0.self_attn.q_proj.weight``)."""
        return self.hf_model.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def state_dict(self, *args, **kwargs) -> dict:
        """The HF model's state dict (HF's names and layouts)."""
        return self.hf_model.state_dict(*args, **kwargs)

    # ---- names ------------------------------------------------------------------------------------
    @property
    def hook_dict(self) -> dict:
        """{TransformerLens site name: hook point} for every canonical site, in graph order. A hook point has
        TransformerLens' ``add_hook(fn, dir="fwd"|"bwd", is_permanent=False)`` and ``remove_hooks(dir="fwd",
        including_permanent=False)``, which keep hooks on this model (``model.add_hook``)."""
        from .model import BoundHookPoint

        return {s.name: BoundHookPoint(s.name, s.layer, self) for s in self.site_table.values() if s.canonical}

    def _drop_hooks(self, name: str, dir: str, including_permanent: bool) -> None:
        """Remove the kept hooks at site ``name`` in direction ``dir`` ("fwd", "bwd" or "both")."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir={dir!r}: use 'fwd', 'bwd' or 'both'")
        self._persistent = [h for h in self._persistent
                            if not (h[0] == name and (dir == "both" or h[3] == dir) and (including_permanent or not h[2]))]

    @property
    def all_head_labels(self) -> HeadLabels:
        """["L0H0", "L0H1", ...] for every layer and head."""
        return HeadLabels(f"L{layer}H{head}" for layer in range(self.cfg.n_layers) for head in range(self.cfg.n_heads or 0))

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """The sum of the attention output biases (and MLP output biases) of the layers before ``layer`` [d_model];
        with ``mlp_input`` also layer ``layer``'s attention output bias (what the MLP there reads), as TransformerLens."""
        n = self.cfg.n_layers
        if not 0 <= layer <= n or (mlp_input and layer == n):
            raise ValueError(f"layer must be in 0..{n - 1 if mlp_input else n} (mlp_input={mlp_input}); got {layer}")
        total = torch.zeros(self.cfg.d_model, dtype=self.cfg.dtype, device=self.cfg.device)
        for i in range(layer + (1 if mlp_input else 0)):
            total = total + layer_weights.attention(self, i)["b_O"]
            if include_mlp_biases and i < layer:
                total = total + layer_weights.mlp(self, i)["b_out"]
        return total

    def with_processed_weights(self, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                               fold_value_biases: bool = True):
        """A NEW Model of a processed deep copy of the HF model (this one is unchanged); see
        ``fxlens.engine.processed_weights`` for what each option does and where it is defined."""
        from .processed_weights import process

        return process(self, fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                       fold_value_biases=fold_value_biases)


def config_fields(derived, hf_model) -> dict:
    """cfg fields TransformerLens code reads, from the captured graph and the HF config."""
    mg = derived.graph
    config = getattr(hf_model, "config", None)
    kinds = {n.kind for n in mg.norms.values()}
    normalization = "LN" if kinds == {"layernorm"} else "RMS" if kinds == {"rms"} else None if not kinds else "mixed"
    if any(a is not None and a.rot_q is not None for a in mg.attn):
        positions = "rotary"
    elif len(mg.structure.embed_terms) > 1 and _has_learned_positions(derived):
        positions = "standard"
    elif getattr(config, "alibi", False) or getattr(config, "model_type", None) in ("bloom", "mpt"):
        positions = "alibi"
    else:
        positions = None
    act = None
    for attr in ("hidden_act", "activation_function", "hidden_activation", "activation"):
        value = getattr(config, attr, None)
        if isinstance(value, str):
            act = value
            break
    gated = any(m is not None and m.pre_linear is not None for m in mg.mlp)
    return {"act_fn": act, "normalization_type": normalization, "positional_embedding_type": positions, "gated_mlp": gated}


def _has_learned_positions(derived) -> bool:
    from ..graphs.attention import _walk_back
    from ..graphs.nodes import op_name
    from ..graphs.vocab import token_embedding

    mg = derived.graph
    token = token_embedding(mg.captured.module.graph)
    for _, node in mg.structure.embed_terms:
        emb = mg.dg.node(_walk_back(mg.dg, node)[-1])
        if emb is not token and op_name(emb) == "embedding":
            return True
    return False
