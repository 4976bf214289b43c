"""Circuits as code: edges, edge interventions, circuit evaluation, path patching, EAP and ACDC.

A circuit is a set of edges between components (the embedding, attention heads, MLPs, the logits)
through the residual stream. Senders are ``input``, ``a{layer}.h{head}`` and ``m{layer}``; receivers
are ``a{layer}.h{head}<q|k|v>`` (k and v index key/value heads in grouped-query models), ``m{layer}``
and ``logits``. An edge is ``(sender, receiver)`` or the string ``"a0.h1->a1.h0<k>"``.

A map of the package:

- ``circuit.py``: the ``Circuit`` object (set operations, JSON, DOT, networkx, validation);
- ``edges.py``: sender outputs, ablation values (the vocabulary of ``engine.ablation``), the
  reference run's mask, ``run_with_edges`` and ``run_with_circuit``;
- ``edge_sweeps.py``: many edge sets at once, as rows of the layered-row engine;
- ``path_patching.py``: path patching, each sender a row;
- ``eap.py``: edge attribution patching, one forward and one backward;
- ``pruning.py``: ACDC on top of the edge sweep.

Every function that runs a second input (``reference``, ``corrupted_tokens``) runs it with its own
mask (``reference_attention_mask`` / ``corrupted_attention_mask``), else with ``attention_mask``.

On models that normalise each branch's output before adding it (Gemma 2/3, OLMo 2/3) an edge's
difference goes through its layer's norm, several edges from one layer into one receiver inside one
norm call; on models that normalise the residual stream itself after each branch (BERT, RoBERTa,
ELECTRA) a receiver reads the residual stream recomputed from the embedding with the replaced edges'
senders changed, every norm between them replayed (both definitions are in ``edges.py``).

Example::

    from fxlens.circuits import Circuit, run_with_edges, eap_scores, acdc, path_patch
    circuit = Circuit(["input->a0.h0<q>", "a0.h0->a1.h0<k>", "a1.h0->logits"])
    logits = model.run_with_circuit(tokens, circuit, ablation="zero")        # everything else ablated
    scores = eap_scores(model, clean, corrupted, metric)                    # {edge: score}
    found = acdc(model, clean, corrupted, threshold=0.05)                    # a Circuit
    effects = path_patch(model, clean, corrupted, metric, receivers=["a9.h6<q>"])   # {sender: metric}
"""

from ..graphs.components import CircuitError, Components
from .pruning import acdc
from .circuit import Circuit
from .eap import eap_scores
from .edge_sweeps import edge_sweep
from .edges import run_with_circuit, run_with_edges, sender_values
from .path_patching import path_patch

__all__ = [
    "Circuit",
    "CircuitError",
    "model_components",
    "sender_values",
    "run_with_edges",
    "run_with_circuit",
    "edge_sweep",
    "eap_scores",
    "acdc",
    "path_patch",
]


def model_components(model) -> Components:
    """The model's senders and receivers (``graphs.components``), derived once per capture."""
    return model.derived.components
