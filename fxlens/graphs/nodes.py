"""Small, exact questions about single fx nodes: which op, which module, which shape.

Problem: every analysis in ``graphs/`` asks the same questions of nodes ("is this a matmul?", "which
HF module produced it?", "what is its symbolic shape?"); answering them in one place keeps the
analyses short and makes them agree.

Example::

    op_name(node)          # "linear", "scaled_dot_product_attention", "getitem", ...
    scope(node)            # "model.layers.3.self_attn.q_proj"
    in_scope(node, "model.layers.3")  # True for every node the layer's forward produced
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

__all__ = [
    "op_name",
    "is_op",
    "is_assert",
    "scope",
    "scopes",
    "in_scope",
    "tensor_meta",
    "is_tensor",
    "data_inputs",
    "LAYOUT_OPS",
    "MATMUL_OPS",
    "ATTENTION_OPS",
]

# Ops that move or reinterpret data without changing any value.
LAYOUT_OPS = frozenset(
    {
        "view",
        "reshape",
        "_unsafe_view",
        "transpose",
        "permute",
        "contiguous",
        "clone",
        "expand",
        "unsqueeze",
        "squeeze",
        "flatten",
        "unflatten",
        "alias",
        "to",
        "type_as",
        "_to_copy",
        "dropout",
        "detach",
        "lift_fresh_copy",
        "t",
    }
)
# grouped_mm_fallback / _grouped_mm: transformers' mixture-of-experts kernels (one product per expert group)
MATMUL_OPS = frozenset({"linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "einsum", "conv1d",
                        "grouped_mm_fallback", "_grouped_mm", "grouped_mm"})
ATTENTION_OPS = frozenset(
    {
        "scaled_dot_product_attention",
        "_scaled_dot_product_attention_math",
        "_scaled_dot_product_flash_attention_for_cpu",
    }
)


def op_name(node: fx.Node) -> str:
    """The bare op name of a call_function node (``aten.linear.default`` -> ``linear``)."""
    if node.op != "call_function":
        return node.op
    target = node.target
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def is_op(node: fx.Node, *names: str) -> bool:
    return node.op == "call_function" and op_name(node) in names


def is_assert(node: fx.Node) -> bool:
    name = op_name(node)
    return name.startswith("_assert") or name in ("sym_constrain_range_for_size", "_check")


def scopes(node: fx.Node) -> list[str]:
    """Module paths of the node's module stack, outermost first (``""`` is the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _cls in stack.values()]


def call_scopes(node: fx.Node) -> list[str]:
    """Like ``scopes``, but a module's second and later calls in one forward carry their call number:
    ``model.layers.1@1`` is the second call of ``model.layers.1`` (a looped layer, ALBERT's shared layer).
    torch.export keys ``nn_module_stack`` by call, with the same ``@k`` suffix on the key."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, _cls) in stack.items():
        m = _CALL.search(str(key))
        out.append(f"{path}@{m.group(1)}" if m and path else path)
    return out


_CALL = re.compile(r"@(\d+)$")


def scope(node: fx.Node) -> str:
    """The innermost HF module path that produced this node (``""`` for the root model)."""
    paths = scopes(node)
    return paths[-1] if paths else ""


def scope_class(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    values = list(stack.values())
    return str(values[-1][1]) if values else ""


def in_scope(node: fx.Node, path: str) -> bool:
    """Whether the node was produced inside module ``path`` (or one of its children)."""
    return path in scopes(node)


def tensor_meta(node: fx.Node):
    """The FakeTensor (or SymInt, or tuple) recorded for the node, or None."""
    return node.meta.get("val")


def is_tensor(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(tensor_meta(node), torch.Tensor)


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """Tensor-valued input nodes, excluding parameters and buffers (get_attr)."""
    return [n for n in node.all_input_nodes if n.op != "get_attr" and is_tensor(n)]


def sym_dims(node: fx.Node, batch, seq) -> tuple:
    """The node's shape with the batch and sequence symbols replaced by "B" and "S".

    Other symbolic sizes (a flattened batch*seq) appear as their sympy expressions; static sizes as ints.
    """
    val = tensor_meta(node)
    if not isinstance(val, torch.Tensor):
        return ()
    out = []
    for d in val.shape:
        expr = d.node.expr if isinstance(d, torch.SymInt) else d
        if expr == batch:
            out.append("B")
        elif expr == seq:
            out.append("S")
        elif isinstance(expr, int):
            out.append(expr)
        else:
            try:
                out.append(int(expr))
            except TypeError:
                out.append(expr)
    return tuple(out)
