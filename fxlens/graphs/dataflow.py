"""Dataflow queries on a captured graph: who reads whom, what dominates what.

Problem: finding the residual stream, the branches that write into it and the cone of nodes a
patch changes are graph-algorithm questions; they should be asked of one small data-edge view of
the fx graph, not answered ad hoc by walking ``node.args``.

Mechanism: ``DataGraph`` is a networkx DiGraph over node names whose edges are tensor data edges
(parameters and buffers, i.e. get_attr nodes, are constants and have no edges). Dominators come from
``networkx.immediate_dominators``.

Example::

    dg = DataGraph(gm.graph)
    dg.spine("dropout", "add_8")        # ['dropout', 'add_5', 'add_8'], the residual chain of a block
    dg.downstream(["view_6"])           # every node whose value depends on view_6
"""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx
import torch.fx as fx

from .nodes import data_inputs

__all__ = ["DataGraph"]


class DataGraph:
    """A networkx view of the tensor data edges of an fx graph (node names as vertices)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.nodes: dict[str, fx.Node] = {n.name: n for n in graph.nodes}
        self.order: dict[str, int] = {n.name: i for i, n in enumerate(graph.nodes)}
        g = nx.DiGraph()
        for node in graph.nodes:
            g.add_node(node.name)
            for src in node.all_input_nodes:
                if src.op != "get_attr":
                    g.add_edge(src.name, node.name)
        self.g = g

    def node(self, name: str) -> fx.Node:
        return self.nodes[name]

    def downstream(self, names: Iterable[str]) -> set[str]:
        """Names of nodes that depend on any of ``names`` (excluding the names themselves)."""
        out: set[str] = set()
        for name in names:
            out |= nx.descendants(self.g, name)
        return out

    def downstream_within(self, names: Iterable[str], within: set[str]) -> set[str]:
        """Nodes of ``within`` reachable from ``names`` along paths that stay inside ``within``."""
        names = list(names)
        sub = self.g.subgraph(set(within) | set(names))
        out: set[str] = set()
        for name in names:
            out |= nx.descendants(sub, name)
        return out & set(within)

    def upstream(self, names: Iterable[str]) -> set[str]:
        out: set[str] = set()
        for name in names:
            out |= nx.ancestors(self.g, name)
        return out

    def between(self, source: str, sink: str, within: set[str] | None = None) -> set[str]:
        """Nodes strictly between ``source`` and ``sink`` on some path (optionally inside ``within``)."""
        sub = self.g if within is None else self.g.subgraph(within | {source, sink})
        if source not in sub or sink not in sub:
            return set()
        return (nx.descendants(sub, source) & nx.ancestors(sub, sink)) - {source, sink}

    def dominators(self, root: str, within: set[str]) -> dict[str, str]:
        """Immediate dominators of the subgraph ``within`` (plus root) for paths starting at root."""
        sub = self.g.subgraph(within | {root})
        return nx.immediate_dominators(sub, root)

    def spine(self, source: str, sink: str, within: set[str]) -> list[str]:
        """Nodes that every path from source to sink passes through, in order (both ends included)."""
        region = self.between(source, sink, within) | {source, sink}
        idom = self.dominators(source, region)
        if sink not in idom:
            return []
        chain = [sink]
        while chain[-1] != source:
            chain.append(idom[chain[-1]])
        return chain[::-1]

    def sorted(self, names: Iterable[str]) -> list[str]:
        return sorted(names, key=self.order.__getitem__)

    def data_inputs(self, name: str) -> list[str]:
        return [n.name for n in data_inputs(self.nodes[name])]
