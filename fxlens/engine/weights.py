"""Weight edits: zero or replace a head's output weights, rank-one edits, reversibly or on a copy.

Problem: circuit hypotheses are often tested by editing weights (knock a head out, write a rank-one
update into an MLP as in ROME). The user's model must never change silently: an edit is either scoped
to a ``with`` block that restores every touched tensor, or made on a copy of just those tensors.

Mechanism: ``WeightEdits`` records edits as (parameter path, function of the tensor). ``with
model.edit_weights() as w:`` applies them in place as they are made (the captured graph shares the
HF model's parameters) and restores the saved originals on exit, exceptions included.
``model.with_weight_edits(fn)`` applies them to clones of the touched tensors inside a new
``fxlens.Model`` that shares everything else; the HF model is left as it was.

Example::

    with model.edit_weights() as w:
        w.zero_head(3, 5)                                   # head 5 of layer 3 writes nothing
        w.rank_one("model.layers.4.mlp.down_proj.weight", u, v, scale=0.1)
        logits = model(tokens)
    ablated = model.with_weight_edits(lambda w: w.zero_head(3, 5))   # a second model, same weights but one head
"""

from __future__ import annotations

import torch

from ..graphs.nodes import op_name

__all__ = ["WeightEdits", "WeightEditError"]


class WeightEditError(ValueError):
    pass


class WeightEdits:
    def __init__(self, model, *, in_place: bool):
        self.model = model
        self.in_place = in_place
        self._saved: dict = {}  # path -> original tensor (in-place mode)
        self._copies: dict = {}  # path -> edited clone (copy mode)

    # ---- lookup --------------------------------------------------------------------------------
    def parameter(self, path: str) -> torch.Tensor:
        module = self.model.captured.module
        try:
            value = module.get_parameter(path)
        except AttributeError:
            try:
                value = module.get_buffer(path)
            except AttributeError:
                names = [n for n, _ in module.named_parameters()]
                import difflib

                close = difflib.get_close_matches(path, names, n=3, cutoff=0.4)
                raise WeightEditError(f"no parameter {path!r} in this model. Closest: {', '.join(close) or 'none'}") from None
        return self._copies.get(path, value)

    def _edit(self, path: str, fn) -> None:
        current = self.parameter(path)
        with torch.no_grad():
            if self.in_place:
                if path not in self._saved:
                    self._saved[path] = current.detach().clone()
                current.copy_(fn(current.detach().clone()))
            else:
                self._copies[path] = torch.nn.Parameter(fn(current.detach().clone()), requires_grad=current.requires_grad)

    def _head_slice(self, layer: int, head: int):
        mg = self.model.graph
        if not 0 <= layer < mg.n_layers:
            raise WeightEditError(f"layer {layer} is out of range: this model has layers 0..{mg.n_layers - 1}")
        a = mg.attn[layer]
        if a is None:
            raise WeightEditError(f"layer {layer} has no attention heads fxlens can address")
        if not 0 <= head < a.n_heads:
            raise WeightEditError(f"head {head} is out of range: layer {layer} has heads 0..{a.n_heads - 1}")
        mm = mg.dg.node(a.o_matmul)
        name = op_name(mm)
        weight = mm.args[1] if name == "linear" else mm.args[2]
        if weight.op != "get_attr":
            raise WeightEditError(f"the output projection of layer {layer} does not read a parameter directly")
        cols = slice(head * a.d_head, (head + 1) * a.d_head)
        # nn.Linear holds [d_model, heads*d_head]; GPT-2's Conv1D holds [heads*d_head, d_model]
        index = (slice(None), cols) if name == "linear" else (cols, slice(None))
        return weight.target, index, name == "linear"

    # ---- edits ---------------------------------------------------------------------------------
    def zero_head(self, layer: int, head: int) -> "WeightEdits":
        """Zero the head's block of the output projection: the head writes nothing (the bias stays)."""
        path, index, _ = self._head_slice(layer, head)

        def fn(w):
            w[index] = 0
            return w

        self._edit(path, fn)
        return self

    def set_head_output(self, layer: int, head: int, weight: torch.Tensor) -> "WeightEdits":
        """Replace the head's W_O block with ``weight`` [d_head, d_model] (TransformerLens' orientation)."""
        path, index, transposed = self._head_slice(layer, head)
        a = self.model.graph.attn[layer]
        weight = torch.as_tensor(weight)
        want = (a.d_head, self.model.cfg.d_model)
        if tuple(weight.shape) != want:
            raise WeightEditError(f"set_head_output({layer}, {head}): weight has shape {tuple(weight.shape)}; expected {want} (d_head, d_model)")

        def fn(w):
            w[index] = (weight.t() if transposed else weight).to(w.dtype)
            return w

        self._edit(path, fn)
        return self

    def rank_one(self, path: str, u: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> "WeightEdits":
        """W += scale * outer(u, v) for the 2-D parameter at HF path ``path``."""
        w = self.parameter(path)
        u, v = torch.as_tensor(u).flatten(), torch.as_tensor(v).flatten()
        if w.dim() != 2 or (u.numel(), v.numel()) != tuple(w.shape):
            raise WeightEditError(
                f"rank_one({path!r}): u has {u.numel()} and v {v.numel()} entries; the parameter is {tuple(w.shape)}"
            )
        self._edit(path, lambda t: t + scale * torch.outer(u.to(t.dtype), v.to(t.dtype)))
        return self

    def set(self, path: str, value: torch.Tensor) -> "WeightEdits":
        """Replace the parameter at ``path`` with ``value`` (same shape)."""
        w = self.parameter(path)
        value = torch.as_tensor(value)
        if value.shape != w.shape:
            raise WeightEditError(f"set({path!r}): value has shape {tuple(value.shape)}; the parameter is {tuple(w.shape)}")
        self._edit(path, lambda t: value.to(t.dtype).clone())
        return self

    # ---- scoping -------------------------------------------------------------------------------
    def restore(self) -> None:
        with torch.no_grad():
            for path, original in self._saved.items():
                self.model.captured.module.get_parameter(path).copy_(original)
        self._saved.clear()

    def __enter__(self) -> "WeightEdits":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def build(self):
        """A new fxlens.Model whose edited tensors are the clones (copy mode); it derives its own programs."""
        src = self.model
        overrides = dict(src.derived.binding.overrides)
        overrides.update(self._copies)
        return src._with_derived(src.derived.rebound(overrides))
