"""Capture and analyse an encoder-decoder model (T5, BART, Marian, Pegasus, ...): two stacks, one graph.

Problem: an encoder-decoder reads two token sequences of different lengths (the source, read by the
encoder, and the decoder's input), runs two stacks of blocks, and its decoder blocks hold a third
branch, cross-attention, whose keys come from the encoder. The single-stack capture exports
``input_ids`` alone (T5 then has no decoder input; BART makes one with ``shift_tokens_right`` and
violates the sequence constraint), and the structure finder sees one list of blocks.

Mechanism:
- ``capture_seq2seq`` exports the model with ``input_ids``, ``attention_mask``, ``decoder_input_ids``
  and ``decoder_attention_mask`` as inputs, with one batch dimension and a sequence dimension of its
  own for each stack (``seq`` for the encoder, ``decoder_seq`` for the decoder), then rebuilds the
  graph as ``capture`` does. A self-check against the HF model on a fresh input (other lengths,
  padding in both masks) refuses a wrong capture.
- ``analyse_seq2seq`` runs the structure finder once per stack (``find_structure(within=...)``), names
  each stack's canonical sites with the single-stack site builder under TransformerLens'
  ``HookedEncoderDecoder`` names (``encoder.{i}.hook_resid_pre``, ``decoder.{i}.attn.hook_pattern``,
  ``decoder.{i}.hook_cross_attn_out``, ``decoder.{i}.hook_resid_mid_cross``,
  ``decoder.{i}.cross_attn.hook_pattern`` [batch, head, query_pos, key_pos] with keys over the
  encoder's positions, ``encoder_final_ln.*``, ``decoder_final_ln.*``) and adds every module's output
  under its HF path. ``Seq2SeqGraph.shape`` sizes a site from both lengths.

Example::

    cg = capture_seq2seq(hf_model)
    mg = analyse_seq2seq(cg)
    mg.sites["decoder.1.cross_attn.hook_pattern"]
    mg.shape(mg.sites["decoder.0.hook_resid_pre"], batch=2, seq=(7, 4))     # (2, 4, d_model)

Gotchas: ``structure`` (the decoder's) is what the single-stack engine sees; the layered-row engine
does not run two stacks, so sweeps run whole-model rows (``engine/seq2seq.py``). A site's "pos" axis
means its own stack's positions. Whisper's encoder reads ``input_features`` of a fixed size
(``num_mel_bins`` x ``2 * max_source_positions``): only the batch and the decoder's length vary, and the
encoder's fixed length stands for its "pos" axis. Other feature-reading models are refused. A per-head
rewrite finds its attention with ``Seq2SeqGraph.attention_of(site)`` (a layer index names several).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict

import sympy
import torch
import torch.fx as fx
from torch.fx.graph import CodeGen

from . import capture as _cap
from .attention import AttentionError, find_attention
from .capture import CapturedGraph, CaptureError
from .dataflow import DataGraph
from .functional import functionalize, is_mutation
from .layout import IDENTITY
from .mlp import find_mlp
from .moe import find_moe
from .module_sites import module_outputs
from .nodes import op_name
from .norms import find_norm
from .sites import SPLITTABLE_PROJECTIONS, rewritten, PATTERN_AXES, QKV_AXES, RESID_AXES, ModelGraph, Site, SiteError, SiteTable, _Builder, _dims, _plain
from .structure import StructureError, _module_nodes, _norm_modules, find_structure

__all__ = ["is_encoder_decoder", "capture_seq2seq", "analyse_seq2seq", "Seq2SeqCaptured", "Seq2SeqGraph", "STACKS"]

STACKS = ("encoder", "decoder")
_NOT_YET = "not offered for encoder-decoders yet (it needs a rewrite of a fused operation); read its inputs' sites instead"
_NO_CROSS_HEADS = "per-head cross-attention values are not offered yet; the cross-attention module's raw sites (its q, k, v, o projections) work"
FEED = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
FEATURES_FEED = ("input_features", "decoder_input_ids", "decoder_attention_mask")


def is_encoder_decoder(model) -> bool:
    """An encoder-decoder with both stacks: the config says so and the forward takes a decoder input
    (T5EncoderModel keeps T5's config but runs the encoder alone)."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or not hasattr(model, "forward"):
        return False
    return "decoder_input_ids" in _cap._accepted_kwargs(model)


@dataclasses.dataclass
class Seq2SeqCaptured(CapturedGraph):
    """A captured encoder-decoder: ``seq_symbol`` is the encoder's length, ``decoder_seq_symbol`` the decoder's."""

    decoder_seq_symbol: object = None
    decoder_start_token_id: int | None = None
    source: str = "input_ids"  # what the encoder reads: "input_ids", or "input_features" (Whisper)
    feature_shape: tuple | None = None  # (mel bins, frames) of input_features


# ---- capture -------------------------------------------------------------------------------------
class _Bound(torch.nn.Module):
    """Binds the fixed flags so that the export's inputs are the four token tensors only."""

    def __init__(self, inner, extra):
        super().__init__()
        self.inner = inner
        self.extra = extra

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                          decoder_attention_mask=decoder_attention_mask, **self.extra)


class _BoundFeatures(torch.nn.Module):
    """The same for an encoder that reads a fixed-size ``input_features`` (Whisper's log-mel frames)."""

    def __init__(self, inner, extra):
        super().__init__()
        self.inner = inner
        self.extra = extra

    def forward(self, input_features, decoder_input_ids, decoder_attention_mask):
        return self.inner(input_features=input_features, decoder_input_ids=decoder_input_ids,
                          decoder_attention_mask=decoder_attention_mask, **self.extra)


def _source(model, accepts: set) -> str:
    """What the encoder reads: "input_ids", or "input_features" of a fixed size (Whisper); anything else is refused."""
    name = type(model).__name__
    config = model.config
    if "decoder_input_ids" in accepts and "input_ids" in accepts:
        return "input_ids"
    if "decoder_input_ids" in accepts and "input_features" in accepts and _feature_shape(config) is not None:
        return "input_features"
    reads = next((k for k in ("input_features", "input_values", "pixel_values") if k in accepts), None)
    what = f"its encoder reads {reads} of a size fxlens cannot tell from the config" if reads else "its forward takes no input_ids and decoder_input_ids"
    raise CaptureError(
        f"{name} is an encoder-decoder that fxlens cannot capture: {what}. fxlens captures token-in encoder-decoders "
        "(T5, MT5, BART, mBART, Marian, Pegasus, ...) and Whisper-style ones (input_features of num_mel_bins x "
        "2 * max_source_positions frames). Wrap the model so that its forward takes input_ids, attention_mask, "
        "decoder_input_ids and decoder_attention_mask, or use its text decoder alone."
    )


def _feature_shape(config) -> tuple | None:
    """(mel bins, frames) of Whisper-style input features: the two convolutions halve the frames once."""
    mels, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    return (int(mels), 2 * int(positions)) if mels and positions else None


def _lengths(model) -> tuple[int, int]:
    """The largest encoder and decoder lengths the export may assume (one below the positions table:
    a constraint reaching ``max_position_embeddings`` inclusive fails to verify)."""
    config = getattr(model, "config", None)
    enc = getattr(config, "max_position_embeddings", None) or getattr(config, "max_source_positions", None) or 4096
    dec = getattr(config, "max_target_positions", None) or enc
    return max(int(enc) - 1, 8), max(int(dec) - 1, 8)


def _example(model, batch=2, enc=5, dec=7, seed=0, padded=False, source="input_ids"):
    config = model.config
    vocab = getattr(config, "vocab_size", None) or 2
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, enc), generator=g)
    dids = torch.randint(0, vocab, (batch, dec), generator=g)
    mask, dmask = torch.ones_like(ids), torch.ones_like(dids)
    if padded:
        mask[0, -2:] = 0
        dmask[-1, -1:] = 0
    if source == "input_features":
        feats = torch.randn((batch, *_feature_shape(config)), generator=g).to(param.dtype if param is not None else torch.float32)
        return {k: v.to(device) for k, v in zip(FEATURES_FEED, (feats, dids, dmask))}
    return {k: v.to(device) for k, v in zip(FEED, (ids, mask, dids, dmask))}


def capture_seq2seq(model: torch.nn.Module, *, attn_implementation: str | None = None) -> Seq2SeqCaptured:
    """Export an encoder-decoder with both token inputs (see the module docstring)."""
    _cap._check_devices(model)
    if _cap._several_devices(model):
        raise CaptureError(
            f"{type(model).__name__}'s weights live on several devices: encoder-decoders run on one device in fxlens "
            "for now (decoder-only models may be spread). Load it with device_map={'': 'cuda:0'}, or move it with .to(device)"
        )
    accepts = _cap._accepted_kwargs(model)
    source = _source(model, accepts)
    extra = {k: v for k, v in (("use_cache", False), ("return_dict", True)) if k in accepts}
    with _cap._borrowed(model, attn_implementation):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
        example = _example(model, source=source)
        max_enc, max_dec = _lengths(model)
        batch = torch.export.Dim("batch", min=1)
        seq = torch.export.Dim("seq", min=1, max=max_enc)
        dec = torch.export.Dim("decoder_seq", min=1, max=max_dec)
        if source == "input_features":  # a fixed number of frames: only the batch and the decoder's length vary
            bound, keys, shapes = _BoundFeatures(model, extra), FEATURES_FEED, ({0: batch}, {0: batch, 1: dec}, {0: batch, 1: dec})
        else:
            bound, keys = _Bound(model, extra), FEED
            shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: dec}, {0: batch, 1: dec})
        try:
            ep = torch.export.export(bound, tuple(example[k] for k in keys), dynamic_shapes=shapes, strict=False)
        except Exception as err:  # noqa: BLE001 - re-raised with an explanation
            explained = _cap._explain(model, err)
            raise CaptureError(
                f"{explained}\nAn encoder-decoder is exported with the encoder's and the decoder's lengths left free; "
                "families whose attention pads or splits the sequence into blocks or windows (LongT5, LED, Pegasus-X), or "
                "whose decoder predicts n-gram streams (ProphetNet), "
                "cannot be captured that way yet. Encoder-decoders that work: T5, MT5, UMT5, Switch Transformers, BART, "
                "mBART, Marian, Pegasus, Blenderbot, PLBart, M2M100, BigBird-Pegasus (attention_type='original_full'), Whisper."
            ) from err
        gm = ep.module()
        names = _cap._output_names(ep)
        graph, inputs = _cap._rebuild(gm, names)
        functionalize(graph)
        graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or is_mutation(n))
        graph.set_codegen(CodeGen())
        module = fx.GraphModule(gm, graph, class_name=f"Captured{type(model).__name__}")
        _cap._rename_attrs(module)
        syms = {}
        for node in module.graph.nodes:
            if node.op == "placeholder" and node.name in ("input_ids", "input_features", "decoder_input_ids"):
                syms[node.name] = [s.node.expr if isinstance(s, torch.SymInt) else s for s in node.meta["val"].shape]
        if "decoder_input_ids" not in syms:
            raise CaptureError(f"{type(model).__name__}: the captured graph does not read decoder_input_ids; fxlens cannot "
                               "tell its decoder's input apart. Please report this with the model's config.")
        param = next(iter(model.parameters()), None)
        if source == "input_features":
            # the encoder's length is fixed (frames / 2): that int stands for its "pos" axis
            syms["input_ids"] = [syms["input_features"][0], _feature_shape(model.config)[1] // 2]
        cg = Seq2SeqCaptured(
            module=module,
            inputs=tuple(inputs),
            outputs=tuple(graph.output_node().args[0]["outputs"].keys()),
            batch_symbol=syms["input_ids"][0],
            seq_symbol=syms["input_ids"][1],
            attn_implementation=impl,
            dtype=param.dtype if param is not None else torch.float32,
            device=param.device if param is not None else torch.device("cpu"),
            is_causal=False,  # the encoder reads every position
            decoder_seq_symbol=syms["decoder_input_ids"][1],
            decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
            source=source,
            feature_shape=_feature_shape(model.config) if source == "input_features" else None,
        )
        _self_check(model, cg, extra)
    return cg


def feed_of(cg: CapturedGraph, feed: dict) -> dict:
    """The entries of ``feed`` the captured program takes (an input the graph never reads is dropped)."""
    return {k: v for k, v in feed.items() if k in cg.inputs}


def _self_check(model, cg: Seq2SeqCaptured, extra: dict) -> None:
    """Refuse a graph that does not compute what the model computes on a fresh, padded input."""
    from .selfcheck import compare

    feed = _example(model, batch=3, enc=6, dec=4, seed=1, padded=True, source=cg.source)
    with torch.no_grad():
        reference = model(**feed, **extra)
        got = cg.module(**feed_of(cg, feed))["outputs"]
    mismatch = compare(got, reference, cg.dtype, length=feed["decoder_input_ids"].shape[1])
    if mismatch is not None:
        raise CaptureError(mismatch.describe(type(model).__name__))


# ---- analysis ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Seq2SeqGraph(ModelGraph):
    """A ModelGraph of both stacks. ``structure``, ``attn``, ``mlp`` are the decoder's (the stack that makes
    the logits); ``stacks[name]`` holds (structure, attn, mlp) for "encoder" and "decoder";
    ``cross[i]`` is decoder block i's cross-attention (an ``Attention``, or None)."""

    stacks: dict = None
    cross: list = None

    def attention_of(self, site: Site):
        """The ``Attention`` a per-head site belongs to (its stack's self-attention, or the cross-attention)."""
        return _attention_of(self, site)

    def shape(self, site: Site, batch: int, seq) -> tuple:
        """The site's shape for ``batch`` rows of ``seq`` = (encoder length, decoder length) tokens."""
        enc, dec = seq if isinstance(seq, tuple) else (seq, seq)
        cg = self.captured
        values = {cg.batch_symbol: batch, cg.decoder_seq_symbol: dec}
        if not isinstance(cg.seq_symbol, int):  # Whisper's encoder length is a fixed int
            values[cg.seq_symbol] = enc
        if site.rewrite is None:
            dims = _dims_of(self.dg.node(site.node))
        elif site.rewrite[0] == "expand_attention":  # [batch, head, query pos, key pos] from SDPA's q and k
            sdpa = self.dg.node(site.rewrite[1])
            q, k = _dims_of(sdpa.args[0]), _dims_of(sdpa.args[1])
            dims = (q[0], q[1], q[2], k[2])
        elif site.rewrite[0] == "decompose_norm":  # the norm's input; its scale has one entry per position
            dims = _dims_of(self.dg.node(site.rewrite[1]).args[0])
            dims = dims[:-1] + (1,) if site.kind == "scale" else dims
        elif site.rewrite[0] == "split_heads":  # [batch, pos, head, d_model] beside z [batch, pos, head, d_head]
            a = self.attention_of(site)
            z = a.z.layout.shape(_dims_of(self.dg.node(a.z.node)), cg.batch_symbol, None)
            dims = tuple(z[:3]) + (self.dims["d_model"],)
        else:
            raise SiteError(f"{site.name} needs a rewrite ({site.rewrite[0]}) that encoder-decoders do not offer yet")
        user = site.layout.shape(dims, cg.batch_symbol, None)
        return tuple(int(sympy.sympify(d).subs(values)) for d in user)


def _dims_of(node) -> tuple:
    return tuple((d.node.expr if isinstance(d, torch.SymInt) else d) for d in node.meta["val"].shape)


# rewrites whose pass needs nothing but the target node (per-head results look up the single-stack analysis)
_STACK_FREE_REWRITES = ("expand_attention", "decompose_norm", "split_heads")


def _attention_of(mg, site: Site):
    stack = site.name.split(".", 1)[0]
    if ".cross_attn." in site.name:
        return mg.cross[site.layer]
    return mg.stacks[stack][1][site.layer]


def _stack_of(path: str) -> str | None:
    parts = path.split(".")
    for stack in STACKS:
        if stack in parts:
            return stack
    return None


def _stack_prefix(path: str, stack: str) -> str:
    """The module path up to and including the stack's own name (``model.encoder``, ``encoder``)."""
    parts = path.split(".")
    return ".".join(parts[: parts.index(stack) + 1])


def _stack_roots(graph: fx.Graph) -> dict:
    """{"encoder": "model.encoder", "decoder": "model.decoder"}: where each stack's modules live."""
    roots = {}
    for path in _module_nodes(graph):
        stack = _stack_of(path)
        if stack is not None and stack not in roots:
            roots[stack] = _stack_prefix(path, stack)
    missing = [s for s in STACKS if s not in roots]
    if missing:
        raise StructureError(f"no {' and no '.join(missing)} stack found (a module named 'encoder'/'decoder')")
    return roots


def analyse_seq2seq(cg: Seq2SeqCaptured) -> Seq2SeqGraph:
    graph = cg.module.graph
    dg = DataGraph(graph)
    by_scope = _module_nodes(graph)
    roots = _stack_roots(graph)
    norms = {}
    for path in _norm_modules(by_scope):
        seq = cg.decoder_seq_symbol if _stack_of(path) == "decoder" else cg.seq_symbol
        norm = find_norm(dg, path, by_scope[path], (cg.batch_symbol, seq))
        if norm is not None:
            norms[path] = norm
    stacks, sites, left_out, cross = {}, [], {}, []
    for stack in STACKS:
        syms = (cg.batch_symbol, cg.decoder_seq_symbol if stack == "decoder" else cg.seq_symbol)
        st = find_structure(graph, dg, within=roots[stack])
        if stack == "encoder":
            st = dataclasses.replace(st, unembed=None, unembed_module=None)
        attns, mlps, moes = [], [], []
        for block in st.blocks:
            a = None
            if block.attn is not None:
                try:
                    a = find_attention(dg, block, block.attn, syms, norms)
                except AttentionError as err:
                    for suffix in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_attn_scores", "hook_pattern"):
                        left_out[f"{stack}.{block.index}.attn.{suffix}"] = f"attention not recognised ({_plain(err)})"
            moe = find_moe(dg, block.mlp, syms) if block.mlp is not None else None
            m = find_mlp(dg, block.mlp, syms) if block.mlp is not None and moe is None else None
            attns.append(a)
            mlps.append(m)
            moes.append(moe)
        builder = _Builder(dg, syms, st, attns, mlps, norms, None, moes)
        builder._canonical()
        rename = _Renamer(stack)
        for site in builder.sites:
            if site.rewrite is not None and site.rewrite[0] not in _STACK_FREE_REWRITES:
                left_out[rename(site.name)] = _NOT_YET
                continue
            sites.append(dataclasses.replace(site, name=rename(site.name)))
        left_out.update({rename(k): v for k, v in builder.left_out.items()})
        stacks[stack] = (st, attns, mlps)
        if stack == "decoder":
            cross = _cross_attention(dg, cg, st, norms, sites, left_out)
    taken = {s.name for s in sites}
    sites += _raw_sites(dg, cg, taken)
    order = {name: i for i, name in enumerate(dg.order)} if not isinstance(dg.order, dict) else dg.order
    sites.sort(key=lambda s: (order.get(s.rewrite[1], 0), 1) if s.rewrite else (order.get(s.node, 0), 0))
    table = SiteTable(OrderedDict((s.name, s) for s in sites), len(stacks["decoder"][0].blocks), left_out)
    table.get_act_name = _get_act_name(table)
    unexpected = sorted(k for k, why in left_out.items() if why not in (_NOT_YET, _NO_CROSS_HEADS))
    if unexpected:
        warnings.warn(f"{len(unexpected)} TransformerLens sites are not offered for this model (raw module sites still work): "
                      + "; ".join(f"{k}: {left_out[k]}" for k in unexpected[:6]) + (" ..." if len(unexpected) > 6 else ""),
                      stacklevel=2)
    st, attns, mlps = stacks["decoder"]
    dims = _dims(dg, (cg.batch_symbol, cg.decoder_seq_symbol), st, attns, mlps)
    dims["n_encoder_layers"] = len(stacks["encoder"][0].blocks)
    return Seq2SeqGraph(cg, dg, st, attns, mlps, norms, table, dims, stacks=stacks, cross=cross)


class _Renamer:
    """``blocks.{i}.x`` -> ``{stack}.{i}.x``; ``ln_final.x`` -> ``{stack}_final_ln.x``; ``hook_embed`` stays
    the encoder's (shared token embedding) and becomes ``decoder.hook_embed`` for the decoder."""

    def __init__(self, stack: str):
        self.stack = stack

    def __call__(self, name: str) -> str:
        if name.startswith("blocks."):
            return f"{self.stack}." + name[len("blocks."):]
        if name.startswith("ln_final."):
            return f"{self.stack}_final_ln." + name[len("ln_final."):]
        if self.stack == "decoder" and name.startswith("hook_"):
            return f"decoder.{name}"
        return name


def _cross_attention(dg, cg, st, norms, sites: list, left_out: dict) -> list:
    """Decoder blocks' cross-attention sites: ``hook_cross_attn_out``, ``hook_resid_mid_cross`` and
    ``cross_attn.hook_q|k|v|z|attn_scores|pattern`` (keys and values over the encoder's positions)."""
    out = []
    B, S, E = cg.batch_symbol, cg.decoder_seq_symbol, cg.seq_symbol
    for block in st.blocks:
        p = f"decoder.{block.index}."
        attn_branches = [br for br in block.branches if br.kind == "attn"]
        cross = attn_branches[1] if len(attn_branches) > 1 else None
        if cross is None:
            out.append(None)
            left_out[p + "hook_cross_attn_out"] = "no cross-attention branch found in this decoder block"
            continue
        sites.append(Site(p + "hook_cross_attn_out", cross.output, IDENTITY, RESID_AXES, block.index, "cross_attn_out"))
        mlp_junction = block.mlp.junction if block.mlp is not None else None
        if cross.junction != mlp_junction:
            sites.append(Site(p + "hook_resid_mid_cross", cross.junction, IDENTITY, RESID_AXES, block.index, "resid_mid_cross"))
        try:
            # the attention finder sees one "pos" symbol; here the keys run over the encoder's positions. No
            # rotary context: everything after the self-attention depends on the block's mask and positions
            a = find_attention(dg, dataclasses.replace(block, context=()), cross, (B, _Either(S, E)), norms)
        except AttentionError:
            a = None
        out.append(a)
        if a is not None and a.kind == "sdpa":  # computed from SDPA's own q and k when asked for
            rw = ("expand_attention", a.op)
            for suffix, part in (("hook_attn_scores", "scores"), ("hook_pattern", "pattern")):
                sites.append(Site(p + "cross_attn." + suffix, rewritten(*rw, part), IDENTITY, PATTERN_AXES, block.index,
                                  "cross_" + suffix[5:], rw))
        elif (pattern := _cross_pattern(dg, cross, (B, S, E))) is None:
            left_out[p + "cross_attn.hook_pattern"] = "no softmax over the encoder's positions found in the cross-attention"
        else:
            scores, weights = pattern
            sites.append(Site(p + "cross_attn.hook_attn_scores", scores, IDENTITY, PATTERN_AXES, block.index, "cross_attn_scores"))
            sites.append(Site(p + "cross_attn.hook_pattern", weights, IDENTITY, PATTERN_AXES, block.index, "cross_pattern"))
        want = {}
        if a is not None:
            d_qk = a.d_head_qk or a.d_head
            want = {
                "hook_q": (a.q, (B, S, a.n_heads, d_qk)),
                "hook_k": (a.k, (B, E, a.n_kv_heads, d_qk)),
                "hook_v": (a.v, (B, E, a.n_kv_heads, a.d_head)),
                "hook_z": (a.z, (B, S, a.n_heads, a.d_head)),
            }
        for suffix in ("hook_q", "hook_k", "hook_v", "hook_z"):
            name = p + "cross_attn." + suffix
            view, shape = want.get(suffix, (None, None))
            if view is None or _user_shape(dg, view, B) != shape:
                left_out[name] = _NO_CROSS_HEADS
                continue
            sites.append(Site(name, view.node, view.layout, QKV_AXES, block.index, "cross_" + suffix[5:]))
        if "hook_z" in want and p + "cross_attn.hook_z" not in left_out and op_name(dg.node(a.o_matmul)) in SPLITTABLE_PROJECTIONS:
            rw = ("split_heads", a.o_matmul)
            sites.append(Site(p + "cross_attn.hook_result", rewritten(*rw, "result"), IDENTITY, ("batch", "pos", "head", "d_model"),
                              block.index, "cross_result", rw, expensive=True))
    return out


class _Either:
    """Equal to either of two sympy symbols: the attention finder's "pos" for a cross-attention, whose
    queries run over the decoder's positions and keys over the encoder's. Every site it finds is then
    checked against the exact symbols (``_user_shape``)."""

    def __init__(self, *symbols):
        self.symbols = symbols

    def __eq__(self, other):
        return any(other == s for s in self.symbols)

    def __hash__(self):
        return hash(self.symbols)


def _user_shape(dg, view, batch) -> tuple | None:
    dims = tuple((d.node.expr if isinstance(d, torch.SymInt) else d) for d in dg.node(view.node).meta["val"].shape)
    try:
        return tuple(view.layout.shape(dims, batch, None))
    except (IndexError, TypeError):
        return None


def _cross_pattern(dg, branch, syms) -> tuple | None:
    """(scores node, pattern node) of a cross-attention branch: the softmax over the last axis whose
    value is [batch, head, decoder pos, encoder pos], and its input."""
    B, S, E = syms
    for name in dg.sorted(branch.nodes):
        node = dg.node(name)
        if op_name(node) not in ("softmax", "_softmax") or not node.all_input_nodes:
            continue
        dims = tuple((d.node.expr if isinstance(d, torch.SymInt) else d) for d in node.meta["val"].shape)
        if len(dims) == 4 and dims[0] == B and dims[2] == S and dims[3] == E:
            return node.all_input_nodes[0].name, node.name
    return None


def _raw_sites(dg, cg, taken) -> list:
    """Every module call's output under its HF path (``module_sites``), axes named from both lengths."""
    names = {cg.batch_symbol: "batch", cg.seq_symbol: "pos", cg.decoder_seq_symbol: "pos"}
    out = []
    for name, node_name in module_outputs(dg.graph, dg, taken):
        dims = [(d.node.expr if isinstance(d, torch.SymInt) else d) for d in dg.node(node_name).meta["val"].shape]
        axes = tuple(names.get(d, f"dim{i}") for i, d in enumerate(dims))
        out.append(Site(name, node_name, IDENTITY, axes, None, "module"))
    return out


_SHORT_CROSS = {"cross_attn_out": "hook_cross_attn_out", "resid_mid_cross": "hook_resid_mid_cross"}


def _get_act_name(table: SiteTable):
    """TransformerLens' ``get_act_name`` with a stack: ``("resid_pre", 1, "decoder")`` ->
    ``decoder.1.hook_resid_pre``; without a stack, the decoder's."""
    base = SiteTable.get_act_name.__get__(table)

    def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
        stack = "decoder"
        if layer_type in STACKS:
            stack, layer_type = layer_type, None
        if name in table and layer is None:
            return name
        if layer is None:
            return base(name, None, layer_type)
        if name in _SHORT_CROSS:
            return f"{stack}.{layer}.{_SHORT_CROSS[name]}"
        if name.startswith("cross_") and name[6:] in ("q", "k", "v", "z", "pattern", "attn_scores", "attn"):
            short = name[6:] if name[6:] != "attn" else "pattern"
            return f"{stack}.{layer}.cross_attn.hook_{short}"
        full = base(name, 0, layer_type)
        return f"{stack}.{layer}." + full[len("blocks.0."):]

    return get_act_name
