"""Generation with interventions against HF's ``generate``.

References: HF ``generate(do_sample=False)`` for greedy tokens; HF ``generate`` with a plain forward
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
ROTARY = ["llama", "qwen2", "neox"]

warnings.filterwarnings("ignore", message="generate recomputes")


def prompt(batch=1, seq=5, seed=0):
    return torch.randint(3, 90, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_generate(hf, ids, mask=None):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), max_new_tokens=NEW,
                           min_new_tokens=NEW, do_sample=False, pad_token_id=0)


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


def test_the_step_program_is_built_once_and_reused_at_every_length():
    _, model = cached_model("llama")
    steer = [fxlens.Steer("blocks.1.hook_resid_pre", torch.ones(model.cfg.d_model))]
    model.generate(prompt(seed=7), 2, stop_at_eos=False, interventions=steer)
    before = len(model.programs)
    model.generate(prompt(seed=8), NEW, stop_at_eos=False, interventions=steer)
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
