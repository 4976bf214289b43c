"""A graph module's program as straight-line Python with every lookup done once.

Problem: the forward fx generates for a GraphModule reaches each operator through
``torch.ops.aten.<op>.<overload>`` (four attribute reads and a Python ``OpOverload.__call__`` frame)
and each weight through a chain of ``nn.Module.__getattr__`` calls (``getattr(self.model.layers,
"0").self_attn.q_proj.weight``), at every call. A one-token decode step of a 135M model runs ~2000
small operators in 30 block programs: those lookups cost ~2 ms of a ~58 ms step on CPU, more than
generation's whole allowance over HF's own ``generate``.

Mechanism: ``Runner(gm)`` writes the graph once more as Python source and compiles it: an ATen
operator is bound to its C++ entry point (``OpOverload._op``, which is all ``OpOverload.__call__``
does), a ``get_attr`` to the tensor or module it names (the same object, so in-place weight edits
are seen), and every other constant argument to a global. Each value is dropped after its last use, as
fx's own code does, so peak memory is unchanged. The runner computes exactly what ``gm(**feed)``
computes: the same operators on the same arguments in the same order.

Example::

    run = Runner(gm)
    out = run(input_ids=ids, attention_mask=mask)     # == gm(input_ids=ids, attention_mask=mask)
    run.graph_module is gm

Gotchas: the bindings are made when the runner is built; a program whose attributes are later
reassigned (not edited in place) needs a new runner. ``Programs`` builds one per cached program, and a
model whose parameters are rebound is captured again (``engine.derived``), so this never shows there.
Graphs with a code generator other than fx's default (pytree in/out specs) run through ``gm`` itself.
"""

from __future__ import annotations

import keyword
import math

import torch
import torch.fx as fx

__all__ = ["Runner"]

_INLINE = (bool, int, str, type(None))  # written into the source as literals


class Runner:
    def __init__(self, gm: fx.GraphModule):
        self.graph_module = gm
        self._globals: dict = {}
        self._names: dict = {}
        self.forward = self._compile(gm)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- source --------------------------------------------------------------------------------
    def _bind(self, obj, hint: str) -> str:
        key = id(obj)
        if key not in self._names:
            name = f"_{hint}{len(self._names)}"
            self._names[key] = name
            self._globals[name] = obj
        return self._names[key]

    def _expr(self, a, var: dict) -> str:
        if isinstance(a, fx.Node):
            return var[a]
        if isinstance(a, tuple):
            return "(" + "".join(self._expr(x, var) + ", " for x in a) + ")"
        if isinstance(a, list):
            return "[" + ", ".join(self._expr(x, var) for x in a) + "]"
        if isinstance(a, dict) and all(isinstance(k, str) for k in a):
            return "{" + ", ".join(f"{k!r}: {self._expr(v, var)}" for k, v in a.items()) + "}"
        if isinstance(a, slice):
            return f"slice({self._expr(a.start, var)}, {self._expr(a.stop, var)}, {self._expr(a.step, var)})"
        if type(a) in _INLINE or type(a) is float and math.isfinite(a):
            return repr(a)  # repr round-trips these exactly
        return self._bind(a, "c")

    def _call(self, fn: str, node: fx.Node, var: dict, skip: int = 0) -> str:
        parts = [self._expr(x, var) for x in node.args[skip:]]
        parts += [f"{k}={self._expr(v, var)}" for k, v in node.kwargs.items()]
        return f"{fn}({', '.join(parts)})"

    def _compile(self, gm: fx.GraphModule):
        if type(gm.graph._codegen) is not fx.graph.CodeGen:
            return gm
        nodes = list(gm.graph.nodes)
        last = {}
        for i, node in enumerate(nodes):
            for arg in node.all_input_nodes:
                last[arg] = i
        var = {node: f"v{i}" for i, node in enumerate(nodes)}
        params, body = [], []
        for i, node in enumerate(nodes):
            if node.op == "placeholder":
                name = node.target
                if not name.isidentifier() or keyword.iskeyword(name):  # also *args: fx's own forward takes those
                    return gm
                default = f"={self._expr(node.args[0], var)}" if node.args else ""
                params.append(name + default)
                line = f"{var[node]} = {name}"
            elif node.op == "get_attr":
                obj = gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                line = f"{var[node]} = {self._bind(obj, 'g')}"
            elif node.op == "call_function":
                target = node.target
                fn = target._op if isinstance(target, torch._ops.OpOverload) else target
                line = f"{var[node]} = {self._call(self._bind(fn, 'f'), node, var)}"
            elif node.op == "call_method" and isinstance(node.args[0], fx.Node):
                line = f"{var[node]} = {self._call(f'{var[node.args[0]]}.{node.target}', node, var, skip=1)}"
            elif node.op == "call_module":
                line = f"{var[node]} = {self._call(self._bind(gm.get_submodule(node.target), 'm'), node, var)}"
            elif node.op == "output":
                body.append(f"return {self._expr(node.args[0], var)}")
                continue
            else:
                return gm
            dead = [var[a] for a in dict.fromkeys(node.all_input_nodes) if last.get(a) == i]
            if node.op != "placeholder" and not node.users:
                dead.append(var[node])
            body.append(line + "".join(f"; {d} = None" for d in dead))
        src = f"def forward({', '.join(params)}):\n" + "".join(f"    {line}\n" for line in body)
        self.source = src
        scope = dict(self._globals)
        exec(compile(src, f"<fxlens runner of {type(gm).__name__}>", "exec"), scope)
        return scope["forward"]

