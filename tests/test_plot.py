"""fxlens.plot: each function returns a matplotlib Figure and writes a non-empty PNG; import fxlens
does not need matplotlib."""

import subprocess
import sys

import pytest
import torch
from conftest import cached_model
from families import tokens

pytest.importorskip("matplotlib")

from fxlens import lens, plot  # noqa: E402
from fxlens.circuits import Circuit  # noqa: E402

PNG = b"\x89PNG"


def _check(fig, path):
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000


def test_patching_heatmap(tmp_path):
    path = tmp_path / "heat.png"
    fig = plot.patching_heatmap(torch.randn(3, 5), x_labels=["<s>", " The", " cat", "\n", " sat"], y_labels="layer",
                                title="resid_pre", annotate=True, save=path)
    _check(fig, path)
    with pytest.raises(ValueError, match="2-D"):
        plot.patching_heatmap(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="3 x labels for an axis of 5"):
        plot.patching_heatmap(torch.randn(3, 5), x_labels=["a", "b", "c"])


def test_attention_patterns_from_a_cache(tmp_path):
    _, model = cached_model("llama")
    ids = tokens(1, 6)
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    path = tmp_path / "attn.png"
    fig = plot.attention_patterns(cache, [(0, 1), (1, 2), (1, 3), (0, 0)], [f"t{int(i)}" for i in ids[0]], save=path)
    _check(fig, path)
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4


def test_logit_lens_grid(tmp_path):
    _, model = cached_model("llama")
    ids = tokens(1, 5)

    class Strings:  # the tiny model has no tokenizer: any object with to_string will do
        def to_string(self, i):
            return f"t{i}"

    grid = lens.logit_lens(model, ids)[:, 0]
    path = tmp_path / "lens.png"
    _check(plot.logit_lens_grid(Strings(), grid, [f"t{int(i)}" for i in ids[0]], save=path), path)
    path2 = tmp_path / "lens_target.png"
    _check(plot.logit_lens_grid(Strings(), grid, target=ids[0], save=path2), path2)


def test_circuit_graph_from_scores_and_from_a_circuit(tmp_path):
    scores = {("input", "a0.h1<q>"): 0.5, ("a0.h1", "a1.h0<k>"): -1.0, ("a1.h0", "logits"): 2.0, ("m0", "m1"): 0.1,
              "a0.h0->m1": 0.05}
    path = tmp_path / "circuit.png"
    _check(plot.circuit_graph(scores, top_k=4, save=path), path)
    path2 = tmp_path / "circuit2.png"
    _check(plot.circuit_graph(Circuit(["input->a0.h0<q>", "a0.h0->logits"]), save=path2), path2)
    with pytest.raises(ValueError, match="not a circuit component"):
        plot.circuit_graph({("input", "b3"): 1.0})


def test_import_fxlens_does_not_import_matplotlib():
    code = "import sys, fxlens, fxlens.lens, fxlens.heads; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
