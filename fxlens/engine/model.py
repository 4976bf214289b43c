"""``fxlens.Model``: a captured HF model with TransformerLens' entry points.

Problem: researchers want ``model(text)``, ``run_with_cache``, ``run_with_hooks`` and the token helpers
they know, on any HF model, without adapters, without hooks left on the model, and fast.

Mechanism: the HF model is captured as an fx graph whose nodes are named sites (``graphs.analyse``);
everything derived from the capture lives in one ``Derived`` owner (``engine/derived.py``), which the
Model checks against the HF model at the start of every call and follows when the model changed. Each
call turns its request into a plan with the plan builder (``engine/plan.py``), gets the program for
that plan from a bounded cache, and feeds it tokens (and hook functions or tensors as graph inputs).

Example::

    model = fxlens.Model.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    logits, cache = model.run_with_cache("The Eiffel Tower is in", names_filter=lambda n: n.endswith("pattern"))
    cache["pattern", 3].shape     # [batch, head, query_pos, key_pos]

A model whose code fixes the sequence length (state-space and hybrid models) is captured once per input
length (told once, at wrapping); each call uses the capture of its input's length (``Derived.at_length``),
and ``model.sites`` and the other properties describe the capture of the last input's length.

Gotchas: the graph is specialised to the model's dtype and device; when the HF model is moved or its
modules replaced after wrapping, the next call captures it again (and says so once). Forward hooks
registered on the HF model are not part of the graph (use ``run_with_hooks``).
"""

from __future__ import annotations

import contextlib

import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..architectures import table_for
from ..graphs.bounds import max_positions
from ..graphs.sites import Site, SiteError
from ..passes import Read
from .activation_cache import ActivationCache
from .derived import Derived, StaleModelError
from .inputs import feed as checked_feed
from .interventions import prepare
from .plan import PlanBuilder
from .surface import TransformerLensSurface, config_fields
from .tokens import Tokens

__all__ = ["Model", "HookPoint", "Config"]


@dataclass(frozen=True)
class HookPoint:
    """What a hook function receives as its second argument (TransformerLens' ``hook``)."""

    name: str
    layer_index: int | None = None

    def layer(self) -> int | None:
        return self.layer_index


@dataclass(frozen=True)
class BoundHookPoint(HookPoint):
    """A ``HookPoint`` of ``model.hook_dict``: hooks added to it are kept on its model (``model.add_hook``)."""

    model: Any = field(default=None, compare=False, repr=False)

    def add_hook(self, hook, dir: str = "fwd", is_permanent: bool = False) -> None:
        self.model.add_hook(self.name, hook, dir=dir, is_permanent=is_permanent)

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False) -> None:
        self.model._drop_hooks(self.name, dir, including_permanent)


@dataclass
class Config:
    """Model dimensions with TransformerLens' field names."""

    n_layers: int
    d_model: int
    n_heads: int | None = None
    d_head: int | None = None
    n_key_value_heads: int | None = None
    d_mlp: int | None = None
    d_vocab: int | None = None  # token ids accepted: the input embedding's rows
    d_vocab_out: int | None = None  # the last axis of the logits (num_labels for a classification head)
    n_ctx: int | None = None
    num_experts: int | None = None  # mixture-of-experts models (TransformerLens' names)
    experts_per_token: int | None = None
    model_type: str | None = None
    # what prepend_bos=None means in to_tokens, run_with_cache, ... (TransformerLens' field and default)
    default_prepend_bos: bool = True
    # read from the graph and the HF config (``surface.config_fields``): "gelu_new", "silu", ...
    act_fn: str | None = None
    normalization_type: str | None = None  # "LN", "RMS" (a processed copy: "LNPre", "RMSPre"), None without norms
    positional_embedding_type: str | None = None  # "standard" (learned), "rotary", "alibi", None when none is found
    gated_mlp: bool = False
    has_table: bool = False
    attn_implementation: str = "sdpa"
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _config(derived: Derived, hf_model, table) -> Config:
    config = getattr(hf_model, "config", None)
    dims = derived.graph.dims
    n_ctx = max_positions(config)
    max_seq = derived.captured.max_seq  # lengths beyond it were found not to work (``graphs.bounds``)
    n_ctx = max_seq if n_ctx is None or (max_seq is not None and max_seq < n_ctx) else n_ctx
    return Config(
        n_layers=dims["n_layers"],
        d_model=int(dims["d_model"]),
        n_heads=dims.get("n_heads"),
        d_head=dims.get("d_head"),
        n_key_value_heads=dims.get("n_key_value_heads"),
        d_mlp=dims.get("d_mlp"),
        d_vocab=dims.get("d_vocab") or getattr(config, "vocab_size", None),
        d_vocab_out=dims.get("d_vocab_out") or dims.get("d_vocab"),
        n_ctx=n_ctx,
        num_experts=dims.get("n_experts"),
        experts_per_token=dims.get("experts_per_token"),
        model_type=getattr(config, "model_type", None),
        has_table=table is not None,
        **config_fields(derived, hf_model),
        attn_implementation=derived.captured.attn_implementation,
        dtype=derived.captured.dtype,
        device=derived.captured.device,
    )


class Model(TransformerLensSurface):
    """A HuggingFace model captured as a graph of named sites. See the module docstring."""

    def __new__(cls, hf_model=None, *args, **kwargs):
        # an encoder-decoder (config.is_encoder_decoder) is a Seq2SeqModel (engine/seq2seq.py)
        if cls is Model and getattr(getattr(hf_model, "config", None), "is_encoder_decoder", False):
            from ..graphs.seq2seq import is_encoder_decoder
            from .seq2seq import Seq2SeqModel

            cls = Seq2SeqModel if is_encoder_decoder(hf_model) else cls
        return object.__new__(cls)

    def __init__(self, hf_model: torch.nn.Module, tokenizer=None, *, attn_implementation: str | None = None, table="auto"):
        _check_model_and_tokenizer(hf_model, tokenizer)
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        if table == "auto":
            table = table_for(getattr(hf_model, "config", None))
        self.table = table
        self.attn_implementation = attn_implementation
        self._derived = Derived.capture(hf_model, attn_implementation, table)
        self._length: int | None = None  # the last input's length: which capture a length-fixing model uses
        self._told: set = set()
        self._persistent: list = []  # (site name, fn, permanent, dir) added with add_hook, applied to every forward call
        self.last_sweep_stats: dict = {}  # what the last run of rows (a sweep, path patching, an edge sweep) did
        self.cfg = _config(self._derived, hf_model, table)
        self._tok = Tokens(tokenizer, self._derived.captured.device)

    # ---- what the Model is derived from ----------------------------------------------------------
    @property
    def derived(self) -> Derived:
        """Everything derived from the capture, after checking that the HF model is as captured.

        Values edited in place need nothing (the graph shares the tensors); swapped parameter objects
        are rebound; a moved or restructured model is captured again (said once per change).
        """
        d = self._derived
        change = d.binding.change()
        if change is not None:
            d = self._follow(change)
        d = d.at_length(self._length)
        if self.hf_model.training and "train" not in self._told:
            self._told.add("train")
            warnings.warn(
                f"the HF model is in train() mode; fxlens runs it as in eval() mode (no dropout). Call "
                f"{type(self.hf_model).__name__}.eval() to silence this",
                UserWarning,
                stacklevel=3,
            )
        elif not self.hf_model.training:
            self._told.discard("train")
        return d

    def _follow(self, change) -> Derived:
        d = self._derived
        if change.hooks and not (change.swapped or change.moved or change.modules):
            d.binding.acknowledge_hooks()
            warnings.warn(
                "forward hooks were added to or removed from the HF model after wrapping; fxlens does not run them "
                "(use run_with_hooks, or wrap the model again to capture them)",
                UserWarning,
                stacklevel=4,
            )
            return d
        if change.rebindable and set(change.swapped) <= d.binding.graph_paths and not d.binding.untied(change):
            self._derived = d.rebound()
            return self._derived
        if d.binding.overrides:
            raise StaleModelError(
                f"this Model is a copy with edited weights (with_weight_edits), and the HF model it shares the other "
                f"weights with has changed since ({change.describe()}); make the copy again from a Model of the changed HF model"
            )
        warnings.warn(
            f"the HF model changed after wrapping ({change.describe()}); it was captured again, and fxlens now computes with it as it is",
            UserWarning,
            stacklevel=4,
        )
        self._derived = Derived.capture(self.hf_model, self.attn_implementation, self.table)
        self.cfg = _config(self._derived, self.hf_model, self.table)
        self._tok.device = self._derived.captured.device
        return self._derived

    @property
    def _active(self) -> Derived:
        """The Derived of the last input's length (``Derived.at_length``; the capture itself for a model
        that takes every length)."""
        return self._derived.at_length(self._length)

    @property
    def captured(self):
        return self._active.captured

    @property
    def graph(self):
        return self._active.graph

    @property
    def site_table(self):
        return self._active.graph.sites

    @property
    def programs(self):
        return self._active.programs

    def _with_derived(self, derived: Derived) -> "Model":
        """A Model sharing this one's HF model, tokenizer and table, computing with ``derived``."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._derived = derived
        new._length = None
        new._told = set()
        new._persistent = list(self._persistent)  # the copy's own list: hooks added to one stay off the other
        new.last_sweep_stats = {}
        new._tok = Tokens(self.tokenizer, derived.captured.device)
        return new

    def __deepcopy__(self, memo) -> "Model":
        """A Model of a deep copy of the HF model (and of this Model's own edited tensors)."""
        hf = copy.deepcopy(self.hf_model, memo)
        overrides = {p: copy.deepcopy(t, memo) for p, t in self._derived.binding.overrides.items()}
        new = self._with_derived(self._derived.for_model(hf, overrides))
        new.hf_model = hf
        new.tokenizer = copy.deepcopy(self.tokenizer, memo)
        new._tok = Tokens(new.tokenizer, new._derived.captured.device)
        new.cfg = copy.deepcopy(self.cfg, memo)
        return new

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, **kwargs) -> "Model":
        """Wrap a model you already have; it is never modified. Each call captures it afresh."""
        return cls(hf_model, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, tokenizer=None, attn_implementation: str | None = None, **hf_kwargs) -> "Model":
        """Load with ``AutoModelForCausalLM`` (falling back to masked-LM and base classes) and ``AutoTokenizer``.

        ``hf_kwargs`` go to ``from_pretrained`` (``gguf_file=``, ``torch_dtype=``, ``revision=``, ...).
        ``tokenizer``: None loads one from the same place (an error if there is none), False loads none,
        a name or folder loads that one, anything else is used as the tokenizer.
        """
        import transformers

        load_kwargs = dict(hf_kwargs)
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        errors = []
        hf_model = None
        for auto in _auto_classes(name_or_path, hf_kwargs):
            try:
                hf_model = getattr(transformers, auto).from_pretrained(name_or_path, **load_kwargs)
                break
            except (ValueError, KeyError) as err:
                errors.append(f"{auto}: {err}")
        if hf_model is None:
            raise ValueError(f"could not load {name_or_path!r}:\n" + "\n".join(errors))
        hf_model.eval()
        tok_kwargs = {k: v for k, v in hf_kwargs.items() if k in ("gguf_file", "revision", "trust_remote_code")}
        if tokenizer is False:
            tokenizer = None
        elif tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            source = name_or_path if tokenizer is None else tokenizer
            why, cause = None, None
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(source, **tok_kwargs)
            except (OSError, ValueError, TypeError, KeyError) as err:
                text = str(err).strip()
                why, cause = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}", err
            else:
                # transformers 5 builds a tokenizer with an empty vocabulary from a folder with no tokenizer files
                if getattr(tokenizer, "vocab_size", None) == 0:
                    why = "the folder holds no tokenizer files; AutoTokenizer built one with an empty vocabulary"
            if why is not None:
                raise ValueError(
                    f"loaded the model from {name_or_path!r} but no tokenizer from {str(source)!r} ({why}). Pass "
                    "tokenizer=False to go on without one (then give token ids, not text), or tokenizer=<a tokenizer, "
                    "or a name or folder that holds one>."
                ) from cause
        return cls(hf_model, tokenizer, attn_implementation=attn_implementation)

    # ---- sites ----------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        """Every site name, in graph order (canonical TransformerLens names and raw HF module paths)."""
        return self.site_table.names()

    def site(self, name) -> Site:
        return self.site_table[name]

    def get_act_name(self, name: str, layer: int | None = None, layer_type: str | None = None) -> str:
        return self.site_table.get_act_name(name, layer, layer_type)

    def _resolve(self, names, canonical_only: bool = False) -> list[Site]:
        """The sites ``names`` selects. A predicate sees every site name: TransformerLens names and raw
        HF module paths (``model.layers.0.mlp``); ``canonical_only=True`` shows it only the former, as a
        TransformerLens model would. None selects every site except the expensive ones (per-head results,
        per-expert outputs), of both kinds unless ``canonical_only``."""
        pool = [s for s in self.site_table.values() if s.canonical or not canonical_only]
        if names is None:
            return [s for s in pool if not s.expensive]
        if isinstance(names, str) or isinstance(names, tuple):
            return [self.site_table[names]]
        if callable(names):
            # a predicate sees every site of the pool; only names_filter=None leaves out the expensive ones
            return [s for s in pool if names(s.name)]
        return [self.site_table[n] for n in names]

    # ---- tokens ---------------------------------------------------------------------------------
    def _bos(self, prepend_bos: bool | None) -> bool:
        """``prepend_bos=None`` is the model's default, ``cfg.default_prepend_bos``, as in TransformerLens."""
        return self.cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos)

    def to_tokens(self, text, prepend_bos: bool | None = None, padding_side: str = "right") -> torch.Tensor:
        return self._tok.encode(text, prepend_bos=self._bos(prepend_bos), padding_side=padding_side)[0]

    def to_string(self, tokens):
        return self._tok.to_string(tokens)

    def to_str_tokens(self, value, prepend_bos: bool | None = None):
        return self._tok.to_str_tokens(value, prepend_bos=self._bos(prepend_bos))

    def to_single_token(self, string: str) -> int:
        return self._tok.to_single_token(string)

    def _inputs(self, value, attention_mask=None, prepend_bos: bool | None = None, padding_side: str = "right") -> dict:
        """The program's checked inputs (``fxlens.engine.inputs.feed``); a model captured per length
        switches to (or captures) the one of this input's length."""
        self.derived  # the HF model as captured, or followed (see ``derived``)
        out = checked_feed(
            value, attention_mask, tokens=self._tok, device=self.captured.device, vocab=self.cfg.d_vocab,
            n_ctx=self.cfg.n_ctx, takes_mask="attention_mask" in self.captured.inputs,
            model_name=type(self.hf_model).__name__, prepend_bos=self._bos(prepend_bos), padding_side=padding_side,
            lengths=self._lengths(),
        )
        if self._derived.captured.static_seq is not None:
            self._derived.at_length(out["input_ids"].shape[1])  # refused here when the length is ambiguous
            self._length = out["input_ids"].shape[1]
        return out

    def _lengths(self) -> tuple | None:
        """(min, max, why min, why max) for ``inputs.feed`` when the capture found bounds of its own."""
        cg, config = self._derived.captured, getattr(self.hf_model, "config", None)
        max_pos = max_positions(config)
        if cg.min_seq <= 1 and (cg.max_seq is None or max_pos is None or cg.max_seq >= max_pos):
            return None
        why_max = (f"torch.export could not prove the model's code correct for longer inputs although "
                   f"config.max_position_embeddings = {max_pos}" if max_pos is not None and cg.max_seq is not None
                   and cg.max_seq < max_pos else None)
        return cg.min_seq, cg.max_seq, "torch.export found that its code needs it", why_max

    # ---- running --------------------------------------------------------------------------------
    def _outputs(self, out: dict, feed: dict, return_type: str | None):
        if return_type in (None, "none"):
            return None
        if return_type not in ("logits", "loss", "both"):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None; got {return_type!r}")
        logits = (out.get("outputs") or {}).get(self.captured.logits)
        if logits is None:
            raise ValueError(self._no_logits(return_type))
        if return_type == "logits":
            return logits
        if self.cfg.d_vocab_out is not None and self.cfg.d_vocab is not None and self.cfg.d_vocab_out != self.cfg.d_vocab:
            raise ValueError(
                f"return_type={return_type!r} asks for the next-token loss, which needs logits over the {self.cfg.d_vocab} "
                f"tokens; the last axis of {type(self.hf_model).__name__}'s logits holds {self.cfg.d_vocab_out}, not "
                f"{self.cfg.d_vocab} (a classification head). Use return_type='logits' and compute the loss you mean from them."
            )
        loss = lm_loss(logits, feed["input_ids"], feed.get("attention_mask"))
        return loss if return_type == "loss" else (logits, loss)

    def _no_logits(self, return_type) -> str:
        return self._derived.no_logits(f"return_type={return_type!r}")

    def _logits(self, out: dict) -> torch.Tensor:
        """The logits of a whole-model program's output, or a ValueError for a model without a head."""
        key = self.captured.logits
        if key is None:
            raise ValueError(self._derived.no_logits("this call"))
        return out["outputs"][key]

    def __call__(self, input, attention_mask=None, *, return_type: str | None = "logits", prepend_bos: bool | None = None,
                 padding_side: str = "right", loss_per_token: bool = False):
        """Logits [batch, pos, vocab]; ``return_type`` "loss" (mean next-token loss; per position with
        ``loss_per_token=True``, [batch, pos - 1]), "both" or None, as in TransformerLens."""
        feed = self._inputs(input, attention_mask, prepend_bos, padding_side)
        if not self._persistent:
            out = self.programs.get(())(**feed)
        else:
            plan, inputs = self._with_persistent(PlanBuilder(self.graph)).build()
            out = self.programs.get(plan)(**feed, **inputs)
        result = self._outputs(out, feed, return_type)
        if loss_per_token and return_type in ("loss", "both"):
            logits = self._logits(out)
            loss = lm_loss(logits, feed["input_ids"], feed.get("attention_mask"), per_token=True)
            return loss if return_type == "loss" else (logits, loss)
        return result

    forward = __call__

    def run_with_cache(
        self,
        input,
        attention_mask=None,
        *,
        names_filter=None,
        return_logits: bool = True,
        stop_at_layer: int | None = None,
        remove_batch_dim: bool = False,
        return_type: str | None = "logits",
        prepend_bos: bool | None = None,
        padding_side: str = "right",
        canonical_only: bool = False,
        fwd_hooks=(),
        incl_bwd: bool = False,
    ):
        """Run once and return ``(logits, ActivationCache)`` of the sites ``names_filter`` selects.

        ``fwd_hooks`` (as in ``run_with_hooks``) and hooks added with ``add_hook`` run first: the cache
        holds the values after them, as in TransformerLens.

        ``names_filter``: None (every site except the expensive per-head results ``attn.hook_result`` and
        per-expert outputs), a name, a list of names, or a predicate on names. A predicate sees every site
        name, raw HF module paths (``model.layers.0.mlp``) as well as TransformerLens names;
        ``canonical_only=True`` keeps raw paths out of None and of predicates (TransformerLens' set).
        With ``return_logits=False`` or ``stop_at_layer=L`` nothing after the last needed node runs; ``stop_at_layer=L`` returns ``blocks.L.hook_resid_pre`` in place of logits.

        ``incl_bwd=True`` also differentiates the output (which must be a scalar: ``return_type="loss"``)
        and caches each site's gradient as ``name + "_grad"``, as TransformerLens does. Gradients are taken
        with ``torch.autograd.grad`` down to the earliest cached site only: no parameter's ``.grad`` is
        touched, and it works with gradients disabled around the call.
        """
        feed = self._inputs(input, attention_mask, prepend_bos, padding_side)
        sites = self._resolve(names_filter, canonical_only)
        if incl_bwd:
            if stop_at_layer is not None or not return_logits or return_type is None:
                raise ValueError("incl_bwd=True differentiates the model's output: it cannot be combined with "
                                 "stop_at_layer, return_logits=False or return_type=None")
            return self._cache_with_grads(feed, sites, fwd_hooks, canonical_only, return_type, remove_batch_dim)
        stop = None
        if stop_at_layer is not None:
            if not 0 <= stop_at_layer <= self.cfg.n_layers:
                raise ValueError(f"stop_at_layer={stop_at_layer} is out of range: use 0..{self.cfg.n_layers}")
            # the residual stream entering layer stop_at_layer (after the last block for n_layers)
            block = self.graph.structure.blocks[min(stop_at_layer, self.cfg.n_layers - 1)]
            stop_node = block.resid_pre if stop_at_layer < self.cfg.n_layers else block.resid_post
            limit = self.graph.dg.order[stop_node]
            sites = [s for s in sites if self.graph.dg.order.get(s.rewrite[1] if s.rewrite else s.node, 0) <= limit]
            stop = stop_node
        keep_outputs = return_logits and stop is None and return_type is not None
        if fwd_hooks or self._persistent:
            b = self._hooked(PlanBuilder(self.graph), fwd_hooks, canonical_only)
            plan, inputs = b.cache(sites, reads=[Read("fxl_stop", stop)] if stop else (), keep_outputs=keep_outputs).build()
            out = self.programs.get(plan)(**feed, **inputs)
        else:
            plan = self._cache_plan(sites, stop, keep_outputs)
            out = self.programs.get(plan)(**feed)
        values = {k: v.detach() if v.requires_grad else v for k, v in out["cache"].items()}
        stopped = values.pop("fxl_stop", None)
        cache = ActivationCache(values, self.site_table, self)
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        if stop is not None:
            return stopped, cache
        return (self._outputs(out, feed, return_type) if keep_outputs else None), cache

    def _cache_with_grads(self, feed, sites, fwd_hooks, canonical_only, return_type, remove_batch_dim):
        """``run_with_cache(incl_bwd=True)``: one run caching ``sites`` with a backward hook on each that keeps
        its gradient, then ``torch.autograd.grad`` of the scalar output with respect to the hooks' anchor."""
        grads: dict = {}

        def keep(grad, point):
            grads[point.name + "_grad"] = grad.detach()

        anchor = torch.zeros((), device=self.cfg.device, requires_grad=True)
        b = self._hooked(PlanBuilder(self.graph), fwd_hooks, canonical_only)
        for site in sites:
            b.hook(site, keep, HookPoint(site.name, site.layer), "bwd", anchor=anchor)
        plan, inputs = b.cache(sites).build()
        with torch.enable_grad():
            out = self.programs.get(plan)(**feed, **inputs)
            result = self._outputs(out, feed, return_type)
            scalar = result[1] if isinstance(result, tuple) else result
            if not (isinstance(scalar, torch.Tensor) and scalar.numel() == 1):
                shape = tuple(scalar.shape) if isinstance(scalar, torch.Tensor) else type(scalar).__name__
                raise ValueError(f"incl_bwd=True differentiates the output, which must be a scalar, but return_type="
                                 f"{return_type!r} gives {shape}: use return_type='loss'")
            torch.autograd.grad(scalar, [anchor], allow_unused=True)
        values = {k: v.detach() for k, v in out["cache"].items()}
        values.update(grads)
        cache = ActivationCache(values, self.site_table, self)
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        detached = tuple(r.detach() for r in result) if isinstance(result, tuple) else result.detach()
        return detached, cache

    def _cache_plan(self, sites, stop: str | None, keep_outputs: bool) -> tuple:
        """The plan that caches ``sites`` (and the residual at node ``stop`` as ``fxl_stop``): the same
        object for the same request, so that looking its program up hashes it once (a cache of every
        site holds hundreds of reads)."""
        d = self._active

        def build():
            b = PlanBuilder(d.graph).cache(sites, reads=[Read("fxl_stop", stop)] if stop else (), keep_outputs=keep_outputs)
            return b.build()[0]

        return d.plan(("cache", tuple(s.name for s in sites), stop, keep_outputs), build)

    # ---- hooks ----------------------------------------------------------------------------------
    def _hook_sites(self, name, canonical_only: bool = False) -> list:
        if callable(name):
            matched = self._resolve(name, canonical_only)
            if not matched:
                raise SiteError("the hook predicate matched no site; see model.sites for the names")
            return matched
        return [self.site_table[name]]

    def _hooked(self, b: PlanBuilder, fwd_hooks, canonical_only: bool = False, bwd_hooks=()) -> PlanBuilder:
        """``b`` with the persistent hooks, then ``fwd_hooks`` and ``bwd_hooks`` = [(name or predicate, fn)],
        in that order."""
        self._with_persistent(b)
        for hooks, dir in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd")):
            for name, fn in _hook_pairs(hooks, f"{dir}_hooks"):
                for site in self._hook_sites(name, canonical_only):
                    b.hook(site, fn, HookPoint(site.name, site.layer), dir)
        return b

    def _with_persistent(self, b: PlanBuilder) -> PlanBuilder:
        for name, fn, _, dir in self._persistent:
            site = self.site_table[name]
            b.hook(site, fn, HookPoint(site.name, site.layer), dir)
        return b

    def add_hook(self, name, hook, dir: str = "fwd", is_permanent: bool = False, *, canonical_only: bool = False) -> None:
        """Keep ``hook(value, hook_point)`` at the site ``name`` (or every site a predicate accepts) for every
        forward call (``model(...)``, ``run_with_cache``, ``run_with_hooks``, ``run_with_interventions``)
        until ``reset_hooks()``; it is part of each call's program, not a Python hook on the HF model.
        ``dir="bwd"``: ``hook(grad, hook_point)`` is called on the site's gradient when a backward pass runs
        through an output of such a call (a returned tensor replaces the gradient).
        ``is_permanent=True`` keeps it through ``reset_hooks()`` (``including_permanent=True`` removes it).
        Sweeps, path patching and other runs of rows refuse while hooks are set (they build their own
        programs): pass the edit as an intervention there.

        Unlike TransformerLens, a backward hook belongs to the forward call that ran with it: resetting the
        hooks between the forward and the backward does not stop it from firing on that call's gradients."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir={dir!r}: use 'fwd' (forward hooks) or 'bwd' (hooks on gradients)")
        if not callable(hook):
            raise TypeError(f"hook must be a function (value, hook_point) -> value or None; got {type(hook).__name__}")
        for site in self._hook_sites(name, canonical_only):
            self._persistent.append((site.name, hook, bool(is_permanent), dir))

    def reset_hooks(self, including_permanent: bool = False) -> None:
        """Remove the hooks ``add_hook`` kept (the permanent ones too with ``including_permanent``)."""
        self._persistent = [h for h in self._persistent if h[2] and not including_permanent]

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True):
        """``with model.hooks(fwd_hooks=[(name, fn)], bwd_hooks=[(name, fn)]):`` every forward call inside
        runs with these hooks (backward hooks fire on the gradients of those calls' outputs); they are
        removed on exit, errors included (``reset_hooks_end=False`` keeps them)."""
        before = list(self._persistent)
        try:
            for hooks, dir in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd")):
                for name, fn in _hook_pairs(hooks, f"{dir}_hooks"):
                    self.add_hook(name, fn, dir)
            yield self
        finally:
            if reset_hooks_end:
                self._persistent = before

    @property
    def persistent_hooks(self) -> list:
        """[(site name, function)] of the hooks every forward call runs with (``add_hook``), forward and
        backward."""
        return [(name, fn) for name, fn, _, _ in self._persistent]

    def run_with_hooks(
        self,
        input,
        attention_mask=None,
        *,
        fwd_hooks=(),
        bwd_hooks=(),
        return_type: str | None = "logits",
        reset_hooks_end: bool = True,
        prepend_bos: bool | None = None,
        padding_side: str = "right",
        canonical_only: bool = False,
    ):
        """Run with ``fwd_hooks = [(name or predicate, fn)]``; ``fn(value, hook) -> value | None``.

        A predicate sees every site name, raw HF module paths included; ``canonical_only=True`` shows it
        only TransformerLens names (as a TransformerLens model would).

        ``value`` is the site in TransformerLens layout; returning a tensor replaces it (same shape
        and dtype), returning None keeps it (in-place edits are kept). Nothing persists after the call.

        ``bwd_hooks = [(name or predicate, fn)]``: ``fn(grad, hook)`` is called on the gradient of the site
        (in TransformerLens layout) when a backward pass runs through this call's output, e.g.
        ``model.run_with_hooks(ids, return_type="loss", bwd_hooks=[...]).backward()``; a returned tensor
        replaces the gradient. (In TransformerLens these need ``reset_hooks_end=False``; here they belong
        to the call's own autograd graph, so nothing has to stay on the model.)
        """
        if not reset_hooks_end:
            raise ValueError(
                "reset_hooks_end=False would keep these hooks after the call: add them with model.add_hook(name, fn) "
                "(or `with model.hooks(fwd_hooks=...):`) to keep them"
            )
        feed = self._inputs(input, attention_mask, prepend_bos, padding_side)
        plan, inputs = self._hooked(PlanBuilder(self.graph), fwd_hooks, canonical_only, bwd_hooks).build()
        out = self.programs.get(plan)(**feed, **inputs)
        return self._outputs(out, feed, return_type)

    def run_with_interventions(
        self,
        input,
        interventions,
        attention_mask=None,
        *,
        names_filter=None,
        return_type: str | None = "logits",
        compile: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str = "right",
    ):
        """Run once with every intervention applied (in the order given) as one program.

        ``interventions``: ``fxlens.Patch``, ``Ablate``, ``Steer``, ``Scale`` or ``Apply`` specs, checked
        against this input's shapes before anything runs. Returns the logits, or ``(logits, cache)``
        when ``names_filter`` asks for sites (their values after the interventions). ``compile=True``
        runs the program through torch.compile (told once, and run uncompiled, if that fails).
        """
        feed = self._inputs(input, attention_mask, prepend_bos, padding_side)
        batch, seq = feed["input_ids"].shape
        return self._intervened(feed, interventions, batch, seq, names_filter, return_type, compile)

    def _intervened(self, feed: dict, interventions, batch: int, lengths, names_filter, return_type, compile: bool,
                    fwd_hooks=()):
        """One run of ``feed`` with the interventions (checked against ``batch`` and ``lengths``), the kept
        hooks and ``fwd_hooks``, and a cache of ``names_filter``'s sites when given."""
        prep = prepare(list(interventions), self, batch, lengths, feed.get("attention_mask"))
        b = self._hooked(PlanBuilder(self.graph), fwd_hooks)
        prep.add_to(b)
        if names_filter is not None:
            b.cache(self._resolve(names_filter))
        plan, inputs = b.build()
        out = self.programs.get(plan, compile)(**feed, **inputs)
        result = self._outputs(out, feed, return_type)
        if names_filter is None:
            return result
        return result, ActivationCache({k: v.detach() for k, v in out["cache"].items()}, self.site_table, self)

    def run_with_circuit(self, input, circuit, attention_mask=None, *, ablation="zero", reference=None,
                         reference_attention_mask=None, return_type="logits"):
        """Run with every edge outside ``circuit`` ablated (see ``fxlens.circuits.run_with_circuit``)."""
        from ..circuits import run_with_circuit

        return run_with_circuit(self, input, circuit, ablation=ablation, reference=reference, attention_mask=attention_mask,
                                reference_attention_mask=reference_attention_mask, return_type=return_type)

    def run_with_edges(self, input, edges, attention_mask=None, *, ablation="zero", reference=None,
                       reference_attention_mask=None, return_type="logits"):
        """Run with the given edges ablated or patched (see ``fxlens.circuits.run_with_edges``)."""
        from ..circuits import run_with_edges

        return run_with_edges(self, input, edges, ablation=ablation, reference=reference, attention_mask=attention_mask,
                              reference_attention_mask=reference_attention_mask, return_type=return_type)

    def edit_weights(self):
        """Edit weights in place for the duration of a ``with`` block; every touched tensor is restored.

        The HF model shares these tensors, so it sees the edits inside the block too.
        """
        from .weights import WeightEdits

        return WeightEdits(self, in_place=True)

    # ---- weights and tokens, as TransformerLens names them --------------------------------------
    @property
    def W_E(self) -> torch.Tensor:
        """The token embedding [d_vocab, d_model]: the HF parameter itself (edits show in the model)."""
        from .weight_views import embedding

        return embedding(self)

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding [d_model, d_vocab_out]: a transposed view of the HF output weight."""
        from .weight_views import unembedding

        return unembedding(self)[0]

    @property
    def b_U(self) -> torch.Tensor:
        """The unembedding bias [d_vocab_out] (zeros when the head has none)."""
        from .weight_views import unembedding

        return unembedding(self)[1]

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """The unembedding directions of ``tokens`` (an id, a string of one token, or ids): [..., d_model]."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, dtype=torch.long)
        return self.W_U[:, ids].movedim(0, -1)

    def to_single_str_token(self, token: int) -> str:
        """The string of one token id."""
        if not isinstance(token, int):
            raise TypeError(f"to_single_str_token takes one token id (an int); got {type(token).__name__}")
        return self.to_string(token)

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos: bool | None = None,
                           padding_side: str = "right") -> int:
        """The position of ``single_token`` (an id or a one-token string) in ``input`` (text or ids
        [pos] / [1, pos]): its first or last occurrence (``mode``), as TransformerLens."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last'; got {mode!r}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side) if isinstance(input, str) else torch.as_tensor(input)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence; got a batch of {ids.shape[0]}")
            ids = ids[0]
        where = (ids == token).nonzero().flatten()
        if where.numel() == 0:
            raise ValueError(f"token {token} ({self.to_string(token)!r}) is not in the input")
        return int(where[0] if mode == "first" else where[-1])

    def test_prompt(self, prompt: str, answer: str, prepend_space_to_answer: bool = True, print_details: bool = True,
                    prepend_bos: bool | None = None, top_k: int = 10) -> dict:
        """TransformerLens' ``utils.test_prompt``: the rank, logit and probability of each answer token
        after the prompt (and of the top ``top_k`` tokens at the last position), printed and returned."""
        from .weight_views import test_prompt

        return test_prompt(self, prompt, answer, prepend_space_to_answer, print_details, prepend_bos, top_k)

    def generate(self, input, max_new_tokens: int = 10, **kwargs):
        """Generate ``max_new_tokens`` tokens with ``interventions=[...]`` and hooks applied at every step;
        TransformerLens' arguments (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``stop_at_eos``,
        ``eos_token_id``, ``return_type``, ``verbose``) plus ``generator`` (a torch.Generator for
        reproducible sampling). See ``fxlens.engine.generate``."""
        from .generate import generate

        return generate(self, input, max_new_tokens, **kwargs)

    def to(self, *args, **kwargs) -> "Model":
        """Move or cast the model as ``torch.nn.Module.to`` does (``model.to("cuda")``, ``model.to(torch.bfloat16)``)
        and return it. Like TransformerLens' ``to``, this acts on the model itself: the HF model this Model
        wraps is moved in place (it is the same model), and captured again for its new device or dtype (said
        once). To keep the original where it is, wrap a copy: ``fxlens.Model(copy.deepcopy(hf).to(...))``."""
        self.hf_model.to(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the HF model changed after wrapping")
            self.derived  # noqa: B018 - follows the move now: captured again if the model's tensors changed
        if "to" not in self._told:
            self._told.add("to")
            warnings.warn("model.to moved the HF model it wraps in place (as torch.nn.Module.to does) and captured it again "
                          "for its new device or dtype", UserWarning, stacklevel=2)
        return self

    def cuda(self, device=None) -> "Model":
        """``model.to("cuda")`` (or the given CUDA device)."""
        return self.to(torch.device("cuda") if device is None else torch.device("cuda", device) if isinstance(device, int) else device)

    def cpu(self) -> "Model":
        """``model.to("cpu")``."""
        return self.to("cpu")

    def with_weight_edits(self, edit) -> "Model":
        """A new Model with ``edit(w)`` applied to copies of the touched tensors; this model is unchanged."""
        from .weights import WeightEdits

        w = WeightEdits(self, in_place=False)
        edit(w)
        return w.build()

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"fxlens.Model({type(self.hf_model).__name__}: {c.n_layers} layers, d_model={c.d_model}, "
            f"heads={c.n_heads}, {len(self.site_table)} sites, attention={c.attn_implementation})"
        )


def _hook_pairs(hooks, what: str) -> list:
    """``hooks`` checked as a list of (site name or predicate, function) pairs."""
    for entry in hooks:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and callable(entry[1])):
            raise TypeError(f"{what} must be a list of (site name or predicate, function) pairs")
    return list(hooks)


def _auto_classes(name_or_path, hf_kwargs) -> tuple:
    """The transformers auto classes to try, in order: an encoder-decoder checkpoint (config.is_encoder_decoder)
    loads with its LM head (AutoModelForCausalLM would load BART's decoder alone)."""
    import transformers

    kwargs = {k: v for k, v in hf_kwargs.items() if k in ("gguf_file", "revision", "trust_remote_code")}
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path, **kwargs)
    except Exception:  # noqa: BLE001 - only a probe: the loaders below say what is wrong
        config = None
    if getattr(config, "is_encoder_decoder", False):
        return ("AutoModelForSeq2SeqLM", "AutoModelForSpeechSeq2Seq", "AutoModel")
    return ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel")


def _check_model_and_tokenizer(hf_model, tokenizer) -> None:
    if isinstance(hf_model, (str, os.PathLike)):
        raise TypeError(
            f"Model.from_hf wraps a model object, not a name or folder: to load {str(hf_model)!r} use "
            f"fxlens.Model.from_pretrained({str(hf_model)!r})"
        )
    if not isinstance(hf_model, torch.nn.Module):
        raise TypeError(f"Model.from_hf wraps a torch.nn.Module (a HuggingFace model); got {type(hf_model).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(
            f"tokenizer={str(tokenizer)!r} is a name, not a tokenizer: pass "
            f"transformers.AutoTokenizer.from_pretrained({str(tokenizer)!r})"
        )


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, per_token: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose target is not padding; with ``per_token``
    each position's, [batch, pos - 1] (0 where the target is padding), as TransformerLens' ``loss_per_token``."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    if per_token:
        return nll if mask is None else nll * mask[:, 1:].to(nll.dtype)
    if mask is None:
        return nll.mean()
    m = mask[:, 1:].to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp_min(1)
