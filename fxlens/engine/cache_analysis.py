"""The ActivationCache's analysis helpers: residual stacks, their norms, and direct logit attribution.

Problem: TransformerLens users decompose the residual stream into what each component wrote
(``decompose_resid``, ``stack_head_results``, ``stack_neuron_results``,
``get_full_resid_decomposition``), put the stack through the next norm with the cached scale
(``apply_ln_to_stack``) and read it against unembedding directions (``logit_attrs``). TransformerLens
folds each norm's weight into the next weights (``fold_ln``) so that ``apply_ln_to_stack(...) @ W_U``
is right; fxlens keeps the HF weights as they are, so on an RMSNorm or LayerNorm model with a weight
that product would be wrong unless the user knew to multiply by the norm's weight by hand.

Mechanism: ``apply_ln_to_stack`` does what the norm does to one term of a sum, given the sum's cached
scale (``ln_final.hook_scale``, ``blocks.{l}.ln1|ln2.hook_scale``): centre each term (LayerNorm only),
divide by the scale, multiply by the norm's weight (as the model applies it: ``1 + w`` in Gemma). The
norm's bias is a constant, not part of any term, and is left out. So
``apply_ln_to_stack(stack).sum(0) @ W_U + (b_ln @ W_U + b_U)`` are the model's logits, with
``model.W_U`` the HF weight. Per-head results are ``z @ W_O`` and per-neuron results ``post * W_out``,
with ``W_O``/``W_out`` read from the captured graph (``component_maps``); the output biases are one
``bias`` term, as in TransformerLens. Positions, batch rows and neurons are chosen with TransformerLens'
``Slice`` forms (``fxlens.engine.slices``).

Example::

    stack, labels = cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=False, return_labels=True)
    attrs = cache.logit_attrs(stack, answer_ids, incorrect_ids, pos_slice=-1)   # [components, batch]
    # attrs.sum(0) + constant == logit difference; constant = (b_ln @ W_U + b_U) at the two tokens

Gotchas: equal to TransformerLens on the same weights processed with ``fold_ln=True`` (no centring),
where the norm's weight lives in ``W_U``/``W_Q`` instead. ``accumulated_resid(apply_ln=True)`` at the
final layer applies ``ln_final`` itself to each stacked residual (its own scale, its weight and its
bias), as TransformerLens recomputes it there: the logit lens is ``that @ W_U + b_U``. Models whose
sublayer outputs pass through a norm before the residual add (Gemma 2/3) have no per-head or
per-neuron decomposition: asking raises. ``logit_attrs`` attributes the logit before any soft-capping
(Gemma 2 caps it afterwards; the lens in ``fxlens.lens`` applies the cap).
"""

from __future__ import annotations

import torch

from ..graphs.placement import to_device
from ..graphs.sites import SiteError
from . import component_maps as maps
from .slices import Slice

__all__ = ["CacheAnalysis"]


def _first(stack: torch.Tensor) -> torch.Tensor:
    """Move the concatenated component axis (second to last) to the front."""
    return stack.movedim(-2, 0)


class CacheAnalysis:
    """Mixed into ``ActivationCache``: needs ``_values``, ``_sites``, ``model``, ``has_batch_dim``, ``__getitem__``."""

    # ---- plumbing ------------------------------------------------------------------------------
    def _model(self, what: str):
        if self.model is None:
            raise ValueError(f"{what} needs the model this cache came from; this ActivationCache has none (model=None)")
        return self.model

    def _ln_scale(self, layer: int, mlp_input: bool, pos_slice: Slice, batch_slice: Slice) -> torch.Tensor:
        n = self._sites.n_layers
        key = "ln_final.hook_scale" if layer == n else f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        if key not in self._values:
            where = "in this model" if key not in self._sites else "in this cache; add it to names_filter"
            raise SiteError(f"apply_ln needs the norm's cached scale {key!r}, which is not {where}")
        scale = pos_slice.apply(self._values[key], dim=-2)
        return batch_slice.apply(scale, dim=0) if self.has_batch_dim else scale

    def _norm_path(self, layer: int, mlp_input: bool) -> str:
        model = self._model("apply_ln")
        return maps.norm_path(model, None if layer == self._sites.n_layers else layer, mlp_input)

    # ---- norms ---------------------------------------------------------------------------------
    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True, recompute_ln: bool = False) -> torch.Tensor:
        """Each term of ``residual_stack`` [components, batch, pos, d_model] as the norm at ``layer``
        maps it, given the cached scale of the whole stream: centred (LayerNorm), divided by the scale,
        times the norm's weight; the bias, a constant, left out.

        ``layer``: None and -1 mean the final norm (``ln_final``); otherwise ``ln1`` of that layer, or
        ``ln2`` with ``mlp_input``. ``pos_slice``/``batch_slice`` say which positions and rows the stack
        holds (the scale is sliced to match; ``batch_slice`` also slices the stack). ``recompute_ln``
        at the final layer applies ``ln_final`` itself, bias included, to each term as a whole stream."""
        pos_slice, batch_slice = Slice(pos_slice), Slice(batch_slice)
        layer = self._upto(layer, "apply_ln_to_stack")
        model = self._model("apply_ln_to_stack")
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        path = self._norm_path(layer, mlp_input)
        if recompute_ln and layer == self._sites.n_layers:
            return maps.apply_norm(model, path, residual_stack)
        if maps.norm_kind(model, path) == "layernorm":
            residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        scale = self._ln_scale(layer, mlp_input, pos_slice, batch_slice)
        weight, _ = maps.norm_affine(model, path)
        # on the norm's device (a model spread over devices: the stack may hold earlier blocks' terms)
        return residual_stack.to(scale.device) / scale * weight.to(scale.device)

    def _ln_linear(self, W: torch.Tensor, layer: int, mlp_input: bool) -> torch.Tensor:
        """What apply_ln does to the rows of ``W`` [..., d_model], except dividing by the scale."""
        model = self._model("apply_ln")
        path = self._norm_path(layer, mlp_input)
        if maps.norm_kind(model, path) == "layernorm":
            W = W - W.mean(dim=-1, keepdim=True)
        return W * maps.norm_affine(model, path)[0].to(W.device)  # the norm's device may be another block's

    # ---- direct logit attribution ----------------------------------------------------------------
    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None, pos_slice=None,
                    batch_slice=None, has_batch_dim: bool = True) -> torch.Tensor:
        """Each component's direct contribution to the logit of ``tokens`` (minus that of
        ``incorrect_tokens``): [components, *batch_and_pos].

        The stack goes through the final norm as ``apply_ln_to_stack(layer=-1)`` does (its weight folded
        in), then onto ``model.tokens_to_residual_directions(tokens)``. ``tokens``: a string of one token,
        an id, or ids [batch] or [batch, pos]. The components sum to the logit (difference) less a constant
        no component writes: ``b_ln @ W_U + b_U`` at the token(s), the final norm's bias (zero in
        RMSNorm) and the unembedding bias (usually zero), differenced like the logits."""
        model = self._model("logit_attrs")
        pos_slice, batch_slice = Slice(pos_slice), Slice(batch_slice)

        def shape_of(t):
            return torch.as_tensor(model.to_single_token(t) if isinstance(t, str) else t).shape

        directions = model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            if shape_of(tokens) != shape_of(incorrect_tokens):
                raise ValueError(f"tokens and incorrect_tokens must have the same shape; got {tuple(shape_of(tokens))} "
                                 f"and {tuple(shape_of(incorrect_tokens))}")
            directions = directions - model.tokens_to_residual_directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        if (has_batch_dim and batch_slice.mode != "int" and scaled.ndim == 4 and directions.ndim == 2
                and directions.shape[0] == scaled.shape[1]):
            directions = directions.unsqueeze(-2)  # one token per row, read at every position
        return (scaled * directions.to(scaled.dtype)).sum(dim=-1)

    # ---- residual stacks -----------------------------------------------------------------------
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream up to and including the input of ``layer``: [components, batch, pos, d_model].

        As in TransformerLens: ``resid_pre`` of layers ``0..layer``, where layer ``n_layers`` means the
        stream after the last block (``final_post``, before the final norm); None and -1 mean ``n_layers``.
        ``incl_mid`` adds ``resid_mid`` of each layer before ``layer``, ``mlp_input`` that of ``layer``
        itself. ``apply_ln`` puts every component through the norm at ``layer`` (at the final layer
        ``ln_final`` itself, recomputed per component: ``@ W_U + b_U`` then gives the logit lens)."""
        n_layers = self._sites.n_layers
        n = self._upto(layer, "accumulated_resid")
        pos_slice = Slice(pos_slice)
        labels, out = [], []
        for i in range(n + 1):
            if i == n_layers:
                labels.append("final_post")
                out.append(self["resid_post", n_layers - 1])
                continue
            labels.append(f"{i}_pre")
            out.append(self["resid_pre", i])
            if ((incl_mid and i < n) or (mlp_input and i == n)) and self._sites.get_act_name("resid_mid", i) in self._sites:
                labels.append(f"{i}_mid")
                out.append(self["resid_mid", i])
        stacked = torch.stack(_together([pos_slice.apply(t, dim=-2) for t in out]))
        if apply_ln:
            stacked = self.apply_ln_to_stack(stacked, n, mlp_input=mlp_input, pos_slice=pos_slice,
                                             has_batch_dim=self.has_batch_dim, recompute_ln=n == n_layers)
        return (stacked, labels) if return_labels else stacked

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all", apply_ln: bool = False,
                        pos_slice=None, incl_embeds: bool = True, return_labels: bool = False):
        """What each component wrote into the residual stream before ``layer``: [components, ...].

        First the embedding terms (unless ``incl_embeds=False``): one per embedding site (``embed``,
        ``pos_embed``, ``token_type_embed``) when those sites are every term summed into the first residual
        and all were cached; otherwise ``blocks.0.hook_resid_pre`` as one term labelled ``embeddings``.
        Then ``{i}_attn_out`` and ``{i}_mlp_out`` per layer (and ``{i}_cross_attn_out`` between them in an
        encoder-decoder's decoder); ``mlp_input`` adds ``{layer}_attn_out`` (the terms of ``resid_mid``).
        ``mode`` "attn" or "mlp" keeps only those. Every term must have been cached: a missing one raises
        ``SiteError`` naming the sites to add to ``names_filter`` (leaving a term out would make the
        components silently not sum to the residual). ``apply_ln`` and ``pos_slice`` as in
        ``apply_ln_to_stack``."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp'; got {mode!r}")
        n = self._upto(layer, "decompose_resid")
        pos_slice = Slice(pos_slice)
        terms = self._embedding_terms() if incl_embeds else []
        cross = {i for i in range(min(n + 1, self._sites.n_layers)) if self._sites.get_act_name("cross_attn_out", i) in self._sites}
        for i in range(n + (1 if mlp_input and n < self._sites.n_layers else 0)):
            if mode in ("all", "attn"):
                terms.append((self._sites.get_act_name("attn_out", i), f"{i}_attn_out"))
                if i in cross:
                    terms.append((self._sites.get_act_name("cross_attn_out", i), f"{i}_cross_attn_out"))
            if mode in ("all", "mlp") and i < n:
                terms.append((self._sites.get_act_name("mlp_out", i), f"{i}_mlp_out"))
        missing = [name for name, _ in terms if name not in self._values]
        if missing:
            raise SiteError(
                f"decompose_resid needs {', '.join(missing)}, which {'was' if len(missing) == 1 else 'were'} not cached; "
                "add them to names_filter (or run_with_cache with names_filter=None)"
            )
        out = [pos_slice.apply(self._values[name], dim=-2) for name, _ in terms]
        if not out:
            raise ValueError(f"decompose_resid(layer={layer}, mode={mode!r}, incl_embeds={incl_embeds}) selects no component")
        shape = torch.broadcast_shapes(*(t.shape for t in out))
        stacked = torch.stack(_together([t.expand(shape) for t in out]))
        if apply_ln:
            stacked = self.apply_ln_to_stack(stacked, n, mlp_input=mlp_input, pos_slice=pos_slice, has_batch_dim=self.has_batch_dim)
        labels = [label for _, label in terms]
        return (stacked, labels) if return_labels else stacked

    def _embedding_terms(self) -> list[tuple[str, str]]:
        """(site name, label) of the terms that make the residual entering layer 0 (see decompose_resid)."""
        named = [(name, name[5:]) for name in ("hook_embed", "hook_pos_embed", "hook_token_type_embed") if name in self._sites]
        structure = getattr(getattr(self.model, "graph", None), "structure", None)
        terms = {node for _, node in getattr(structure, "embed_terms", ())}
        first = self._sites.get_act_name("resid_pre", 0)
        if named and (not terms or terms == {self._sites[name].node for name, _ in named}):
            if all(name in self._values for name, _ in named) or first not in self._values:
                return named
        return [(first, "embeddings")]

    # ---- heads -----------------------------------------------------------------------------------
    def compute_head_results(self) -> None:
        """Cache each layer's per-head outputs ``blocks.{l}.attn.hook_result`` [batch, pos, head, d_model]
        from the cached ``hook_z`` and the output weight ``W_O``, where not cached already (the output
        bias is not in any head's result, as in TransformerLens)."""
        self._head_results(self._sites.n_layers)

    def _head_results(self, upto: int) -> None:
        """compute_head_results for the layers before ``upto`` only (a cache may hold z of those alone)."""
        model = self._model("compute_head_results")
        for layer in range(upto):
            key = f"blocks.{layer}.attn.hook_result"
            if key in self._values:
                continue
            z_name = f"blocks.{layer}.attn.hook_z"
            if z_name not in self._values:
                raise SiteError(f"compute_head_results needs {z_name!r} (or {key!r}), which was not cached; add it to names_filter")
            W_O, _ = maps.attn_out_weight(model, layer)
            z = self._values[z_name]
            self._values[key] = torch.einsum("...hd,hdm->...hm", z, W_O.to(z.dtype))

    def stack_head_results(self, layer: int | None = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """Every head's output in the layers before ``layer`` (None/-1: all), as residual-stream terms:
        [n_heads * layers, batch, pos, d_model], labelled ``L{l}H{h}``. ``incl_remainder`` adds the rest of
        ``resid_post`` of layer ``layer - 1`` (embeddings, MLPs, biases) as ``remainder``."""
        n = self._upto(layer, "stack_head_results")
        pos_slice = Slice(pos_slice)
        self._head_results(n)
        parts, labels = [], []
        for i in range(n):
            result = pos_slice.apply(self[f"blocks.{i}.attn.hook_result"], dim=-3)
            parts.append(result)
            labels += [f"L{i}H{h}" for h in range(result.shape[-2])]
        if parts:
            stack = _first(torch.cat(_together(parts), dim=-2))
        else:
            like = pos_slice.apply(self["resid_pre", 0], dim=-2)
            stack = like.new_zeros((0, *like.shape))
        if incl_remainder:
            total = pos_slice.apply(self["resid_post", n - 1] if n > 0 else self["resid_pre", 0], dim=-2)
            stack = torch.cat([stack, (total.to(stack.device) - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, n, pos_slice=pos_slice, has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack

    # ---- neurons ---------------------------------------------------------------------------------
    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None, project_output_onto=None) -> torch.Tensor:
        """Each neuron's output in layer ``layer``: ``post * W_out`` [batch, pos, d_mlp, d_model] (or the
        projections onto ``project_output_onto`` [d_model] or [d_model, k])."""
        return self._neurons(layer, Slice(neuron_slice), Slice(pos_slice), project_output_onto, None)

    def _neurons(self, layer: int, neuron_slice: Slice, pos_slice: Slice, project, ln) -> torch.Tensor:
        """Layer ``layer``'s neuron results; ``ln`` = (layer, mlp_input, pos_slice) folds that norm in."""
        W_out, _ = maps.mlp_out_weight(self._model("stack_neuron_results"), layer)
        acts = neuron_slice.apply(pos_slice.apply(self["post", layer], dim=-2), dim=-1)
        W = neuron_slice.apply(W_out, dim=0).to(acts.dtype)
        if ln is not None:
            W = self._ln_linear(W, ln[0], ln[1])
            acts = acts / self._ln_scale(ln[0], ln[1], ln[2], Slice(None)).to(acts.device)
        if project is not None:
            W = W @ project.to(W.device, W.dtype)
            if project.ndim == 1:
                return acts * W
        return acts[..., None] * W

    def stack_neuron_results(self, layer: int | None, pos_slice=None, neuron_slice=None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False, project_output_onto=None,
                             mlp_input: bool = False):
        """Every neuron's output in the layers before ``layer`` (None/-1: all): [d_mlp * layers, batch, pos,
        d_model] (or projected onto ``project_output_onto``), labelled ``L{l}N{i}``. ``incl_remainder`` adds
        the rest of ``resid_post`` of layer ``layer - 1`` (``resid_mid`` of ``layer`` with ``mlp_input``)."""
        n = self._upto(layer, "stack_neuron_results")
        neuron_slice, pos_slice = Slice(neuron_slice), Slice(pos_slice)
        if neuron_slice.mode == "int":
            neuron_slice = Slice([neuron_slice.slice])
        project = project_output_onto
        ln = (n, mlp_input, pos_slice) if apply_ln else None
        parts = [self._neurons(i, neuron_slice, pos_slice, project, ln) for i in range(n)]
        labels = [f"L{i}N{int(j)}" for i in range(n) for j in neuron_slice.indices(self["post", i].shape[-1])]
        if parts and project is not None and project.ndim == 1:
            stack = torch.cat(_together(parts), dim=-1).movedim(-1, 0)  # [batch, pos, neurons] -> [neurons, batch, pos]
        elif parts:
            stack = _first(torch.cat(_together(parts), dim=-2))
        else:
            like = pos_slice.apply(self["resid_pre", 0], dim=-2)
            if project is not None:
                like = like @ project.to(like.dtype)
            stack = like.new_zeros((0, *like.shape))
        if incl_remainder:
            target = self["resid_mid", n] if mlp_input else (self["resid_post", n - 1] if n > 0 else self["resid_pre", 0])
            total = pos_slice.apply(target, dim=-2)[None]
            if apply_ln:
                total = self.apply_ln_to_stack(total, n, mlp_input=mlp_input, pos_slice=pos_slice, has_batch_dim=self.has_batch_dim)
            if project is not None:
                total = total @ project.to(total.dtype)
            stack = torch.cat([stack, total.to(stack.device) - stack.sum(0, keepdim=True)])
            labels.append("remainder")
        return (stack, labels) if return_labels else stack

    # ---- everything ------------------------------------------------------------------------------
    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False, expand_neurons: bool = True,
                                     apply_ln: bool = False, pos_slice=None, return_labels: bool = False,
                                     project_output_onto=None):
        """The residual stream entering ``layer`` (None/-1: after the last block; ``resid_mid`` of ``layer``
        with ``mlp_input``) as the sum of every head (``L{l}H{h}``), every neuron (``L{l}N{i}``; per MLP,
        ``{l}_mlp_out``, with ``expand_neurons=False``), the embeddings and one ``bias`` term (the
        attention output biases, and the MLP output biases when neurons are expanded). The terms sum to
        the residual exactly. ``apply_ln``, ``pos_slice``, ``project_output_onto`` as in the stacking
        helpers."""
        n = self._upto(layer, "get_full_resid_decomposition")
        model = self._model("get_full_resid_decomposition")
        if mlp_input and n == self._sites.n_layers:
            raise ValueError("mlp_input=True needs a layer below n_layers: the stream after the last block enters no MLP")
        pos_slice = Slice(pos_slice)
        project = project_output_onto
        heads_upto = n + 1 if mlp_input else n

        def finish(stack):
            if apply_ln:
                stack = self.apply_ln_to_stack(stack, n, mlp_input=mlp_input, pos_slice=pos_slice, has_batch_dim=self.has_batch_dim)
            return stack @ project.to(stack.dtype) if project is not None else stack

        parts, labels = [], []
        heads, head_labels = self.stack_head_results(heads_upto, return_labels=True, pos_slice=pos_slice)
        parts.append(finish(heads))
        labels += head_labels
        if n > 0:
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(
                    n, pos_slice=pos_slice, return_labels=True, apply_ln=apply_ln, project_output_onto=project, mlp_input=mlp_input)
            else:
                neurons, neuron_labels = self.decompose_resid(n, mode="mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True)
                neurons = finish(neurons)
            parts.append(neurons)
            labels += neuron_labels
        embeds, embed_labels = self.decompose_resid(0, mode="attn", pos_slice=pos_slice, return_labels=True)
        parts.append(finish(embeds))
        labels += embed_labels
        like = embeds[0]
        # each layer's bias on its own block's device: summed where the embeddings are
        bias = sum(to_device(maps.attn_out_weight(model, i)[1], like.device) for i in range(heads_upto))
        if expand_neurons:
            bias = bias + sum(to_device(maps.mlp_out_weight(model, i)[1], like.device) for i in range(n))
        parts.append(finish(torch.as_tensor(bias, dtype=like.dtype, device=like.device).expand(like.shape)[None]))
        labels.append("bias")
        stack = torch.cat(_together(parts))
        return (stack, labels) if return_labels else stack


def _together(parts: list) -> list:
    """``parts`` on one device: the last one's (for a model spread over devices, the LM head's side, where
    stacks are unembedded); unchanged on one device."""
    device = parts[-1].device if parts else None
    return [p if p.device == device else p.to(device) for p in parts]
