"""What a plain metric callable reads of the logits, found by tracing it once.

Problem: the metric every TransformerLens user writes first, ``lambda logits: (logits[:, -1, A] -
logits[:, -1, B]).mean()``, is a plain callable on full ``[batch, pos, vocab]`` logits. A sweep that
hands every row full logits computes the final norm at every position and the unembedding over the
whole vocabulary, for two numbers per prompt: 2-3x the time of the same sweep with a declared metric
(``fxlens.metrics``), which computes only the logits it reads.

Mechanism: ``traced(metric, shape, dtype)`` traces the callable once with ``make_fx`` on a fake logits
tensor of the run's exact shape (fake tensors: a Python branch on a value, ``.item()`` or
``.tolist()`` cannot be traced, and the metric then keeps full logits). The aten graph is read from
the logits input forward. Data-movement ops (``select``, ``slice``, ``index``, ``gather``, views,
permutes, ``expand``...) are replayed on three index tensors that hold, for every element, its batch,
position and vocabulary coordinate; the first op that computes with values (``sub``, ``log_softmax``,
``mean``...), or the output, reads exactly the elements its argument's coordinates name. Those
coordinates give the positions ``P`` and vocabulary entries ``V`` the metric reads. The result is a
``fxlens.metrics.Metric``: ``select`` returns ``P`` and ``V`` for every prompt, and ``from_selected`` runs
the traced graph with each value-reading argument gathered from the ``[batch, |P|, |V|]`` selected
logits by precomputed indices. Every op after the gathers is the traced op on the same values, so the
result is the callable's own result on those logits, not an approximation.

Example::

    reads = traced(lambda l: (l[:, -1, 5] - l[:, -1, 7]).mean(), (2, 16, 50257), torch.float32)
    reads.positions, reads.tokens        # (15,), (5, 7)

Gotchas: an index computed from the logits' values (``l[0, -1, l[0, -1].argmax()]``) reads the
whole tensor it indexes; so does a reduction over it (``l.log_softmax(-1)[:, -1]`` reads every
position: select the position first, ``l[:, -1].log_softmax(-1)``). A metric that reads nearly
everything is run on full logits (``None``), which is then just as fast. Tracing refusals are returned
as the reason (``Untraceable``), for the caller to say once.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..metrics import Metric

__all__ = ["traced", "reads_of", "Untraceable", "TracedMetric"]

aten = torch.ops.aten

# Ops whose output elements are elements of their first argument (the other arguments are not data).
MOVEMENT = {
    aten.select.int, aten.slice.Tensor, aten.index.Tensor, aten.index_select.default, aten.gather.default,
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.expand.default, aten.alias.default, aten.detach.default, aten.narrow.default,
    aten.diagonal.default, aten.flatten.using_ints, aten.unflatten.int, aten.movedim.int,
    aten.lift_fresh_copy.default, aten.clone.default,
}
MAX_READ = 1 << 24  # elements of one value-reading argument beyond which the metric keeps full logits


class Untraceable(str):
    """Why a callable's reads could not be established (the caller keeps full logits and says so)."""


@dataclass(eq=False)
class TracedMetric(Metric):
    """A plain callable's reads (positions, tokens) with the graph that computes it from them."""

    fn: object  # the user's callable, for full logits
    gm: fx.GraphModule  # the traced graph on selected logits [batch, |P|, |V|]
    pos_index: torch.Tensor  # [|P|] absolute positions
    tok_index: torch.Tensor  # [|V|] vocabulary ids
    batch: int
    per_prompt: bool = False  # the callable returns one value per prompt ([batch]), not a scalar
    lead: tuple = ()  # leading axes of its value before the batch axis ([n_metrics] for metrics.Several)

    @property
    def positions(self) -> tuple:
        return tuple(self.pos_index.tolist())

    @property
    def tokens(self) -> tuple:
        return tuple(self.tok_index.tolist())

    def select(self, seq: int, batch: int):
        return self.pos_index.expand(batch, -1), self.tok_index.expand(batch, -1)

    def from_selected(self, selected: torch.Tensor) -> torch.Tensor:
        """[rows, *lead] for a scalar metric, [rows, *lead, batch] for one that returns a value per prompt."""
        shape = self.lead + ((self.batch,) if self.per_prompt else ())
        return torch.stack([self.gm(rows).reshape(shape) for rows in selected])

    def per_example(self, selected: torch.Tensor) -> torch.Tensor:
        if not self.per_prompt:
            raise NotImplementedError("the callable returns one number for the batch")
        return self.from_selected(selected)

    def __call__(self, logits: torch.Tensor):
        return self.fn(logits)


def traced(metric, shape: tuple, dtype: torch.dtype, device=None) -> TracedMetric | Untraceable | None:
    """``metric``'s reads on logits of ``shape`` (see the module docstring): a TracedMetric, None when
    it reads (nearly) every logit, or the reason it cannot be traced."""
    from torch.fx.experimental.proxy_tensor import make_fx

    example = torch.empty(shape, dtype=dtype, device=device)
    try:
        gm = make_fx(metric, tracing_mode="fake", _allow_non_fake_inputs=True)(example)
    except Exception as err:  # noqa: BLE001 - any failure to trace means "cannot prove": full logits
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Untraceable(f"it could not be traced on fake logits ({type(err).__name__}: {first[:160]})")
    return _reads(gm, shape, metric)


def _reads(gm: fx.GraphModule, shape: tuple, metric) -> TracedMetric | Untraceable | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return Untraceable("it takes other inputs than the logits")
    logits = placeholders[0]
    b, s, v = shape
    device = logits.meta["val"].device if "val" in logits.meta else None
    grid = tuple(torch.arange(n, device=device).view(shape) for n, shape in ((b, (b, 1, 1)), (s, (1, s, 1)), (v, (1, 1, v))))
    coords: dict = {logits: tuple(g.expand(b, s, v) for g in grid)}  # node -> (batch, pos, vocab) of its elements
    tainted = {logits}  # nodes whose value depends on the logits
    values: dict = {}  # concrete values of nodes that do not
    uses: list = []  # (consumer, argument node) where a value-reading op reads logits elements

    def arg_value(a):
        return fx.node.map_arg(a, lambda n: values[n])

    for node in gm.graph.nodes:
        if node is logits:
            continue
        if node.op == "get_attr":
            values[node] = getattr(gm, node.target)
            continue
        ins = node.all_input_nodes
        if node.op == "output":
            uses += [(node, n) for n in ins if n in coords]  # outputs computed from values were counted where read
            continue
        if not any(n in tainted for n in ins):
            values[node] = node.target(*arg_value(node.args), **arg_value(node.kwargs))
            continue
        tainted.add(node)
        first = node.args[0] if node.args else None
        rest = [n for n in ins if n is not first]
        if node.target in MOVEMENT and isinstance(first, fx.Node) and first in coords and not any(n in tainted for n in rest):
            try:
                coords[node] = tuple(_replay(node, c, values) for c in coords[first])
                continue
            except Exception:  # noqa: BLE001 - a view the expanded coordinates cannot take: it reads them all
                pass
        uses += [(node, n) for n in ins if n in coords]
    if not uses:
        return None  # its result does not read the logits (or is no tensor): full logits, where the caller says why
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    val = out.meta.get("val") if isinstance(out, fx.Node) else None
    lead = tuple(getattr(metric, "lead", ()))
    if lead:
        if not isinstance(val, torch.Tensor) or tuple(val.shape) not in (lead, lead + (b,)):
            return None
    elif not isinstance(val, torch.Tensor) or (val.numel() != 1 and tuple(val.shape) != (b,)):
        return None  # neither a scalar nor one value per prompt: full logits, where the caller says what it returned
    for _, n in uses:
        if coords[n][0].numel() > MAX_READ:
            return None
    pos = torch.unique(torch.cat([coords[n][1].reshape(-1) for _, n in uses]))
    tok = torch.unique(torch.cat([coords[n][2].reshape(-1) for _, n in uses]))
    if pos.numel() == s and tok.numel() == v:
        return None
    on_selected = _on_selected(gm, logits, uses, coords, pos, tok, s, v)
    per_prompt = val.dim() == len(lead) + 1 if lead else (val.numel() != 1 or val.dim() == 1)
    return TracedMetric(metric, on_selected, pos.cpu(), tok.cpu(), b, per_prompt=per_prompt, lead=lead)


def _replay(node: fx.Node, coordinate: torch.Tensor, values: dict) -> torch.Tensor:
    """``node``'s op applied to a coordinate tensor in place of its first argument."""
    args = (coordinate,) + tuple(fx.node.map_arg(a, lambda n: values[n]) for a in node.args[1:])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
    return node.target(*args, **kwargs)


def _on_selected(gm, logits, uses, coords, pos, tok, s, v) -> fx.GraphModule:
    """The traced graph with its placeholder taken as the selected logits [batch, |P|, |V|]: each
    value-reading argument is gathered from them by a constant index."""
    gm = fx.GraphModule(gm, gm.graph.__deepcopy__())
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    placeholder = by_name[logits.name]
    where_pos = torch.full((s,), -1, dtype=torch.long, device=pos.device)
    where_pos[pos] = torch.arange(pos.numel(), device=pos.device)
    where_tok = torch.full((v,), -1, dtype=torch.long, device=tok.device)
    where_tok[tok] = torch.arange(tok.numel(), device=tok.device)
    n_pos, n_tok = pos.numel(), tok.numel()
    with graph.inserting_after(placeholder):
        flat = graph.call_function(aten.reshape.default, (placeholder, [-1]))
    gathered: dict = {}
    for k, (consumer, arg) in enumerate(uses):
        if arg.name not in gathered:
            cb, cp, cv = coords[arg]
            index = (cb * n_pos + where_pos[cp]) * n_tok + where_tok[cv]
            name = f"fxl_read_index_{k}"
            gm.register_buffer(name, index.contiguous())
            with graph.inserting_before(by_name[consumer.name]):
                idx = graph.get_attr(name)
                gathered[arg.name] = graph.call_function(aten.index.Tensor, (flat, [idx]))
        by_name[consumer.name].replace_input_with(by_name[arg.name], gathered[arg.name])
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


_SEEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # metric -> {(shape, dtype): result}


def reads_of(metric, shape: tuple, dtype: torch.dtype, device=None) -> TracedMetric | None:
    """``traced`` once per metric and logits shape (the result kept while the metric lives); a metric
    that cannot be traced is said once, with the reason, and gets None (full logits)."""
    key = (tuple(shape), dtype, str(device))
    try:
        seen = _SEEN.setdefault(metric, {})
    except TypeError:  # not weak-referenceable: trace every time
        seen = {}
    if key not in seen:
        result = traced(metric, shape, dtype, device)
        if isinstance(result, Untraceable):
            warnings.warn(
                f"the metric runs on full logits at every position, because {result}. fxlens computes only the "
                "logits a metric reads when it can trace it: index the logits with ints or tensors that do not "
                "depend on their values, or declare the reads with fxlens.metrics (logit_diff, logit)",
                UserWarning,
                stacklevel=4,
            )
            result = None
        seen[key] = result
    return seen[key]
