"""Generation with interventions against HF's ``generate``.

References: HF ``generate(do_sample=False)`` (which decodes from its own key/value cache) for greedy
tokens; HF's full forward for each cached decode step's logits; HF ``generate`` with a plain forward
hook on a decoder layer (adding a vector to its output) for a steered generation; left-padded batches
where HF derives positions from the mask (rotary families, where the shift does not matter).
"""

import warnings

import pytest
import torch
from conftest import cached_model

import fxlens

NEW = 8
FAMILIES = ["llama", "qwen2", "neox", "gpt2"]
ROTARY = ["llama", "qwen2", "neox", "mistral"]

warnings.filterwarnings("ignore", message="generate recomputes")


def prompt(batch=1, seq=5, seed=0):
    return torch.randint(3, 90, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_generate(hf, ids, mask=None):
    """HF's greedy generation of NEW tokens with no end-of-sequence token (so nothing is banned or cut)."""
    saved = hf.config.eos_token_id, hf.generation_config.eos_token_id
    hf.config.eos_token_id = hf.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), max_new_tokens=NEW,
                               do_sample=False, pad_token_id=0)
    finally:
        hf.config.eos_token_id, hf.generation_config.eos_token_id = saved


def layers(hf):
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        try:
            return hf.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError("no decoder layers")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_hf_generate(family):
    hf, model = cached_model(family)
    for seed in range(2):
        ids = prompt(seed=seed)
        assert torch.equal(model.generate(ids, NEW, stop_at_eos=False), hf_generate(hf, ids))


@pytest.mark.parametrize("family", ROTARY)
def test_left_padded_batches_equal_hf_generate(family):
    hf, model = cached_model(family)
    ids = prompt(3, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    got = model.generate(ids, NEW, stop_at_eos=False, attention_mask=mask)
    assert torch.equal(got, hf_generate(hf, ids, mask))
    # a list of prompts of different lengths is left-padded by fxlens
    rows = [ids[i][mask[i].bool()] for i in range(3)]
    assert torch.equal(model.generate(rows, NEW, stop_at_eos=False)[:, -NEW:], got[:, -NEW:])


@pytest.mark.parametrize("family", FAMILIES)
def test_steered_generation_equals_hf_generate_with_a_forward_hook(family):
    hf, model = cached_model(family)
    ids = prompt(seed=5)
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2)) * 4

    def add(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + vector,) + output[1:]
        return output + vector

    handle = layers(hf)[0].register_forward_hook(add)
    try:
        want = hf_generate(hf, ids)
    finally:
        handle.remove()
    plain = model.generate(ids, NEW, stop_at_eos=False)
    steered = model.generate(ids, NEW, stop_at_eos=False, interventions=[fxlens.Steer("blocks.0.hook_resid_post", vector)])
    assert torch.equal(steered, want)
    assert not torch.equal(steered, plain)  # the vector changes the continuation
    hooked = model.generate(ids, NEW, stop_at_eos=False, fwd_hooks=[("blocks.0.hook_resid_post", lambda v, hook: v + vector)])
    assert torch.equal(hooked, want)


@pytest.mark.parametrize("family", ROTARY)
def test_steered_left_padded_batches_equal_hf_generate_with_a_forward_hook(family):
    hf, model = cached_model(family)
    ids, mask = prompt(3, 6, seed=21), None
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5)) * 4

    def add(module, args, output):
        return (output[0] + vector,) + output[1:] if isinstance(output, tuple) else output + vector

    handle = layers(hf)[0].register_forward_hook(add)
    try:
        want = hf_generate(hf, ids, mask)
    finally:
        handle.remove()
    got = model.generate(ids, NEW, stop_at_eos=False, attention_mask=mask,
                         interventions=[fxlens.Steer("blocks.0.hook_resid_post", vector)])
    assert torch.equal(got, want)
    assert not torch.equal(got, model.generate(ids, NEW, stop_at_eos=False, attention_mask=mask))


def test_the_recompute_program_is_built_once_and_reused_at_every_length():
    _, model = cached_model("llama")
    steer = [fxlens.Steer("blocks.1.hook_resid_pre", torch.ones(model.cfg.d_model))]
    model.generate(prompt(seed=7), 2, stop_at_eos=False, interventions=steer, use_past_kv_cache=False)
    before = len(model.programs)
    model.generate(prompt(seed=8), NEW, stop_at_eos=False, interventions=steer, use_past_kv_cache=False)
    assert len(model.programs) == before


def test_sampling_is_reproducible_with_a_generator_and_follows_top_k():
    _, model = cached_model("llama")
    ids = prompt(2, 4, seed=9)

    def run(seed, **kw):
        return model.generate(ids, NEW, stop_at_eos=False, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    # top_k=1 is greedy whatever the seed
    assert torch.equal(run(3, top_k=1), model.generate(ids, NEW, stop_at_eos=False))
    assert torch.equal(run(4, top_p=1e-6), model.generate(ids, NEW, stop_at_eos=False))


def test_generation_stops_at_eos_and_pads_finished_rows_with_it():
    hf, model = cached_model("llama")
    ids = prompt(seed=11)
    free = model.generate(ids, NEW, stop_at_eos=False)
    eos = int(free[0, ids.shape[1] + 2])  # the third generated token plays EOS
    got = model.generate(ids, NEW, eos_token_id=eos)
    assert got.shape[1] == ids.shape[1] + 3 and int(got[0, -1]) == eos
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(ids, NEW)  # no tokenizer: nothing to take the EOS from
    with pytest.raises(ValueError, match="return_type"):
        model.generate(ids, NEW, stop_at_eos=False, return_type="embeds")


# ---- the key/value cache ---------------------------------------------------------------------------

from fxlens.engine.decode import Decoder  # noqa: E402
from fxlens.engine.rows.blocks import Blocks  # noqa: E402


def _left_padded(batch=3, seq=6, seed=3):
    ids = prompt(batch, seq, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", FAMILIES + ["opt", "gemma2"])
def test_each_cached_step_equals_a_forward_of_the_whole_sequence(family):
    """The decode step's logits against the full forward (HF's own, and fxlens' with the same steer)."""
    from families import make

    hf, model = cached_model(family) if family in FAMILIES else (None, None)
    if hf is None:
        hf = make(family, **({"n_kv_heads": 2} if family == "gemma2" else {}))
        model = fxlens.Model.from_hf(hf)
    ids, mask = _left_padded()
    full = torch.cat([ids, prompt(3, 4, seed=4)], dim=1)
    fmask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], dim=1)
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    site = "blocks.1.hook_resid_mid" if family != "neox" else "blocks.1.hook_attn_out"
    plain, steered = Decoder(model, [], []), Decoder(model, [], [])
    for n in range(ids.shape[1], full.shape[1] + 1):
        # absolute positions: one in the prompt, one generated (from the step that has it)
        steer = [fxlens.Steer(site, vector, pos=[2] + [p for p in (7,) if p < n])]
        steered.interventions = steer
        with torch.no_grad():
            got = plain.step(full[:, :n], fmask[:, :n])
            want = hf(input_ids=full[:, :n], attention_mask=fmask[:, :n]).logits[:, -1]
            got_s = steered.step(full[:, :n], fmask[:, :n])
            want_s = model.run_with_interventions(full[:, :n], steer, fmask[:, :n])[:, -1]
        scale = want.abs().max().item()
        if family != "gpt2":  # GPT-2's learned positions count padding slots in fxlens, not in HF (see generate's docs)
            assert (got - want).abs().max().item() < 1e-5 * scale, n
        assert (got_s - want_s).abs().max().item() < 1e-5 * scale, n


def test_decode_programs_are_built_once_and_reused_at_every_step():
    _, model = cached_model("llama")
    steer = [fxlens.Steer("blocks.1.hook_resid_pre", torch.ones(model.cfg.d_model))]
    model.generate(prompt(seed=7), 3, stop_at_eos=False, interventions=steer)
    blocks = Blocks.of(model._active)
    before = [len(p) for p in blocks.programs]
    model.generate(prompt(seed=8), NEW, stop_at_eos=False, interventions=steer)
    assert [len(p) for p in blocks.programs] == before


def test_compiled_decode_equals_uncompiled(monkeypatch):
    """torch.compile through dynamo with the aot_eager backend (inductor's C++ build takes minutes on CI)."""
    import fxlens.engine.programs as programs

    real = torch.compile
    monkeypatch.setattr(programs.torch, "compile", lambda gm, **kw: real(gm, backend="aot_eager", **kw))
    _, model = cached_model("qwen2")
    ids, mask = _left_padded(seed=12)
    steer = [fxlens.Steer("blocks.0.hook_resid_post", torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)))]
    want = model.generate(ids, 5, stop_at_eos=False, attention_mask=mask, interventions=steer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile would run uncompiled, said as a RuntimeWarning
        got = model.generate(ids, 5, stop_at_eos=False, attention_mask=mask, interventions=steer, compile=True)
    assert torch.equal(got, want)


def _hf_steered(hf, ids, mask, vector, when):
    """HF generate with a plain hook adding ``vector`` to layer 0's output at prefill ('prompt') or at the
    one-token decode steps ('generated')."""

    def add(module, args, output):
        seq = (output[0] if isinstance(output, tuple) else output).shape[1]
        if (when == "prompt") != (seq == 1):
            return (output[0] + vector,) + output[1:] if isinstance(output, tuple) else output + vector
        return output

    handle = layers(hf)[0].register_forward_hook(add)
    try:
        return hf_generate(hf, ids, mask)
    finally:
        handle.remove()


@pytest.mark.parametrize("part", ["prompt", "generated"])
def test_an_intervention_limited_to_the_prompt_or_to_generated_tokens(part):
    hf, model = cached_model("llama")
    ids, mask = _left_padded(seed=13)
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 4
    spec = fxlens.During(fxlens.Steer("blocks.0.hook_resid_post", vector), part)
    got = model.generate(ids, NEW, stop_at_eos=False, attention_mask=mask, interventions=[spec])
    assert torch.equal(got, _hf_steered(hf, ids, mask, vector, part))
    again = model.generate(ids, NEW, stop_at_eos=False, attention_mask=mask, interventions=[spec], use_past_kv_cache=False)
    assert torch.equal(got, again)
    with pytest.raises(ValueError, match="part"):
        fxlens.During(spec.spec, "answer")


def test_a_cache_over_the_generation_equals_a_cache_of_the_result():
    hf, model = cached_model("llama")
    ids, mask = _left_padded(seed=14)
    steer = [fxlens.Steer("blocks.0.hook_resid_post", torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(4)))]
    names = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z"]
    out, cache = model.generate(ids, 4, stop_at_eos=False, attention_mask=mask, interventions=steer, names_filter=names)
    fmask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], dim=1)
    _, want = model.run_with_interventions(out, steer, fmask, names_filter=names)
    real = fmask.bool()
    for name in names:
        assert cache[name].shape == want[name].shape, name
        # padding slots' own rows are not compared: a pattern row of a padding query is NaN (no key to attend)
        got, ref = (cache[name][real], want[name][real]) if "pattern" not in name else (
            cache[name].transpose(1, 2)[real], want[name].transpose(1, 2)[real])
        assert (got - ref).abs().max().item() < 1e-5, name


def test_hooks_on_materialised_sites_decode_from_the_cache():
    """A pattern (computed beside SDPA) and per-head results are sites of a block: no recompute."""
    _, model = cached_model("llama")
    ids, mask = _left_padded(seed=16)
    halve = [("blocks.1.attn.hook_pattern", lambda v, hook: v * 0.5), ("blocks.0.attn.hook_result", lambda v, hook: v * 2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.generate(ids, 4, stop_at_eos=False, attention_mask=mask, fwd_hooks=halve)
    assert not [w for w in caught if "recomputes" in str(w.message)]
    assert torch.equal(got, model.generate(ids, 4, stop_at_eos=False, attention_mask=mask, fwd_hooks=halve,
                                           use_past_kv_cache=False))
    assert not torch.equal(got, model.generate(ids, 4, stop_at_eos=False, attention_mask=mask))


def test_hooks_see_the_new_positions_and_an_uncacheable_edit_recomputes_said_once():
    _, model = cached_model("llama")
    ids, mask = _left_padded(seed=15)
    shapes = []
    model.generate(ids, 3, stop_at_eos=False, attention_mask=mask,
                   fwd_hooks=[("blocks.0.hook_resid_post", lambda v, hook: shapes.append(tuple(v.shape)))])
    assert shapes == [(3, 6, model.cfg.d_model), (3, 1, model.cfg.d_model), (3, 1, model.cfg.d_model)]
    mean = [fxlens.Ablate("blocks.0.hook_resid_post", how="mean")]  # the mean over real tokens reads every position
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.generate(ids, 3, stop_at_eos=False, attention_mask=mask, interventions=mean)
    said = [w for w in caught if "recomputes" in str(w.message)]
    assert len(said) == 1 and "mean over real tokens" in str(said[0].message)
    assert torch.equal(got, model.generate(ids, 3, stop_at_eos=False, attention_mask=mask, interventions=mean,
                                           use_past_kv_cache=False))
