"""Read and replace canonical sites with plain hooks on the HF model: a reference built without fxlens.

What it is: for each family (GPT-2, Llama and its GQA variants, GPT-NeoX, OPT, BERT/RoBERTa/ELECTRA
with any head), a table of which HF module holds each canonical site (``blocks.{i}.hook_resid_pre``,
``hook_resid_mid``, ``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``, ``attn.hook_z``,
``attn.hook_q|k|v``) and how to view it in TransformerLens' layout; and one forward that installs
``register_forward_hook`` / ``register_forward_pre_hook(with_kwargs=True)`` hooks reading and
replacing those values.

Problem: fxlens' sweeps and interventions were checked against fxlens' own hook path; a bug shared by
both cannot show there. These hooks know nothing of fxlens' graph, so they are the reference.

Mechanism (module paths relative to one decoder/encoder layer):
- ``resid_pre``: the layer's input, via a forward-pre-hook on the layer.
- ``attn_out``: output[0] of the attention module (BERT-like: the output of ``attention.output.dense``,
  before dropout and the post-attention LayerNorm).
- ``mlp_out``: the MLP module's output (OPT: ``fc2``, which HF runs on [batch * pos, d];
  BERT-like: ``output.dense``).
- ``resid_mid`` (not for parallel blocks): pre-norm families have no module holding it, so it is read as
  ``resid_pre + attn_out`` and replaced by giving the attention module output ``new_mid - resid_pre``
  (the residual add then rebuilds ``new_mid`` up to one rounding); BERT-like: the input of
  ``attention.output.LayerNorm``.
- ``resid_post``: the layer's output (BERT-like: the input of ``output.LayerNorm``, since the layer
  output is the normalised residual).
- ``z``: the input of the attention output projection viewed [batch, pos, head, d_head].
- ``q``/``k``/``v``: projection outputs viewed [batch, pos, head, d_head] (k, v with the KV heads). GPT-2's
  fused ``c_attn`` is [q | k | v] along features; GPT-NeoX's ``query_key_value`` is viewed
  [batch, pos, head, 3 * d_head] and split per head (``modeling_gpt_neox.py``). OPT's q is the
  projection before HF multiplies it by ``d_head ** -0.5``.

Example::

    logits, cache = hf_forward(hf, ids, mask, replace={"blocks.1.hook_resid_pre": lambda v: v * 0}, read=["blocks.1.attn.hook_z"])
    hf_cache(hf, ids, mask, ["blocks.0.attn.hook_q"])["blocks.0.attn.hook_q"]   # [batch, pos, head, d_head]

Gotchas: a replacement function gets a copy of the value and returns the new value (same shape);
cached values are those the model went on with (after any replacement at that site). Gradients flow
when the caller enables them (``grad=True``).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

_PRE_NORM = dict(parallel=False, bert=False)
# paths relative to the base model (hf.<base_model_prefix>) and to one layer
SPEC = {
    "gpt2": dict(_PRE_NORM, layers="h", attn="attn", mlp="mlp", o="attn.c_proj", qkv=("split", "attn.c_attn")),
    "llama": dict(_PRE_NORM, layers="layers", attn="self_attn", mlp="mlp", o="self_attn.o_proj",
                  qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "gpt_neox": dict(_PRE_NORM, parallel=True, layers="layers", attn="attention", mlp="mlp", o="attention.dense",
                     qkv=("neox", "attention.query_key_value")),
    "opt": dict(_PRE_NORM, layers="decoder.layers", attn="self_attn", mlp="fc2", o="self_attn.out_proj",
                qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "bert": dict(parallel=False, bert=True, layers="encoder.layer", attn="attention.output.dense", mlp="output.dense",
                 o="attention.output.dense", mid="attention.output.LayerNorm", post="output.LayerNorm",
                 qkv=("attention.self.query", "attention.self.key", "attention.self.value")),
}
SPEC["roberta"] = SPEC["electra"] = SPEC["bert"]
for _f in ("mistral", "qwen2"):
    SPEC[_f] = SPEC["llama"]

# in the order a layer computes them: hooks on one module apply in this order
KINDS = ("resid_pre", "q", "k", "v", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")
_NAME = re.compile(r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out|attn\.hook_[qkvz])$")


def name(kind: str, layer: int) -> str:
    """The canonical site name of ``kind`` (one of KINDS) at ``layer``."""
    return f"blocks.{layer}.attn.hook_{kind}" if kind in "qkvz" else f"blocks.{layer}.hook_{kind}"


def parse(site: str) -> tuple[int, str]:
    m = _NAME.match(site)
    if m is None:
        raise KeyError(f"hf_hooks has no reference for {site!r}; known kinds: {KINDS}")
    return int(m.group(1)), m.group(2).split("hook_")[-1]


def spec(hf) -> dict:
    return SPEC[hf.config.model_type]


def layer_paths(hf) -> list[str]:
    s = spec(hf)
    prefix = hf.base_model_prefix if hasattr(hf, hf.base_model_prefix) and hf.base_model_prefix else ""
    path = f"{prefix}.{s['layers']}" if prefix else s["layers"]
    n = len(hf.get_submodule(path))
    return [f"{path}.{i}" for i in range(n)]


def dims(hf) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, d_head)."""
    c = hf.config
    heads = c.num_attention_heads
    d_head = getattr(c, "head_dim", None) or c.hidden_size // heads
    return heads, getattr(c, "num_key_value_heads", None) or heads, d_head


# ---- per-site views: (module, "pre" | "out", get(value) -> site value, put(value, new) -> module value) ----


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, new):
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


def _as_bpd(b, p):
    """A [batch, pos, ...] view of a module value (OPT's MLP runs on [batch * pos, d])."""
    return lambda x: x.reshape(b, p, -1), lambda x, new: new.reshape(x.shape)


def _heads(b, p, h, dh):
    return lambda x: x.reshape(b, p, h, dh), lambda x, new: new.reshape(x.shape)


def _fused(b, p, h, dh, which, kind):
    """q/k/v out of a fused projection: GPT-2 [q | k | v] on features, NeoX per head [q | k | v]."""
    i = "qkv".index(which)
    if kind == "split":
        get = lambda x: x[..., i * h * dh:(i + 1) * h * dh].reshape(b, p, h, dh)  # noqa: E731

        def put(x, new):
            parts = list(x.split(h * dh, dim=-1))
            parts[i] = new.reshape(b, p, h * dh)
            return torch.cat(parts, dim=-1)
    else:
        get = lambda x: x.view(b, p, h, 3 * dh)[..., i * dh:(i + 1) * dh]  # noqa: E731

        def put(x, new):
            parts = list(x.view(b, p, h, 3 * dh).split(dh, dim=-1))
            parts[i] = new
            return torch.cat(parts, dim=-1).reshape(x.shape)
    return get, put


class _Run:
    """State of one hooked forward: the layer inputs seen, what to replace, what to record."""

    def __init__(self, hf, ids, replace, read):
        self.hf, self.replace, self.read = hf, dict(replace), set(read)
        self.b, self.p = ids.shape
        self.s = spec(hf)
        self.layers = layer_paths(hf)
        self.layer_input = {}
        self.cache = {}
        # module path -> "pre"/"out" -> list of (site, get, put) in the order they apply
        self.hooks = defaultdict(lambda: defaultdict(list))
        for site in sorted(set(self.replace) | self.read, key=lambda n: (parse(n)[0], KINDS.index(parse(n)[1]))):
            self._place(site)
        for path in self.layers:  # every layer input is kept: resid_mid needs it
            self.hooks[path]["pre"]

    def _place(self, site):
        layer, kind = parse(site)
        L = self.layers[layer] + "."
        s, b, p = self.s, self.b, self.p
        h, kv, dh = dims(self.hf)
        ident = (lambda x: x, lambda x, new: new)
        if kind == "resid_pre":
            self.hooks[self.layers[layer]]["pre"].append((site, *ident))
        elif kind == "resid_post":
            if s["bert"]:
                self.hooks[L + s["post"]]["pre"].append((site, *ident))
            else:
                self.hooks[self.layers[layer]]["out"].append((site, *ident))
        elif kind == "resid_mid":
            if s["parallel"]:
                raise KeyError(f"{site}: a parallel block has no resid_mid")
            if s["bert"]:
                self.hooks[L + s["mid"]]["pre"].append((site, *ident))
            else:
                # attention output a -> resid_pre + a; a replacement gives back new - resid_pre
                pre = lambda: self.layer_input[layer]  # noqa: E731
                self.hooks[L + s["attn"]]["out"].append((site, lambda a: pre() + a, lambda a, new: new - pre()))
        elif kind == "attn_out":
            self.hooks[L + s["attn"]]["out"].append((site, *ident))
        elif kind == "mlp_out":
            self.hooks[L + s["mlp"]]["out"].append((site, *_as_bpd(b, p)))
        elif kind == "z":
            self.hooks[L + s["o"]]["pre"].append((site, *_heads(b, p, h, dh)))
        else:
            heads = h if kind == "q" else kv
            fused = s["qkv"][0] in ("split", "neox")
            path = s["qkv"][1] if fused else s["qkv"]["qkv".index(kind)]
            views = _fused(b, p, heads, dh, kind, s["qkv"][0]) if fused else _heads(b, p, heads, dh)
            self.hooks[L + path]["out"].append((site, *views))

    def _apply(self, entries, x):
        for site, get, put in entries:
            if site in self.replace:
                new = self.replace[site](get(x).clone())
                x = put(x, new)
            if site in self.read:
                self.cache[site] = get(x)
        return x

    def install(self):
        handles = []
        for path, where in self.hooks.items():
            module = self.hf.get_submodule(path)
            layer = self.layers.index(path) if path in self.layers else None
            if "pre" in where:
                handles.append(module.register_forward_pre_hook(self._pre(where["pre"], layer), with_kwargs=True))
            if "out" in where:
                handles.append(module.register_forward_hook(self._out(where["out"])))
        return handles

    def _pre(self, entries, layer):
        def hook(module, args, kwargs):
            if args:
                x = self._apply(entries, args[0])
                args = (x,) + tuple(args[1:])
            else:
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                x = self._apply(entries, kwargs[key])
                kwargs = dict(kwargs, **{key: x})
            if layer is not None:
                self.layer_input[layer] = x
            return args, kwargs

        return hook

    def _out(self, entries):
        def hook(module, args, out):
            return _with_first(out, self._apply(entries, _first(out)))

        return hook


def hf_forward(hf, ids, mask=None, replace=None, read=(), *, grad: bool = False):
    """(logits, {site: value}) of one HF forward with ``replace`` = {site: fn(value) -> value} applied."""
    run = _Run(hf, ids, replace or {}, read)
    handles = run.install()
    try:
        with torch.set_grad_enabled(grad):
            kwargs = {"input_ids": ids}
            if mask is not None:
                kwargs["attention_mask"] = mask
            out = hf(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits, run.cache


def hf_cache(hf, ids, mask, sites) -> dict:
    """{site: value} read with hooks on the plain HF forward."""
    return hf_forward(hf, ids, mask, read=sites)[1]


def hf_run(hf, ids, mask=None, replace=None) -> torch.Tensor:
    """Logits of the HF forward with ``replace`` = {site: fn(value) -> value} applied."""
    return hf_forward(hf, ids, mask, replace)[0]


def all_sites(hf) -> list[str]:
    """Every site this module has a reference for on ``hf``."""
    n, parallel = len(layer_paths(hf)), spec(hf)["parallel"]
    return [name(k, i) for i in range(n) for k in KINDS if not (parallel and k == "resid_mid")]


# ---- models whose patches matter ----------------------------------------------------------------

FAMILY_DIMS = {"gpt2": {}, "llama": {"n_kv_heads": 2}, "neox": {}, "opt": {}, "bert": {}}
WEIGHT_SCALE = 10.0
_PAIRS: dict = {}


def pair(family: str):
    """(hf_model, fxlens.Model) of ``families.make(family, **FAMILY_DIMS[family])`` with every matrix
    scaled by WEIGHT_SCALE (init std 0.02 -> 0.2), built once per session.

    At the default init a patch moves a logit difference by 1e-5 to 1e-3, too close to the 1e-5
    tolerance to tell a wrong cell from rounding; at std 0.2 the grids of these tests spread by 1e-2 to 1.
    """
    if family not in _PAIRS:
        import fxlens
        from families import make

        hf = make(family, **FAMILY_DIMS[family])
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() >= 2:
                    p.mul_(WEIGHT_SCALE)
        _PAIRS[family] = (hf, fxlens.Model.from_hf(hf))
    return _PAIRS[family]


# ---- shared by the tests that use this library --------------------------------------------------------

# each sweep of fxlens.patching -> (site kind, axes of the index after the layer, in the result's order)
SWEEPS = {
    "resid_pre": ("resid_pre", ("pos",)),
    "resid_mid": ("resid_mid", ("pos",)),
    "attn_out": ("attn_out", ("pos",)),
    "mlp_out": ("mlp_out", ("pos",)),
    "attn_head_out_by_pos": ("z", ("pos", "head")),
    "attn_head_q_by_pos": ("q", ("pos", "head")),
    "attn_head_k_by_pos": ("k", ("pos", "head")),
    "attn_head_v_by_pos": ("v", ("pos", "head")),
    "attn_head_out_all_pos": ("z", ("head",)),
    "attn_head_q_all_pos": ("q", ("head",)),
    "attn_head_k_all_pos": ("k", ("head",)),
    "attn_head_v_all_pos": ("v", ("head",)),
}


def padding_mask(ids: torch.Tensor, padding: str) -> torch.Tensor:
    """A mask for three rows with 6, 4 and 3 real tokens (of 6), padded on ``padding``'s side."""
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 4:] = 0
        mask[2, 3:] = 0
    else:
        mask[1, :2] = 0
        mask[2, :3] = 0
    return mask


def maxdiff(a, b) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()
