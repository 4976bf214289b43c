"""ActivationCache conveniences and ``fxlens.attribution`` checked by value against the HF model alone.

References: HF's ``output_hidden_states`` and plain HF-module hooks (tests/hf_hooks.py), and for
attribution an autograd reference made with those hooks: the corrupted input runs with a zero tensor
(requires_grad) added at the site of every layer, ``torch.autograd.grad`` of the metric gives the
gradient at the site, and a cell's estimate is ``metric(corrupted) + sum((clean - corrupted) * grad)``
over the axes the function does not keep (clean and corrupted values read with the same hooks).

- ``remove_batch_dim``: values equal the batch-1 run's (HF hooks and fxlens' batch-1 cache) squeezed.
- ``accumulated_resid``: resid_pre i is HF's ``hidden_states[i]``; ``final_post`` is the input of the
  final norm (HF's last hidden state is after it: the final norm of ``final_post`` must give it).
  ``incl_mid``, ``return_labels``; ``layer=`` as TransformerLens 4.3 defines it.
- ``stack_activation``: equals the HF-hook values stacked over layers; ``layer=`` as TransformerLens.
- ``decompose_resid``: the embeddings and every attn_out / mlp_out sum to the residual (1e-5).
- attribution: every ``get_act_patch_*`` of a hookable site against the HF autograd reference, right
  and left padding, a declared and a plain metric; the ``_every`` functions equal stacking their parts.

``layer=`` (None, -1, 0..n_layers) means what it means in TransformerLens 4.3.
"""

import functools

import pytest
import torch
from families import tokens

import hf_hooks as H
from fxlens import attribution, metrics, patching

TOL = 1e-5
B, S = 3, 6
FAMILIES = list(H.FAMILY_DIMS)
N = 2  # layers of every model here


def ids_mask(padding="right"):
    ids = tokens(B, S, seed=31)
    return ids, H.padding_mask(ids, padding)


maxdiff = H.maxdiff


FINAL_NORM = {"gpt2": "transformer.ln_f", "llama": "model.norm", "neox": "gpt_neox.final_layer_norm",
              "opt": "model.decoder.final_layer_norm", "bert": f"bert.encoder.layer.{N - 1}.output.LayerNorm"}


@functools.cache
def hf_values(family, padding="right"):
    """(hidden_states, {site: value} from HF hooks) on the padded batch."""
    hf, _ = H.pair(family)
    ids, mask = ids_mask(padding)
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    return hidden, H.hf_cache(hf, ids, mask, H.all_sites(hf))


@functools.cache
def fx_cache(family, padding="right"):
    _, model = H.pair(family)
    ids, mask = ids_mask(padding)
    return model.run_with_cache(ids, mask)[1]


# ---- remove_batch_dim --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_batch_dim_values_equal_the_batch_one_run_squeezed(family):
    hf, model = H.pair(family)
    one = tokens(1, S, seed=32)
    hf_one = H.hf_cache(hf, one, None, H.all_sites(hf))
    _, full = model.run_with_cache(one)
    _, squeezed = model.run_with_cache(one, remove_batch_dim=True)
    by_method = full.remove_batch_dim()
    assert set(squeezed) == set(full) == set(by_method)
    for name, value in hf_one.items():
        assert maxdiff(squeezed[name], value[0]) <= TOL, name
    for name in full:
        # every site with a batch axis has it first; the others (rotary tables) are kept as they are
        want = full[name][0] if squeezed[name].dim() == full[name].dim() - 1 else full[name]
        assert torch.equal(squeezed[name], want), name  # exact (masked attention scores hold -inf)
        assert torch.equal(by_method[name], want), name
    with pytest.raises(ValueError, match="batch size is 3"):
        fx_cache(family).remove_batch_dim()


# ---- accumulated_resid -----------------------------------------------------------------------------


def final_post_reference(family):
    """The input of the final norm, read with an HF hook; and that norm applied to it."""
    hf, _ = H.pair(family)
    hidden, hooks = hf_values(family)
    post = hooks[H.name("resid_post", N - 1)]
    with torch.no_grad():
        normed = hf.get_submodule(FINAL_NORM[family])(post)
    # HF's last hidden state is after the final norm (BERT: after the last layer's output LayerNorm)
    assert maxdiff(normed, hidden[N]) <= TOL
    return post


@pytest.mark.parametrize("family", FAMILIES)
def test_accumulated_resid_equals_hf_hidden_states_and_final_norm_input(family):
    hidden, _ = hf_values(family)
    acc, labels = fx_cache(family).accumulated_resid(return_labels=True)
    assert labels == [f"{i}_pre" for i in range(N)] + ["final_post"]
    assert acc.shape == (N + 1, B, S, hidden[0].shape[-1])
    for i in range(N):
        assert maxdiff(acc[i], hidden[i]) <= TOL, labels[i]  # resid_pre i is the input of layer i
    assert maxdiff(acc[N], final_post_reference(family)) <= TOL
    assert maxdiff(fx_cache(family).accumulated_resid(), acc) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_accumulated_resid_incl_mid_inserts_each_resid_mid(family):
    hf, _ = H.pair(family)
    hidden, hooks = hf_values(family)
    acc, labels = fx_cache(family).accumulated_resid(incl_mid=True, return_labels=True)
    if H.spec(hf)["parallel"]:  # no resid_mid: the same as without incl_mid
        want_labels = ["0_pre", "1_pre", "final_post"]
        want = [hidden[0], hidden[1], final_post_reference(family)]
    else:
        want_labels = ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
        want = [hidden[0], hooks["blocks.0.hook_resid_mid"], hidden[1], hooks["blocks.1.hook_resid_mid"], final_post_reference(family)]
    assert labels == want_labels
    assert maxdiff(acc, torch.stack(want)) <= TOL


def _tl_accumulated(family, layer, incl_mid=False):
    """TransformerLens 4.3's accumulated_resid(layer, incl_mid) from HF references: resid_pre of layers
    0..layer (resid_mid of each layer before ``layer`` with incl_mid); n_layers, -1 and None mean every
    layer and then final_post."""
    _, hooks = hf_values(family)
    if layer is None or layer == -1:
        layer = N
    labels, values = [], []
    for i in range(layer + 1):
        if i == N:
            labels.append("final_post")
            values.append(final_post_reference(family))
            continue
        labels.append(f"{i}_pre")
        values.append(hooks[H.name("resid_pre", i)])
        if incl_mid and i < layer and H.name("resid_mid", i) in hooks:
            labels.append(f"{i}_mid")
            values.append(hooks[H.name("resid_mid", i)])
    return torch.stack(values), labels


@pytest.mark.parametrize("layer", [0, 1, 2, -1, None])
@pytest.mark.parametrize("incl_mid", [False, True])
def test_accumulated_resid_layer_argument_follows_transformer_lens(layer, incl_mid):
    family = "llama"
    want, want_labels = _tl_accumulated(family, layer, incl_mid)
    got, labels = fx_cache(family).accumulated_resid(layer=layer, incl_mid=incl_mid, return_labels=True)
    assert labels == want_labels
    assert maxdiff(got, want) <= TOL


# ---- stack_activation ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v"])
def test_stack_activation_equals_hf_values_stacked(family, kind):
    _, hooks = hf_values(family)
    cache = fx_cache(family)
    got = cache.stack_activation(kind)
    assert maxdiff(got, torch.stack([cache[kind, i] for i in range(N)])) == 0
    assert maxdiff(got, torch.stack([hooks[H.name(kind, i)] for i in range(N)])) <= TOL
    # layer=L: the layers strictly before L (TransformerLens' meaning too)
    assert maxdiff(cache.stack_activation(kind, layer=1), got[:1]) == 0


def test_stack_activation_layer_none_means_every_layer():
    cache = fx_cache("gpt2")
    assert maxdiff(cache.stack_activation("z", layer=None), cache.stack_activation("z")) == 0


# ---- decompose_resid -------------------------------------------------------------------------------

ADDITIVE = [f for f in FAMILIES if f != "bert"]  # BERT's post-LN residual is not a sum of what blocks write


@pytest.mark.parametrize("family", ADDITIVE)
def test_decompose_resid_sums_to_the_final_residual(family):
    _, model = H.pair(family)
    parts, labels = fx_cache(family).decompose_resid(return_labels=True)
    embeds = [n[5:] for n in ("hook_embed", "hook_pos_embed") if n in model.sites]
    assert labels == embeds + [f"{i}_{k}" for i in range(N) for k in ("attn_out", "mlp_out")]
    assert maxdiff(parts.sum(0), final_post_reference(family)) <= TOL
    # layer=1: what was written before layer 1 sums to its input, HF's hidden_states[1]
    before, labels1 = fx_cache(family).decompose_resid(layer=1, return_labels=True)
    assert labels1 == embeds + ["0_attn_out", "0_mlp_out"]
    assert maxdiff(before.sum(0), hf_values(family)[0][1]) <= TOL
    # mode="attn" keeps the attention outputs only, read with HF hooks
    attn, labels_a = fx_cache(family).decompose_resid(mode="attn", return_labels=True)
    assert labels_a == embeds + [f"{i}_attn_out" for i in range(N)]
    _, hooks = hf_values(family)
    for i in range(N):
        assert maxdiff(attn[len(embeds) + i], hooks[H.name("attn_out", i)]) <= TOL


def test_decompose_resid_layer_minus_one_means_every_layer():
    cache = fx_cache("gpt2")
    assert maxdiff(cache.decompose_resid(layer=-1), cache.decompose_resid()) == 0


# ---- attribution patching against an HF autograd reference ----------------------------------------

SWEEPS = H.SWEEPS
AXIS = {"pos": 1, "head": 2}  # of [batch, pos, (head, d_head | d_model)]


def corrupt(ids):
    out = ids.clone()
    out[:, 2] = (ids[:, 2] - 3 + 50) % 97 + 3
    out[0, 4] = (ids[0, 4] - 3 + 50) % 97 + 3
    return out


def attribution_metrics(padding):
    _, mask = ids_mask(padding)
    last = mask.sum(1) - 1 if padding == "right" else torch.full((B,), S - 1)
    answer, wrong = torch.tensor([5, 17, 42]), torch.tensor([7, 8, 90])
    rows = torch.arange(B)
    declared = metrics.logit_diff(answer, wrong, pos=last)

    def plain(logits):
        lp = logits.log_softmax(-1)
        return (lp[rows, last, answer] - lp[rows, last, wrong]).mean() + (logits.mean(-1) * mask).sum() / mask.sum()

    return {"declared": declared, "plain": plain}


def hf_attribution(family, padding, metric_name, kind, axes):
    """[n_layers, *kept axes]: the autograd estimate built with HF hooks only."""
    hf, _ = H.pair(family)
    clean, mask = ids_mask(padding)
    corrupted = corrupt(clean)
    metric = attribution_metrics(padding)[metric_name]
    sites = [H.name(kind, i) for i in range(N)]
    clean_values = H.hf_cache(hf, clean, mask, sites)
    corrupted_values = H.hf_cache(hf, corrupted, mask, sites)
    deltas = {s: torch.zeros_like(corrupted_values[s], requires_grad=True) for s in sites}
    logits, _ = H.hf_forward(hf, corrupted, mask, replace={s: (lambda v, d=deltas[s]: v + d) for s in sites}, grad=True)
    value = metric(logits)
    grads = torch.autograd.grad(value, [deltas[s] for s in sites])
    out = []
    for s, g in zip(sites, grads):
        contrib = (clean_values[s] - corrupted_values[s]) * g
        keep = [AXIS[a] for a in axes]
        out.append(contrib.sum(dim=[d for d in range(contrib.dim()) if d not in keep]))
    return value.item() + torch.stack(out)


@functools.cache
def clean_cache(family, padding):
    _, model = H.pair(family)
    clean, mask = ids_mask(padding)
    return model.run_with_cache(clean, mask)[1]


CONFIGS = [("right", "declared"), ("left", "plain")]


@pytest.mark.parametrize("padding, metric", CONFIGS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sweep", SWEEPS)
def test_attribution_equals_hf_autograd_reference(sweep, family, padding, metric):
    hf, model = H.pair(family)
    kind, axes = SWEEPS[sweep]
    if kind == "resid_mid" and H.spec(hf)["parallel"]:
        pytest.skip("a parallel block has no resid_mid")
    clean, mask = ids_mask(padding)
    fn = attribution_metrics(padding)[metric]
    got = getattr(attribution, f"get_act_patch_{sweep}")(model, corrupt(clean), clean_cache(family, padding), fn, attention_mask=mask)
    want = hf_attribution(family, padding, metric, kind, axes)
    assert maxdiff(got, want) <= TOL
    assert (want - want.flatten()[0]).abs().max() > 1e-3  # the estimates differ across cells


EVERY = {
    "get_act_patch_block_every": ["resid_pre", "attn_out", "mlp_out"],
    "get_act_patch_attn_head_all_pos_every": ["attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos",
                                              "attn_head_v_all_pos", "attn_head_pattern_all_pos"],
    "get_act_patch_attn_head_by_pos_every": ["attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos",
                                             "attn_head_v_by_pos", "attn_head_pattern_by_pos"],
}


@pytest.mark.parametrize("module", [attribution, patching], ids=["attribution", "patching"])
@pytest.mark.parametrize("every", EVERY)
def test_every_function_equals_its_parts_stacked(every, module):
    # Llama with 2 KV heads: the k and v parts have fewer heads and are zero-padded to n_heads
    family, padding, metric = "llama", "right", "declared"
    _, model = H.pair(family)
    clean, mask = ids_mask(padding)
    fn = attribution_metrics(padding)[metric]
    args = (model, corrupt(clean), clean_cache(family, padding), fn)
    got = getattr(module, every)(*args, attention_mask=mask)
    heads = model.cfg.n_heads
    parts = []
    for name in EVERY[every]:
        part = getattr(module, f"get_act_patch_{name}")(*args, attention_mask=mask)
        if name == "attn_head_pattern_by_pos":
            part = part.permute(0, 2, 1)  # [layer, head, dest] -> [layer, pos, head] like the others
        if module is attribution and name in SWEEPS:
            # the non-pattern parts also equal the HF autograd reference
            kind, axes = SWEEPS[name]
            assert maxdiff(part, hf_attribution(family, padding, metric, kind, axes)) <= TOL, name
        if part.shape[-1] != heads and "head" in name:
            part = torch.nn.functional.pad(part, (0, heads - part.shape[-1]))
        parts.append(part)
    assert got.shape == (len(parts), *parts[0].shape)
    assert maxdiff(got, torch.stack(parts)) <= TOL
    assert got.abs().max() > 1e-3
