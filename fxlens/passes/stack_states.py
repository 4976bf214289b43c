"""Stack states: a state-space scan's state after each position as one [batch, pos, *state] value.

Problem: ``blocks.{i}.mixer.hook_ssm_state`` is the recurrent state of a Mamba layer after each position,
but the captured scan (``graphs.ssm``) holds it as one node per position, each computed from the one
before. Reading needs them side by side; writing must make later positions evolve from the written
state, as editing HF's ``cache.ssm_states`` between tokens does.

Mechanism: for reading (``replace=False``) a ``stack`` of the state nodes is made beside the last one
(named ``{first state}__ssm_state``) and the model is untouched. For writing (``replace=True``) that
stack is the site's value, and the model computes through it: the scan is replayed, step by step, from
the written value, ``r_p = where(written_p != unwritten_p, written_p, step(r_{p-1}))``, and every reader
of a state outside the scan (each position's output ``C_p @ state``) reads the replay. So a state that an
edit or hook changes at position p *is* the state at p, and positions after p continue the recurrence
from it; states it leaves alone are recomputed from the (possibly changed) state before them. With no
change the replay is the scan itself, bit for bit.

Example::

    gm = stack_states(gm, StackStates((Scan("add_2", ("add_2", "add_3", "add_4")),), replace=True))

Gotchas: an element that a hook sets to exactly its unwritten value counts as not written (it is then
recomputed from the state before it); the replay costs one more pass over the scan's steps. The nodes
are reordered topologically afterwards, since the outputs of early positions now read the replay.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..graphs.sites import rewritten
from .base import PassError, rewrite

__all__ = ["Scan", "StackStates", "stack_states"]


@dataclass(frozen=True)
class Scan:
    target: str  # the first state node (names the site's node)
    states: tuple  # the state node after each position, in order


@dataclass(frozen=True)
class StackStates:
    stage: ClassVar[str] = "materialise"
    scans: tuple  # of Scan
    replace: bool = False


def _stack(states: list) -> torch.Tensor:
    return torch.stack(states, dim=1)


def _written(new: torch.Tensor, old: torch.Tensor, p: int, step: torch.Tensor) -> torch.Tensor:
    return torch.where(new[:, p] != old[:, p], new[:, p], step)


def _between(a: fx.Node, b: fx.Node) -> list:
    """The nodes on paths from ``a`` to ``b`` (``b`` included, ``a`` not), in graph order."""
    down, stack = set(), [a]
    while stack:
        for u in stack.pop().users:
            if u not in down:
                down.add(u)
                if u is not b:
                    stack.append(u)
    keep, stack = {b}, [b]
    while stack:
        for x in stack.pop().all_input_nodes:
            if x in down and x not in keep:
                keep.add(x)
                stack.append(x)
    return [n for n in b.graph.nodes if n in keep]


def stack_states(gm: fx.GraphModule, spec: StackStates) -> fx.GraphModule:
    with rewrite(gm) as rw:
        for scan in spec.scans:
            states = [rw.node(n) for n in scan.states]
            with rw.after(states[-1]):
                site = rw.create(_stack, (states,), name=rewritten("ssm_state", scan.target, "ssm_state"), like=states[-1])
                if spec.replace:
                    unwritten = rw.create(_stack, (states,), like=states[-1])
            if not spec.replace:
                continue
            chain = set(states)
            steps = [_between(states[p - 1], states[p]) for p in range(1, len(states))]
            for step in steps:
                chain |= set(step)
            env = {}
            with rw.after(unwritten):
                env[states[0]] = rw.create(_written, (site, unwritten, 0, states[0]), like=states[0])
                for p, step in enumerate(steps, start=1):
                    for n in step:
                        copy = rw.graph.node_copy(n, lambda x: env.get(x, x))
                        copy.meta = dict(n.meta)
                        env[n] = copy
                    env[states[p]] = rw.create(_written, (site, unwritten, p, env[states[p]]), like=states[p])
            replayed = set(env.values())
            for n in chain:
                for user in list(n.users):
                    if user in chain or user in replayed or user in (site, unwritten):
                        continue
                    user.replace_input_with(n, env[n])
            _reorder(rw.graph)
    return rw.result


def _reorder(graph: fx.Graph) -> None:
    """Order the nodes topologically, keeping the present order wherever it is already valid."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    waiting = {n: sum(1 for x in set(n.all_input_nodes)) for n in nodes}
    ready = [n for n in nodes if waiting[n] == 0]
    heapq.heapify(heap := [(index[n], n.name) for n in ready])
    by_name = {n.name: n for n in nodes}
    order = []
    while heap:
        _, name = heapq.heappop(heap)
        n = by_name[name]
        order.append(n)
        for u in n.users:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(heap, (index[u], u.name))
    if len(order) != len(nodes):
        raise PassError("the replayed scan has a cycle: the written state depends on itself")
    output = graph.output_node()
    for n in order:
        if n is not output:
            output.prepend(n)
