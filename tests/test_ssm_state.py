"""``blocks.{i}.mixer.hook_ssm_state``: a Mamba layer's recurrent state after each position, cached and hooked.

References, both independent of fxlens:
- reading: HF's own scan. Run on the first t+1 tokens with a cache, HF's full-sequence path stores the
  state after position t (``cache.get_recurrent_state(layer)``);
- writing: the mixer's torch path (``MambaMixer.slow_forward``) written out from the module's own
  parameters, with the edit applied to the state inside its loop over positions, and put in place of
  the HF mixer's output by a plain forward hook. Unedited, it reproduces the HF mixer.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import all_families as A
import fxlens

SEQ = 5


def _wrapped(family):
    hf = A.build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fxlens.Model.from_hf(hf)
    return hf, model


@pytest.fixture(scope="module")
def mamba():
    return _wrapped("mamba")


def mixer_by_hand(mixer, x, edit=None):
    """(output, states [batch, pos, d_inner, d_state]) of a Mamba mixer on ``x``; ``edit(p, state)`` may
    replace the state after position p before the position's output and the next step read it."""
    seq = x.shape[1]
    hs, gate = mixer.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    hs = F.silu(mixer.conv1d(hs)[..., :seq])
    time_step, B, C = torch.split(mixer.x_proj(hs.transpose(1, 2)),
                                  [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
    dt = F.softplus(mixer.dt_proj.weight @ time_step.transpose(1, 2) + mixer.dt_proj.bias.float()[:, None])
    a = -torch.exp(mixer.A_log.float())
    dA = torch.exp(a[None, :, None, :] * dt[:, :, :, None])
    dBu = dt[:, :, :, None] * B[:, None, :, :] * hs[:, :, :, None]
    state = torch.zeros(x.shape[0], hs.shape[1], mixer.ssm_state_size)
    ys, states = [], []
    for p in range(seq):
        state = dA[:, :, p] * state + dBu[:, :, p]
        if edit is not None:
            state = edit(p, state)
        states.append(state)
        ys.append((state @ C[:, p, :, None])[..., 0])
    y = torch.stack(ys, -1) + hs * mixer.D[None, :, None]
    y = y * F.silu(gate)
    return mixer.out_proj(y.transpose(1, 2)), torch.stack(states, 1)


def hf_with_mixer_by_hand(hf, layer, ids, edit=None):
    mixer = hf.backbone.layers[layer].mixer
    handle = mixer.register_forward_hook(lambda m, args, out: mixer_by_hand(m, args[0], edit)[0])
    try:
        with torch.no_grad():
            return hf(input_ids=ids).logits
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def falcon_mamba():
    return _wrapped("falcon_mamba")


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba"])
def test_cached_state_equals_hfs_state_after_each_position(family, request):
    hf, model = request.getfixturevalue(family)
    ids = A.probe_ids(2, SEQ, seed=3)
    names = [f"blocks.{i}.mixer.hook_ssm_state" for i in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(ids, names_filter=names)
    for i, name in enumerate(names):
        want = []
        for t in range(SEQ):
            with torch.no_grad():
                out = hf(input_ids=ids[:, : t + 1], use_cache=True)
            past = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache_params
            want.append(past.get_recurrent_state(i))
        want = torch.stack(want, 1)
        got = cache[name]
        assert got.shape == want.shape == (2, SEQ, *want.shape[2:])
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_reference_mixer_reproduces_hf(mamba):
    hf, _ = mamba
    ids = A.probe_ids(2, SEQ, seed=3)
    with torch.no_grad():
        plain = hf(input_ids=ids).logits
    assert (hf_with_mixer_by_hand(hf, 0, ids) - plain).abs().max() <= 1e-5


@pytest.mark.parametrize("layer, pos", [(0, 1), (1, 3), (0, SEQ - 1)])
def test_a_hook_on_the_state_acts_as_an_edit_inside_hfs_scan(mamba, layer, pos):
    """Scaling the state after one position changes that position's output and every later state."""
    hf, model = mamba
    ids = A.probe_ids(2, SEQ, seed=4)
    shift = torch.randn(model.graph.dims["d_inner"], model.graph.dims["d_state"], generator=torch.Generator().manual_seed(0))

    def edit(p, state):
        return state * 1.5 + shift if p == pos else state

    def hook(x, hook):
        x = x.clone()
        x[:, pos] = x[:, pos] * 1.5 + shift
        return x

    want = hf_with_mixer_by_hand(hf, layer, ids, edit)
    with torch.no_grad():
        got = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.mixer.hook_ssm_state", hook)])
        plain = model(ids)
    assert (got - want).abs().max() <= 1e-5
    assert (got - plain).abs().max() > 1e-3  # the edit did act


def test_patching_states_at_two_positions_sets_both(mamba):
    """A patch of the states at two positions: both take the patched value, the rest evolve from them."""
    hf, model = mamba
    ids, other = A.probe_ids(1, SEQ, seed=4), A.probe_ids(1, SEQ, seed=5)
    name = "blocks.1.mixer.hook_ssm_state"
    _, cache = model.run_with_cache(other, names_filter=[name])
    source = cache[name]

    def edit(p, state):
        return source[:, p] if p in (1, 3) else state

    want = hf_with_mixer_by_hand(hf, 1, ids, edit)

    def hook(x, hook):
        x = x.clone()
        x[:, [1, 3]] = source[:, [1, 3]]
        return x

    with torch.no_grad():
        got = model.run_with_hooks(ids, fwd_hooks=[(name, hook)])
    assert (got - want).abs().max() <= 1e-5


def test_an_identity_hook_leaves_the_logits_bit_identical(mamba):
    _, model = mamba
    ids = A.probe_ids(2, SEQ, seed=3)
    with torch.no_grad():
        plain = model(ids)
        hooked = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.mixer.hook_ssm_state", lambda x, hook: x)])
    assert torch.equal(plain, hooked)


def test_mamba2_offers_no_per_position_state(tmp_path):
    """Mamba2's torch path scans in chunks and holds no per-position state: no site, no wrong one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fxlens.Model.from_hf(A.build("mamba2"))
    assert not [n for n in model.site_table if "ssm_state" in n]
    assert any(n.endswith("hook_mixer_out") for n in model.site_table)


def test_a_patch_intervention_of_one_position_equals_the_edit_in_hfs_scan(mamba):
    hf, model = mamba
    ids, other = A.probe_ids(2, SEQ, seed=4), A.probe_ids(2, SEQ, seed=6)
    name = "blocks.0.mixer.hook_ssm_state"
    _, cache = model.run_with_cache(other, names_filter=[name])
    want = hf_with_mixer_by_hand(hf, 0, ids, lambda p, state: cache[name][:, p] if p == 2 else state)
    with torch.no_grad():
        got = model.run_with_interventions(ids, [fxlens.Patch(name, source=cache, pos=2)])
    got = got[0] if isinstance(got, tuple) else got
    assert (got - want).abs().max() <= 1e-5
