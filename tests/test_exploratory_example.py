"""Smoke test of examples/exploratory_analysis.py on the real SmolLM2-135M: it runs, saves its plots,
and its numbers hang together (direct logit attribution sums to the model's logit difference; patching
the whole residual stream at the only position where the prompts differ restores the clean run)."""

import contextlib
import io
import pathlib
import sys

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
import exploratory_analysis  # noqa: E402


def test_exploratory_analysis_example_runs_and_saves_its_plots(smollm2, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        got = exploratory_analysis.run(smollm2, tmp_path, patched=("resid_pre",), patch_prompts=2)
    assert "backup name movers" in printed.getvalue()
    assert got["from_resid"] == pytest.approx(got["logit_diff"], abs=1e-3)
    assert got["attrs_sum"] == pytest.approx(got["logit_diff"], abs=1e-3)
    assert got["logit_diff"] > 3  # measured 4.72: the model does IOI
    resid = got["patching"]["resid_pre"]
    assert resid.shape == (30, 15)
    assert resid[0, 10].item() == pytest.approx(1.0, abs=1e-3)  # position 10 holds the subject name, the only difference
    assert resid[0, :10].abs().max().item() <= 1e-3  # identical positions: patching changes nothing
    assert got["detected"]["induction_head"].max().item() > 0.8
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 12 and all(p.stat().st_size > 1000 for p in pngs)
