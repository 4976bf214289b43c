"""State-space and hybrid models (issue 10): captured per input length, every feature checked against HF.

Mamba, Mamba2 and Jamba (a hybrid: attention, Mamba and mixture-of-experts layers) fix the sequence
length in their code (a Python loop over positions, chunking), so fxlens captures them once per input
length (``graphs.lengths``, ``Derived.at_length``). Every check is against the HF model itself:

- logits equal HF's (1e-5, float32) at two lengths, and at a batch size other than the capture's;
- every ``blocks.{i}.hook_resid_pre`` / ``hook_resid_post`` equals ``output_hidden_states`` (HF's Mamba
  and Mamba2 list each layer's output there, not the embeddings: the first resid_pre is checked against
  the input embeddings);
- ``blocks.{i}.hook_mixer_out`` equals a plain ``register_forward_hook`` on the mixer module;
- a resid_pre sweep (``get_act_patch_resid_pre``) equals a loop of plain HF forwards, one per cell,
  each with a forward-pre-hook that writes the clean residual at one position;
- the fallback is told once (one UserWarning for the Model, whatever the lengths used);
- a length equal to one of the model's own sizes is refused with the lengths that work.
"""

import warnings

import pytest
import torch
import transformers as T

import fxlens
from fxlens import patching
from fxlens.engine.inputs import InputError

VOCAB = 100
TOL = 1e-5


def _mamba():
    return T.MambaForCausalLM(T.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                            expand=2, conv_kernel=4, time_step_rank=4, use_cache=False))


def _mamba2():
    return T.Mamba2ForCausalLM(T.Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                              num_heads=4, head_dim=16, n_groups=1, expand=2, conv_kernel=4,
                                              chunk_size=8, time_step_rank=4, use_cache=False))


def _jamba():
    return T.JambaForCausalLM(T.JambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
        use_mamba_kernels=False, use_cache=False))


# family -> (builder, layer list path, mixer module path of layer 0)
FAMILIES = {
    "mamba": (_mamba, "backbone.layers", "backbone.layers.{i}.mixer"),
    "mamba2": (_mamba2, "backbone.layers", "backbone.layers.{i}.mixer"),
    "jamba": (_jamba, "model.layers", "model.layers.{i}.mamba"),
}
_MODELS: dict = {}


def _model(family):
    """(hf, fxlens.Model, the UserWarnings of wrapping), built once per session."""
    if family not in _MODELS:
        torch.manual_seed(0)
        hf = FAMILIES[family][0]().eval()
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model = fxlens.Model.from_hf(hf)
        _MODELS[family] = (hf, model, [w for w in seen if "once per input length" in str(w.message)])
    return _MODELS[family]


def _ids(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf(hf, ids, **kwargs):
    with torch.no_grad():
        return hf(input_ids=ids, use_cache=False, **kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_hf_at_two_lengths_and_batch_sizes(family):
    hf, model, _ = _model(family)
    for batch, length in ((2, 7), (3, 11), (1, 11)):
        ids = _ids(batch, length)
        got = model(ids)
        assert got.shape == (batch, length, VOCAB)
        assert (got - _hf(hf, ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_residual_sites_equal_hf_hidden_states(family):
    hf, model, _ = _model(family)
    ids = _ids(2, 11, seed=2)
    hidden = _hf(hf, ids, output_hidden_states=True).hidden_states
    _, cache = model.run_with_cache(ids, names_filter=lambda n: "hook_resid_" in n)
    n = model.cfg.n_layers
    if family in ("mamba", "mamba2"):
        # HF's Mamba models list each layer's output (then the final norm's), not the embeddings
        assert len(hidden) == n + 1
        with torch.no_grad():
            embedded = hf.get_input_embeddings()(ids)
        assert (cache["blocks.0.hook_resid_pre"] - embedded).abs().max().item() <= TOL
        for i in range(n):
            assert (cache[f"blocks.{i}.hook_resid_post"] - hidden[i]).abs().max().item() <= TOL
        for i in range(1, n):
            assert (cache[f"blocks.{i}.hook_resid_pre"] - hidden[i - 1]).abs().max().item() <= TOL
        return
    for i in range(n):
        assert (cache[f"blocks.{i}.hook_resid_pre"] - hidden[i]).abs().max().item() <= TOL
    for i in range(n - 1):  # the last hidden state is after the final norm
        assert (cache[f"blocks.{i}.hook_resid_post"] - hidden[i + 1]).abs().max().item() <= TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixer_out_equals_a_plain_forward_hook_on_the_mixer(family):
    hf, model, _ = _model(family)
    path = FAMILIES[family][2]
    layers = [i for i in range(model.cfg.n_layers) if f"blocks.{i}.hook_mixer_out" in model.sites]
    assert layers, "no mixer site"
    ids = _ids(2, 7, seed=3)
    seen = {}
    handles = [hf.get_submodule(path.format(i=i)).register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in layers]
    try:
        _hf(hf, ids)
    finally:
        for h in handles:
            h.remove()
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_mixer_out"))
    for i in layers:
        assert (cache[f"blocks.{i}.hook_mixer_out"] - seen[i]).abs().max().item() <= TOL
        assert f"blocks.{i}.hook_attn_out" not in model.sites  # a state-space mixer is not attention


def _layer_inputs(hf, layers_path, ids):
    """Each layer's input (its hidden_states argument) on a plain HF forward, read by forward-pre-hooks."""
    seen = {}
    layers = hf.get_submodule(layers_path)
    handles = [layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        _hf(hf, ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def _hooked_resid_pre(hf, layers_path, ids, layer, pos, value):
    """HF logits with the input of layer ``layer`` at ``pos`` replaced by ``value`` [batch, d]."""
    layer_module = hf.get_submodule(layers_path)[layer]

    def pre(module, args, kwargs):
        if args:
            h = args[0].clone()
            h[:, pos] = value
            return (h, *args[1:]), kwargs
        h = kwargs["hidden_states"].clone()
        h[:, pos] = value
        return args, {**kwargs, "hidden_states": h}

    handle = layer_module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        return _hf(hf, ids).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["mamba", "mamba2", "jamba"])
def test_resid_pre_sweep_equals_a_loop_of_hooked_hf_forwards(family):
    hf, model, _ = _model(family)
    layers_path = FAMILIES[family][1]
    clean, corrupted = _ids(1, 7, seed=4), _ids(1, 7, seed=5)
    corrupted[:, 0] = clean[:, 0]  # position 0 unchanged: a cell that changes nothing must be the base run

    def metric(logits):
        return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()

    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the whole-model rows fallback, if taken, is exact
        got = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    inputs = _layer_inputs(hf, layers_path, clean)
    want = torch.empty(model.cfg.n_layers, 7)
    for layer in range(model.cfg.n_layers):
        for pos in range(7):
            want[layer, pos] = metric(_hooked_resid_pre(hf, layers_path, corrupted, layer, pos, inputs[layer][:, pos]))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_per_length_fallback_is_told_once(family):
    hf, model, told = _model(family)
    assert len(told) == 1
    assert "once per input length" in str(told[0].message) and type(hf).__name__ in str(told[0].message)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        model(_ids(2, 13))
        model(_ids(2, 7))
    assert not [w for w in later if "once per input length" in str(w.message)]


def test_a_length_equal_to_a_model_size_is_refused_with_lengths_that_work():
    # state_size is 8 (and Mamba2's chunk size too): at length 8 a state axis would look like positions
    hf, model, _ = _model("mamba")
    with pytest.raises(InputError, match=r"a length of 8 equals one of the model's own sizes.*pad to 9 tokens"):
        model(_ids(1, 8))
    assert (model(_ids(1, 9)) - _hf(hf, _ids(1, 9)).logits).abs().max().item() <= TOL
