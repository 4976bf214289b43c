"""A processed copy of a model for logit-lens style work: norms folded, writing weights centred.

Problem: TransformerLens loads models with their weights processed: the norms' scale and shift folded
into the linear maps that read them (``fold_ln``), every weight that writes into the residual stream
centred (``center_writing_weights``), the unembedding centred over the vocabulary (``center_unembed``),
and the value biases folded into the output bias (``fold_value_biases``). Direct logit attribution and
the logit lens read cleaner on such weights. fxlens never changes the user's model.

Mechanism: ``process`` deep-copies the HF model, adds zero biases to ``nn.Linear`` projections that will
need one (a norm's shift folded into a bias-free projection, a tied unembedding untied), wraps the copy
as a new Model, and edits the copy's parameters in place through the new Model's weight views
(``engine.layer_weights``: strided views, so fused and interleaved q/k/v packings are written where
they live). What each option does, and where it is defined:

- ``fold_ln``: for a norm ``normalized(x) * w + b`` read by projections ``W`` (q, k, v; MLP in and gate;
  the unembedding): ``b_W += b @ W``, ``W *= w[:, None]``, and the norm's own weight becomes the identity.
  With LayerNorm the reading weights are also centred over d_model (the normalised input has zero mean,
  so this changes nothing). Defined for LayerNorm and RMSNorm; an RMSNorm has no shift, so only ``w`` folds.
- ``center_writing_weights``: subtract from W_E, W_pos, W_O, b_O, W_out, b_out their mean over d_model.
  Exact only when every reader of the residual stream is a LayerNorm (which removes the mean): not for
  RMSNorm models, not for post-norm models. Skipped there with a warning.
- ``center_unembed``: ``W_U -= W_U.mean(-1)``, ``b_U -= b_U.mean()``: each position's logits shift by one
  constant, so log-softmax and probabilities are unchanged (logits are not). Skipped, with a warning,
  when the logits pass through a non-linear cap after the unembedding (Gemma 2's soft-capping).
- ``fold_value_biases``: ``b_O += sum_h b_V[h] @ W_O[h]``, ``b_V = 0`` (each pattern row sums to 1).

Example::

    folded = model.with_processed_weights()          # a new Model; ``model`` and its HF model unchanged
    folded(ids).log_softmax(-1) - model(ids).log_softmax(-1)     # ~1e-6
    folded.cfg.normalization_type                     # "LNPre" (GPT-2), "RMSPre" (Llama)
    folded.weight_processing                          # what was applied, and what was skipped and why

Gotchas: a model whose attention or MLP weights cannot be read as views (a mixture of experts, an MLP
fxlens does not recognise), whose branches read the residual without a norm in front (post-norm models
such as BERT), or whose norm is not ``normalized(x) * w + b`` cannot be processed: ``ProcessingError``
says which block and why. The copy costs one capture and the model's memory again. A ``with_weight_edits`` Model's edits are
carried into the copy; hooks kept with ``add_hook`` are not (add them to the new Model).
"""

from __future__ import annotations

import copy
import warnings

import torch

from . import layer_weights
from .handles import NormFormError, norm_affine
from .weight_views import embedding, unembedding, unembedding_node

__all__ = ["process", "ProcessingError"]

_CAP_FREE = {"view", "reshape", "_unsafe_view", "to", "_to_copy", "contiguous", "clone", "float", "alias", "detach"}


class ProcessingError(ValueError):
    pass


def process(model, *, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
            fold_value_biases: bool = True):
    plan = _Plan(model, fold_ln, center_writing_weights, center_unembed, fold_value_biases)
    new = plan.copy()
    with torch.no_grad():
        if plan.applied["fold_ln"]:
            _fold_ln(new, plan)
        if plan.applied["center_writing_weights"]:
            _center_writing(new)
        if plan.applied["center_unembed"]:
            W_U, b_U = unembedding(new)
            W_U.sub_(W_U.mean(-1, keepdim=True))
            if plan.unembed_bias:
                b_U.sub_(b_U.mean())
        if plan.applied["fold_value_biases"]:
            _fold_value_biases(new)
    if plan.applied["fold_ln"]:
        new.cfg.normalization_type = {"LN": "LNPre", "RMS": "RMSPre"}.get(model.cfg.normalization_type, model.cfg.normalization_type)
    new.weight_processing = dict(plan.applied, skipped=dict(plan.skipped))
    return new


class _Plan:
    """What can be applied to ``model`` (checked before anything is copied) and the copy's structural fixes."""

    def __init__(self, model, fold_ln, center_writing, center_unembed, fold_value_biases):
        self.model = model
        mg = model.derived.graph
        self.skipped: dict[str, str] = {}
        asked = {"fold_ln": fold_ln, "center_writing_weights": center_writing, "center_unembed": center_unembed,
                 "fold_value_biases": fold_value_biases}
        self.applied = dict(asked)
        n = model.cfg.n_layers
        self.attn = [self._read(layer_weights.attention, layer) for layer in range(n)]
        self.mlp = [self._read(layer_weights.mlp, layer) for layer in range(n)]
        self.maps = [layer_weights._maps(model, layer) for layer in range(n)]
        try:
            unembed = unembedding_node(model)
        except AttributeError as err:
            raise ProcessingError(f"cannot process {type(model.hf_model).__name__}'s weights: {err}") from None
        self.unembed_module = _scope(unembed)
        self.unembed_bias = len(unembed.args) > 2 and getattr(unembed.args[2], "op", None) == "get_attr"
        self.norms = self._norms(mg) if fold_ln or center_writing else {}
        kinds = {kind for _, kind in self.norms.values()}
        if center_writing and "rms" in kinds:
            self._skip("center_writing_weights", "the model uses RMSNorm, which does not remove the mean of the "
                       "residual stream, so centring what writes into it would change the outputs")
        elif center_writing and any(b.attn is not None and b.attn.post_norm or b.mlp is not None and b.mlp.post_norm
                                    for b in mg.structure.blocks):
            self._skip("center_writing_weights", "the model normalises branch outputs before adding them (post-norms)")
        elif center_writing and len(mg.structure.embed_terms) > 1 + (self._has_pos()):
            self._skip("center_writing_weights", "the embedding adds terms other than the token and position embeddings")
        if center_unembed and not _uncapped(mg, unembed):
            self._skip("center_unembed", "the logits pass through a non-linear op after the unembedding (soft-capping), "
                       "so shifting them by a constant would change the probabilities")
        self.tied = embedding(model).data_ptr() == unembedding(model)[0].data_ptr()

    def _skip(self, option: str, why: str) -> None:
        self.applied[option] = False
        self.skipped[option] = why
        warnings.warn(f"with_processed_weights: {option} skipped: {why}", UserWarning, stacklevel=5)

    def _read(self, read, layer):
        try:
            return read(self.model, layer)
        except AttributeError as err:
            raise ProcessingError(f"cannot process {type(self.model.hf_model).__name__}'s weights: {err}") from None

    def _has_pos(self) -> int:
        try:
            layer_weights.positional_embedding(self.model)
            return 1
        except AttributeError:
            return 0

    def _norms(self, mg) -> dict:
        """{norm path: (its readers, kind)}; readers are ("attn", layer), ("mlp", layer) or ("unembed",)."""
        out: dict = {}
        for block in mg.structure.blocks:
            for kind, branch in (("attn", block.attn), ("mlp", block.mlp)):
                if branch is None:
                    continue
                if branch.norm is None:
                    raise ProcessingError(f"cannot fold norms: block {block.index}'s {kind} reads the residual stream "
                                          "without a norm in front (a post-norm model); call with fold_ln=False")
                out.setdefault(branch.norm, [[], None])[0].append((kind, block.index))
        final = mg.structure.final_norm
        if final is None:
            raise ProcessingError("cannot fold norms: the model has no final norm before the unembedding; call with fold_ln=False")
        out.setdefault(final, [[], None])[0].append(("unembed",))
        for path, entry in out.items():
            try:
                entry[1] = norm_affine(self.model, path)[2]
            except NormFormError as err:
                raise ProcessingError(f"cannot fold norms: {err}; call with fold_ln=False") from None
        return {path: (tuple(readers), kind) for path, (readers, kind) in out.items()}

    def copy(self):
        """A new Model of a deep copy of the HF model, untied and given the biases the edits will need."""
        from .model import Model

        model = self.model
        hf = copy.deepcopy(model.hf_model)
        # a with_weight_edits Model computes with its own tensors at some paths: the copy takes them (in place: a path
        # tied to another is one graph tensor, so the edited Model computes with the edit at both)
        with torch.no_grad():
            for path, tensor in model.derived.binding.overrides.items():
                owner, _, name = path.rpartition(".")
                module = hf.get_submodule(owner)
                getattr(module, name).copy_(tensor)
        need_bias = set()
        if self.applied["fold_ln"]:
            for path, (readers, kind) in self.norms.items():
                if kind != "layernorm" or not bool(norm_affine(model, path)[1].any()):
                    continue
                for reader in readers:
                    if reader[0] == "attn":
                        need_bias |= {p.module for p in (self.maps[reader[1]].q, self.maps[reader[1]].k, self.maps[reader[1]].v)}
                    elif reader[0] == "mlp":
                        m = self.maps[reader[1]]
                        need_bias |= {p.module for p in (m.w_in, m.w_gate) if p is not None}
                    else:
                        need_bias.add(self.unembed_module)
        if self.applied["fold_value_biases"]:
            # b_V is nonzero where the model has one, or where fold_ln gives v a bias: b_O must then exist to take it
            need_bias |= {m.o.module for m in self.maps if m.v.bias is not None or m.v.module in need_bias}
        for path in sorted(need_bias):
            _ensure_bias(hf, path)
        if self.unembed_module in need_bias:
            self.unembed_bias = True
        if self.tied and any(self.applied.values()):
            head = hf.get_submodule(self.unembed_module)
            head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
            if getattr(hf.config, "tie_word_embeddings", None):
                hf.config.tie_word_embeddings = False
        return Model(hf, model.tokenizer, attn_implementation=model.attn_implementation, table=model.table)


def _ensure_bias(hf, path: str) -> None:
    module = hf.get_submodule(path)
    if getattr(module, "bias", None) is not None:
        return
    if not isinstance(module, torch.nn.Linear):
        raise ProcessingError(f"cannot fold a bias into {path} ({type(module).__name__}): it has no bias parameter and is not an nn.Linear")
    w = module.weight
    module.bias = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)


def _scope(node) -> str:
    from ..graphs.nodes import scope

    return scope(node)


def _uncapped(mg, linear) -> bool:
    """Whether the logits output is the unembedding's output through reshapes and casts only."""
    from ..graphs.nodes import op_name

    cg = mg.captured
    out = next(n for n in cg.module.graph.nodes if n.op == "output").args[0]["outputs"]
    node = out.get(cg.logits) if cg.logits is not None else None
    while node is not linear:
        if node is None:
            return False
        if op_name(node) not in _CAP_FREE or len(node.all_input_nodes) != 1:
            return False
        node = node.all_input_nodes[0]
    return True


def _fold_into(W: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor, axis: int, center: bool) -> None:
    """Fold ``normalized * w + b`` into a map reading it along ``axis`` of ``W`` (d_model); ``bias`` is its bias view."""
    if bias is not None and bool(b.any()):
        bias.add_(torch.tensordot(b, W, dims=([0], [axis])))
    shape = [1] * W.dim()
    shape[axis] = -1
    W.mul_(w.view(shape))
    if center:
        W.sub_(W.mean(axis, keepdim=True))


def _fold_ln(new, plan: _Plan) -> None:
    for path, (readers, kind) in plan.norms.items():
        w, b, _, form = norm_affine(new, path)
        w, b = w.detach().clone(), b.detach().clone()
        center = kind == "layernorm"
        for reader in readers:
            if reader[0] == "attn":
                a = layer_weights.attention(new, reader[1])
                for W, bias in ((a["W_Q"], a["b_Q"]), (a["_W_K"], a["_b_K"]), (a["_W_V"], a["_b_V"])):
                    _fold_into(W, bias, w, b, 1, center)
            elif reader[0] == "mlp":
                m = layer_weights.mlp(new, reader[1])
                for W, bias in ((m["W_in"], m["b_in"]), (m["W_gate"], m["b_gate"])):
                    if W is not None:
                        _fold_into(W, bias, w, b, 0, center)
            else:
                W_U, b_U = unembedding(new)
                _fold_into(W_U, b_U if plan.unembed_bias else None, w, b, 0, center)
        module = new.hf_model.get_submodule(path)
        if getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0 if form == "weight" else 0.0)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()


def _center_writing(new) -> None:
    W_E = embedding(new)
    W_E.sub_(W_E.mean(-1, keepdim=True))
    try:
        W_pos = layer_weights.positional_embedding(new)
    except AttributeError:
        W_pos = None
    if W_pos is not None:
        W_pos.sub_(W_pos.mean(-1, keepdim=True))
    for layer in range(new.cfg.n_layers):
        a, m = layer_weights.attention(new, layer), layer_weights.mlp(new, layer)
        for W, bias in ((a["W_O"], a["b_O"]), (m["W_out"], m["b_out"])):
            W.sub_(W.mean(-1, keepdim=True))
            bias.sub_(bias.mean())  # a bias the model lacks reads as fresh zeros: their mean is 0


def _fold_value_biases(new) -> None:
    for layer in range(new.cfg.n_layers):
        a = layer_weights.attention(new, layer)
        if not bool(a["_b_V"].any()):
            continue
        a["b_O"].add_(torch.einsum("hd,hdm->m", a["b_V"], a["W_O"]))
        a["_b_V"].zero_()
