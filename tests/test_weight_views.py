"""Weight views in TransformerLens' shapes, against the HF run they come from and TransformerLens itself.

References, none of them fxlens: plain forward hooks on the HF modules (the projection's input and
output, the attention pattern HF returns with ``output_attentions``), HF's own q/k/v/z read by
``tests/hf_hooks.py``, the HF parameters (storage shared, in-place edits in both directions), and
TransformerLens' TransformerBridge on the same weights. ``FactoredMatrix`` is checked against dense
products and ``torch.linalg`` (and TransformerLens' own FactoredMatrix for indexing).
"""

import copy

import pytest
import torch
import transformers as T
from conftest import cached_model
from families import make, tokens
from hf_hooks import hf_cache

import fxlens
from fxlens import FactoredMatrix

TOL = 1e-5
# layer list, q/k/v projection(s) (the first reads the normalised input), output projection, MLP in, gate, out
PATHS = {
    "gpt2": ("transformer.h", "attn.c_attn", "attn.c_proj", "mlp.c_fc", None, "mlp.c_proj"),
    "llama": ("model.layers", "self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"),
    "qwen2": ("model.layers", "self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"),
    "neox": ("gpt_neox.layers", "attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", None, "mlp.dense_4h_to_h"),
    "opt": ("model.decoder.layers", "self_attn.q_proj", "self_attn.out_proj", "fc1", None, "fc2"),
    # Phi-3 fuses the gate and up projections too: [gate | up] along the output features
    "phi3": ("model.layers", "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.gate_up_proj", "mlp.down_proj"),
}
KV = {"llama": 2, "qwen2": 2, "phi3": 2}


def build(family, attn_implementation="eager"):
    if family == "phi3":
        torch.manual_seed(0)
        hf = T.Phi3ForCausalLM(T.Phi3Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn_implementation))
        hf.eval()
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        return hf
    return make(family, n_kv_heads=KV.get(family), attn_implementation=attn_implementation)


_BUILT = {}


def eager_pair(family):
    """(hf, Model) with eager attention, so that HF returns its attention pattern."""
    if family not in _BUILT:
        hf = build(family)
        hf_io(hf, [], tokens(1, 3))  # transformers adds its output-recording hooks on the first such call
        _BUILT[family] = (hf, fxlens.Model.from_hf(hf))
    return _BUILT[family]


def hf_io(hf, paths: list[str], ids):
    """{path: (input, output)} of each module on one HF forward (plain hooks), and HF's attention patterns."""
    seen, handles = {}, []
    for path in paths:
        def hook(module, args, out, path=path):
            seen[path] = (args[0].detach(), (out[0] if isinstance(out, tuple) else out).detach())
        handles.append(hf.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return seen, out.attentions


def close(a, b, tol=TOL):
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    a, b = a.detach(), b.detach()
    assert (a - b).abs().max() <= tol * max(1.0, float(b.abs().max())), float((a - b).abs().max())


@pytest.mark.parametrize("family", sorted(PATHS))
def test_attention_views_reproduce_the_hf_projections_and_heads(family):
    hf, model = eager_pair(family)
    layers, qkv, o_proj = PATHS[family][:3]
    ids = tokens(2, 6, seed=5)
    layer = 1
    q_path, o_path = f"{layers}.{layer}.{qkv}", f"{layers}.{layer}.{o_proj}"
    io, patterns = hf_io(hf, [q_path, o_path], ids)
    x = io[q_path][0]
    b, p = ids.shape
    H, D = model.cfg.n_heads, model.cfg.d_head
    kv = KV.get(family, H)
    w = model.blocks[layer].attn
    assert w.W_Q.shape == (H, model.cfg.d_model, D) and w._W_K.shape == (kv, model.cfg.d_model, D)
    assert w.W_O.shape == (H, D, model.cfg.d_model) and w.b_O.shape == (model.cfg.d_model,)
    q = torch.einsum("bpm,hmd->bphd", x, w.W_Q) + w.b_Q
    k = torch.einsum("bpm,hmd->bphd", x, w._W_K) + w._b_K
    v = torch.einsum("bpm,hmd->bphd", x, w._W_V) + w._b_V
    if family == "phi3":  # HF slices its fused qkv_proj output [q | k | v]
        out = io[q_path][1]
        want = out[..., :H * D].view(b, p, H, D), out[..., H * D:(H + kv) * D].view(b, p, kv, D), out[..., (H + kv) * D:].view(b, p, kv, D)
    else:
        ref = hf_cache(hf, ids, None, [f"blocks.{layer}.attn.hook_{s}" for s in "qkv"])
        want = tuple(ref[f"blocks.{layer}.attn.hook_{s}"] for s in "qkv")
    for got, ref in zip((q, k, v), want):
        close(got, ref)
    # a head's output from the views: pattern (HF's) @ v, then through W_O; HF's z and o_proj output
    v_full = torch.einsum("bpm,hmd->bphd", x, w.W_V) + w.b_V
    assert torch.equal(w.W_V, w._W_V.repeat_interleave(H // kv, dim=0))
    z = torch.einsum("bhqk,bkhd->bqhd", patterns[layer], v_full)
    close(z, io[o_path][0].view(b, p, H, D))
    result = torch.einsum("bqhd,hdm->bqhm", z, w.W_O)
    close(result.sum(2) + w.b_O, io[o_path][1])
    _, cache = model.run_with_cache(ids, names_filter=f"blocks.{layer}.attn.hook_result")
    close(cache["result", layer], result)


@pytest.mark.parametrize("family", sorted(PATHS))
def test_mlp_views_reproduce_the_hf_projections(family):
    hf, model = eager_pair(family)
    layers, _, _, w_in, w_gate, w_out = PATHS[family]
    ids = tokens(2, 6, seed=6)
    paths = [f"{layers}.1.{p}" for p in (w_in, w_gate, w_out) if p]
    io, _ = hf_io(hf, paths, ids)
    m = model.blocks[1].mlp
    x, pre = io[paths[0]]
    gate = io[paths[1]][1] if w_gate else None
    if family == "phi3":
        d_mlp = model.cfg.d_mlp
        gate, pre = pre[..., :d_mlp], pre[..., d_mlp:]
    assert m.W_in.shape == (model.cfg.d_model, model.cfg.d_mlp) and m.W_out.shape == (model.cfg.d_mlp, model.cfg.d_model)
    close(x @ m.W_in + m.b_in, pre)
    if w_gate:
        close(io[paths[1]][0] @ m.W_gate, gate)
        assert model.cfg.gated_mlp
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.1.mlp.hook_pre"))
        close(cache["blocks.1.mlp.hook_pre"], gate)  # TransformerLens' hook_pre is the activation's input
        close(cache["blocks.1.mlp.hook_pre_linear"], pre)
    else:
        assert m.W_gate is None and model.W_gate is None and not model.cfg.gated_mlp
    post, out = io[paths[-1]]
    close(post @ m.W_out + m.b_out, out)


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "phi3"])
def test_per_layer_views_share_the_hf_parameters_storage_both_ways(family):
    hf = build(family, attn_implementation=None)
    model = fxlens.Model.from_hf(hf)
    layers, qkv, o_proj, w_in, _, _ = PATHS[family]
    def weight(path):
        return hf.get_submodule(f"{layers}.0.{path}").weight

    attn = model.blocks[0].attn
    views = {qkv: attn.W_Q, qkv.replace("q_proj", "k_proj"): attn._W_K, qkv.replace("q_proj", "v_proj"): attn._W_V,
             o_proj: attn.W_O}
    if w_in:
        views[w_in] = model.blocks[0].mlp.W_in
    for path, view in views.items():
        assert view.untyped_storage().data_ptr() == weight(path).untyped_storage().data_ptr(), path
    fused = weight(qkv.replace("q_proj", "v_proj"))
    # an edit to the HF parameter shows in a view taken before it
    W_V = attn._W_V
    before = W_V.clone()
    with torch.no_grad():
        fused.mul_(2)
    assert torch.equal(W_V, before * 2)
    # a write through a view reaches the HF model: head 1's value weights only
    with torch.no_grad():
        attn._W_V[1].zero_()
    ids = tokens(1, 5, seed=2)
    z = hf_cache(hf, ids, None, ["blocks.0.attn.hook_v"])["blocks.0.attn.hook_v"] if family != "phi3" else None
    if z is not None:
        b_V = attn._b_V[1]
        assert torch.allclose(z[0, :, 1], b_V.expand(5, -1), atol=1e-6) and not torch.allclose(z[0, :, 0], b_V.expand(5, -1))
    assert torch.equal(model.W_V[0], attn.W_V) and model.W_V.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr()  # stacked: a copy


def test_views_follow_a_with_weight_edits_copy():
    hf, model = cached_model("gpt2")
    w = hf.transformer.h[0].attn.c_attn.weight
    edited = model.with_weight_edits(lambda e: e.set("transformer.h.0.attn.c_attn.weight", torch.zeros_like(w)))
    assert bool((edited.W_Q[0] == 0).all()) and not bool((model.W_Q[0] == 0).all())


def test_positional_embedding_and_refusals():
    hf, model = cached_model("gpt2")
    assert model.W_pos.data_ptr() == hf.transformer.wpe.weight.data_ptr()
    assert model.cfg.positional_embedding_type == "standard" and model.cfg.normalization_type == "LN"
    assert model.cfg.act_fn == "gelu_new"
    _, llama = cached_model("llama")
    assert llama.cfg.positional_embedding_type == "rotary" and llama.cfg.normalization_type == "RMS" and llama.cfg.act_fn == "silu"
    with pytest.raises(AttributeError, match="no learned positional embedding"):
        llama.W_pos
    torch.manual_seed(0)
    moe = fxlens.Model.from_hf(T.MixtralForCausalLM(T.MixtralConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)).eval())
    with pytest.raises(AttributeError, match="MLP weights of block 0 cannot be read: block 0's MLP is a mixture of experts"):
        moe.W_in
    assert moe.blocks[0].attn.W_Q.shape == (4, 32, 8)
    with pytest.raises(IndexError, match="out of range"):
        model.blocks[5]


@pytest.fixture(scope="module")
def bridges(tiny_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    names = {"gpt2": "gpt2", "neox": "EleutherAI/pythia-70m", "llama": "meta-llama/Llama-3.2-1B"}
    out = {}
    for family, name in names.items():
        hf, model = eager_pair(family)
        out[family] = (model, TransformerBridge.boot_transformers(name, hf_model=copy.deepcopy(hf), tokenizer=tiny_tokenizer))
    return out


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_stacked_weights_equal_transformer_lens(bridges, family):
    model, bridge = bridges[family]
    names = ["W_Q", "W_O", "W_in", "W_out", "W_E", "W_U", "b_U"] + (["W_pos"] if family == "gpt2" else [])
    if family != "llama":  # the bridge refuses biases a model lacks; fxlens gives zeros, as HookedTransformer did
        names += ["b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "W_K", "W_V"]
    else:
        names += ["W_gate"]
        # the bridge stacks the key/value heads; HookedTransformer's W_K repeated them (fxlens: W_K), _W_K holds them
        for kv in ("W_K", "W_V"):
            close(getattr(model, "_" + kv), getattr(bridge, kv))
            close(getattr(model, kv), getattr(bridge, kv).repeat_interleave(2, dim=1))
    for name in names:
        close(getattr(model, name), getattr(bridge, name))
    close(model.OV.AB, bridge.OV.AB)
    close(model.QK.AB, bridge.QK.AB)
    for layer in range(3):
        for mlp_input in (False, True):
            if not (mlp_input and layer == 2):
                close(model.accumulated_bias(layer, mlp_input=mlp_input), bridge.accumulated_bias(layer, mlp_input=mlp_input))
    assert model.all_head_labels() == bridge.all_head_labels == model.all_head_labels
    assert set(model.hook_dict) <= set(bridge.hook_dict)
    assert {k: v.name for k, v in model.hook_dict.items()} == {k: k for k in model.hook_dict}
    for field in ("normalization_type", "positional_embedding_type", "act_fn", "gated_mlp"):
        assert getattr(model.cfg, field) == getattr(bridge.cfg, field), field


def test_parameters_pass_through_to_the_hf_model():
    hf, model = cached_model("llama")
    assert [id(p) for p in model.parameters()] == [id(p) for p in hf.parameters()]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in hf.named_parameters()]
    assert model.state_dict().keys() == hf.state_dict().keys()
    assert model.blocks[0].ln1.w is hf.model.layers[0].input_layernorm.weight
    assert model.ln_final.w is hf.model.norm.weight and bool((model.ln_final.b == 0).all())
    assert model.embed.W_E is hf.model.embed_tokens.weight and model.unembed.W_U.data_ptr() == hf.lm_head.weight.data_ptr()
    assert len(model.blocks) == 2 and [b.attn._layer for b in model.blocks] == [0, 1] and model.blocks[-1].attn._layer == 1


def test_gemma_norm_weight_is_one_plus_the_parameter():
    hf, model = cached_model("gemma")
    ln = model.blocks[0].ln1
    assert torch.equal(ln.w, 1 + hf.model.layers[0].input_layernorm.weight)


# ---- FactoredMatrix ------------------------------------------------------------------------------------


@pytest.fixture
def fm():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 2, 10, 4, generator=g, dtype=torch.float64)
    B = torch.randn(3, 2, 4, 10, generator=g, dtype=torch.float64)
    return FactoredMatrix(A, B), A @ B


def test_factored_matrix_products_equal_dense(fm):
    f, dense = fm
    assert f.shape == dense.shape and f.ndim == 4 and f.mdim == 4
    assert torch.allclose(f.AB, dense)
    assert torch.allclose(f.BA, f.B @ f.A)
    assert torch.allclose(f.T.AB, dense.transpose(-2, -1))
    g = torch.Generator().manual_seed(1)
    M = torch.randn(10, 7, generator=g, dtype=torch.float64)
    N = torch.randn(5, 10, generator=g, dtype=torch.float64)
    vec = torch.randn(10, generator=g, dtype=torch.float64)
    assert torch.allclose((f @ M).AB, dense @ M) and torch.allclose((N @ f).AB, N @ dense)
    assert torch.allclose(f @ vec, dense @ vec) and torch.allclose(vec @ f, vec @ dense)
    assert torch.allclose((f @ f).AB, dense @ dense)
    assert torch.allclose((2.5 * f).AB, 2.5 * dense)


def test_factored_matrix_svd_eigenvalues_and_norm_equal_torch_linalg(fm):
    f, dense = fm
    U, S, V = f.svd()
    assert torch.allclose(S, torch.linalg.svdvals(dense)[..., :4])
    assert torch.allclose(U @ torch.diag_embed(S) @ V.transpose(-2, -1), dense)
    assert torch.equal(f.Vh, V) and torch.equal(f.U, U) and torch.equal(f.S, S)
    assert torch.allclose(f.norm(), torch.linalg.matrix_norm(dense))
    want = torch.linalg.eigvals(dense)
    top = want.gather(-1, want.abs().argsort(-1, descending=True))[..., :4]
    got = f.eigenvalues
    key = lambda e: torch.sort(e.real * 1e3 + e.imag, dim=-1).values  # noqa: E731
    assert torch.allclose(key(got), key(top), atol=1e-8)
    assert torch.allclose(f.make_even().AB, dense)
    assert torch.allclose(f.collapse_l(), torch.diag_embed(S) @ V.transpose(-2, -1))


def test_factored_matrix_indexing_matches_transformer_lens(fm):
    from transformer_lens import FactoredMatrix as TLFactored

    f, dense = fm
    theirs = TLFactored(f.A, f.B)
    for idx in (1, (1, 0), (slice(0, 2),), (2, 1, 3), (0, 1, slice(2, 5), 4), -1):
        mine, ref = f[idx], theirs[idx]
        assert mine.shape == ref.shape, idx
        assert torch.allclose(mine.AB, ref.AB), idx
    assert torch.allclose(f[2, 1].AB, dense[2, 1])
    assert torch.allclose(f.get_corner(2), theirs.get_corner(2))


def test_model_ov_and_qk_are_the_head_circuits():
    _, model = eager_pair("llama")
    OV, QK = model.OV, model.QK
    assert OV.shape == (2, 4, 64, 64) and QK.shape == (2, 4, 64, 64)
    layer, head = 1, 3
    attn = model.blocks[layer].attn
    dense = attn.W_V[head] @ attn.W_O[head]
    assert torch.allclose(OV[layer, head].AB, dense, atol=1e-6)
    assert torch.allclose(OV[layer, head].S, torch.linalg.svdvals(dense)[:16], atol=1e-5)
    kv = attn._W_K[head // 2]  # query head 3 reads key/value head 1
    assert torch.allclose(QK[layer, head].AB, attn.W_Q[head] @ kv.T, atol=1e-6)
    assert torch.allclose(attn.OV.AB, OV[layer].AB, atol=1e-6)


def test_strided_view_and_gathered_copy_agree_with_indexing():
    """``layer_weights._select`` against plain advanced indexing: an affine index map is a view, any other a copy."""
    from fxlens.engine.layer_weights import _select
    from fxlens.graphs.projections import Projection

    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 5, generator=g)  # Linear [out, in]: q/k/v read along the output features
    W_o = torch.randn(5, 24, generator=g)  # Linear [out, in]: W_O read along the input features
    for index in (torch.arange(8, 20).view(3, 4), torch.arange(24).view(3, 2, 4)[:, 1], torch.randperm(24, generator=g)[:12].view(3, 4)):
        p = Projection("mm", "m", "w", None, 0, index)
        got = _select(W, p, "out", 1)
        assert torch.equal(got, W[index].permute(0, 2, 1))
        assert (p.affine is not None) == (got._base is W)  # affine: a view of W; otherwise a gathered copy
        conv = Projection("mm", "m", "w", None, 1, index)  # Conv1D keeps [in, out]
        assert torch.equal(_select(W.t(), conv, "out", 1), W[index].permute(0, 2, 1))
        assert torch.equal(_select(W_o, p, "in", 2), W_o.t()[index])
