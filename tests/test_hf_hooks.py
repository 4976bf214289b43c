"""The HF-hook reference library (tests/hf_hooks.py) checked before anything is checked against it.

- With no replacement its forward returns exactly the HF model's logits, and every site it reads
  equals fxlens' ``run_with_cache`` value for the same name (1e-5), under right and left padding.
- Replacing a site with its own value changes nothing (each view's put undoes its get).
- Replacing a site with another run's value gives the downstream values of that run: q, k, v -> z;
  z -> attn_out; attn_out -> resid_mid - resid_pre; resid_mid -> mlp_out; mlp_out -> resid_post; resid_pre -> the
  whole layer. These use only the HF model, so the replacement semantics are pinned down without fxlens.
"""

import pytest
import torch
from families import tokens

import hf_hooks as H

TOL = 1e-5
FAMILIES = list(H.FAMILY_DIMS)


def batch(padding):
    """Three rows of 6 tokens with 6, 4 and 3 real tokens, padded on the given side."""
    ids = tokens(3, 6, seed=5)
    return ids, H.padding_mask(ids, padding)


maxdiff = H.maxdiff


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_reads_equal_hf_logits_and_fxlens_cache(family, padding):
    hf, model = H.pair(family)
    ids, mask = batch(padding)
    sites = H.all_sites(hf)
    logits, cache = H.hf_forward(hf, ids, mask, read=sites)
    with torch.no_grad():
        assert maxdiff(logits, hf(input_ids=ids, attention_mask=mask).logits) == 0
    _, fx = model.run_with_cache(ids, mask, names_filter=sites)
    assert set(cache) == set(sites)
    for site in sites:
        assert maxdiff(fx[site], cache[site]) <= TOL, site
    h, kv, dh = H.dims(hf)
    assert cache["blocks.0.attn.hook_q"].shape == (3, 6, h, dh)
    assert cache["blocks.0.attn.hook_k"].shape == (3, 6, kv, dh)


@pytest.mark.parametrize("family", FAMILIES)
def test_replacing_every_site_by_itself_changes_nothing(family):
    hf, _ = H.pair(family)
    ids, mask = batch("right")
    want = H.hf_run(hf, ids, mask)
    got = H.hf_run(hf, ids, mask, replace={s: (lambda v: v) for s in H.all_sites(hf)})
    assert maxdiff(got, want) <= TOL


DOWNSTREAM = [  # (replaced kinds, a kind then equal to the other run's)
    (("q", "k", "v"), "z"),
    (("z",), "attn_out"),
    (("attn_out",), "attn_out"),  # and resid_mid - resid_pre equals it (below)
    (("resid_mid",), "mlp_out"),
    (("mlp_out", "resid_mid"), "resid_post"),
    (("resid_pre",), "resid_post"),
]


@pytest.mark.parametrize("replaced, downstream", DOWNSTREAM)
@pytest.mark.parametrize("family", FAMILIES)
def test_replacing_with_another_runs_value_gives_its_downstream_values(family, replaced, downstream):
    hf, _ = H.pair(family)
    if H.spec(hf)["parallel"] and ("resid_mid" in replaced or downstream == "resid_mid"):
        pytest.skip("a parallel block has no resid_mid")
    if H.spec(hf)["parallel"] and downstream == "resid_post" and replaced != ("resid_pre",):
        replaced = ("resid_pre",)
    ids, mask = batch("right")
    other = (ids + 37) % 97 + 3
    layer = 1
    names = [H.name(k, layer) for k in replaced]
    theirs = H.hf_cache(hf, other, mask, names + [H.name(downstream, layer)])
    ours = H.hf_cache(hf, ids, mask, [H.name(downstream, layer)])
    _, got = H.hf_forward(hf, ids, mask, replace={n: (lambda v, n=n: theirs[n]) for n in names}, read=[H.name(downstream, layer)])
    target = H.name(downstream, layer)
    assert maxdiff(ours[target], theirs[target]) > 1e-3  # the two runs differ there
    assert maxdiff(got[target], theirs[target]) <= TOL
    if replaced == ("attn_out",) and not H.spec(hf)["parallel"]:
        _, mid = H.hf_forward(hf, ids, mask, replace={names[0]: lambda v: theirs[names[0]]},
                              read=[H.name("resid_pre", layer), H.name("resid_mid", layer)])
        assert maxdiff(mid[H.name("resid_mid", layer)] - mid[H.name("resid_pre", layer)], theirs[names[0]]) <= TOL
