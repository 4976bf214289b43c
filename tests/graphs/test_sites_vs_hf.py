"""Canonical and raw sites equal eager references built from the HF model alone.

Every reference here comes from the HF model itself: ``output_hidden_states``, ``output_attentions`` on
an eager deep copy, and forward (pre-)hooks on HF modules whose paths are listed per family in
``SPEC``. Nothing from fxlens is used to build a reference, so these tests pin down the
TransformerLens meaning of each site independently of TransformerLens and of fxlens' own analysis.
All inputs carry padding (attention_mask with zeros at the end of two rows).
"""

import contextlib
import copy
import functools

import pytest
import torch
from conftest import cached_model
from families import FAMILIES, tokens

import fxlens

TOL = 1e-5

# Paths relative to one HF layer. ``qkv``: ("split", fused path) for GPT-2's c_attn, ("neox", path) for
# GPT-NeoX's query_key_value, or three separate projections. ``attn_out``/``mlp_out``: the module whose
# output (first element if a tuple) is what the block adds to the residual stream.
_LLAMA_LIKE = dict(
    layers="model.layers",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    o="self_attn.o_proj",
    act="mlp.act_fn",
    up="mlp.up_proj",
    down="mlp.down_proj",
    attn_out="self_attn",
    mlp_out="mlp",
    norms={"ln1": "input_layernorm", "ln2": "post_attention_layernorm"},
    final="model.norm",
    parallel=False,
)
_GEMMA2_LIKE = dict(
    _LLAMA_LIKE,
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    norms={
        "ln1": "input_layernorm",
        "ln1_post": "post_attention_layernorm",
        "ln2": "pre_feedforward_layernorm",
        "ln2_post": "post_feedforward_layernorm",
    },
)
SPEC = {
    "gpt2": dict(
        layers="transformer.h",
        qkv=("split", "attn.c_attn"),
        o="attn.c_proj",
        act="mlp.act",
        up=None,
        down="mlp.c_proj",
        attn_out="attn",
        mlp_out="mlp",
        norms={"ln1": "ln_1", "ln2": "ln_2"},
        final="transformer.ln_f",
        parallel=False,
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3": _GEMMA2_LIKE,
    "neox": dict(
        layers="gpt_neox.layers",
        qkv=("neox", "attention.query_key_value"),
        o="attention.dense",
        act="mlp.act",
        up=None,
        down="mlp.dense_4h_to_h",
        attn_out="attention",
        mlp_out="mlp",
        norms={"ln1": "input_layernorm", "ln2": "post_attention_layernorm"},
        final="gpt_neox.final_layer_norm",
        parallel=True,
    ),
    "opt": dict(
        layers="model.decoder.layers",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        o="self_attn.out_proj",
        act="activation_fn",
        up=None,
        down="fc2",
        attn_out="self_attn",
        mlp_out="fc2",
        norms={"ln1": "self_attn_layer_norm", "ln2": "final_layer_norm"},
        final="model.decoder.final_layer_norm",
        parallel=False,
    ),
    "phi": dict(
        layers="model.layers",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        o="self_attn.dense",
        act="mlp.activation_fn",
        up=None,
        down="mlp.fc2",
        attn_out="self_attn",
        mlp_out="mlp",
        norms={"ln1": "input_layernorm"},
        final="model.final_layernorm",
        parallel=True,
    ),
    "gptj": dict(
        layers="transformer.h",
        qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"),
        o="attn.out_proj",
        act="mlp.act",
        up=None,
        down="mlp.fc_out",
        attn_out="attn",
        mlp_out="mlp",
        norms={"ln1": "ln_1"},
        final="transformer.ln_f",
        parallel=True,
    ),
    "bert": dict(
        layers="bert.encoder.layer",
        qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
        o="attention.output.dense",
        act="intermediate.intermediate_act_fn",
        up=None,
        down="output.dense",
        attn_out="attention.output.dense",
        mlp_out="output.dense",
        norms={"ln1": "attention.output.LayerNorm", "ln2": "output.LayerNorm"},
        final=None,
        parallel=None,  # post-LN: checked in test_bert_post_ln_residual_sites
    ),
}
assert set(SPEC) == set(FAMILIES)


def padded_batch():
    """Three rows of 7 tokens; rows 1 and 2 end in padding (valid lengths 7, 5, 2)."""
    ids = tokens(3, 7)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return ids, mask


def assert_close(got, want, name, valid=None):
    """``got`` equals ``want`` to TOL; with ``valid`` ([batch, pos] bool), only at those positions."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if valid is not None:
        got, want = got[valid], want[valid]
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{name}: max diff {diff}"


def first(out):
    """A module's main output: the first element of a tuple or a ModelOutput."""
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    return out


@contextlib.contextmanager
def recording(hf, outputs=(), inputs=()):
    """Record each listed module's outputs and first inputs while the block runs."""
    modules = dict(hf.named_modules())
    outs, ins, handles = {}, {}, []

    def out_hook(path):
        return lambda mod, args, out: outs.setdefault(path, []).append(out)

    def in_hook(path):
        def hook(mod, args, kwargs):
            value = args[0] if args else next(iter(kwargs.values()))
            ins.setdefault(path, []).append(value)

        return hook

    try:
        for path in outputs:
            handles.append(modules[path].register_forward_hook(out_hook(path)))
        for path in inputs:
            handles.append(modules[path].register_forward_pre_hook(in_hook(path), with_kwargs=True))
        yield outs, ins
    finally:
        for h in handles:
            h.remove()


def norm_reference(module, x):
    """(hook_scale, hook_normalized) of a norm module from its input, by TransformerLens' formulas."""
    rms = "RMS" in type(module).__name__
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = module.variance_epsilon
    xc = x if rms else x - x.mean(-1, keepdim=True)
    scale = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return scale, xc / scale


def head_dim(hf):
    c = hf.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@functools.cache
def hf_reference(family):
    """Canonical site name -> value computed from HF module hooks on the padded batch."""
    hf, model = cached_model(family)
    s = SPEC[family]
    ids, mask = padded_batch()
    b, p = ids.shape
    dh = head_dim(hf)
    n = model.cfg.n_layers
    modules = dict(hf.named_modules())
    per_layer_out = [s["attn_out"], s["mlp_out"]] + ([s["up"]] if s["up"] else [])
    per_layer_out += [s["qkv"][1]] if s["qkv"][0] in ("split", "neox") else list(s["qkv"])
    per_layer_in = [s["o"], s["act"], s["down"], *s["norms"].values()]
    outputs = [f"{s['layers']}.{i}.{m}" for i in range(n) for m in per_layer_out]
    inputs = [f"{s['layers']}.{i}.{m}" for i in range(n) for m in per_layer_in] + ([s["final"]] if s["final"] else [])
    with recording(hf, outputs, inputs) as (outs, ins), torch.no_grad():
        res = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert all(len(v) == 1 for v in list(outs.values()) + list(ins.values()))
    out = {k: first(v[0]) for k, v in outs.items()}
    inp = {k: v[0] for k, v in ins.items()}

    ref = {}
    for i in range(n):
        L, B = f"{s['layers']}.{i}.", f"blocks.{i}."
        ref[B + "hook_resid_pre"] = res.hidden_states[i]
        ref[B + "attn.hook_z"] = inp[L + s["o"]].reshape(b, p, -1, dh)
        ref[B + "mlp.hook_pre"] = inp[L + s["act"]].reshape(b, p, -1)
        ref[B + "mlp.hook_post"] = inp[L + s["down"]].reshape(b, p, -1)
        if s["up"]:
            ref[B + "mlp.hook_pre_linear"] = out[L + s["up"]].reshape(b, p, -1)
        ref[B + "hook_attn_out"] = out[L + s["attn_out"]].reshape(b, p, -1)
        ref[B + "hook_mlp_out"] = out[L + s["mlp_out"]].reshape(b, p, -1)
        kind = s["qkv"][0]
        if kind == "split":
            q, k, v = out[L + s["qkv"][1]].chunk(3, dim=-1)
        elif kind == "neox":
            q, k, v = out[L + s["qkv"][1]].view(b, p, -1, 3 * dh).chunk(3, dim=-1)
        else:
            q, k, v = (out[L + m] for m in s["qkv"])
        for name, t in (("q", q), ("k", k), ("v", v)):
            ref[f"{B}attn.hook_{name}"] = t.reshape(b, p, -1, dh)
        for tag, path in s["norms"].items():
            scale, normalized = norm_reference(modules[L + path], inp[L + path])
            # OPT normalises its MLP input as [batch*pos, d]; the sites are [batch, pos, ...]
            ref[f"{B}{tag}.hook_scale"] = scale.reshape(b, p, 1)
            ref[f"{B}{tag}.hook_normalized"] = normalized.reshape(b, p, -1)
    if s["final"]:
        ref["ln_final.hook_scale"], ref["ln_final.hook_normalized"] = norm_reference(modules[s["final"]], inp[s["final"]])
        ref["final_norm_input"] = inp[s["final"]]
    ref["hidden_states"] = res.hidden_states
    return ref


@functools.cache
def fx_cache(family, attn_implementation=None):
    """fxlens' cache of every site (hook_result included) on the padded batch."""
    hf, model = cached_model(family)
    if attn_implementation is not None:
        model = fxlens.Model.from_hf(hf, attn_implementation=attn_implementation)
    ids, mask = padded_batch()
    _, cache = model.run_with_cache(ids, mask, names_filter=list(model.sites))
    return cache


def check_sites(family, suffixes):
    ref, cache = hf_reference(family), fx_cache(family)
    names = [k for k in ref if k.endswith(suffixes)]
    assert names, f"no reference for {suffixes}"
    for name in names:
        assert_close(cache[name], ref[name], name)
    return names


# ---- residual stream ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES + ("olmo", "roberta"))
def test_resid_pre_equals_hf_hidden_states(family):
    hf, model = cached_model(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    n = model.cfg.n_layers
    assert len(hidden) == n + 1
    _, cache = model.run_with_cache(ids, mask, names_filter=lambda name: name.endswith("hook_resid_pre"))
    assert len(cache) == n
    for i in range(n):
        assert_close(cache["resid_pre", i], hidden[i], f"resid_pre {i}")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "bert"])
def test_resid_post_equals_next_layer_input_and_final_norm_input(family):
    _, model = cached_model(family)
    ref, cache = hf_reference(family), fx_cache(family)
    n = model.cfg.n_layers
    for i in range(n - 1):
        assert_close(cache["resid_post", i], ref["hidden_states"][i + 1], f"resid_post {i}")
    assert_close(cache["resid_post", n - 1], ref["final_norm_input"], "final resid_post")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "bert"])
def test_resid_differences_equal_attn_out_and_mlp_out(family):
    _, model = cached_model(family)
    ref, cache = hf_reference(family), fx_cache(family)
    for i in range(model.cfg.n_layers):
        attn, mlp = ref[f"blocks.{i}.hook_attn_out"], ref[f"blocks.{i}.hook_mlp_out"]
        pre, post = cache["resid_pre", i], cache["resid_post", i]
        if SPEC[family]["parallel"]:
            assert f"blocks.{i}.hook_resid_mid" not in model.sites
            assert_close(post - pre, attn + mlp, f"resid_post - resid_pre {i}")
        else:
            mid = cache["resid_mid", i]
            assert_close(mid - pre, attn, f"resid_mid - resid_pre {i}")
            assert_close(post - mid, mlp, f"resid_post - resid_mid {i}")


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_out_and_mlp_out_equal_what_the_block_adds(family):
    check_sites(family, ("hook_attn_out", "hook_mlp_out"))


def test_bert_post_ln_residual_sites():
    hf, model = cached_model("bert")
    s, ref, cache = SPEC["bert"], hf_reference("bert"), fx_cache("bert")
    ids, mask = padded_batch()
    L = [f"{s['layers']}.{i}." for i in range(model.cfg.n_layers)]
    ln1 = [p + s["norms"]["ln1"] for p in L]
    ln2 = [p + s["norms"]["ln2"] for p in L]
    with recording(hf, outputs=ln1, inputs=ln1 + ln2) as (outs, ins), torch.no_grad():
        hf(input_ids=ids, attention_mask=mask)
    for i in range(model.cfg.n_layers):
        # resid_mid: residual + attention output, before attention.output.LayerNorm
        assert_close(cache["resid_mid", i], ins[ln1[i]][0], f"resid_mid {i}")
        assert_close(cache["resid_mid", i], cache["resid_pre", i] + ref[f"blocks.{i}.hook_attn_out"], f"resid_mid sum {i}")
        # resid_post: LN1 output + MLP output, before output.LayerNorm
        assert_close(cache["resid_post", i], ins[ln2[i]][0], f"resid_post {i}")
        assert_close(cache["resid_post", i], outs[ln1[i]][0] + ref[f"blocks.{i}.hook_mlp_out"], f"resid_post sum {i}")
        # the layer output is the normalised residual
        assert_close(cache[f"blocks.{i}.hook_normalized_resid_post"], ref["hidden_states"][i + 1], f"normalized_resid_post {i}")


# ---- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_z_equals_output_projection_input(family):
    check_sites(family, ("attn.hook_z",))


@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_equal_projection_outputs(family):
    names = check_sites(family, ("attn.hook_q", "attn.hook_k", "attn.hook_v"))
    assert len(names) == 3 * cached_model(family)[1].cfg.n_layers


def test_grouped_query_k_and_v_have_the_key_value_heads():
    hf, model = cached_model("llama", n_kv_heads=2)
    ids, mask = padded_batch()
    b, p = ids.shape
    attn = "model.layers.1.self_attn."
    with recording(hf, outputs=[attn + "q_proj", attn + "k_proj", attn + "v_proj"]) as (outs, _), torch.no_grad():
        hf(input_ids=ids, attention_mask=mask)
    _, cache = model.run_with_cache(ids, mask, names_filter=["blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v"])
    assert cache["q", 1].shape == (b, p, 4, 16)
    for name in "qkv":
        assert_close(cache[name, 1], outs[attn + f"{name}_proj"][0].view(b, p, -1, 16), name)
    assert cache["k", 1].shape == cache["v", 1].shape == (b, p, 2, 16)


def test_opt_q_is_the_unscaled_projection():
    hf, _ = cached_model("opt")
    ref, cache = hf_reference("opt"), fx_cache("opt")
    q = cache["q", 0]
    assert_close(q, ref["blocks.0.attn.hook_q"], "q")
    scaling = head_dim(hf) ** -0.5
    assert (q * scaling - ref["blocks.0.attn.hook_q"]).abs().max().item() > 1e-3


@functools.cache
def eager_attentions(family):
    hf, _ = cached_model(family)
    eager = copy.deepcopy(hf)
    eager.set_attn_implementation("eager")
    ids, mask = padded_batch()
    with torch.no_grad():
        return eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions


def query_rows(t):
    """Pattern-like [b, h, q, k] as [b, q, h, k] so that a [b, q] mask indexes query rows."""
    return t.transpose(1, 2)


@pytest.mark.parametrize(
    "family, attn_implementation",
    [(f, None) for f in FAMILIES + ("olmo", "roberta")] + [("llama", "eager"), ("gpt2", "eager")],
)
def test_pattern_equals_hf_eager_attentions(family, attn_implementation):
    hf, model = cached_model(family)
    if attn_implementation is not None:
        model = fxlens.Model.from_hf(hf, attn_implementation=attn_implementation)
        assert model.cfg.attn_implementation == attn_implementation
    ids, mask = padded_batch()
    want = eager_attentions(family)
    _, cache = model.run_with_cache(ids, mask, names_filter=lambda name: name.endswith("hook_pattern"))
    assert len(want) == len(cache) == model.cfg.n_layers
    for i, w in enumerate(want):
        assert_close(query_rows(cache["pattern", i]), query_rows(w), f"pattern {i}", mask.bool())


def rotary_reference(family, ref_q, ref_k):
    """(rot_q, rot_k) per layer: the family's apply_rotary_pos_emb on the reference q and k."""
    hf, model = cached_model(family)
    ids, mask = padded_batch()
    rotary = "model.rotary_emb"
    calls = {}

    def hook(mod, args, kwargs, out):
        layer_type = args[2] if len(args) > 2 else kwargs.get("layer_type")
        calls[layer_type] = out

    handle = dict(hf.named_modules())[rotary].register_forward_hook(hook, with_kwargs=True)
    norms = [f"model.layers.{i}.self_attn.{x}_norm" for i in range(model.cfg.n_layers) for x in "qk"] if family == "gemma3" else []
    try:
        with recording(hf, outputs=norms) as (outs, _), torch.no_grad():
            hf(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    if family == "gemma3":
        from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb
    else:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    out = []
    for i in range(model.cfg.n_layers):
        if family == "gemma3":
            # Gemma 3 normalises q and k per head ([batch, head, pos, d_head]) before the rotation
            q, k = outs[norms[2 * i]][0], outs[norms[2 * i + 1]][0]
            cos, sin = calls[hf.config.layer_types[i]]
        else:
            q, k = ref_q[i].transpose(1, 2), ref_k[i].transpose(1, 2)
            cos, sin = calls[None]
        rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
        out.append((rq.transpose(1, 2), rk.transpose(1, 2)))
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rot_q_and_rot_k_equal_hf_rotary_embedding(family):
    _, model = cached_model(family)
    ref, cache = hf_reference(family), fx_cache(family)
    n = model.cfg.n_layers
    rot = rotary_reference(family, [ref[f"blocks.{i}.attn.hook_q"] for i in range(n)], [ref[f"blocks.{i}.attn.hook_k"] for i in range(n)])
    for i, (rq, rk) in enumerate(rot):
        assert_close(cache["rot_q", i], rq, f"rot_q {i}")
        assert_close(cache["rot_k", i], rk, f"rot_k {i}")
        assert (rq - ref[f"blocks.{i}.attn.hook_q"]).abs().max().item() > 1e-3  # the rotation did something


@pytest.mark.parametrize("attn_implementation", [None, "eager"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attn_scores_are_scaled_qk_and_softmax_to_the_pattern(family, attn_implementation):
    hf, model = cached_model(family)
    if attn_implementation is not None:
        model = fxlens.Model.from_hf(hf, attn_implementation=attn_implementation)
    ref = hf_reference(family)
    ids, mask = padded_batch()
    n, dh = model.cfg.n_layers, head_dim(hf)
    _, cache = model.run_with_cache(ids, mask, names_filter=lambda name: name.endswith(("attn_scores", "hook_pattern")))
    if family == "llama":
        qs, ks = zip(*rotary_reference(family, [ref[f"blocks.{i}.attn.hook_q"] for i in range(n)], [ref[f"blocks.{i}.attn.hook_k"] for i in range(n)]))
    else:
        qs = [ref[f"blocks.{i}.attn.hook_q"] for i in range(n)]
        ks = [ref[f"blocks.{i}.attn.hook_k"] for i in range(n)]
    p = ids.shape[1]
    # unmasked: an unpadded query attending to an unpadded key at or before it
    unmasked = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :] & torch.ones(p, p, dtype=torch.bool).tril()
    for i in range(n):
        scores, pattern = cache["attn_scores", i], cache["pattern", i]
        assert scores.shape == pattern.shape == (ids.shape[0], model.cfg.n_heads, p, p)
        assert_close(query_rows(scores.softmax(-1)), query_rows(pattern), f"softmax(scores) {i}", mask.bool())
        k = ks[i].repeat_interleave(qs[i].shape[2] // ks[i].shape[2], dim=2)
        want = torch.einsum("bqhd,bkhd->bhqk", qs[i], k) * dh**-0.5
        got = scores.masked_fill(~unmasked, 0)
        assert_close(got, want.masked_fill(~unmasked, 0), f"scores {i}")
        # masked entries get no weight
        assert pattern.masked_select(~unmasked & mask.bool()[:, None, :, None]).abs().max().item() == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_result_is_each_heads_share_of_the_output_projection(family):
    hf, model = cached_model(family)
    s, ref, cache = SPEC[family], hf_reference(family), fx_cache(family)
    modules = dict(hf.named_modules())
    dh = head_dim(hf)
    for i in range(model.cfg.n_layers):
        proj = modules[f"{s['layers']}.{i}.{s['o']}"]
        # Conv1D (GPT-2) stores [in, out]; Linear stores [out, in]
        w_o = proj.weight if family == "gpt2" else proj.weight.T
        z = ref[f"blocks.{i}.attn.hook_z"]
        want = torch.stack([z[:, :, h] @ w_o[h * dh : (h + 1) * dh] for h in range(z.shape[2])], dim=2)
        assert_close(cache["result", i], want, f"result {i}")


# ---- MLP and norms -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_pre_and_post_equal_activation_input_and_down_projection_input(family):
    names = check_sites(family, ("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear"))
    _, model = cached_model(family)
    gated = SPEC[family]["up"] is not None
    assert len(names) == (3 if gated else 2) * model.cfg.n_layers
    assert ("blocks.0.mlp.hook_pre_linear" in model.sites) == gated


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_scale_and_normalized_follow_the_formula(family):
    names = check_sites(family, ("hook_scale", "hook_normalized"))
    _, model = cached_model(family)
    expected = 2 * len(SPEC[family]["norms"]) * model.cfg.n_layers + (2 if SPEC[family]["final"] else 0)
    assert len(names) == expected
    assert fx_cache(family)["blocks.0.ln1.hook_scale"].shape == (3, 7, 1)


# ---- raw sites ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES + ("olmo", "roberta"))
def test_raw_sites_equal_module_outputs(family):
    """Every call of every module: ``path`` is the first call's output, ``path@k`` the (k+1)-th's."""
    hf, model = cached_model(family)
    modules = dict(hf.named_modules())
    raw = [n for n in model.sites if n in modules and not n.endswith("rotary_emb")]
    assert len(raw) >= 20
    ids, mask = padded_batch()
    with recording(hf, outputs=raw) as (outs, _), torch.no_grad():
        hf(input_ids=ids, attention_mask=mask)
    per_call = [(name if k == 0 else f"{name}@{k}", out) for name in raw for k, out in enumerate(outs.get(name, []))]
    offered = [(site, out) for site, out in per_call if site in model.sites]
    _, cache = model.run_with_cache(ids, mask, names_filter=[site for site, _ in offered])
    for site, out in offered:
        assert_close(cache[site], first(out), site)
    # a later call without a site is one torch.export removed (eval-mode dropout is the identity)
    missing = [site for site, _ in per_call if site not in model.sites]
    assert all("drop" in site for site in missing), missing
    assert len(offered) >= len(raw)


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_raw_site_of_a_tuple_output_module_holds_its_first_output(family):
    # model.rotary_emb returns (cos, sin); its site should hold cos, as attention modules' sites
    # hold output[0]
    hf, model = cached_model(family)
    path = "model.rotary_emb" if family == "llama" else "gpt_neox.rotary_emb"
    ids, mask = padded_batch()
    with recording(hf, outputs=[path]) as (outs, _), torch.no_grad():
        hf(input_ids=ids, attention_mask=mask)
    _, cache = model.run_with_cache(ids, mask, names_filter=path)
    assert_close(cache[path], outs[path][0][0], path)
