"""Graph-rewrite passes: each a pure function ``(GraphModule, frozen spec) -> GraphModule``.

A pass never mutates its input and never holds tensors; tensors (patch values, steering vectors,
hook functions) enter as graph inputs whose names the spec carries (the engine's plan builder
chooses them), so new values never need a new program.

Each spec class states its ``stage``; a plan runs its passes in stage order (``STAGES``), which
``check_order`` enforces: kernel rewrites of the captured ops first, then position layouts (a KV
prefix, packed rows), then materialising rewrites (an explicit pattern, a decomposed norm, per-head
results), then edits (interventions, edges, hooks), then reads (caches), then output rewrites (a
vocabulary slice). A later stage may rely on the nodes an earlier one created, never the reverse.

Example::

    gm = apply(gm, ExpandAttention(("scaled_dot_product_attention",)))
    gm = apply(gm, Cache((Read("blocks.0.attn.hook_pattern", "scaled_dot_product_attention__pattern"),)))
"""

from .base import PassError
from .cache import Cache, Read, cache
from .decompose_norm import DecomposeNorm, decompose_norm
from .edges import EdgePostNorm, EdgeReceiver, Edges, EdgeSender, EdgeSpine, EdgeSpineStep, edges
from .expand_attention import ExpandAttention, expand_attention
from .fuse_gelu import FuseGelu, fuse_gelu
from .hooks import HookAt, HookError, Hooks, hooks
from .intervene import Edit, EditError, Intervene, intervene
from .kv_prefix import KVPrefix, kv_prefix
from .pack_rows import PackRows, pack_rows
from .select_vocab import SelectVocab, select_vocab
from .split_experts import SplitExperts, split_experts
from .split_heads import SplitHeads, split_heads
from .split_inputs import SplitInputs, split_inputs
from .stack_states import StackStates, stack_states

STAGES = ("kernels", "layout", "materialise", "edit", "read", "output")

_PASSES = {
    ExpandAttention: expand_attention,
    DecomposeNorm: decompose_norm,
    SplitHeads: split_heads,
    SplitExperts: split_experts,
    SplitInputs: split_inputs,
    StackStates: stack_states,
    Cache: cache,
    Hooks: hooks,
    Intervene: intervene,
    KVPrefix: kv_prefix,
    PackRows: pack_rows,
    SelectVocab: select_vocab,
    FuseGelu: fuse_gelu,
    Edges: edges,
}


def register(spec_type, fn) -> None:
    """Make ``apply`` run ``fn`` for specs of ``spec_type`` (which must state its ``stage``)."""
    if getattr(spec_type, "stage", None) not in STAGES:
        raise PassError(f"{spec_type.__name__} must declare a class attribute stage, one of {STAGES}")
    _PASSES[spec_type] = fn


def apply(gm, spec):
    """Run the pass registered for ``type(spec)``."""
    try:
        fn = _PASSES[type(spec)]
    except KeyError:
        raise PassError(f"no pass is registered for {type(spec).__name__}") from None
    return fn(gm, spec)


def check_order(plan: tuple) -> None:
    """Raise PassError unless the plan's passes run in stage order (see the module docstring)."""
    last = 0
    for i, spec in enumerate(plan):
        stage = getattr(spec, "stage", None)
        if stage not in STAGES:
            raise PassError(f"{type(spec).__name__} states no stage; it cannot be placed in a plan")
        k = STAGES.index(stage)
        if k < last:
            before = plan[i - 1]
            raise PassError(
                f"{type(spec).__name__} ({stage}) comes after {type(before).__name__} ({before.stage}); "
                f"passes run in the order {' -> '.join(STAGES)}"
            )
        last = k


__all__ = [
    "PassError",
    "STAGES",
    "apply",
    "check_order",
    "register",
    "Cache",
    "Read",
    "DecomposeNorm",
    "ExpandAttention",
    "SplitHeads",
    "SplitExperts",
    "StackStates",
    "Hooks",
    "HookAt",
    "HookError",
    "Edit",
    "EditError",
    "Intervene",
    "KVPrefix",
    "PackRows",
    "SelectVocab",
    "FuseGelu",
    "Edges",
    "EdgePostNorm",
    "EdgeSpine",
    "EdgeSpineStep",
    "EdgeSender",
    "EdgeReceiver",
]
