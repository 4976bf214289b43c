"""Find a transformer's structure from the dataflow: blocks, residual stream, branches, norms.

Problem: hook sites such as ``blocks.3.hook_resid_mid`` or ``blocks.3.hook_attn_out`` must exist for
every model, including families nobody wrote a table for. They are facts about the graph's dataflow,
not about module names.

Mechanism:
- Blocks are the integer-indexed children of the module list that covers most matrix products
  (``model.layers.{i}``, ``transformer.h.{i}``, ``bert.encoder.layer.{i}``), one block per *call*: a
  layer the forward runs several times (ALBERT shares one layer across depth, Dory loops a middle
  layer) is a block per call, in the order they run, as HF's ``hidden_states`` count them; torch.export
  tells the calls apart in ``nn_module_stack`` (``nodes.call_scopes``). Such blocks share ``path``.
- A block's residual input (``resid_pre``) is the external input that dominates its output; the
  *spine* is the chain of nodes every path from ``resid_pre`` to the block output passes through.
- Consecutive spine nodes bound a segment. A segment whose interior holds a matrix product is a
  branch; the junction's sum is flattened into terms, each term is what a component adds to the
  residual stream (``hook_attn_out`` / ``hook_mlp_out``), and a term mixes positions (attention, or a
  mixer such as a state-space layer) when an attention op, a product of two activations, or an op that
  moves values along the positions axis (RWKV's time shift and unrolled recurrence) lies upstream of it.
  Parallel blocks (GPT-J, NeoX) yield two terms in one segment.
- A branch's entry norm is the module, on the dominator chain of its first matrix product, that holds
  a normalisation op; a norm on the spine after a junction is a post-norm (BERT).

Example::

    s = find_structure(gm.graph)
    s.blocks[3].resid_mid, s.blocks[3].attn.output, s.blocks[3].attn.norm   # node, node, module path

Gotchas: a float32 graph may route the residual through a no-op ``.to(float32)`` inside a norm's
scope (the spine then contains that alias); resid sites always name the block's input, the first
junction and the block's output, never such aliases. Gemma-3n keeps four residual streams stacked as
[4, batch, pos, d_model] and mixes them (AltUp), so its residual sum does not isolate attention;
``attention_module_branch`` then reads the attention branch from the attention module's own nodes.
RMSNorm written as ``x * pow(mean(x^2) + eps, -0.5)`` (Gemma-3n) counts as a norm (``is_norm_op``).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from .dataflow import DataGraph
from .nodes import (ATTENTION_OPS, MATMUL_OPS, LAYOUT_OPS, call_scopes, is_op, is_tensor, op_name, scope, scopes,
                    tensor_meta)

__all__ = ["Branch", "Block", "Structure", "find_structure", "attention_module_branch", "is_norm_op", "StructureError", "NORM_OPS"]

NORM_OPS = frozenset({"layer_norm", "native_layer_norm", "rsqrt", "rms_norm", "_fused_rms_norm", "group_norm"})


class StructureError(RuntimeError):
    pass


def is_norm_op(node: fx.Node) -> bool:
    """A normalisation op; ``pow(v, -0.5)`` is an rsqrt written as a power (Gemma-3n's RMSNorm)."""
    name = op_name(node)
    return name in NORM_OPS or (name == "pow" and len(node.args) > 1 and node.args[1] == -0.5)


@dataclass(frozen=True)
class Branch:
    kind: str  # "attn" or "mlp"
    output: str  # node added into the residual stream
    entry: str  # spine node the branch reads
    junction: str  # spine node where it is added back
    nodes: frozenset  # node names of the branch (ancestors of output inside the segment)
    module: str  # HF module path that owns the component's matrix products
    norm: str | None = None  # HF path of the entry norm module
    post_norm: str | None = None  # HF path of a norm applied to the branch output before the add


@dataclass(frozen=True)
class Block:
    index: int
    path: str
    resid_pre: str
    resid_post: str
    spine: tuple
    resid_mid: str | None = None
    attn: Branch | None = None
    mlp: Branch | None = None
    spine_norms: tuple = ()  # (module path, output node) of norms on the spine, in order
    context: tuple = ()  # external non-residual inputs (mask, rotary cos/sin, position ids)
    nodes: frozenset = frozenset()
    branches: tuple = ()  # every branch, in graph order (a decoder block's cross-attention is the second "attn")


@dataclass(frozen=True)
class Structure:
    blocks_path: str
    blocks: tuple
    embed_terms: tuple = ()  # (module path, node) of each term summed into the first residual
    final_norm: str | None = None  # HF path of the final norm module
    unembed: str | None = None  # node producing the main output (logits)
    unembed_module: str | None = None
    # the parallel module lists a layer is split over (XLM: attentions.i, layer_norm1.i, ffns.i, layer_norm2.i),
    # when no module holds a whole layer; empty otherwise
    split_layers: tuple = ()


def _module_nodes(graph: fx.Graph, calls: bool = False) -> dict[str, list[fx.Node]]:
    """{module path: its nodes, in graph order}; with ``calls``, one entry per call of a module called
    more than once (``model.layers.1``, ``model.layers.1@1``: see ``nodes.call_scopes``)."""
    by_scope: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function":
            for path in (call_scopes(node) if calls else scopes(node)):
                by_scope[path].append(node)
    return by_scope


def _block_calls(paths: list[str], by_call: dict, dg: DataGraph) -> list[tuple[str, str]]:
    """(module path, call key) of every call of the block modules, in the order they run: a layer run
    several times in one forward (ALBERT's shared layer, a looped middle layer) is one block per call."""
    calls = []
    for path in paths:
        pattern = re.compile(re.escape(path) + r"(@\d+)?")
        calls += [(path, key) for key in by_call if pattern.fullmatch(key) and by_call[key]]
    return sorted(calls, key=lambda c: dg.order[by_call[c[1]][0].name])


def _find_block_list(graph: fx.Graph, within: str | None = None) -> tuple[str, list[str]]:
    """(the blocks' module list, the block module paths). The paths also hold the layers of another list
    of the same layer class whose calls interleave with the first list's (HRM runs a low-level and a
    high-level stack of one layer class in alternation): the blocks are then every layer call of both, in
    the order they run, as HF's ``hidden_states`` count them."""
    coverage: dict[str, set] = defaultdict(set)
    indices: dict[str, set] = defaultdict(set)
    classes: dict[str, set] = defaultdict(set)
    span: dict[str, list] = {}
    for k, node in enumerate(graph.nodes):
        if node.op != "call_function" or op_name(node) not in MATMUL_OPS:
            continue
        for path, cls in ((p, c) for p, c in (node.meta.get("nn_module_stack") or {}).values()):
            m = re.fullmatch(r"(.+)\.(\d+)", path)
            if m and (within is None or m.group(1).startswith(within + ".")):
                coverage[m.group(1)].add(node.name)
                indices[m.group(1)].add(int(m.group(2)))
                classes[m.group(1)].add(str(cls))
                lo_hi = span.setdefault(m.group(1), [k, k])
                lo_hi[1] = k
    if not coverage:
        raise StructureError("no repeated blocks (a module list of layers holding matrix products) found")
    prefix = max(coverage, key=lambda p: (len(coverage[p]), -p.count(".")))
    idx = sorted(indices[prefix])
    if idx != list(range(len(idx))):
        raise StructureError(f"blocks under {prefix!r} are not numbered 0..n-1: {idx}")
    paths = [f"{prefix}.{i}" for i in idx]
    for other in sorted(coverage):
        nested = other.startswith(prefix + ".") or prefix.startswith(other + ".")
        interleaved = span[prefix][0] < span[other][0] < span[prefix][1] or span[other][0] < span[prefix][0] < span[other][1]
        if (other != prefix and not nested and interleaved and classes[other] == classes[prefix]
                and sorted(indices[other]) == list(range(len(indices[other])))):
            paths += [f"{other}.{i}" for i in sorted(indices[other])]
    return prefix, paths


def _sum_terms(dg: DataGraph, junction: str, entry: str, region: set[str]) -> list[str]:
    """Flatten the sum at ``junction`` into its terms, dropping the residual ``entry``."""
    terms: list[str] = []

    def visit(name: str, top: bool) -> None:
        node = dg.node(name)
        if name == entry:
            return
        # a value-preserving op over a sum (Falcon's dropout(mlp + attn)) is looked through
        inner = node.all_input_nodes[0] if _passes_value(node) and node.all_input_nodes else None
        if inner is not None and inner.name in region and len(inner.users) == 1 and is_op(inner, "add"):
            if top or (name in region and len(node.users) == 1):
                visit(inner.name, True)
                return
        expandable = is_op(node, "add") and (top or (name in region and len(node.users) == 1))
        if expandable:
            operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(operands) == 2 and all(a.name in region or a.name == entry for a in operands):
                for a in operands:
                    visit(a.name, False)
                return
        terms.append(name)

    visit(junction, True)
    return terms


def _passes_value(node: fx.Node) -> bool:
    """An op whose output equals its input in an eval-mode graph: dropout, an alias, a same-dtype cast."""
    name = op_name(node)
    if name in ("dropout", "alias", "clone", "contiguous", "detach"):
        return True
    if name in ("to", "_to_copy", "type_as") and node.all_input_nodes:
        src, out = tensor_meta(node.all_input_nodes[0]), tensor_meta(node)
        return src is not None and out is not None and src.dtype == out.dtype and src.shape == out.shape
    return False


def _norm_modules(by_scope: dict[str, list[fx.Node]]) -> set[str]:
    out = set()
    for path, nodes in by_scope.items():
        if any(is_norm_op(n) for n in nodes):
            # the innermost module holding the op is the norm; parents also hold it, so keep only
            # paths whose own (direct) nodes contain the op
            if any(is_norm_op(n) and scope(n) == path for n in nodes):
                out.add(path)
    return out


def _common_scope(nodes: list[fx.Node]) -> str:
    stacks = [scopes(n) for n in nodes if scopes(n)]
    if not stacks:
        return ""
    common = stacks[0]
    for s in stacks[1:]:
        k = 0
        while k < min(len(common), len(s)) and common[k] == s[k]:
            k += 1
        common = common[:k]
    return common[-1] if common else ""


def _escaping(nodes: set[str], dg: DataGraph) -> list[str]:
    out = []
    for name in nodes:
        node = dg.node(name)
        if is_tensor(node) and any(u.name not in nodes for u in node.users):
            out.append(name)
    return dg.sorted(out)


def find_structure(graph: fx.Graph, dg: DataGraph | None = None, within: str | None = None) -> Structure:
    """``within``: a module path (``model.decoder``); only block lists under it are considered (one
    stack of an encoder-decoder)."""
    dg = dg or DataGraph(graph)
    by_scope = _module_nodes(graph)
    norm_modules = _norm_modules(by_scope)
    prefix, paths = _find_block_list(graph, within)
    by_call = _module_nodes(graph, calls=True)

    blocks = []
    prev_out: str | None = None
    for index, (path, key) in enumerate(_block_calls(paths, by_call, dg)):
        block_nodes = {n.name for n in by_call[key]}
        external = set()
        for name in block_nodes:
            for src in dg.node(name).all_input_nodes:
                if src.op != "get_attr" and src.name not in block_nodes and is_tensor(src):
                    external.add(src.name)
        outputs = _escaping(block_nodes, dg)
        if not outputs:
            raise StructureError(f"block {path} has no output")
        resid_pre = prev_out if prev_out in external else _pick_resid_input(dg, external, block_nodes, outputs)
        pre_shape = tuple(tensor_meta(dg.node(resid_pre)).shape)
        same = [o for o in outputs if tuple(tensor_meta(dg.node(o)).shape) == pre_shape]
        resid_post = same[-1] if same else outputs[-1]
        blocks.append(_analyse_block(dg, index, path, resid_pre, resid_post, block_nodes, external, by_scope, norm_modules))
        prev_out = resid_post

    structure = Structure(blocks_path=prefix, blocks=tuple(blocks))
    out = _add_ends(dg, graph, structure, by_scope, norm_modules)
    split = _sibling_lists(prefix, paths, by_scope)
    return dataclasses.replace(out, split_layers=(prefix,) + split) if split else out


def _sibling_lists(prefix: str, paths: list[str], by_scope) -> tuple:
    """Other module lists beside the blocks' list with the same indices and nodes of their own: a layer
    split over parallel lists (XLM, FlauBERT), so that the block module holds only a part of each layer."""
    parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    n = len(paths)
    lists: dict = defaultdict(set)
    for path in by_scope:
        m = re.fullmatch(r"(.+)\.(\d+)", path)
        if m and m.group(1) != prefix and m.group(1).rsplit(".", 1)[0] == parent and "." in m.group(1):
            lists[m.group(1)].add(int(m.group(2)))
    return tuple(sorted(p for p, idx in lists.items() if idx == set(range(n))))


def _pick_resid_input(dg: DataGraph, external: set[str], block_nodes: set[str], outputs: list[str]) -> str:
    """The external input with the output's shape that has the longest residual spine to it."""
    sink = outputs[-1]
    shape = tuple(tensor_meta(dg.node(sink)).shape)
    candidates = [e for e in dg.sorted(external) if tuple(tensor_meta(dg.node(e)).shape) == shape]
    best, best_len = None, 0
    for e in candidates:
        n = len(dg.spine(e, sink, block_nodes | {e}))
        if n > best_len:
            best, best_len = e, n
    if best is None:
        raise StructureError(f"could not find the residual input of the block producing {sink}")
    return best


def _analyse_block(dg, index, path, resid_pre, resid_post, block_nodes, external, by_scope, norm_modules) -> Block:
    spine = dg.spine(resid_pre, resid_post, block_nodes | {resid_pre})
    if not spine:
        raise StructureError(f"block {path}: no residual path from {resid_pre} to {resid_post}")
    region = dg.between(resid_pre, resid_post, block_nodes) | {resid_post}
    branches: list[Branch] = []
    spine_norms = []
    first_junction = None
    for a, b in zip(spine, spine[1:]):
        interior = dg.between(a, b, region)
        if not any(op_name(dg.node(n)) in MATMUL_OPS | ATTENTION_OPS for n in interior):
            norm_path = scope(dg.node(b))
            normalises = any(is_norm_op(dg.node(n)) for n in interior | {b})
            if normalises and norm_path in norm_modules and b in _escaping({n.name for n in by_scope[norm_path]}, dg):
                spine_norms.append((norm_path, b))
            continue
        terms = _sum_terms(dg, b, a, interior)
        for term in terms:
            nodes = (dg.upstream([term]) & interior) | {term}
            has_attn = _mixes_positions(dg, nodes)
            matmuls = [dg.node(n) for n in dg.sorted(nodes) if op_name(dg.node(n)) in MATMUL_OPS | ATTENTION_OPS]
            if not matmuls:
                continue
            module = _common_scope(matmuls)
            norm = _entry_norm(dg, a, matmuls[0].name, region, norm_modules, path)
            post = _exit_norm(dg, term, nodes, norm_modules, module, by_scope)
            branches.append(
                Branch(
                    kind="attn" if has_attn else "mlp",
                    output=term,
                    entry=a,
                    junction=b,
                    nodes=frozenset(nodes),
                    module=module,
                    norm=norm,
                    post_norm=post,
                )
            )
        if first_junction is None:
            first_junction = b
    attn = next((br for br in branches if br.kind == "attn"), None)
    mlp = next((br for br in branches if br.kind == "mlp"), None)
    resid_mid = None
    if attn is not None and mlp is not None and attn.junction != mlp.junction:
        resid_mid = attn.junction if dg.order[attn.junction] < dg.order[mlp.junction] else mlp.junction
    context = tuple(dg.sorted(external - {resid_pre}))
    return Block(
        index=index,
        path=path,
        resid_pre=resid_pre,
        resid_post=resid_post,
        spine=tuple(spine),
        resid_mid=resid_mid,
        attn=attn,
        mlp=mlp,
        spine_norms=tuple(spine_norms),
        context=context,
        nodes=frozenset(block_nodes),
        branches=tuple(branches),
    )


_PRODUCTS = frozenset({"matmul", "bmm", "baddbmm", "einsum"})


def _mixes_positions(dg, nodes) -> bool:
    """Whether a branch mixes positions (attention, or a mixer such as a state-space layer): an
    attention op, a product of two activations (q @ k), or an op that moves values along the positions
    axis (``_moves_positions``: RWKV's time mixing shifts the sequence and runs a recurrence over it
    position by position, with no product of two activations).

    A softmax alone does not make attention: a mixture-of-experts router takes the softmax of a
    token's expert logits, which never mixes positions.
    """
    inputs = {n.name for n in dg.graph.nodes if n.op == "placeholder"}
    seq = _positions_size(dg)
    for n in nodes:
        name = op_name(dg.node(n))
        if name in ATTENTION_OPS:
            return True
        if name in _PRODUCTS:
            operands = dg.data_inputs(n)
            if len(operands) >= 2 and all(dg.upstream([a]) & inputs for a in operands[:2]):
                return True
        if seq is not None and _moves_positions(dg.node(n), seq):
            return True
    return False


def _positions_size(dg):
    """The length of the positions axis (input_ids' second axis: a symbol, or an int in a capture of one
    length), or None."""
    ids = next((n for n in dg.graph.nodes if n.op == "placeholder" and n.name == "input_ids"), None)
    val = tensor_meta(ids) if ids is not None else None
    if val is None or len(val.shape) != 2:
        return None
    return _expr(val.shape[1])


def _expr(d):
    """A size as a sympy expression or an int."""
    return d.node.expr if isinstance(d, torch.SymInt) else d


def _is_positions_axis(val, axis, seq) -> bool:
    """Whether ``axis`` of a [batch, pos, ...] tensor ``val`` is its positions axis."""
    if not isinstance(val, torch.Tensor) or val.dim() < 3 or not isinstance(axis, int):
        return False
    return axis % val.dim() == 1 and _expr(val.shape[1]) == seq


def _moves_positions(node: fx.Node, seq) -> bool:
    """An op that picks one position of a [batch, pos, ...] tensor, a strict part of its positions, or joins
    or pads along them: values move between positions (a time shift, a recurrence unrolled over positions)."""
    name = op_name(node)
    src = node.args[0] if node.args else None
    if name in ("cat", "stack") and isinstance(src, (list, tuple)) and len(src) > 1:
        axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return _is_positions_axis(tensor_meta(node), axis, seq)
    if not isinstance(src, fx.Node):
        return False
    val = tensor_meta(src)
    if name == "select":
        return _is_positions_axis(val, node.args[1], seq)
    if name == "slice":
        axis = node.args[1] if len(node.args) > 1 else 0
        out = tensor_meta(node)
        return (_is_positions_axis(val, axis, seq) and isinstance(out, torch.Tensor) and out.dim() == val.dim()
                and _expr(out.shape[1]) != seq)
    if name in ("roll", "cumsum", "flip"):
        axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        axis = axis[0] if isinstance(axis, (list, tuple)) and axis else axis
        return _is_positions_axis(val, axis, seq)
    if name == "constant_pad_nd":
        pad = node.args[1] if len(node.args) > 1 else ()
        k = (val.dim() - 2) if isinstance(val, torch.Tensor) else 0  # the pad pairs run from the last axis: pair k pads axis 1 of [b, pos, ...]
        return (_is_positions_axis(val, 1, seq) and len(pad) > 2 * k + 1 and any(pad[2 * k: 2 * k + 2]))
    return False


def attention_module_branch(dg: DataGraph, block: Block, by_scope) -> Branch | None:
    """The attention branch of a block whose residual sum does not separate it (Gemma-3n's AltUp mixes
    stacked residual streams around it): the innermost module under the block that holds an attention op,
    read from its own nodes. Its entry is the one input it reads that is neither the block's positional
    context (mask, rotary cos/sin) nor derived from it; its output, the value leaving the module. None
    when no such module or no single entry exists."""
    ops = [n for n in dg.sorted(block.nodes) if op_name(dg.node(n)) in ATTENTION_OPS | {"softmax", "_softmax"}]
    ctx = dg.downstream_within(block.context, set(block.nodes)) | set(block.context)
    for op in ops:
        path = scope(dg.node(op))
        if not path.startswith(block.path + "."):
            continue
        nodes = {n.name for n in by_scope.get(path, ())}
        if not _mixes_positions(dg, nodes):
            continue  # a router's softmax over experts
        inputs = {src.name for n in nodes for src in dg.node(n).all_input_nodes
                  if src.op != "get_attr" and src.name not in nodes and is_tensor(src)
                  and len(tensor_meta(src).shape) > 0 and src.name not in ctx}
        outputs = _escaping(nodes, dg)
        if len(inputs) != 1 or not outputs:
            continue
        (entry,) = inputs
        return Branch(kind="attn", output=outputs[-1], entry=entry, junction=outputs[-1], nodes=frozenset(nodes),
                      module=path)
    return None


def _entry_norm(dg, entry, first_matmul, region, norm_modules, block_path) -> str | None:
    idom = dg.dominators(entry, region | {entry})
    name = first_matmul
    while name in idom and name != entry:
        name = idom[name]
        if name == entry:
            break
        path = scope(dg.node(name))
        if path in norm_modules and path != block_path:
            return path
    return None


def _exit_norm(dg, term, nodes, norm_modules, module, by_scope) -> str | None:
    path = scope(dg.node(term))
    if path in norm_modules and path != module and not path.startswith(module + "."):
        return path
    # the term may be a cast or dropout applied after the norm
    node = dg.node(term)
    while op_name(node) in LAYOUT_OPS and node.all_input_nodes:
        node = node.all_input_nodes[0]
        p = scope(node)
        if p in norm_modules and p != module and not p.startswith(module + "."):
            return p
    return None


def _add_ends(dg: DataGraph, graph: fx.Graph, s: Structure, by_scope, norm_modules) -> Structure:
    first = s.blocks[0].resid_pre
    last = s.blocks[-1].resid_post
    # Embedding terms: flatten the sum that makes the first residual, through layout ops and a norm.
    embed_terms = []
    node = dg.node(first)
    while op_name(node) in LAYOUT_OPS or op_name(node) == "layer_norm":
        node = node.all_input_nodes[0]
    upstream = dg.upstream([node.name]) | {node.name}
    terms = _sum_terms(dg, node.name, "__none__", upstream) if is_op(node, "add") else [node.name]
    for term in terms:
        emb = [n for n in dg.sorted((dg.upstream([term]) | {term})) if is_op(dg.node(n), "embedding")]
        if emb:
            embed_terms.append((scope(dg.node(emb[-1])), term))
    # Final norm: a norm module whose input is the last residual (through layout ops only).
    final_norm = None
    for path in norm_modules:
        nodes = {n.name for n in by_scope[path]}
        inputs = {src.name for n in by_scope[path] for src in n.all_input_nodes if src.op != "get_attr" and src.name not in nodes}
        if last in inputs or any(_layout_of(dg, i) == last for i in inputs):
            if not any(path == b.path or path.startswith(b.path + ".") for b in s.blocks):
                final_norm = path
    out = graph.output_node().args[0]["outputs"]
    unembed = unembed_module = None
    if out:
        node = next(iter(out.values()))
        while node is not None and op_name(node) not in MATMUL_OPS:
            inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
            node = inputs[0] if len(inputs) == 1 else None
        if node is not None:
            unembed, unembed_module = node.name, scope(node)
    return Structure(
        blocks_path=s.blocks_path,
        blocks=s.blocks,
        embed_terms=tuple(embed_terms),
        final_norm=final_norm,
        unembed=unembed,
        unembed_module=unembed_module,
        split_layers=s.split_layers,
    )


def _layout_of(dg: DataGraph, name: str) -> str:
    node = dg.node(name)
    while op_name(node) in LAYOUT_OPS and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node.name
