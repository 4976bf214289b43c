"""Text generation with interventions and hooks applied at every step.

Problem: steering a model while it generates (steering vectors, refusal directions, ablated heads) is
one of the most common things researchers do. The intervention must apply to the prompt and to every
generated token, batched prompts must be left-padded, and greedy generation must give HF's tokens.

Mechanism: every step runs the captured program of the whole sequence so far, with the same plan
(the interventions, hooks kept with ``add_hook`` and ``fwd_hooks``), fed as graph inputs, so the
program is built once and reused at every length (the capture has a dynamic sequence axis). The next
token comes from the last position's logits: argmax, or sampling with temperature, top-k and top-p
from a ``torch.Generator`` when one is given (reproducible). Rows that produced ``eos_token_id`` keep
producing it; generation stops when every row has.

Example::

    text = model.generate("The Eiffel Tower is in", max_new_tokens=10,
                          interventions=[fxlens.Steer("blocks.6.hook_resid_post", direction, scale=4.0)])

Gotchas: each step recomputes the whole sequence (no key/value cache yet: ``use_past_kv_cache`` is
accepted and ignored, said once), so a step costs a forward of the sequence so far; exact, and fine
for the short continuations interpretability work inspects. An intervention's ``pos`` is an absolute
position of the padded sequence. Learned absolute positions (GPT-2) count padding slots as HF's own
forward does; HF's ``generate`` derives positions from the mask instead, so left-padded batches of
such models differ from HF's ``generate`` (rotary models do not).
"""

from __future__ import annotations

import warnings

import torch


__all__ = ["generate"]


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
):
    """See the module docstring; the arguments are TransformerLens' ``generate``'s plus ``interventions``,
    ``generator`` and ``attention_mask`` (for a left-padded batch of token ids)."""
    if return_type not in ("input", "str", "tokens"):
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens'; got {return_type!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more; got {max_new_tokens}")
    if use_past_kv_cache:
        warnings.warn("generate recomputes the whole sequence at each step (no key/value cache yet); results are exact",
                      UserWarning, stacklevel=3)
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
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    steps = range(max_new_tokens)
    if verbose:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generating")
    for _ in steps:
        logits = _step(model, ids, mask, list(interventions), fwd_hooks)
        token = _next_token(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        if stop_at_eos:
            token = torch.where(done, torch.as_tensor(eos_token_id, device=token.device), token)
            done |= token == eos_token_id
        ids = torch.cat([ids, token[:, None].to(ids.dtype)], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if stop_at_eos and bool(done.all()):
            break
    if return_type == "str" or (return_type == "input" and as_text):
        rows = [row.tolist() if mask is None else row[m.bool()].tolist() for row, m in zip(ids, mask if mask is not None else ids)]
        text = model.to_string(rows)
        return text[0] if isinstance(input, str) else text
    return ids


def _step(model, ids: torch.Tensor, mask, interventions: list, fwd_hooks) -> torch.Tensor:
    """Logits of one forward of the sequence so far, with every intervention and hook."""
    feed = {"input_ids": ids}
    if "attention_mask" in model.captured.inputs:
        feed["attention_mask"] = mask if mask is not None else torch.ones_like(ids)
    with torch.no_grad():
        return model._intervened(feed, interventions, ids.shape[0], ids.shape[1], None, "logits", False, fwd_hooks)
