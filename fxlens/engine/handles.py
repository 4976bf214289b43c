"""Thin handles for reading weights as TransformerLens' module tree names them.

Problem: TransformerLens code reads ``model.blocks[3].attn.W_Q``, ``model.blocks[3].ln1.w``,
``model.embed.W_E``, ``model.unembed.W_U``, ``model.ln_final.w``. fxlens has no module tree of its own
(the HF model is run as a captured graph), and copying weights into one would break "an edit to the HF
parameter shows".

Mechanism: each handle holds the Model and a layer index and reads on access: attention and MLP weights
from ``engine.layer_weights`` (views of the HF parameters), norms from the tensors the Model computes
with (``Binding.current``: the HF parameter, or a ``with_weight_edits`` copy's). A norm's ``w`` and
``b`` are its effective scale and shift (``norm(x) = normalized(x) * w + b``), checked once per norm
against the HF module on a probe input: the parameter itself for ``x * weight``, ``1 + weight``
(computed) for Gemma's ``x * (1 + weight)``.

Example::

    model.blocks[0].attn.W_Q.shape       # [n_heads, d_model, d_head], a view of the q projection
    model.blocks[0].ln1.w                # the norm's weight parameter
    model.blocks[-1].mlp.W_out           # [d_mlp, d_model]

Gotchas: a handle is not an ``nn.Module``: it holds no parameters and has no forward; use the HF model
(``model.hf_model``) for module-level surgery. A norm whose output is not ``normalized(x) * w + b`` (a
norm with a learned per-group scale, or an unknown form) raises AttributeError when ``w`` is read.
"""

from __future__ import annotations

import torch

from . import layer_weights
from .layer_weights import ATTN_NAMES, MLP_NAMES

__all__ = ["Blocks", "BlockHandle", "AttnHandle", "MlpHandle", "NormHandle", "EmbedHandle", "UnembedHandle",
           "norm_affine", "NormFormError"]


class NormFormError(AttributeError):
    pass


def _reader(group: str, name: str):
    def get(self):
        return getattr(layer_weights, group)(self._model, self._layer)[name]

    get.__name__ = name
    get.__doc__ = f"``{name}`` of this block (see ``fxlens.engine.layer_weights``)."
    return property(get)


class AttnHandle:
    """``blocks[i].attn``: W_Q, W_K, W_V [head, d_model, d_head], W_O [head, d_head, d_model], biases, OV, QK."""

    def __init__(self, model, layer: int):
        self._model, self._layer = model, layer

    @property
    def OV(self):
        from ..factored import FactoredMatrix

        w = layer_weights.attention(self._model, self._layer)
        return FactoredMatrix(w["W_V"], w["W_O"])

    @property
    def QK(self):
        from ..factored import FactoredMatrix

        w = layer_weights.attention(self._model, self._layer)
        return FactoredMatrix(w["W_Q"], w["W_K"].transpose(-2, -1))

    def __repr__(self) -> str:
        return f"<attention weights of block {self._layer}>"


class MlpHandle:
    """``blocks[i].mlp``: W_in, W_gate [d_model, d_mlp], W_out [d_mlp, d_model], b_in, b_out."""

    def __init__(self, model, layer: int):
        self._model, self._layer = model, layer

    def __repr__(self) -> str:
        return f"<MLP weights of block {self._layer}>"


for _name in ATTN_NAMES:
    setattr(AttnHandle, _name, _reader("attention", _name))
for _name in MLP_NAMES:
    setattr(MlpHandle, _name, _reader("mlp", _name))


class NormHandle:
    """A norm's effective scale ``w`` and shift ``b`` (zeros for RMSNorm), and its HF ``path``."""

    def __init__(self, model, path: str | None, what: str):
        self._model, self.path, self._what = model, path, what

    def _affine(self):
        if self.path is None:
            raise AttributeError(f"{self._what}: the model has no such norm")
        return norm_affine(self._model, self.path)

    @property
    def w(self) -> torch.Tensor:
        return self._affine()[0]

    @property
    def b(self) -> torch.Tensor:
        return self._affine()[1]

    @property
    def kind(self) -> str:
        """"layernorm" or "rms"."""
        return self._affine()[2]

    def __repr__(self) -> str:
        return f"<norm {self.path}>"


class BlockHandle:
    """``model.blocks[i]``: ``attn``, ``mlp``, ``ln1``, ``ln2``."""

    def __init__(self, model, layer: int):
        self._model, self._layer = model, layer
        self.attn = AttnHandle(model, layer)
        self.mlp = MlpHandle(model, layer)
        block = model.derived.graph.structure.blocks[layer]
        attn_norm = block.attn.norm if block.attn is not None else None
        mlp_norm = block.mlp.norm if block.mlp is not None else None
        self.ln1 = NormHandle(model, attn_norm, f"blocks.{layer}.ln1")
        self.ln2 = NormHandle(model, mlp_norm if mlp_norm != attn_norm else None, f"blocks.{layer}.ln2")

    def __repr__(self) -> str:
        return f"<block {self._layer} of {self._model!r}>"


class Blocks:
    """``model.blocks``: a sequence of ``BlockHandle`` (negative indices count from the end)."""

    def __init__(self, model):
        self._model = model

    def __len__(self) -> int:
        return self._model.cfg.n_layers

    def __getitem__(self, i):
        n = len(self)
        if isinstance(i, slice):
            return [self[j] for j in range(n)[i]]
        if not -n <= i < n:
            raise IndexError(f"block {i} is out of range for a model of {n} blocks")
        return BlockHandle(self._model, i % n)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class EmbedHandle:
    """``model.embed``: ``W_E`` [d_vocab, d_model]; ``model.pos_embed``: ``W_pos``."""

    def __init__(self, model):
        self._model = model

    @property
    def W_E(self) -> torch.Tensor:
        return self._model.W_E

    @property
    def W_pos(self) -> torch.Tensor:
        return layer_weights.positional_embedding(self._model)


class UnembedHandle:
    """``model.unembed``: ``W_U`` [d_model, d_vocab_out], ``b_U``."""

    def __init__(self, model):
        self._model = model

    @property
    def W_U(self) -> torch.Tensor:
        return self._model.W_U

    @property
    def b_U(self) -> torch.Tensor:
        return self._model.b_U


def norm_affine(model, path: str) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    """(w, b, kind, form) of the norm module at ``path``: ``norm(x) = normalized(x) * w + b``; ``form`` is
    "weight" (w is the parameter) or "one_plus" (w = 1 + the parameter, computed). Checked on a probe input."""
    derived = model.derived
    norm = derived.graph.norms.get(path)
    if norm is None:
        raise NormFormError(f"{path} is not a norm fxlens recognises")
    form = derived.item(("norm_form", path), lambda: _probe_form(model, path, norm.kind))
    if isinstance(form, str) and form.startswith("!"):
        raise NormFormError(form[1:])
    binding = derived.binding
    weight = binding.current(f"{path}.weight") if f"{path}.weight" in binding.paths else None
    bias = binding.current(f"{path}.bias") if f"{path}.bias" in binding.paths else None
    d = model.cfg.d_model
    if weight is None:
        weight = torch.ones(d, dtype=model.cfg.dtype, device=model.cfg.device)
    w = weight if form == "weight" else 1 + weight
    b = bias if bias is not None else torch.zeros(d, dtype=w.dtype, device=w.device)
    return w, b, norm.kind, form


def _probe_form(model, path: str, kind: str) -> str:
    module = model.hf_model.get_submodule(path)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    eps = next((getattr(module, a) for a in ("eps", "variance_epsilon", "epsilon") if isinstance(getattr(module, a, None), float)), None)
    if eps is None:
        return f"!{path}: no epsilon found on the norm module ({type(module).__name__})"
    d = model.cfg.d_model
    p = next(iter(module.parameters()), None)
    dtype = p.dtype if p is not None else model.cfg.dtype
    device = p.device if p is not None else model.cfg.device  # its own device (a model spread over devices)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(dtype=dtype, device=device)
    with torch.no_grad():
        try:
            y = module(x)
        except Exception as err:  # noqa: BLE001 - a norm that does not take [n, d_model] alone is not one we can fold
            return f"!{path} ({type(module).__name__}) cannot be probed on its own ({type(err).__name__}: {err})"
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            return f"!{path} ({type(module).__name__}) does not map [n, d_model] to [n, d_model]"
        y = y.float()
        xf = x.float()
        if kind == "layernorm":
            xf = xf - xf.mean(-1, keepdim=True)
        normalized = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        w = weight.float() if weight is not None else torch.ones(d)
        b = bias.float() if bias is not None else torch.zeros(d)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for form, scale in (("weight", w), ("one_plus", 1 + w)):
            if (normalized * scale + b - y).abs().max() <= tol * max(1.0, float(y.abs().max())):
                return form
    return f"!{path} ({type(module).__name__}) does not compute normalized(x) * weight + bias, nor * (1 + weight)"
