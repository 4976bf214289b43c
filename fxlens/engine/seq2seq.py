"""``Seq2SeqModel``: an encoder-decoder (T5, BART, Marian, Pegasus, ...) with TransformerLens' entry points.

Problem: an encoder-decoder reads two token sequences. TransformerLens' ``HookedEncoderDecoder`` takes
``model(input, decoder_input, return_type, one_zero_attention_mask)``; its sites are
``encoder.{i}.*`` and ``decoder.{i}.*`` (and ``decoder.{i}.cross_attn.*``). Every fxlens entry point
(``run_with_cache``, ``run_with_hooks``, ``run_with_interventions``, the patching sweeps) must take the
decoder's input too, and size each site from its own stack's length.

Mechanism: ``fxlens.Model(hf_model)`` of a model whose config says ``is_encoder_decoder`` is a
``Seq2SeqModel``; the capture and the site table come from ``graphs/seq2seq.py``. Each call checks both
inputs (``engine/inputs.py``), packs them into one feed, and runs the base Model's code on it.
Sweeps (``patching.generic_activation_patch``) run as exact whole-model rows: the corrupted input is
tiled once per patch, each patch one masked edit, a chunk of patches one forward (the layer-by-layer
row engine runs one stack; this is said once per capture).

Example::

    model = fxlens.Model(t5)                                  # a Seq2SeqModel
    logits = model(src_ids, decoder_input=tgt_ids)            # [batch, decoder pos, vocab]
    logits, cache = model.run_with_cache(src_ids, tgt_ids)
    cache["decoder.1.cross_attn.hook_pattern"]                # [batch, head, decoder pos, encoder pos]
    patching.get_act_patch_resid_pre(model, src_ids, cache, metric, decoder_input=tgt_ids)   # decoder layers x pos

Gotchas: without ``decoder_input`` the decoder reads one ``decoder_start_token_id`` per row (as HF's
generate starts). Whisper takes ``input_features`` [batch, mel bins, frames] in place of tokens. ``model.cfg.n_layers`` is the decoder's; ``model.cfg.n_encoder_layers`` the encoder's.
Circuits, path patching and attribution are not offered for encoder-decoders yet.
"""

from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from ..graphs.seq2seq import feed_of
from ..graphs.sites import SiteError
from ..passes.intervene import set_to
from .inputs import InputError
from .inputs import feed as checked_feed
from .model import Model, lm_loss
from .plan import PlanBuilder
from .rows.readout import scalar
from .rows.schedule import row_bytes

__all__ = ["Seq2SeqModel", "activation_patch"]


class _Feed(dict):
    """Both stacks' checked inputs, handed through the base Model's code as its ``input``."""


class Seq2SeqModel(Model):
    """A captured encoder-decoder. See the module docstring."""

    is_encoder_decoder = True

    def __init__(self, hf_model, tokenizer=None, **kwargs):
        super().__init__(hf_model, tokenizer, **kwargs)
        self.cfg.n_encoder_layers = self.graph.dims.get("n_encoder_layers")

    def _follow(self, change):
        derived = super()._follow(change)
        self.cfg.n_encoder_layers = derived.graph.dims.get("n_encoder_layers")  # a fresh capture makes a fresh cfg
        return derived

    # ---- inputs ---------------------------------------------------------------------------------
    def _feed(self, input, decoder_input=None, attention_mask=None, decoder_attention_mask=None, *, prepend_bos=None,
              padding_side="right") -> _Feed:
        if isinstance(input, _Feed):
            return input
        self.derived
        common = dict(tokens=self._tok, device=self.captured.device, vocab=self.cfg.d_vocab, takes_mask=True,
                      model_name=type(self.hf_model).__name__, padding_side=padding_side)
        if self.captured.source == "input_features":
            enc = {"input_ids": self._features(input, attention_mask)}
        else:
            enc = checked_feed(input, attention_mask, n_ctx=self.cfg.n_ctx, prepend_bos=self._bos(prepend_bos), **common)
        if decoder_input is None:
            start = self.captured.decoder_start_token_id
            if start is None:
                raise InputError(f"give decoder_input: {type(self.hf_model).__name__}'s config names no decoder_start_token_id")
            decoder_input = torch.full((enc["input_ids"].shape[0], 1), int(start), dtype=torch.long)
        dec = checked_feed(decoder_input, decoder_attention_mask, n_ctx=None, prepend_bos=False, **common)
        if dec["input_ids"].shape[0] != enc["input_ids"].shape[0]:
            raise InputError(f"the decoder input has {dec['input_ids'].shape[0]} rows and the encoder input "
                             f"{enc['input_ids'].shape[0]}: give one decoder sequence per source sequence")
        if self.captured.source == "input_features":
            out = _Feed(input_features=enc["input_ids"], decoder_input_ids=dec["input_ids"], decoder_attention_mask=dec["attention_mask"])
        else:
            out = _Feed(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], decoder_input_ids=dec["input_ids"],
                        decoder_attention_mask=dec["attention_mask"])
        return _Feed(feed_of(self.captured, out))

    def _features(self, value, attention_mask) -> torch.Tensor:
        """Whisper-style ``input_features`` [batch, mel bins, frames], checked: the encoder reads a fixed size."""
        name = type(self.hf_model).__name__
        want = self.captured.feature_shape
        if attention_mask is not None:
            raise InputError(f"{name}'s encoder reads input_features without a mask; drop attention_mask")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise InputError(f"{name} reads input_features: a float tensor [batch, {want[0]}, {want[1]}] (log-mel frames, "
                             f"as its feature extractor makes them); got {type(value).__name__}"
                             + (f" of dtype {value.dtype}" if isinstance(value, torch.Tensor) else ""))
        if value.dim() == 2:
            value = value.unsqueeze(0)
        if value.dim() != 3 or tuple(value.shape[1:]) != tuple(want) or value.shape[0] == 0:
            raise InputError(f"{name} reads input_features of shape [batch, {want[0]}, {want[1]}]; got {tuple(value.shape)} "
                             "(pad or cut the audio's frames to that length, as its feature extractor does)")
        if not bool(torch.isfinite(value).all()):
            raise InputError("input_features holds NaN or infinite values")
        return value.to(self.captured.device, self.captured.dtype)

    def _inputs(self, value, attention_mask=None, prepend_bos: bool | None = None, padding_side: str = "right") -> dict:
        self.derived
        if isinstance(value, _Feed):
            return dict(value)
        # only the entry points of this class hand over both stacks' inputs; anything else was written for
        # one token sequence and would run the decoder on a start token alone
        raise NotImplementedError(
            f"{type(self.hf_model).__name__} is an encoder-decoder; this function takes one token sequence and is not "
            "offered for encoder-decoders yet. Encoder-decoders offer model(tokens, decoder_input), run_with_cache, "
            "run_with_hooks, run_with_interventions and fxlens.patching sweeps (with decoder_input=...)."
        )

    @staticmethod
    def _mask(attention_mask, one_zero_attention_mask):
        if attention_mask is not None and one_zero_attention_mask is not None:
            raise ValueError("give attention_mask or one_zero_attention_mask (the same thing), not both")
        return attention_mask if attention_mask is not None else one_zero_attention_mask

    def _outputs(self, out: dict, feed: dict, return_type):
        if return_type in ("loss", "both"):
            logits = super()._outputs(out, feed, "logits")
            loss = lm_loss(logits, feed["decoder_input_ids"], feed.get("decoder_attention_mask"))
            return loss if return_type == "loss" else (logits, loss)
        return super()._outputs(out, feed, return_type)

    # ---- running --------------------------------------------------------------------------------
    def __call__(self, input, decoder_input=None, return_type="logits", one_zero_attention_mask=None, *,
                 attention_mask=None, decoder_attention_mask=None, prepend_bos: bool | None = None, padding_side: str = "right"):
        """Logits [batch, decoder pos, vocab] (``return_type``: "logits", "loss" (next-token loss on the
        decoder input), "both" or None), as TransformerLens' ``HookedEncoderDecoder.forward``."""
        feed = self._feed(input, decoder_input, self._mask(attention_mask, one_zero_attention_mask), decoder_attention_mask,
                          prepend_bos=prepend_bos, padding_side=padding_side)
        return super().__call__(feed, return_type=return_type)

    forward = __call__

    def run_with_cache(self, input, decoder_input=None, *, attention_mask=None, one_zero_attention_mask=None,
                       decoder_attention_mask=None, prepend_bos: bool | None = None, padding_side: str = "right", **kwargs):
        """``(logits, ActivationCache)``; ``kwargs`` as ``Model.run_with_cache`` (``stop_at_layer`` counts decoder layers)."""
        feed = self._feed(input, decoder_input, self._mask(attention_mask, one_zero_attention_mask), decoder_attention_mask,
                          prepend_bos=prepend_bos, padding_side=padding_side)
        return super().run_with_cache(feed, **kwargs)

    def run_with_hooks(self, input, decoder_input=None, *, attention_mask=None, one_zero_attention_mask=None,
                       decoder_attention_mask=None, prepend_bos: bool | None = None, padding_side: str = "right", **kwargs):
        """As ``Model.run_with_hooks`` (``fwd_hooks=[(name, fn)]``), with the decoder's input."""
        feed = self._feed(input, decoder_input, self._mask(attention_mask, one_zero_attention_mask), decoder_attention_mask,
                          prepend_bos=prepend_bos, padding_side=padding_side)
        return super().run_with_hooks(feed, **kwargs)

    def run_with_interventions(self, input, interventions, decoder_input=None, *, attention_mask=None,
                               one_zero_attention_mask=None, decoder_attention_mask=None, names_filter=None,
                               return_type="logits", compile: bool = False, prepend_bos: bool | None = None,
                               padding_side: str = "right"):
        """As ``Model.run_with_interventions``; each site is sized from its own stack's length."""
        feed = dict(self._feed(input, decoder_input, self._mask(attention_mask, one_zero_attention_mask),
                               decoder_attention_mask, prepend_bos=prepend_bos, padding_side=padding_side))
        batch = feed["decoder_input_ids"].shape[0]
        return self._intervened(feed, interventions, batch, _lengths(feed), names_filter, return_type, compile)

    def _unsupported(self, what: str):
        raise NotImplementedError(f"{what} is not offered for encoder-decoders yet; activation patching "
                                  "(fxlens.patching), run_with_cache, run_with_hooks and run_with_interventions are")

    def run_with_circuit(self, *args, **kwargs):
        self._unsupported("run_with_circuit")

    def run_with_edges(self, *args, **kwargs):
        self._unsupported("run_with_edges")

    def __repr__(self) -> str:
        c = self.cfg
        return (f"fxlens.Seq2SeqModel({type(self.hf_model).__name__}: {c.n_encoder_layers} encoder and {c.n_layers} "
                f"decoder layers, d_model={c.d_model}, heads={c.n_heads}, {len(self.site_table)} sites, "
                f"attention={c.attn_implementation})")


def _lengths(feed: dict) -> tuple[int, int]:
    """(encoder length, decoder length); a fixed-size encoder input (Whisper) says None for the encoder."""
    enc = feed["input_ids"].shape[1] if "input_ids" in feed else None
    return enc, feed["decoder_input_ids"].shape[1]


# ---- activation patching -------------------------------------------------------------------------
def activation_patch(model: Seq2SeqModel, corrupted_tokens, clean_cache, metric, patch_setter, activation_name: str,
                     index_axis_names=None, index_df=None, return_index_df=False, *, attention_mask=None,
                     decoder_input=None, decoder_attention_mask=None, stack: str = "decoder", axes=None, grid=None,
                     make_df=None, memory_budget: float = 1.0, progress: bool = False):
    """``patching.generic_activation_patch`` on an encoder-decoder: the sites are ``{stack}.{layer}.*``,
    "pos" is that stack's positions; exact whole-model rows (see the module docstring), as many per
    forward as ``memory_budget`` (GiB) allows."""
    if stack not in ("encoder", "decoder"):
        raise ValueError(f"stack must be 'encoder' or 'decoder'; got {stack!r}")
    if model.persistent_hooks:
        from .rows.rows import RowError

        raise RowError("this model has hooks kept with add_hook, which sweeps would run without: call model.reset_hooks() "
                       "first, or express the edit as an intervention")
    feed = dict(model._feed(corrupted_tokens, decoder_input, attention_mask, decoder_attention_mask))
    batch = feed["decoder_input_ids"].shape[0]
    lengths = _lengths(feed)
    seq = lengths[1]
    if stack == "encoder":
        seq = lengths[0] if lengths[0] is not None else model.captured.seq_symbol
    n_layers = model.cfg.n_encoder_layers if stack == "encoder" else model.cfg.n_layers
    heads = model.cfg.n_heads
    ranges = {"layer": n_layers, "pos": seq, "head_index": heads, "head": heads, "src_pos": seq, "dest_pos": seq}
    table = model.site_table
    first = table._sites.get(table.get_act_name(activation_name, 0, stack))
    if first is not None:  # the grid's sizes from the site itself: a cross-attention's keys run over the encoder
        shape = model.graph.shape(first, batch, lengths)
        for key, axis in (("pos", "pos"), ("head_index", "head"), ("head", "head"), ("dest_pos", "query_pos"), ("src_pos", "key_pos")):
            if axis in first.axes:
                ranges[key] = shape[first.axes.index(axis)]
    rows, shape, flat = grid(ranges, index_axis_names, index_df)
    name = lambda layer: table.get_act_name(activation_name, layer, stack)  # noqa: E731
    for row in rows:
        if not 0 <= row[0] < n_layers:
            raise IndexError(f"layer {row[0]} is out of range: the {stack} has layers 0..{n_layers - 1}")
    _tell_once(model)
    with torch.no_grad():
        if axes is None:
            out = _hooked_loop(model, feed, clean_cache, metric, patch_setter, name, rows)
        else:
            cells = []
            for row in rows:
                site = table[name(row[0])]
                if len(row) - 1 != len(axes):
                    raise ValueError(f"{patch_setter.__name__} takes indices (layer, {', '.join(axes)}); got {row}")
                want = model.graph.shape(site, batch, lengths)
                for a, v in zip(axes, row[1:]):
                    size = want[site.axes.index(a)]
                    if not 0 <= v < size:
                        raise IndexError(f"index {v} on axis {a} of {site.name} is out of range 0..{size - 1}")
                cells.append((site, tuple(zip(axes, row[1:])), want))
            out = _run_rows(model, feed, cells, clean_cache, metric, _max_rows(model, feed, memory_budget), progress)
    out = out if flat else out.view(*shape)
    if return_index_df:
        return out, (index_df if index_df is not None else make_df(shape, index_axis_names))
    return out


def _tell_once(model) -> None:
    told = model.derived.item("seq2seq_whole_rows", list)
    if not told:
        told.append(True)
        warnings.warn("sweeps on encoder-decoders run as exact whole-model forwards (a chunk of patches per forward); the "
                      "batched layer-by-layer engine runs one stack only", RuntimeWarning, stacklevel=4)


def _clean_value(clean_cache, site, want):
    try:
        value = clean_cache[site.name]
    except Exception:  # noqa: BLE001 - re-raised with the site's name
        raise SiteError(f"the clean cache holds no value for {site.name}; run_with_cache it on the clean tokens") from None
    if tuple(value.shape) != tuple(want):
        raise ValueError(f"the clean value of {site.name} has shape {tuple(value.shape)}; the corrupted run needs {tuple(want)}")
    return value


_MAX_ROWS = 32  # more patches per forward stop paying off on a CPU (whole-model rows: no shared prefix)


def _max_rows(model, feed: dict, memory_budget: float) -> int:
    """Patches per forward within ``memory_budget``: each is a whole-model row of both stacks, full logits."""
    batch, dec = feed["decoder_input_ids"].shape
    enc = feed["input_ids"].shape[1] if "input_ids" in feed else dec
    element = torch.empty((), dtype=model.captured.dtype).element_size()
    dims = model.graph.dims
    per_row = row_bytes(dims, element, dec, 0, batch, False) + row_bytes(dims, element, enc, 0, batch, True)
    per_row += sum(v.numel() * v.element_size() for v in feed.values() if isinstance(v, torch.Tensor))
    return max(1, min(_MAX_ROWS, int(memory_budget * 2**30) // per_row))


def _run_rows(model, feed: dict, cells: list, clean_cache, metric, max_rows: int, progress: bool = False) -> torch.Tensor:
    batch = feed["decoder_input_ids"].shape[0]
    device, dtype = model.captured.device, model.captured.dtype
    out = []
    bar = tqdm(total=len(cells), desc="patching", disable=not progress, leave=False)
    for first in range(0, len(cells), max_rows):
        chunk = cells[first : first + max_rows]
        n = len(chunk)
        by_site: dict = {}
        for r, (site, index, want) in enumerate(chunk):
            by_site.setdefault(site.name, (site, want, []))[2].append((r, index))
        b = PlanBuilder(model.graph)
        for site, want, entries in by_site.values():
            value = _clean_value(clean_cache, site, want).to(device, dtype)
            mask = torch.zeros((n * batch,) + tuple(want[1:]), dtype=torch.bool)
            for r, index in entries:
                where = [slice(r * batch, (r + 1) * batch)] + [slice(None)] * (len(want) - 1)
                for a, v in index:
                    where[site.axes.index(a)] = slice(v, v + 1)
                mask[tuple(where)] = True
            b.edit(site, set_to, (value.repeat(n, *([1] * (value.dim() - 1))),), mask.to(device))
        plan, inputs = b.build()
        tiled = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in feed.items()}
        logits = model._logits(model.programs.get(plan)(**tiled, **inputs))
        out += [scalar(metric(logits[k * batch : (k + 1) * batch])).float().cpu() for k in range(n)]
        bar.update(n)
    bar.close()
    model.last_sweep_stats = {"forwards": -(-len(cells) // max_rows), "rows_per_forward": min(max_rows, len(cells))}
    return torch.stack(out) if out else torch.empty(0)


def _hooked_loop(model, feed, clean_cache, metric, setter, name, rows) -> torch.Tensor:
    """TransformerLens' algorithm for a patch setter fxlens cannot batch: one hooked forward per row."""
    out = []
    for row in rows:
        site = name(row[0])
        clean = clean_cache[site]

        def hook(value, hook, index=row, clean=clean):
            return setter(value.clone(), list(index), clean)

        logits = model.run_with_hooks(_Feed(feed), fwd_hooks=[(site, hook)])
        out.append(scalar(metric(logits)).float())
    return torch.stack(out)
