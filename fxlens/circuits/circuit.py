"""The Circuit object: a set of edges (sender -> receiver), with set operations, JSON, DOT and networkx.

Problem: a circuit found by EAP or ACDC, or written down from a paper, must be a value a researcher
can compare, combine, save and draw, and that fxlens checks against a model before running it.

Mechanism: edges are pairs of component names (``graphs.components``): senders ``input``,
``a{layer}.h{head}``, ``m{layer}``; receivers ``a{layer}.h{head}<q|k|v>``, ``m{layer}``, ``logits``.
An edge is a tuple or the string ``"sender->receiver"``; a single string is one edge. Operations
return new circuits. ``validate(model)`` checks every name and that each edge points forward.

Example::

    c = Circuit(["a0.h1->a1.h0<k>", "a1.h0->logits"])
    c | Circuit("input->a0.h1<q>")          # union
    Circuit.from_json(c.to_json()) == c
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import networkx as nx

from ..graphs.components import CircuitError

__all__ = ["Circuit", "CircuitError", "edge"]


def edge(e) -> tuple:
    """``(sender, receiver)`` from a tuple or a ``"sender->receiver"`` string."""
    if isinstance(e, str):
        if "->" not in e:
            raise CircuitError(f"an edge is 'sender->receiver' (e.g. 'a0.h1->a1.h0<k>'); got {e!r}")
        s, r = e.split("->", 1)
        return s.strip(), r.strip()
    try:
        s, r = e
    except (TypeError, ValueError):
        raise CircuitError(f"an edge is a (sender, receiver) pair or a 'sender->receiver' string; got {e!r}") from None
    return str(s), str(r)


class Circuit:
    """A set of edges (sender, receiver). Immutable in spirit: operations return new circuits."""

    def __init__(self, edges: Iterable | str = ()):
        if isinstance(edges, str):
            edges = [edges]  # one edge, not its characters
        elif isinstance(edges, Circuit):
            edges = edges.edges
        self.edges = frozenset(edge(e) for e in edges)

    @classmethod
    def from_edges(cls, edges: Iterable) -> "Circuit":
        return cls(edges)

    @classmethod
    def full(cls, model) -> "Circuit":
        """Every edge of the model."""
        comp = model.derived.components
        return cls((s.name, r.name) for r in comp.receivers for s in comp.upstream(r))

    @classmethod
    def from_networkx(cls, graph: nx.DiGraph) -> "Circuit":
        return cls(graph.edges())

    def to_networkx(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_edges_from(sorted(self.edges))
        return g

    def to_json(self, path=None) -> str:
        text = json.dumps({"format": "fxlens.circuit/1", "edges": [f"{s}->{r}" for s, r in sorted(self.edges)]}, indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path) -> "Circuit":
        """A circuit from JSON text or from a file (a path string or ``pathlib.Path``)."""
        text = text_or_path
        if isinstance(text_or_path, os.PathLike) or not str(text_or_path).lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        data = json.loads(text)
        if data.get("format") != "fxlens.circuit/1":
            raise CircuitError(f"not an fxlens circuit file (format {data.get('format')!r})")
        return cls(data["edges"])

    def to_dot(self) -> str:
        """Graphviz DOT: senders and receivers as nodes, edges as arrows (render with ``dot -Tpng``)."""
        lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];']
        for s, r in sorted(self.edges):
            lines.append(f'  "{s}" -> "{r}";')
        lines.append("}")
        return "\n".join(lines)

    def validate(self, model) -> "Circuit":
        """Raise CircuitError for unknown components or edges that point backwards in depth."""
        comp = model.derived.components
        for s_name, r_name in sorted(self.edges):
            s, r = comp.sender(s_name), comp.receiver(r_name)
            if not comp.reaches(s, r):
                raise CircuitError(
                    f"edge {s_name}->{r_name} points backwards in depth: {s_name} writes at layer {s.layer}, "
                    f"after {r_name} reads the residual stream at layer {r.layer}"
                )
        return self

    def __len__(self) -> int:
        return len(self.edges)

    def __iter__(self):
        return iter(sorted(self.edges))

    def __contains__(self, e) -> bool:
        return edge(e) in self.edges

    def __or__(self, other) -> "Circuit":
        return Circuit(self.edges | Circuit(other).edges)

    def __and__(self, other) -> "Circuit":
        return Circuit(self.edges & Circuit(other).edges)

    def __sub__(self, other) -> "Circuit":
        return Circuit(self.edges - Circuit(other).edges)

    def __eq__(self, other) -> bool:
        return isinstance(other, Circuit) and self.edges == other.edges

    def __hash__(self) -> int:
        return hash(self.edges)

    def __repr__(self) -> str:
        by_receiver: dict = {}
        for s, r in sorted(self.edges):
            by_receiver.setdefault(r, []).append(s)
        lines = [f"Circuit with {len(self.edges)} edges"]
        for r, ss in by_receiver.items():
            lines.append(f"  {r:14s} <- {', '.join(ss)}")
        return "\n".join(lines)
