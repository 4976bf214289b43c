"""XLNet: a max_position_embeddings of -1 is no bound, and a sequence-first residual is offered [batch, pos, d].

Reference: plain ``register_forward_pre_hook(with_kwargs=True)`` hooks on XLNet's layers, whose hidden
states HF holds [pos, batch, d] (``test_coverage.hf_forward``). Before the fixes, ``from_hf`` read XLNet's
``max_position_embeddings = -1`` (relative positions, no limit) as a bound, so that every input was refused
("sequence length 5 exceeds the model's -1 positions (0..-2)"), and its residual sites were not offered
("[pos, batch, 64], which does not lay out as [batch, pos, d_model]"). FSMT's decoder is laid out the same way.
"""

import warnings

import torch

import all_families as A
import fxlens
from fxlens.graphs.bounds import max_positions
from test_coverage import _layer_input, _replace, hf_forward


def test_a_non_positive_max_position_is_no_bound():
    class Config:
        max_position_embeddings = -1

    assert max_positions(Config()) is None
    Config.max_position_embeddings = 64
    assert max_positions(Config()) == 64


def test_xlnet_takes_any_length_and_its_residual_reads_as_batch_pos_d():
    hf = A.build("xlnet")
    assert hf.config.max_position_embeddings == -1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fxlens.Model.from_hf(hf)
    assert model.cfg.n_ctx is None or model.cfg.n_ctx > 64  # the bound torch.export proves (511), never -1
    ids = A.probe_ids(2, 9, seed=2)  # longer than the capture's example input
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: "hook_resid" in n)
    paths = [b.path for b in model.graph.structure.blocks]
    out, inputs, last = hf_forward(hf, ids, None, paths)
    assert (logits - out.logits).abs().max() <= 1e-5 * max(1.0, float(out.logits.abs().max()))
    for i, want in enumerate(inputs):
        assert want.shape[:2] == (9, 2)  # HF's layer holds it sequence-first
        assert (cache[f"blocks.{i}.hook_resid_pre"] - want.transpose(0, 1)).abs().max() <= 1e-5
    assert (cache[f"blocks.{len(paths) - 1}.hook_resid_post"] - last.transpose(0, 1)).abs().max() <= 1e-5

    # a patch in the user's layout lands at the right position: zero position 3 of row 0 before layer 1
    def hf_zero(mod, args, kwargs):
        where, x = _layer_input(args, kwargs)
        x = x.clone()
        x[3, 0] = 0
        return _replace(args, kwargs, where, x)

    handle = hf.get_submodule(paths[1]).register_forward_pre_hook(hf_zero, with_kwargs=True)
    try:
        with torch.no_grad():
            want = hf(input_ids=ids).logits
    finally:
        handle.remove()

    def zero(value, hook):
        value = value.clone()
        value[0, 3] = 0
        return value

    got = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_pre", zero)])
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
