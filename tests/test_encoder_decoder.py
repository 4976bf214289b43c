"""Encoder-decoders (T5, BART, Marian, MT5) against the HF model and plain HF hooks.

Every reference here is computed without fxlens: HF's outputs (logits, ``encoder_hidden_states``,
``decoder_hidden_states``, eager ``cross_attentions``) and forwards of the HF model with
``register_forward_pre_hook`` / ``register_forward_hook`` on its layers and attention modules.
Norm weights and biases are perturbed so that where a norm sits matters.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import fxlens
from fxlens import patching
from fxlens.graphs.capture import CaptureError

V = 50


def _perturb(hf):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return hf.eval()


def _t5(cls=transformers.T5ForConditionalGeneration, config=transformers.T5Config, **kw):
    c = config(vocab_size=V, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=4,
               relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, attn_implementation="eager", **kw)
    return cls(c)


def _bart():
    c = transformers.BartConfig(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                                attn_implementation="eager")
    return transformers.BartForConditionalGeneration(c)


def _marian():
    c = transformers.MarianConfig(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                                  pad_token_id=V - 1, decoder_start_token_id=V - 1, attn_implementation="eager")
    return transformers.MarianMTModel(c)


def _mt5():
    return _t5(transformers.MT5ForConditionalGeneration, transformers.MT5Config, feed_forward_proj="gated-gelu")


BUILD = {"t5": _t5, "bart": _bart, "marian": _marian, "mt5": _mt5}
_MODELS: dict = {}


def model(family):
    """(hf, fxlens model), once per session. HF is called once with output_attentions first: transformers
    installs its output-recording hooks on first use, which the Model would otherwise report as added."""
    if family not in _MODELS:
        torch.manual_seed(0)
        hf = _perturb(BUILD[family]())
        ids, mask, dids, dmask = _inputs(padded=True)
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dids, decoder_attention_mask=dmask,
               output_attentions=True, output_hidden_states=True)
        _MODELS[family] = (hf, fxlens.Model(hf))
    return _MODELS[family]


def _inputs(padded: bool, seed: int = 0, batch: int = 2, enc: int = 7, dec: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V - 1, (batch, enc), generator=g)
    dids = torch.randint(1, V - 1, (batch, dec), generator=g)
    mask, dmask = torch.ones_like(ids), torch.ones_like(dids)
    if padded:
        mask[1, -3:] = 0
        dmask[0, -2:] = 0
    return ids, mask, dids, dmask


def _hf(hf, ids, mask, dids, dmask, **kw):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dids, decoder_attention_mask=dmask, **kw)


def _layers(hf, stack):
    base = hf.get_encoder() if stack == "encoder" else hf.get_decoder()
    return base.block if hasattr(base, "block") else base.layers


def _cross(hf, layer):
    block = _layers(hf, "decoder")[layer]
    return block.layer[1].EncDecAttention if hasattr(block, "layer") else block.encoder_attn


FAMILIES = ["t5", "bart", "marian", "mt5"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_logits_and_residual_sites_equal_hf(family, padded):
    hf, m = model(family)
    assert isinstance(m, fxlens.Seq2SeqModel)
    ids, mask, dids, dmask = _inputs(padded)
    ref = _hf(hf, ids, mask, dids, dmask, output_hidden_states=True, output_attentions=True)
    logits, cache = m.run_with_cache(ids, dids, attention_mask=mask, decoder_attention_mask=dmask)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(m(ids, dids, attention_mask=mask, decoder_attention_mask=dmask), ref.logits, atol=1e-5, rtol=0)
    assert m.cfg.n_encoder_layers == 2 and m.cfg.n_layers == 3
    for i in range(2):
        torch.testing.assert_close(cache[f"encoder.{i}.hook_resid_pre"], ref.encoder_hidden_states[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"encoder.{i}.attn.hook_pattern"], ref.encoder_attentions[i], atol=1e-5, rtol=0)
    for i in range(3):
        torch.testing.assert_close(cache[f"decoder.{i}.hook_resid_pre"], ref.decoder_hidden_states[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"decoder.{i}.attn.hook_pattern"], ref.decoder_attentions[i], atol=1e-5, rtol=0)
        pattern = cache[f"decoder.{i}.cross_attn.hook_pattern"]
        assert pattern.shape == (2, 4, dids.shape[1], ids.shape[1])  # [batch, head, decoder pos, encoder pos]
        torch.testing.assert_close(pattern, ref.cross_attentions[i], atol=1e-5, rtol=0)
    # the last residual of each stack: the input of its final norm (T5) or the last hidden state (BART, post-norm)
    last = cache["decoder.2.hook_resid_post"]
    if family in ("t5", "mt5"):
        normalized = cache["encoder_final_ln.hook_normalized"]  # x / rms(x), before the norm's weight
        torch.testing.assert_close(normalized * hf.encoder.final_layer_norm.weight, ref.encoder_last_hidden_state, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(last, ref.decoder_hidden_states[3], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache["encoder.1.hook_resid_post"], ref.encoder_last_hidden_state, atol=1e-5, rtol=0)


def _with_hooks(hf, feed, hooks):
    """HF forward with [(module, kind, fn)] hooks installed ("pre": forward-pre-hook on args[0], "out":
    forward hook on output[0]); removed afterwards."""
    handles = []
    for module, kind, fn in hooks:
        if kind == "pre":
            handles.append(module.register_forward_pre_hook(lambda mod, args, kwargs, fn=fn: ((fn(args[0].clone()),) + args[1:], kwargs),
                                                             with_kwargs=True))
        else:
            def out_hook(mod, args, output, fn=fn):
                if isinstance(output, tuple):
                    return (fn(output[0].clone()),) + output[1:]
                return fn(output.clone())
            handles.append(module.register_forward_hook(out_hook))
    try:
        return _hf(hf, *feed).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_interventions_on_both_stacks_equal_plain_hf_hooks(family):
    hf, m = model(family)
    feed = _inputs(True)
    ids, mask, dids, dmask = feed
    clean = _inputs(True, seed=3)
    _, clean_cache = m.run_with_cache(clean[0], clean[2], attention_mask=clean[1], decoder_attention_mask=clean[3])
    ref_clean = _hf(hf, *clean, output_hidden_states=True)

    # Patch decoder.1.hook_resid_pre at decoder position 2 from the clean run
    got = m.run_with_interventions(ids, [fxlens.Patch("decoder.1.hook_resid_pre", clean_cache, pos=2)], dids,
                                   attention_mask=mask, decoder_attention_mask=dmask)

    def patch_pos2(x, src=ref_clean.decoder_hidden_states[1]):
        x[:, 2] = src[:, 2]
        return x

    want = _with_hooks(hf, feed, [(_layers(hf, "decoder")[1], "pre", patch_pos2)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    # Ablate (zero) decoder.0's cross-attention output, and an encoder residual at position 1
    got = m.run_with_interventions(ids, [fxlens.Ablate("decoder.0.hook_cross_attn_out"),
                                         fxlens.Ablate("encoder.1.hook_resid_pre", pos=1)], dids,
                                   attention_mask=mask, decoder_attention_mask=dmask)

    def zero_pos1(x):
        x[:, 1] = 0
        return x

    want = _with_hooks(hf, feed, [(_cross(hf, 0), "out", torch.zeros_like), (_layers(hf, "encoder")[1], "pre", zero_pos1)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    plain = _hf(hf, *feed).logits
    assert (got - plain).abs().max() > 1e-4  # the interventions changed something

    # run_with_hooks: a user hook on the cross-attention pattern
    seen = {}

    def read(value, hook):
        seen[hook.name] = value.clone()

    m.run_with_hooks(ids, dids, attention_mask=mask, decoder_attention_mask=dmask,
                     fwd_hooks=[("decoder.2.cross_attn.hook_pattern", read)])
    ref = _hf(hf, *feed, output_attentions=True)
    torch.testing.assert_close(seen["decoder.2.cross_attn.hook_pattern"], ref.cross_attentions[2], atol=1e-5, rtol=0)


def _metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 7].mean()


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("stack", ["decoder", "encoder"])
def test_resid_pre_sweep_equals_a_loop_of_hooked_hf_forwards(family, stack):
    hf, m = model(family)
    corrupted = _inputs(True, seed=5)
    clean = _inputs(True, seed=6)
    # the decoder input and the masks are shared; the source tokens differ (the decoder sweep then
    # reads the difference through cross-attention), and for the decoder sweep the decoder tokens too
    clean = (clean[0], corrupted[1], clean[2] if stack == "decoder" else corrupted[2], corrupted[3])
    _, clean_cache = m.run_with_cache(clean[0], clean[2], attention_mask=clean[1], decoder_attention_mask=clean[3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = patching.get_act_patch_resid_pre(m, corrupted[0], clean_cache, _metric, attention_mask=corrupted[1],
                                               decoder_input=corrupted[2], decoder_attention_mask=corrupted[3], stack=stack)
    ref_clean = _hf(hf, *clean, output_hidden_states=True)
    states = ref_clean.decoder_hidden_states if stack == "decoder" else ref_clean.encoder_hidden_states
    n_layers, seq = (3, corrupted[2].shape[1]) if stack == "decoder" else (2, corrupted[0].shape[1])
    assert got.shape == (n_layers, seq)
    want = torch.empty(n_layers, seq)
    for layer in range(n_layers):
        for pos in range(seq):
            def patch(x, src=states[layer], pos=pos):
                x[:, pos] = src[:, pos]
                return x

            want[layer, pos] = _metric(_with_hooks(hf, corrupted, [(_layers(hf, stack)[layer], "pre", patch)]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert want.abs().max() > 0
    assert m.last_sweep_stats == {"forwards": 1, "rows_per_forward": n_layers * seq}
    # a memory budget too small for two rows: one row per forward, the same numbers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        small = patching.get_act_patch_resid_pre(m, corrupted[0], clean_cache, _metric, attention_mask=corrupted[1],
                                                 decoder_input=corrupted[2], decoder_attention_mask=corrupted[3], stack=stack,
                                                 memory_budget=1e-6)
    assert m.last_sweep_stats == {"forwards": n_layers * seq, "rows_per_forward": 1}
    torch.testing.assert_close(small, want, atol=1e-5, rtol=0)


def _whisper():
    c = transformers.WhisperConfig(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                                   decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                                   max_source_positions=12, max_target_positions=20, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2, decoder_start_token_id=3, attn_implementation="eager")
    return transformers.WhisperForConditionalGeneration(c)


def test_whisper_reads_input_features_exactly():
    torch.manual_seed(0)
    hf = _perturb(_whisper())
    g = torch.Generator().manual_seed(2)
    feats, other = torch.randn(2, 8, 24, generator=g), torch.randn(2, 8, 24, generator=g)
    dids = torch.randint(4, V, (2, 5), generator=g)
    dmask = torch.ones_like(dids)
    dmask[0, -1] = 0

    def run(features, hooks=()):
        handles = [module.register_forward_pre_hook(fn) for module, fn in hooks]
        try:
            with torch.no_grad():
                return hf(input_features=features, decoder_input_ids=dids, decoder_attention_mask=dmask,
                          output_hidden_states=True, output_attentions=True)
        finally:
            for h in handles:
                h.remove()

    ref = run(feats)
    m = fxlens.Model(hf)
    logits, cache = m.run_with_cache(feats, dids, decoder_attention_mask=dmask)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)
    for i in range(2):
        torch.testing.assert_close(cache[f"encoder.{i}.hook_resid_pre"], ref.encoder_hidden_states[i], atol=1e-5, rtol=0)
    for i in range(3):
        torch.testing.assert_close(cache[f"decoder.{i}.hook_resid_pre"], ref.decoder_hidden_states[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"decoder.{i}.cross_attn.hook_pattern"], ref.cross_attentions[i], atol=1e-5, rtol=0)
    # a pre-norm family: the decomposed LayerNorm, against the HF norm's output
    norm = hf.model.decoder.layers[1].self_attn_layer_norm
    seen = {}
    handle = norm.register_forward_hook(lambda mod, args, out: seen.__setitem__("out", out))
    try:
        run(feats)
    finally:
        handle.remove()
    torch.testing.assert_close(cache["decoder.1.ln1.hook_normalized"] * norm.weight + norm.bias, seen["out"], atol=1e-5, rtol=0)
    # a decoder resid_pre sweep: the clean run reads other audio
    _, clean_cache = m.run_with_cache(other, dids, decoder_attention_mask=dmask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = patching.get_act_patch_resid_pre(m, feats, clean_cache, _metric, decoder_input=dids, decoder_attention_mask=dmask)
    states = run(other).decoder_hidden_states
    want = torch.empty(3, 5)
    for layer in range(3):
        for pos in range(5):
            def patch(mod, args, src=states[layer], pos=pos):
                x = args[0].clone()
                x[:, pos] = src[:, pos]
                return (x,) + args[1:]

            want[layer, pos] = _metric(run(feats, [(hf.model.decoder.layers[layer], patch)]).logits)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"input_features of shape \[batch, 8, 24\]"):
        m(torch.randn(2, 8, 20), dids)


def test_unsupported_feature_models_are_refused_with_what_works():
    c = transformers.Speech2TextConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                       decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, input_feat_per_channel=8,
                                       max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2, decoder_start_token_id=2)
    with pytest.raises(CaptureError, match=r"input_features.*T5.*BART.*Whisper"):
        fxlens.Model(transformers.Speech2TextForConditionalGeneration(c))


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_sdpa_attention_patterns_equal_eager_hf(family):
    """Under SDPA (the default) the self- and cross-attention patterns are computed from SDPA's operands."""
    import copy

    torch.manual_seed(0)
    hf = _perturb(BUILD[family]())
    hf.set_attn_implementation("sdpa")
    eager = copy.deepcopy(hf)
    eager.set_attn_implementation("eager")
    feed = _inputs(True)
    ref = _hf(eager, *feed, output_attentions=True)
    m = fxlens.Model(hf)
    assert m.cfg.attn_implementation == "sdpa"
    ids, mask, dids, dmask = feed
    logits, cache = m.run_with_cache(ids, dids, attention_mask=mask, decoder_attention_mask=dmask,
                                     names_filter=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)
    for i in range(3):
        torch.testing.assert_close(cache[f"decoder.{i}.cross_attn.hook_pattern"], ref.cross_attentions[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"decoder.{i}.attn.hook_pattern"], ref.decoder_attentions[i], atol=1e-5, rtol=0)
    for i in range(2):
        torch.testing.assert_close(cache[f"encoder.{i}.attn.hook_pattern"], ref.encoder_attentions[i], atol=1e-5, rtol=0)


def test_site_names_and_input_errors():
    hf, m = model("t5")
    assert m.get_act_name("resid_pre", 1) == "decoder.1.hook_resid_pre"
    assert m.get_act_name("resid_pre", 1, "encoder") == "encoder.1.hook_resid_pre"
    assert m.site_table["pattern", 0].name == "decoder.0.attn.hook_pattern"
    assert "decoder.0.hook_resid_mid_cross" in m.sites and "encoder_final_ln.hook_normalized" in m.sites
    with pytest.raises(fxlens.SiteError, match=r"unknown site 'decoder.0.cross_attn.hook_patern'.*decoder.0.cross_attn.hook_pattern"):
        m.site("decoder.0.cross_attn.hook_patern")
    ids = torch.randint(1, V, (2, 5))
    with pytest.raises(ValueError, match="one decoder sequence per source"):
        m(ids, torch.randint(1, V, (3, 4)))
    # no decoder input: one decoder_start_token_id per row, as HF's generate starts
    start = torch.zeros(2, 1, dtype=torch.long)
    torch.testing.assert_close(m(ids), _hf(hf, ids, torch.ones_like(ids), start, torch.ones_like(start)).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_cross_attention_heads_equal_hf_projections(family):
    hf, m = model(family)
    feed = _inputs(True)
    ids, mask, dids, dmask = feed
    _, cache = m.run_with_cache(ids, dids, attention_mask=mask, decoder_attention_mask=dmask,
                                names_filter=lambda n: ".cross_attn." in n)
    for layer in range(3):
        attn = _cross(hf, layer)
        names = ("q", "k", "v", "o") if family == "t5" else ("q_proj", "k_proj", "v_proj", "out_proj")
        seen, handles = {}, []
        for kind, name in zip("qkvz", names):
            module = getattr(attn, name)
            if kind == "z":
                handles.append(module.register_forward_pre_hook(lambda mod, args, kind=kind: seen.__setitem__(kind, args[0])))
            else:
                handles.append(module.register_forward_hook(lambda mod, args, out, kind=kind: seen.__setitem__(kind, out)))
        try:
            _hf(hf, *feed)
        finally:
            for h in handles:
                h.remove()
        for kind in "qkvz":
            value = seen[kind]
            want = value.view(*value.shape[:2], 4, -1)  # [batch, pos, head, d_head]
            torch.testing.assert_close(cache[f"decoder.{layer}.cross_attn.hook_{kind}"], want, atol=1e-5, rtol=0)
    assert cache["decoder.0.cross_attn.hook_k"].shape[1] == ids.shape[1]  # keys over the encoder's positions


@pytest.mark.parametrize("activation", ["z", "cross_z"])
def test_decoder_head_sweep_equals_hooked_hf_loop(activation):
    """Each decoder head's z (self- or cross-attention), patched at every position from the clean run,
    against HF forwards with a pre-hook on the output projection."""
    hf, m = model("bart")
    corrupted = _inputs(True, seed=7)
    clean = _inputs(True, seed=8)
    clean = (clean[0], corrupted[1], clean[2], corrupted[3])
    _, clean_cache = m.run_with_cache(clean[0], clean[2], attention_mask=clean[1], decoder_attention_mask=clean[3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = patching.generic_activation_patch(m, corrupted[0], clean_cache, _metric, patching.layer_head_vector_patch_setter,
                                                activation, index_axis_names=("layer", "head"), attention_mask=corrupted[1],
                                                decoder_input=corrupted[2], decoder_attention_mask=corrupted[3])
    assert got.shape == (3, 4)

    def out_proj(layer):
        block = _layers(hf, "decoder")[layer]
        return (block.self_attn if activation == "z" else block.encoder_attn).out_proj

    clean_z = {}
    handles = [out_proj(i).register_forward_pre_hook(lambda mod, args, i=i: clean_z.__setitem__(i, args[0].clone())) for i in range(3)]
    try:
        _hf(hf, *clean)
    finally:
        for h in handles:
            h.remove()
    want = torch.empty(3, 4)
    for layer in range(3):
        for head in range(4):
            def patch(mod, args, layer=layer, head=head):
                z = args[0].clone().view(*args[0].shape[:2], 4, -1)
                z[:, :, head] = clean_z[layer].view_as(z)[:, :, head]
                return (z.flatten(2),)

            handle = out_proj(layer).register_forward_pre_hook(patch)
            try:
                want[layer, head] = _metric(_hf(hf, *corrupted).logits)
            finally:
                handle.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_circuits_and_one_sequence_functions_refuse_encoder_decoders():
    from fxlens import attribution, circuits

    hf, m = model("t5")
    ids = torch.randint(1, V, (2, 5))
    with pytest.raises(NotImplementedError, match="not offered for encoder-decoders"):
        circuits.model_components(m)
    with pytest.raises(NotImplementedError, match="not offered for encoder-decoders"):
        circuits.eap_scores(m, ids, ids, _metric)
    with pytest.raises(NotImplementedError, match="not offered for encoder-decoders"):
        attribution.attribute(m, ids, m.run_with_cache(ids)[1], _metric, "resid_pre", ("pos",))
    with pytest.raises(NotImplementedError, match="not offered for encoder-decoders"):
        m.run_with_edges(ids, [])


def test_from_pretrained_loads_an_encoder_decoder_with_its_head(tmp_path):
    hf, _ = model("bart")
    hf.save_pretrained(tmp_path)
    m = fxlens.Model.from_pretrained(str(tmp_path), tokenizer=False, attn_implementation="eager")
    assert isinstance(m, fxlens.Seq2SeqModel) and type(m.hf_model).__name__ == "BartForConditionalGeneration"
    ids, mask, dids, dmask = _inputs(True)
    torch.testing.assert_close(m(ids, dids, attention_mask=mask, decoder_attention_mask=dmask),
                               _hf(hf, ids, mask, dids, dmask).logits, atol=1e-5, rtol=0)


def test_text_inputs_with_a_tokenizer(tiny_tokenizer):
    hf, _ = model("t5")
    m = fxlens.Model(hf, tiny_tokenizer)
    got = m(["t5 t6 t7", "t8"], decoder_input=["t3 t9", "t4 t8"])
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 2, 2]])  # bos prepended, right padding marked in the mask
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    dids = torch.tensor([[3, 9], [4, 8]])
    torch.testing.assert_close(got, _hf(hf, ids, mask, dids, torch.ones_like(dids)).logits, atol=1e-5, rtol=0)
    loss = m(["t5 t6 t7", "t8"], ["t3 t9", "t4 t8"], return_type="loss")
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_per_head_results_of_both_stacks_equal_hf(family):
    """``attn.hook_result`` / ``cross_attn.hook_result``: each head's z times its block of W_O (read from HF's
    output projection input), and ablating one head equals zeroing its z slice with a plain HF pre-hook."""
    hf, m = model(family)
    feed = _inputs(True)
    ids, mask, dids, dmask = feed
    names = {"encoder.1.attn": None, "decoder.2.attn": None, "decoder.0.cross_attn": None}
    _, cache = m.run_with_cache(ids, dids, attention_mask=mask, decoder_attention_mask=dmask,
                                names_filter=[f"{n}.hook_result" for n in names])

    def o_proj(name):
        stack, layer, kind = name.split(".")
        block = _layers(hf, stack)[int(layer)]
        if hasattr(block, "layer"):  # T5
            return block.layer[0].SelfAttention.o if kind == "attn" else block.layer[1].EncDecAttention.o
        return (block.self_attn if kind == "attn" else block.encoder_attn).out_proj

    seen = {}
    handles = [o_proj(n).register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0])) for n in names]
    try:
        _hf(hf, *feed)
    finally:
        for h in handles:
            h.remove()
    for n in names:
        z = seen[n].view(*seen[n].shape[:2], 4, -1)
        w = o_proj(n).weight.view(-1, 4, z.shape[-1])  # [d_model, head, d_head]
        torch.testing.assert_close(cache[f"{n}.hook_result"], torch.einsum("bphd,mhd->bphm", z, w), atol=1e-5, rtol=0)
    got = m.run_with_interventions(ids, [fxlens.Ablate("decoder.0.cross_attn.hook_result", head=2)], dids,
                                   attention_mask=mask, decoder_attention_mask=dmask)

    def zero_head(mod, args):
        z = args[0].clone().view(*args[0].shape[:2], 4, -1)
        z[:, :, 2] = 0
        return (z.flatten(2),)

    handle = o_proj("decoder.0.cross_attn").register_forward_pre_hook(zero_head)
    try:
        want = _hf(hf, *feed).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_swapped_parameter_and_a_deep_copy_are_followed():
    import copy

    torch.manual_seed(0)
    hf = _perturb(_bart())
    ids, mask, dids, dmask = _inputs(True)
    _hf(hf, ids, mask, dids, dmask, output_hidden_states=True)  # transformers installs its recording hooks once
    m = fxlens.Model(hf)
    twin = copy.deepcopy(m)
    assert isinstance(twin, fxlens.Seq2SeqModel) and twin.hf_model is not hf
    layer = hf.model.decoder.layers[1].encoder_attn.out_proj
    layer.weight = torch.nn.Parameter(layer.weight * 2)  # a new tensor object: the capture is rebound to it
    _, cache = m.run_with_cache(ids, dids, attention_mask=mask, decoder_attention_mask=dmask,
                                names_filter=["decoder.1.hook_cross_attn_out", "decoder.1.cross_attn.hook_result"])
    ref = _hf(hf, ids, mask, dids, dmask, output_hidden_states=True)
    torch.testing.assert_close(m(ids, dids, attention_mask=mask, decoder_attention_mask=dmask), ref.logits, atol=1e-5, rtol=0)
    assert cache["decoder.1.cross_attn.hook_result"].shape == (2, 5, 4, 16)
    with pytest.raises(NotImplementedError, match="not offered for encoder-decoders"):
        from fxlens import circuits

        circuits.model_components(m)
    # the copy kept the old weights
    plain = _hf(twin.hf_model, ids, mask, dids, dmask).logits
    torch.testing.assert_close(twin(ids, dids, attention_mask=mask, decoder_attention_mask=dmask), plain, atol=1e-5, rtol=0)
    assert (plain - ref.logits).abs().max() > 1e-4


def test_decoder_decompose_resid_includes_cross_attention():
    hf, m = model("t5")
    ids, mask, dids, dmask = _inputs(True)
    ref = _hf(hf, ids, mask, dids, dmask, output_hidden_states=True)
    _, cache = m.run_with_cache(ids, dids, attention_mask=mask, decoder_attention_mask=dmask)
    parts, labels = cache.decompose_resid(layer=2, return_labels=True)
    assert labels == ["embeddings", "0_attn_out", "0_cross_attn_out", "0_mlp_out", "1_attn_out", "1_cross_attn_out", "1_mlp_out"]
    torch.testing.assert_close(parts.sum(0), ref.decoder_hidden_states[2], atol=1e-5, rtol=0)
    assert cache.accumulated_resid().shape == (4, 2, 5, 16)


def test_a_moved_model_is_captured_again():
    torch.manual_seed(0)
    hf = _perturb(_t5())
    ids, mask, dids, dmask = _inputs(True)
    _hf(hf, ids, mask, dids, dmask, output_hidden_states=True)
    m = fxlens.Model(hf)
    hf.double()
    with pytest.warns(UserWarning, match="captured again"):
        got = m(ids, dids, attention_mask=mask, decoder_attention_mask=dmask)
    assert got.dtype == torch.float64 and m.cfg.n_encoder_layers == 2
    torch.testing.assert_close(got, _hf(hf, ids, mask, dids, dmask).logits, atol=1e-10, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert patching.get_act_patch_resid_pre(m, ids, m.run_with_cache(ids, dids)[1], _metric, decoder_input=dids,
                                                stack="encoder").shape == (2, 7)


def test_an_encoder_alone_stays_a_single_stack_model():
    """T5EncoderModel keeps T5's config (is_encoder_decoder) but takes no decoder input."""
    torch.manual_seed(0)
    hf = _perturb(transformers.T5EncoderModel(_t5().config))
    m = fxlens.Model(hf)
    assert type(m) is fxlens.Model
    ids = torch.randint(1, V, (2, 6))
    _, cache = m.run_with_cache(ids, return_type=None)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], ref[1], atol=1e-5, rtol=0)


def test_cross_attention_pattern_sweep_runs_over_encoder_positions():
    """Each (head, decoder pos, encoder pos) entry of decoder.1's cross-attention pattern, against HF forwards
    that replace that entry through a hook on the eager attention weights' softmax."""
    hf, m = model("bart")
    corrupted = _inputs(True, seed=9, enc=4, dec=3)
    clean = _inputs(True, seed=10, enc=4, dec=3)
    clean = (clean[0], corrupted[1], corrupted[2], corrupted[3])
    _, clean_cache = m.run_with_cache(clean[0], clean[2], attention_mask=clean[1], decoder_attention_mask=clean[3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = patching.generic_activation_patch(
            m, corrupted[0], clean_cache, _metric, patching.layer_head_dest_src_pos_pattern_patch_setter, "cross_pattern",
            index_df=[(1, h, d, s) for h in range(4) for d in range(3) for s in range(4)], attention_mask=corrupted[1],
            decoder_input=corrupted[2], decoder_attention_mask=corrupted[3])
    assert got.shape == (48,)
    clean_pattern = _hf(hf, *clean, output_attentions=True).cross_attentions[1]
    import transformers.models.bart.modeling_bart as bart_module

    # the softmax inside decoder.1's cross-attention alone: a flag set by hooks around that module
    block = _layers(hf, "decoder")[1].encoder_attn
    inside, entry, softmax = [], [None], torch.nn.functional.softmax

    def patched(x, *args, **kw):
        out = softmax(x, *args, **kw)
        if inside:
            out = out.clone()
            h, d, s = entry[0]
            out[:, h, d, s] = clean_pattern[:, h, d, s]
        return out

    handles = [block.register_forward_pre_hook(lambda mod, args: inside.append(True)),
               block.register_forward_hook(lambda mod, args, out: inside.clear())]
    bart_module.nn.functional.softmax = patched
    want = []
    try:
        for h in range(4):
            for d in range(3):
                for s in range(4):
                    entry[0] = (h, d, s)
                    want.append(float(_metric(_hf(hf, *corrupted).logits)))
    finally:
        bart_module.nn.functional.softmax = softmax
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)
    assert got.std() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        grid = patching.generic_activation_patch(
            m, corrupted[0], clean_cache, _metric, patching.layer_head_dest_src_pos_pattern_patch_setter, "cross_pattern",
            index_axis_names=("layer", "head_index", "dest_pos", "src_pos"), attention_mask=corrupted[1],
            decoder_input=corrupted[2], decoder_attention_mask=corrupted[3])
    assert grid.shape == (3, 4, 3, 4)  # [decoder layers, heads, decoder positions, encoder positions]
    torch.testing.assert_close(grid[1].flatten(), got, atol=1e-6, rtol=0)
