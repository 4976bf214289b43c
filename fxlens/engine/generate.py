"""Text generation with interventions and hooks applied at every step.

Problem: steering a model while it generates (steering vectors, refusal directions, ablated heads) is
one of the most common things researchers do. The intervention must apply to the prompt and to every
generated token, batched prompts must be left-padded, and greedy generation must give HF's tokens.

Mechanism: the prompt runs once and each new token runs alone, attending to the keys and values of
every earlier position kept from earlier steps (``engine.decode``: the blocks as separate programs with
a key/value prefix, each block's program built once and reused at every step, compiled with
``compile=True``). The interventions (lowered for the whole sequence so far, so ``pos`` is an absolute
position) and hooks (``add_hook`` and ``fwd_hooks``) join each block call; a hook sees the positions that
call computes (all of the prompt, then one token), as with TransformerLens' key/value cache. Where the
cache cannot be used (``decode.cache_reason``: a state-space layer, an edit outside the blocks, ...) or
``use_past_kv_cache=False``, every step recomputes the whole sequence (exact), and the reason is said
once. The next token comes from the last position's logits: argmax, or sampling with temperature, top-k
and top-p from a ``torch.Generator`` when one is given (reproducible). Rows that produced
``eos_token_id`` keep producing it; generation stops when every row has. ``During(spec, "prompt")`` or
``During(spec, "generated")`` limits an intervention to the prompt's positions or to generated tokens.
``names_filter=`` also returns an ActivationCache of those sites over every position of the result
(the last token's activations are computed once more at the end).

Example::

    text = model.generate("The Eiffel Tower is in", max_new_tokens=10,
                          interventions=[fxlens.Steer("blocks.6.hook_resid_post", direction, scale=4.0)])
    ids = model.generate(ids, 5, interventions=[fxlens.During(fxlens.Steer(...), "generated")])

Gotchas: cached decoding and the full recompute agree to float rounding (different matrix shapes), so
greedy choices between near-tied tokens may differ between them. An intervention's ``pos`` is an
absolute position of the padded sequence. Learned absolute positions (GPT-2) count padding slots as HF's
own forward does; HF's ``generate`` derives positions from the mask instead, so left-padded batches of
such models differ from HF's ``generate`` (rotary models do not).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .activation_cache import ActivationCache
from .decode import Decoder, NoCache, cache_reason
from .interventions import _indices


__all__ = ["generate", "During"]


def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """[batch] next tokens from last-position logits [batch, vocab]."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling; got {temperature} (use do_sample=False for greedy)")
    logits = logits.float() / temperature
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
        order = logits.sort(dim=-1, descending=True)
        probs = order.values.softmax(-1)
        # keep the smallest set whose probability reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order.indices, order.values.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@dataclass(frozen=True)
class During:
    """An intervention that acts on the prompt's positions only (``part="prompt"``) or on the generated
    tokens only (``part="generated"``) while generating; ``pos`` of the spec, if any, still applies
    (absolute positions, intersected with the part)."""

    spec: Any
    part: str = "generated"

    def __post_init__(self):
        if self.part not in ("prompt", "generated", "all"):
            raise ValueError(f"During(part={self.part!r}): part is 'prompt', 'generated' or 'all'")


def _at_step(interventions, prompt_len: int, full: int) -> list:
    """The plain specs of one step over ``full`` positions: each ``During`` narrowed to its part's positions."""
    out = []
    for item in interventions:
        if not isinstance(item, During):
            out.append(item)
            continue
        spec = item.spec
        if item.part == "all":
            out.append(spec)
            continue
        part = range(0, prompt_len) if item.part == "prompt" else range(prompt_len, full)
        if spec.pos is not None:
            chosen = set(_indices(spec.pos, full, "position", spec, "pos").tolist())
            part = [p for p in part if p in chosen]
        if len(part):
            out.append(dataclasses.replace(spec, pos=list(part)))
    return out


def generate(
    model,
    input,
    max_new_tokens: int = 10,
    *,
    interventions=(),
    fwd_hooks=(),
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | None = None,
    return_type: str = "input",
    use_past_kv_cache: bool = True,
    verbose: bool = False,
    generator: torch.Generator | None = None,
    prepend_bos: bool | None = None,
    attention_mask=None,
    names_filter=None,
    compile: bool = False,
):
    """See the module docstring; the arguments are TransformerLens' ``generate``'s plus ``interventions``,
    ``generator``, ``attention_mask`` (for a left-padded batch of token ids), ``names_filter`` (also
    return an ActivationCache of those sites over every position of the result) and ``compile``."""
    if return_type not in ("input", "str", "tokens"):
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens'; got {return_type!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more; got {max_new_tokens}")
    as_text = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
    feed = model._inputs(input, attention_mask, prepend_bos, padding_side="left")
    ids = feed["input_ids"]
    mask = feed.get("attention_mask")
    if mask is not None and bool((mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding (every row's last token real): pad on the left, "
                         "or pass the prompts as text or a list of token tensors")
    if eos_token_id is None and model.tokenizer is not None:
        eos_token_id = model.tokenizer.eos_token_id
    if stop_at_eos and eos_token_id is None:
        raise ValueError("stop_at_eos=True needs an eos_token_id (the model has no tokenizer to take it from); "
                         "pass eos_token_id=... or stop_at_eos=False")
    interventions = list(interventions)
    kept = [(name, fn) for name, fn, _, dir in model._persistent if dir == "fwd"]
    hooks = [(site, fn) for name, fn in kept + list(fwd_hooks) for site in model._hook_sites(name)]
    cache_sites = model._resolve(names_filter) if names_filter is not None else []
    step = _stepper(model, interventions, hooks, fwd_hooks, use_past_kv_cache, compile, cache_sites,
                    capacity=ids.shape[1] + max_new_tokens + 1)
    prompt_len = ids.shape[1]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    steps = range(max_new_tokens)
    if verbose:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generating")
    with torch.no_grad():
        for _ in steps:
            logits = step(ids, mask, _at_step(interventions, prompt_len, ids.shape[1]))
            token = _next_token(logits, do_sample, temperature, top_k, top_p, generator)
            if stop_at_eos:
                token = torch.where(done, torch.as_tensor(eos_token_id, device=token.device), token)
                done |= token == eos_token_id
            # logits come from the LM head's device (a model spread over devices): the token joins the prompt's
            ids = torch.cat([ids, token[:, None].to(ids.device, ids.dtype)], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if stop_at_eos and bool(done.all()):
                break
        cache = step.cache(ids, mask, _at_step(interventions, prompt_len, ids.shape[1])) if cache_sites else None
    if return_type == "str" or (return_type == "input" and as_text):
        rows = [row.tolist() if mask is None else row[m.bool()].tolist() for row, m in zip(ids, mask if mask is not None else ids)]
        text = model.to_string(rows)
        result = text[0] if isinstance(input, str) else text
    else:
        result = ids
    return result if cache is None else (result, cache)


class _Recompute:
    """Each step a forward of the whole sequence so far (exact; no cache)."""

    def __init__(self, model, fwd_hooks, compile: bool, cache_sites):
        self.model, self.fwd_hooks, self.compile, self.cache_sites = model, fwd_hooks, compile, cache_sites

    def _run(self, ids, mask, specs, names_filter):
        """(logits, cache or None) of the sequence so far. A model captured per input length refuses a length
        equal to one of its own sizes; such a step runs with masked padding tokens after the last one
        (exact for a causal model: nothing before them reads them), and the padding is cut off again."""
        n = ids.shape[1]
        usable = self.model.derived.usable_length(n)
        if usable != n and "attention_mask" in self.model.captured.inputs:
            pad = usable - n
            mask = mask if mask is not None else torch.ones_like(ids)
            ids = torch.cat([ids, ids.new_zeros(ids.shape[0], pad)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
        # through the Model's input check: a model captured per input length runs this length's capture
        feed = self.model._inputs(ids, mask)
        out = self.model._intervened(feed, specs, ids.shape[0], ids.shape[1], names_filter, "logits", self.compile,
                                     self.fwd_hooks)
        logits, cache = out if names_filter is not None else (out, None)
        if cache is not None and ids.shape[1] != n:
            cache = ActivationCache({k: _first_positions(self.model.site_table, k, v, n) for k, v in cache.items()},
                                    self.model.site_table, self.model)
        return logits[:, :n], cache

    def __call__(self, ids, mask, specs) -> torch.Tensor:
        return self._run(ids, mask, specs, None)[0][:, -1]

    def cache(self, ids, mask, specs):
        return self._run(ids, mask, specs, [s.name for s in self.cache_sites])[1]


def _first_positions(table, name: str, value: torch.Tensor, n: int) -> torch.Tensor:
    """A cached site's value at its first ``n`` positions (every position axis, keys included)."""
    site = table[name]
    for axis in ("pos", "query_pos", "key_pos"):
        if axis in site.axes:
            value = value.narrow(site.axes.index(axis), 0, n)
    return value


class _Cached:
    """The prompt once, then one token per step from the key/value cache (``engine.decode``)."""

    def __init__(self, model, interventions, hooks, compile: bool, cache_sites, fallback, capacity: int = 0):
        self.model, self.fallback = model, fallback
        self.decoder = Decoder(model, interventions, hooks, compile, cache_sites, capacity)

    def __call__(self, ids, mask, specs) -> torch.Tensor:
        if self.decoder is None:
            return self.fallback(ids, mask, specs)
        self.decoder.interventions = specs
        try:
            return self.decoder.step(ids, mask)
        except NoCache as err:
            if self.decoder.seen:
                raise
            _tell(self.model, str(err))
            self.decoder = None
            return self.fallback(ids, mask, specs)

    def cache(self, ids, mask, specs):
        if self.decoder is None:
            return self.fallback.cache(ids, mask, specs)
        self.decoder.interventions = specs
        self.decoder.step(ids, mask)  # the last token's own activations
        return ActivationCache(self.decoder.cached(), self.model.site_table, self.model)


def _stepper(model, interventions, hooks, fwd_hooks, use_cache: bool, compile: bool, cache_sites, capacity: int = 0):
    fallback = _Recompute(model, fwd_hooks, compile, cache_sites)
    if not use_cache:
        return fallback
    specs = [i.spec if isinstance(i, During) else i for i in interventions]
    reason = cache_reason(model, specs, hooks)
    if reason is not None:
        _tell(model, reason)
        return fallback
    return _Cached(model, specs, hooks, compile, cache_sites, fallback, capacity)


def _tell(model, reason: str) -> None:
    told = model._active.item("generate_without_cache", set)
    if reason not in told:
        told.add(reason)
        warnings.warn(f"generate recomputes the whole sequence at each step (exact, slower): {reason}",
                      UserWarning, stacklevel=4)
