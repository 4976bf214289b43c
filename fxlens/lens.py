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
               padding_side: str = "right"):
    """Logits of each layer's residual stream: [n_layers + 1, batch, pos, vocab], or with ``top_k`` the
    pair (values, indices) [n_layers + 1, batch, pos, top_k]. ``pos`` selects positions as
    TransformerLens' ``pos_slice`` (an int drops the axis). ``tokens``: text, a list of texts or ids."""
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
        values, indices = [], []
        for stream in resid:
            logits = to_logits(positions.apply(stream, dim=1))
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
