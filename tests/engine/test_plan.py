"""The plan builder and the pass order: one path from intents to (plan, feed), checked when built.

References: the stage order is a documented contract (``passes.STAGES``); graph-input names must be
the same for the same request (so its program is reused) and every tensor must be fed exactly once.
"""

import pytest
import torch
from conftest import cached_model
from families import tokens

from fxlens import passes
from fxlens.engine.plan import PlanBuilder
from fxlens.engine.programs import Programs
from fxlens.passes import Cache, ExpandAttention, PassError, Read
from fxlens.passes.intervene import add_to, set_to


def _sites(model, *names):
    return [model.site(n) for n in names]


def test_the_same_request_builds_the_same_plan_and_feed_names():
    _, model = cached_model("gpt2")
    site, pattern = _sites(model, "blocks.1.hook_resid_pre", "blocks.0.attn.hook_pattern")

    def build(vec):
        b = PlanBuilder(model.graph)
        b.edit(site, add_to, (vec,), mask=torch.ones(1, 5, 1, dtype=torch.bool))
        b.cache([pattern])
        return b.build()

    plan_a, feed_a = build(torch.zeros(64))
    plan_b, feed_b = build(torch.ones(64))
    assert plan_a == plan_b and hash(plan_a) == hash(plan_b)
    assert list(feed_a) == list(feed_b) == ["fxl_in0", "fxl_in1", "fxl_in2"]
    assert feed_a["fxl_in0"] is add_to and torch.equal(feed_b["fxl_in1"], torch.ones(64))


def test_passes_come_out_in_stage_order_whatever_the_order_of_intents():
    _, model = cached_model("gpt2")
    pattern = model.site("blocks.0.attn.hook_pattern")
    b = PlanBuilder(model.graph)
    b.cache([pattern])  # a read asked for first
    b.select_vocab(model.graph.structure.unembed, torch.tensor([1, 2]))
    b.edit(model.site("blocks.1.hook_resid_pre"), set_to, (torch.zeros(()),))
    b.fuse_gelu()
    plan, _ = b.build()
    stages = [type(spec).stage for spec in plan]
    assert stages == sorted(stages, key=passes.STAGES.index)
    assert [type(spec).__name__ for spec in plan] == ["FuseGelu", "ExpandAttention", "Intervene", "Cache", "SelectVocab"]


def test_a_written_site_gets_the_replacing_rewrite_and_a_read_one_the_side_branch():
    _, model = cached_model("llama")
    pattern = model.site("blocks.0.attn.hook_pattern")
    read_only, _ = PlanBuilder(model.graph).cache([pattern]).build()
    written, _ = PlanBuilder(model.graph).edit(pattern, set_to, (torch.zeros(()),)).build()
    assert [s.replace for s in read_only if isinstance(s, ExpandAttention)] == [False]
    assert [s.replace for s in written if isinstance(s, ExpandAttention)] == [True]


def test_a_plan_out_of_stage_order_is_refused_when_built():
    _, model = cached_model("gpt2")
    pattern = model.site("blocks.0.attn.hook_pattern")
    bad = (Cache((Read(pattern.name, pattern.node, pattern.layout),)), ExpandAttention((pattern.rewrite[1],)))
    with pytest.raises(PassError, match=r"ExpandAttention \(materialise\) comes after Cache \(read\).*kernels -> layout"):
        Programs(model.captured.module).build(bad)


def test_a_spec_without_a_stage_cannot_be_registered():
    class Nameless:
        pass

    with pytest.raises(PassError, match="must declare a class attribute stage"):
        passes.register(Nameless, lambda gm, spec: gm)


def test_the_built_plan_runs_and_edits_what_it_says():
    hf, model = cached_model("gpt2")
    ids = tokens(2, 5)
    site = model.site("blocks.1.hook_resid_pre")
    vec = torch.randn(model.cfg.d_model)
    b = PlanBuilder(model.graph).edit(site, add_to, (vec,)).cache([site])
    plan, feed = b.build()
    out = model.programs.get(plan)(**model._inputs(ids), **feed)
    _, clean = model.run_with_cache(ids, names_filter=site.name)
    assert (out["cache"][site.name] - (clean[site.name] + vec)).abs().max() <= 1e-6
