"""Graph-rewrite passes: each a pure function ``(GraphModule, frozen spec) -> GraphModule``.

A pass never mutates its input and never holds tensors; tensors (patch values, steering vectors,
hook functions) enter as new graph inputs, so new values never need a new program.

Example::

    gm = apply(gm, ExpandAttention("scaled_dot_product_attention"))
    gm = apply(gm, Cache((Read("blocks.0.attn.hook_pattern", "scaled_dot_product_attention__pattern"),)))
"""

from .base import PassError
from .cache import Cache, Read, cache
from .decompose_norm import DecomposeNorm, decompose_norm
from .edges import ALT_INPUT, DELTA_INPUT, MASK_INPUT, EdgeReceiver, Edges, EdgeSender, edges
from .expand_attention import ExpandAttention, expand_attention
from .fuse_gelu import FuseGelu, fuse_gelu
from .hooks import HOOKS_INPUT, HookAt, HookError, Hooks, hooks
from .intervene import Edit, EditError, Intervene, intervene
from .kv_prefix import KVPrefix, kv_prefix
from .pack_rows import PackRows, pack_rows
from .select_vocab import VOCAB_INPUT, SelectVocab, select_vocab
from .split_heads import SplitHeads, split_heads

_PASSES = {
    ExpandAttention: expand_attention,
    DecomposeNorm: decompose_norm,
    SplitHeads: split_heads,
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
    """Make ``apply`` run ``fn`` for specs of ``spec_type``."""
    _PASSES[spec_type] = fn


def apply(gm, spec):
    """Run the pass registered for ``type(spec)``."""
    try:
        fn = _PASSES[type(spec)]
    except KeyError:
        raise PassError(f"no pass is registered for {type(spec).__name__}") from None
    return fn(gm, spec)


__all__ = [
    "PassError",
    "apply",
    "register",
    "Cache",
    "Read",
    "DecomposeNorm",
    "ExpandAttention",
    "SplitHeads",
    "Hooks",
    "HookAt",
    "HookError",
    "HOOKS_INPUT",
    "Edit",
    "EditError",
    "Intervene",
    "KVPrefix",
    "PackRows",
    "SelectVocab",
    "FuseGelu",
    "Edges",
    "EdgeSender",
    "EdgeReceiver",
    "MASK_INPUT",
    "ALT_INPUT",
    "DELTA_INPUT",
    "VOCAB_INPUT",
]
