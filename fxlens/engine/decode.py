"""Generation steps with a key/value cache: the prompt once, then one token per step through the blocks.

Problem: generating n tokens by re-running the whole sequence costs n forwards of a growing sequence.
A decode step needs only the new token's computation, attending to the keys and values of every earlier
position; the same interventions and hooks must act on it, at the same absolute positions.

Mechanism: the sweep engine's pieces already run "positions ``start..`` of a sequence, given the keys
and values before ``start``": the prelude computes the positional context (masks, rotary tables,
learned positions) and the embeddings of the whole sequence (cheap: no layer runs), and each block is
its own program (``rows.Blocks``) fed the new positions' residual, the context sliced to them
(``Blocks.feed``) and a key/value prefix (``passes.kv_prefix``). A ``Decoder`` keeps each attention's
keys and values in a static cache (``kv_prefix.KVBuffer``, preallocated for the whole generation): the
prompt's, read from its block calls (``passes.Read``), start it, and each step's new keys are written
into it in place where the attention joins them to the prefix. The plan of
a decode step is the same at every step (its tensors are graph inputs), so each block's program is
built once and reused, compiled when asked (dynamic shapes: the prefix grows).

Interventions are lowered for the whole sequence (``interventions.prepare``), so ``pos`` means absolute
positions; their tensors and masks are sliced to the new positions before they join the block call.
Hooks see the values of the new positions only, as TransformerLens' hooks do with its key/value cache.

Example::

    dec = Decoder.for_model(model, interventions, fwd_hooks)     # or a reason it cannot be used
    logits = dec.step(ids, mask)            # prompt: [batch, vocab] of the last position
    logits = dec.step(ids_plus_one, mask)   # one more token, from the cache

Gotchas: a model whose blocks mix positions outside attention (state-space, linear attention), a
bidirectional model, hooks or interventions outside the blocks (embeddings, final norm), and an
ablation by the mean over real tokens (it reads every position) cannot decode from a cache;
``reason`` says which, and generation recomputes the sequence at each step instead (exact).
"""

from __future__ import annotations

import torch

from ..passes import Read
from ..passes.kv_prefix import KVBuffer
from .interventions import _real_token_mean, prepare
from .plan import PlanBuilder

__all__ = ["Decoder", "cache_reason", "NoCache"]


class NoCache(RuntimeError):
    """This generation cannot decode from a key/value cache (the message says why)."""


_QUERY_AXES = ("pos", "query_pos")


def cache_reason(model, interventions, hooks) -> str | None:
    """Why ``model`` with these interventions and hooks ([(site, fn)]) cannot decode from a key/value
    cache, or None when it can."""
    from .rows.blocks import Blocks

    if not model.captured.is_causal:
        return "the model is not causal"
    if model.graph.mixes_outside_attention:
        return "its blocks mix positions outside attention (a running state, not keys and values)"
    try:
        blocks = Blocks.of(model._active)
    except Exception as err:  # noqa: BLE001 - the reason is reported; the exact recompute runs instead
        return f"its blocks cannot run separately ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if any(uses is None for uses in blocks.kv_uses):
        return "a block has no attention keys and values to cache"
    why = _suffix_verdict(model)
    if why:
        return f"a step from cached keys and values would not be exact ({why})"
    for site in [model.site_table[spec.site] for spec in interventions] + [site for site, _ in hooks]:
        if _block_of(blocks, site) is None:
            return f"an intervention or hook at {site.name} acts outside the blocks"
    return None


def _suffix_verdict(model) -> str | None:
    """The row engine's check (``rows/exactness.py``) that a block run on later positions alone, with the
    earlier positions' keys and values given, reproduces its full run, as a cached decode step runs it:
    the verdict of an earlier sweep, or one found now on a short probe of token ids 1..6."""
    from .rows.engine import RowEngine

    verdict = model.derived.item("suffix_exact", list)
    if not verdict:
        vocab = model.cfg.d_vocab or 2
        ids = (torch.arange(1, 7) % vocab).unsqueeze(0)
        try:
            RowEngine(model).base(model._inputs(ids, None))
        except Exception:  # noqa: BLE001 - no probe on this model: the decoder's own checks stand
            return None
    return verdict[0] if verdict else None


def _block_of(blocks, site) -> int | None:
    """The block whose program holds ``site``'s node, or None."""
    if site.layer is None or not 0 <= site.layer < blocks.n_layers:
        return None
    names = {n.name for n in blocks.programs[site.layer].base.graph.nodes}
    node = site.rewrite[1] if site.rewrite is not None else site.node  # a rewrite's node is made from its target
    return site.layer if node in names else None


def _narrow(t, axes: tuple, start: int, full: int):
    """``t`` (broadcastable to a site with ``axes``, sized for ``full`` positions) from position ``start``."""
    if not isinstance(t, torch.Tensor) or not start:
        return t
    offset = len(axes) - t.dim()
    for axis in _QUERY_AXES:
        if axis in axes:
            i = axes.index(axis) - offset
            if i >= 0 and t.shape[i] == full:
                t = t.narrow(i, start, full - start)
    return t


class Decoder:
    """The key/value cache of one generation and the step that extends it."""

    def __init__(self, model, interventions, hooks, compile: bool = False, cache_sites=(), capacity: int = 0):
        from .rows.blocks import Blocks

        self.model = model
        self.blocks = Blocks.of(model._active)
        self.interventions = list(interventions)
        self.hooks = list(hooks)  # [(site, fn)]
        self.compile = compile
        self.cache_sites = list(cache_sites)
        self.kv: list = [None] * self.blocks.n_layers  # per layer (keys, values) as KVBuffers after the prompt
        self.capacity = capacity  # positions to preallocate the buffers for (they grow when passed)
        self.seen = 0  # positions whose keys and values are cached
        self.values: dict = {}  # site name -> list of per-step values (cache_sites)
        self._plain: dict = {}  # (layer, with a prefix) -> (plan, names of its prefix inputs) for blocks nothing edits

    def step(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Logits [batch, vocab] of the last position of ``ids``, computing only positions not yet seen."""
        blocks, start = self.blocks, self.seen
        batch, full = ids.shape
        feed = {"input_ids": ids}
        if "attention_mask" in self.model.captured.inputs:
            feed["attention_mask"] = mask if mask is not None else torch.ones_like(ids)
        pre = blocks.prelude(**feed)
        context = pre["context"]
        sliced = {c: blocks.context(c, v, start, 1) for c, v in context.items()}  # once for every block
        items = prepare(self.interventions, self.model, batch, full, feed.get("attention_mask")).items
        if any(fn is _real_token_mean for _, fn, _, _ in items):
            raise NoCache("an ablation by the mean over real tokens reads every position")
        h = pre["outputs"]["hidden"][:, start:]
        busy = {site.layer for site, _ in self.hooks} | {site.layer for site, *_ in items} | {s.layer for s in self.cache_sites}

        for layer in range(blocks.n_layers):
            plain = (layer, bool(start))
            if plain in self._plain:  # no hook, edit or cache here: the same plan every step, fed the cache
                plan, names = self._plain[plain]
                out = blocks.call(layer, plan, blocks.feed(layer, h, sliced), dict(zip(names, self.kv[layer] or ())),
                                  self.compile)
                self._keep(layer, dict(out.get("cache", {})))
                h = out["outputs"]["hidden"]
                continue
            b = PlanBuilder(blocks.graph)
            (k_op, k_use), (v_op, v_use) = blocks.kv_uses[layer]
            if self.kv[layer] is not None:  # the attention reads the cache before the new positions' keys
                b.kv_prefix([(k_op, k_use, self.kv[layer][0]), (v_op, v_use, self.kv[layer][1])])
            for site, fn in self.hooks:
                if site.layer == layer:
                    b.hook(site, fn, _point(site))
            for site, fn, inputs, m in items:
                if site.layer == layer:
                    b.edit(site, fn, tuple(_narrow(x, site.axes, start, full) for x in inputs),
                           _narrow(m, site.axes, start, full))
            # the prompt's keys and values start the cache; later steps write theirs into it (KVBuffer)
            reads = [Read("fxl_k", k_op), Read("fxl_v", v_op)] if self.kv[layer] is None else []
            b.cache([s for s in self.cache_sites if s.layer == layer], reads=reads)
            plan, inputs = b.build()
            if layer not in busy:
                self._plain[plain] = (plan, list(inputs))  # the prefix's keys and values, in that order, or nothing
            out = blocks.call(layer, plan, blocks.feed(layer, h, sliced), inputs, self.compile)
            cache = dict(out.get("cache", {}))
            self._keep(layer, cache)
            for name, value in cache.items():
                self.values.setdefault(name, []).append(value)
            h = out["outputs"]["hidden"]
        if start:
            for k, v in self.kv:
                k.advance(full - start)
                v.advance(full - start)
        self.seen = full
        head = {blocks.seg.head_input: h[:, -1:]}
        for c in blocks.seg.head_context:
            head[c] = blocks.context(c, context[c], full - 1, 1)
        return self.model._logits(blocks.head.get(())(**head))[:, -1]

    def _keep(self, layer: int, cache: dict) -> None:
        """After the prompt's block call: its keys and values start this layer's static cache."""
        if self.kv[layer] is None:
            k, v = cache.pop("fxl_k"), cache.pop("fxl_v")
            self.kv[layer] = (KVBuffer(k, self.capacity), KVBuffer(v, self.capacity))

    def cached(self) -> dict:
        """{site name: value over every position run}: per-step values joined along the positions (a key
        axis, which grows, is zero-filled for the keys a position could not see)."""
        out = {}
        for site in self.cache_sites:
            parts = self.values.get(site.name, [])
            if not parts:
                continue
            axes = site.axes
            q = next((axes.index(a) for a in _QUERY_AXES if a in axes), None)
            if "key_pos" in axes:
                k = axes.index("key_pos")
                n = parts[-1].shape[k]
                parts = [torch.nn.functional.pad(p, [0, 0] * (p.dim() - 1 - k) + [0, n - p.shape[k]]) for p in parts]
            out[site.name] = parts[0] if q is None else torch.cat(parts, dim=q)
        return out


def _point(site):
    from .model import HookPoint

    return HookPoint(site.name, site.layer)
