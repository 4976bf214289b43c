"""Logit lens: what the model would predict if the residual stream stopped after each layer.

Problem: the logit lens (nostalgebraist 2020) reads each layer's residual stream through the model's own
final norm and unembedding. Done by hand it needs one run per layer or a loop of hooks, and on
RMSNorm models people forget the norm's weight; on Gemma 2 the soft-capping.

Mechanism: one run caches ``resid_pre`` of every layer and the stream after the last block (the
components of ``cache.accumulated_resid()``); each is then put through the captured graph's own head,
the nodes from the last residual to the logits (``engine.component_maps.head``), so the norm, its
weight and bias, the unembedding and any scaling or soft-capping are the model's. The last layer's
lens is the model's logits.

Example::

    lens = fxlens.lens.logit_lens(model, "The Eiffel Tower is in the city of", pos=-1)   # [layer, batch, vocab]
    values, indices = fxlens.lens.logit_lens(model, tokens, top_k=5)                     # [layer, batch, pos, 5]

Tuned-lens-style readouts: ``translators=`` applies a map to each layer's stream before the head (a
trained translator, or an affine ``(A, b)`` pair applied as ``x + x @ A + b``).

Gotchas: layer index ``i`` is the stream entering block ``i`` (0: the embeddings) and index
``n_layers`` the stream after the last block: ``n_layers + 1`` rows, as ``accumulated_resid``. The full
tensor is ``(n_layers + 1) * batch * pos * vocab`` floats: pass ``pos`` or ``top_k`` for large vocabularies.
"""

from __future__ import annotations

import torch

from .engine.component_maps import head
from .engine.slices import Slice

__all__ = ["logit_lens"]


def logit_lens(model, tokens, *, top_k: int | None = None, pos=None, attention_mask=None, prepend_bos: bool | None = None,
               padding_side: str = "right", translators=None):
    """Logits of each layer's residual stream: [n_layers + 1, batch, pos, vocab], or with ``top_k`` the
    pair (values, indices) [n_layers + 1, batch, pos, top_k]. ``pos`` selects positions as
    TransformerLens' ``pos_slice`` (an int drops the axis). ``tokens``: text, a list of texts or ids.

    ``translators`` (tuned-lens-style readouts): one map per row of the result (``n_layers + 1`` of them,
    or a dict {layer: map} for some rows), each applied to that layer's residual stream before the model's
    head: a callable ``[..., d_model] -> [..., d_model]``, an ``nn.Module`` (a trained translator), or an
    ``(A, b)`` pair meaning ``x + x @ A + b`` (the tuned lens' residual affine form). ``None`` entries keep
    the plain logit lens for that layer."""
    n = model.cfg.n_layers
    names = [model.get_act_name("resid_pre", i) for i in range(n)] + [model.get_act_name("resid_post", n - 1)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask, names_filter=names, return_type=None,
                                        prepend_bos=prepend_bos, padding_side=padding_side)
        resid = cache.accumulated_resid()  # [n + 1, batch, pos, d_model]
        positions = Slice(pos)
        one = positions.mode == "int"
        if one:
            positions = Slice([positions.slice])  # the head reads [batch, pos, d_model]: keep the axis until the end
        to_logits = head(model)
        maps = _translators(translators, resid.shape[0])
        values, indices = [], []
        for stream, translate in zip(resid, maps):
            stream = positions.apply(stream, dim=1)
            logits = to_logits(stream if translate is None else _translated(translate, stream))
            logits = logits[:, 0] if one else logits
            if top_k is None:
                values.append(logits)
            else:
                top = logits.topk(top_k, dim=-1)
                values.append(top.values)
                indices.append(top.indices)
    if top_k is None:
        return torch.stack(values)
    return torch.stack(values), torch.stack(indices)


def _translators(translators, n: int) -> list:
    """One map (or None) per row of the lens."""
    if translators is None:
        return [None] * n
    if isinstance(translators, dict):
        bad = [k for k in translators if not (isinstance(k, int) and -n <= k < n)]
        if bad:
            raise ValueError(f"translators has layer {bad[0]!r}; the lens has rows 0..{n - 1} (the stream entering each block, then the last)")
        return [translators.get(i, translators.get(i - n)) for i in range(n)]
    maps = list(translators)
    if len(maps) != n:
        raise ValueError(f"translators has {len(maps)} maps; the lens has {n} rows (n_layers + 1): give one per row "
                         "(None keeps the plain lens) or a dict {layer: map}")
    return maps


def _translated(translate, x: torch.Tensor) -> torch.Tensor:
    if isinstance(translate, (tuple, list)) and len(translate) == 2:
        A, b = (torch.as_tensor(t, dtype=x.dtype, device=x.device) for t in translate)
        return x + x @ A + b
    if not callable(translate):
        raise TypeError(f"a translator is a callable, an nn.Module or an (A, b) pair; got {type(translate).__name__}")
    out = translate(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise ValueError(f"a translator must map [..., d_model] to the same shape; it returned "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return out
