"""Properties over random small models, batches, padding and sites (hypothesis).

For random family, depth, heads, head size, batch, length and right padding: the captured model's
logits equal HF's; every site's value has the shape its ``Site.axes`` promise and is finite where
the input is not padding; and a hook that returns its input unchanged is transparent: the logits do
not move and the hook sees exactly the value ``run_with_cache`` returns for that site; and adding a
random tensor to ``blocks.{i}.hook_resid_pre`` equals the same addition in a forward pre-hook on HF
layer i.

Models are built once per drawn configuration (``build``); examples are few and deadlines off so
that the file runs in about a minute on two cores.
"""

import functools

import torch
from families import hf_logits, make
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxlens

TOL = 1e-5
FAMILIES = ("llama", "gpt2", "neox", "gemma2", "opt", "bert")
CAUSAL = {f: f != "bert" for f in FAMILIES}
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "neox": "gpt_neox.layers", "gemma2": "model.layers",
          "opt": "model.decoder.layers", "bert": "bert.encoder.layer"}

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)


@st.composite
def configs(draw):
    family = draw(st.sampled_from(FAMILIES))
    n_heads = draw(st.sampled_from([1, 2, 4]))
    n_kv = draw(st.sampled_from([d for d in (1, 2, 4) if n_heads % d == 0])) if family == "llama" else None
    return family, draw(st.integers(1, 3)), n_heads, n_kv, draw(st.sampled_from([4, 8]))


@functools.lru_cache(maxsize=8)
def build(config):
    family, n_layers, n_heads, n_kv, d_head = config
    d_model = n_heads * d_head
    hf = make(family, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, d_mlp=4 * d_model, seed=n_layers)
    return hf, fxlens.Model.from_hf(hf)


@st.composite
def batches(draw):
    """(ids, mask): 1-4 rows of 1-12 tokens, each row right-padded to a random valid length >= 1."""
    batch, seq = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(1, seq), min_size=batch, max_size=batch))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def expected_sizes(model, name, ids) -> dict:
    c = model.cfg
    # k and v (and their inputs, as TransformerLens splits them) have the key-value heads of grouped-query attention
    heads = c.n_key_value_heads if name.endswith(("hook_k", "hook_v", "hook_rot_k", "hook_k_input", "hook_v_input")) else c.n_heads
    b, p = ids.shape
    return {"batch": b, "pos": p, "query_pos": p, "key_pos": p, "head": heads, "d_head": c.d_head,
            "d_model": c.d_model, "d_mlp": c.d_mlp, "one": 1}


def unpadded(axes, shape, mask, causal) -> torch.Tensor:
    """Bool of ``shape``: True where every batch/position index of the element is an unpadded token
    (and, for attention scores of a causal model, the key is not after the query)."""
    ok = torch.ones(shape, dtype=torch.bool)
    if "batch" in axes:
        b_ax = axes.index("batch")
        for pos in ("pos", "query_pos", "key_pos"):
            if pos in axes:
                p_ax = axes.index(pos)
                view = [1] * len(shape)
                view[b_ax], view[p_ax] = shape[b_ax], shape[p_ax]
                m = mask.bool() if b_ax < p_ax else mask.bool().T
                ok = ok & m.reshape(view)
    if causal and "query_pos" in axes and "key_pos" in axes:
        q_ax, k_ax = axes.index("query_pos"), axes.index("key_pos")
        view = [1] * len(shape)
        view[q_ax], view[k_ax] = shape[q_ax], shape[k_ax]
        tril = torch.ones(shape[q_ax], shape[k_ax], dtype=torch.bool).tril()
        ok = ok & (tril if q_ax < k_ax else tril.T).reshape(view)
    return ok


@SETTINGS
@given(config=configs(), batch=batches())
def test_logits_equal_hf_logits_at_unpadded_positions(config, batch):
    hf, model = build(config)
    ids, mask = batch
    got, want = model(ids, mask), hf_logits(hf, ids, mask)
    assert got.shape == want.shape
    valid = mask.bool()
    assert (got[valid] - want[valid]).abs().max().item() <= TOL


@SETTINGS
@given(config=configs(), batch=batches(), data=st.data())
def test_cached_sites_have_their_axes_shape_and_are_finite_where_unpadded(config, batch, data):
    _, model = build(config)
    ids, mask = batch
    names = data.draw(st.lists(st.sampled_from(model.sites), min_size=1, max_size=4, unique=True), label="sites")
    _, cache = model.run_with_cache(ids, mask, names_filter=names)
    assert set(cache) == set(names)
    for name in names:
        site, value = model.site(name), cache[name]
        assert value.dim() == len(site.axes), (name, site.axes, tuple(value.shape))
        sizes = expected_sizes(model, name, ids)
        for axis, size in zip(site.axes, value.shape):
            if axis in sizes:
                assert size == sizes[axis], (name, site.axes, tuple(value.shape))
        # attention scores are -inf where masked; everything else is finite wherever the token is real
        keep = unpadded(site.axes, value.shape, mask, CAUSAL[config[0]] and name.endswith("hook_attn_scores"))
        assert torch.isfinite(value[keep]).all(), name


@SETTINGS
@given(config=configs(), batch=batches(), data=st.data())
def test_an_identity_hook_is_transparent(config, batch, data):
    _, model = build(config)
    ids, mask = batch
    name = data.draw(st.sampled_from(model.sites), label="site")
    seen = []

    def identity(x, hook):
        seen.append(x.clone())
        return x

    hooked = model.run_with_hooks(ids, mask, fwd_hooks=[(name, identity)])
    logits, cache = model.run_with_cache(ids, mask, names_filter=name)
    valid = mask.bool()
    assert (hooked[valid] - logits[valid]).abs().max().item() <= TOL
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], cache[name], rtol=0, atol=TOL, msg=lambda m: f"{name}: {m}")


@SETTINGS
@given(config=configs(), batch=batches(), data=st.data())
def test_adding_to_resid_pre_equals_an_hf_pre_hook_doing_the_same(config, batch, data):
    hf, model = build(config)
    ids, mask = batch
    layer = data.draw(st.integers(0, model.cfg.n_layers - 1), label="layer")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    delta = torch.randn(*ids.shape, model.cfg.d_model, generator=g)

    def add(mod, args, kwargs):
        if args:
            return (args[0] + delta,) + args[1:], kwargs
        return args, dict(kwargs, hidden_states=kwargs["hidden_states"] + delta)

    handle = dict(hf.named_modules())[f"{LAYERS[config[0]]}.{layer}"].register_forward_pre_hook(add, with_kwargs=True)
    try:
        want = hf_logits(hf, ids, mask)
    finally:
        handle.remove()
    got = model.run_with_hooks(ids, mask, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", lambda x, hook: x + delta)])
    valid = mask.bool()
    assert (got[valid] - want[valid]).abs().max().item() <= TOL
