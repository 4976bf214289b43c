"""What a captured program is fed: token ids and an attention mask, checked before anything runs.

Problem: a user hands ``model(...)`` text, a list of texts, token ids as a tensor or nested lists, and
maybe an attention mask. Several wrong inputs run without an error and give wrong numbers: a float
mask of 0.5 is truncated to 0 by a cast where HF treats it as "attend"; a NaN in a mask; a token id
beyond the embedding reads another row on some devices; ``padding_side="middle"`` pads on the right.
Others fail deep inside the graph with a message about an internal op (an empty batch, a mask of the
wrong shape). Every one of them must be refused here, naming the problem and the fix.

Mechanism: ``feed(...)`` turns the input into ``{"input_ids": LongTensor[batch, pos],
"attention_mask": LongTensor[batch, pos]}`` (the mask only for models whose forward takes one),
checking in order: the type, the shape (2-D, non-empty), the ids against the input vocabulary (the
token embedding's rows, ``model.cfg.d_vocab``) and the context, the mask's shape and values (0/1 or
bool, no NaN).

Example::

    feed(model, "The cat")                              # {"input_ids": [[bos, ...]], "attention_mask": ...}
    feed(model, torch.tensor([[5, 6]]), torch.tensor([[1, 0.5]]))
    # ValueError: attention_mask holds 0.5 at [0, 1]; a mask must hold 0 and 1 only (or be bool) ...

Gotchas: a tokenizer's padded batch for a model whose forward takes no mask is refused unless no row
is padded (the padding would be attended to).
"""

from __future__ import annotations

import torch

__all__ = ["feed", "check_padding_side", "InputError"]

PADDING_SIDES = ("left", "right")


class InputError(ValueError):
    """A model input that fxlens refuses; the message names the problem and the fix."""


def check_padding_side(padding_side) -> None:
    if padding_side not in PADDING_SIDES:
        raise InputError(f"padding_side={padding_side!r} is not a padding side: use 'left' or 'right'")


def _as_ids(value) -> tuple[torch.Tensor, bool]:
    """(ids, came_as_text) without any check beyond the type."""
    if isinstance(value, torch.Tensor):
        return value, False
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise InputError("empty input: an empty list holds no text and no token ids; pass at least one")
        try:
            return torch.tensor(value), False
        except (ValueError, TypeError) as err:
            raise InputError(
                f"could not read the token ids as a [batch, pos] tensor ({err}); rows of different lengths must "
                "be padded to one length and the padding marked 0 in attention_mask"
            ) from err
    if hasattr(value, "__array__"):
        return torch.as_tensor(value), False
    raise TypeError(f"expected text, a list of texts, or token ids [batch, pos]; got {type(value).__name__}")


def _is_token_rows(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value)


def pad_rows(rows, pad_id: int, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token tensors of different lengths (each [pos] or [1, pos]) as one batch: (ids, attention_mask)."""
    flat = []
    for i, r in enumerate(rows):
        if r.dim() == 2 and r.shape[0] == 1:
            r = r[0]
        if r.dim() != 1 or r.numel() == 0:
            raise InputError(f"prompt {i} of the list has shape {tuple(rows[i].shape)}; each must be token ids [pos] or [1, pos]")
        flat.append(r)
    width = max(r.numel() for r in flat)
    ids = torch.full((len(flat), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(flat), width), dtype=torch.long)
    for i, r in enumerate(flat):
        where = slice(width - r.numel(), width) if padding_side == "left" else slice(0, r.numel())
        ids[i, where] = r.to(torch.long).cpu()
        mask[i, where] = 1
    return ids, mask


def _check_ids(ids: torch.Tensor, vocab: int | None, n_ctx: int | None, lengths: tuple | None = None) -> None:
    if ids.dim() != 2 or ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
        raise InputError(
            f"token ids must be an integer tensor [batch, pos]; got shape {tuple(ids.shape)} and dtype {ids.dtype}"
            + ("; convert with .long()" if ids.dim() == 2 else "")
        )
    if ids.shape[0] == 0:
        raise InputError(f"empty batch: the token ids have shape {tuple(ids.shape)}; pass at least one sequence")
    if ids.shape[1] == 0:
        raise InputError("empty input: the token sequence has length 0; pass at least one token")
    if lengths is not None and lengths[0] is not None and ids.shape[1] < lengths[0]:
        raise InputError(
            f"sequence length {ids.shape[1]} is shorter than the {lengths[0]} tokens this model takes (the capture "
            f"found that its code needs at least {lengths[0]}: {lengths[2]}); pad the input to {lengths[0]} tokens "
            "and mark the padding 0 in attention_mask"
        )
    if n_ctx is not None and ids.shape[1] > n_ctx:
        why = f" ({lengths[3]})" if lengths is not None and lengths[3] else ""
        raise InputError(f"sequence length {ids.shape[1]} exceeds the model's {n_ctx} positions (0..{n_ctx - 1}){why}; truncate the input")
    if vocab is not None:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            bad = hi if hi >= vocab else lo
            where = tuple(int(i) for i in (ids == bad).nonzero()[0])
            raise InputError(
                f"token id {bad} (at {list(where)}) is outside the vocabulary: ids must lie in 0..{vocab - 1}, the rows "
                f"of the model's input embedding (model.cfg.d_vocab = {vocab})"
            )


def _check_mask(mask, ids: torch.Tensor, was_1d: bool) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.tensor(mask)
        except (ValueError, TypeError) as err:
            raise InputError(f"could not read attention_mask as a tensor ({err}); give a [batch, pos] tensor of 0 and 1") from err
    if was_1d and mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != tuple(ids.shape):
        raise InputError(
            f"attention_mask has shape {tuple(mask.shape)}, but the token ids have shape {tuple(ids.shape)}: "
            "give one 0/1 entry per token (1 = attend, 0 = padding)"
        )
    if mask.is_complex():
        raise InputError("attention_mask is complex; give a [batch, pos] tensor of 0 and 1 (or bool)")
    if mask.dtype == torch.bool:
        return mask.to(ids.device, torch.long)
    if mask.is_floating_point():
        nan = torch.isnan(mask)
        if bool(nan.any()):
            where = [int(i) for i in nan.nonzero()[0]]
            raise InputError(f"attention_mask holds NaN at {where}; a mask must hold 0 and 1 only (or be bool)")
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        value = mask[tuple(where)].item()
        raise InputError(
            f"attention_mask holds {value} at {where}; a mask must hold 0 and 1 only (or be bool): 1 marks a token "
            "to attend to, 0 a padding token. fxlens does not round other values (HF would read any non-zero as 1)"
        )
    return mask.to(ids.device, torch.long)


def feed(
    value,
    attention_mask=None,
    *,
    tokens,
    device,
    vocab: int | None,
    n_ctx: int | None,
    takes_mask: bool,
    model_name: str = "this model",
    prepend_bos: bool = True,
    padding_side: str = "right",
    lengths: tuple | None = None,
) -> dict:
    """The program's inputs for ``value`` (see the module docstring).

    ``lengths``: (shortest length, longest, why the shortest, why the longest) when the capture found
    bounds of its own (``CapturedGraph.min_seq``/``max_seq``).

    ``tokens``: the ``Tokens`` helper that encodes text; ``vocab``: the input vocabulary size;
    ``n_ctx``: the number of positions; ``takes_mask``: whether the graph has an attention_mask input.
    """
    check_padding_side(padding_side)
    from_tokenizer = None
    is_text = isinstance(value, str) or (isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], str))
    if is_text:
        ids, from_tokenizer = tokens.encode(value, prepend_bos=prepend_bos, padding_side=padding_side)
    elif _is_token_rows(value):
        if attention_mask is not None:
            raise InputError(
                "a list of token tensors is padded by fxlens, which makes its attention_mask: drop attention_mask, "
                "or pass one padded [batch, pos] tensor with its mask"
            )
        ids, from_tokenizer = pad_rows(value, tokens.pad_token_id, padding_side)
    else:
        ids, _ = _as_ids(value)
    was_1d = ids.dim() == 1
    if was_1d:
        ids = ids.unsqueeze(0)
    _check_ids(ids, vocab, n_ctx, lengths)
    ids = ids.to(device, torch.long)
    out = {"input_ids": ids}
    if attention_mask is not None:
        mask = _check_mask(attention_mask, ids, was_1d)
    elif from_tokenizer is not None:
        mask = from_tokenizer.to(device, torch.long)
    else:
        mask = None
    if takes_mask:
        out["attention_mask"] = mask if mask is not None else torch.ones_like(ids)
    elif mask is not None and bool((mask == 0).any()):
        if attention_mask is None:
            raise InputError(
                f"{model_name}'s forward takes no attention_mask, so the padding of this batch of texts would be "
                "attended to; pass texts of equal token length, or one text at a time"
            )
        raise InputError(f"{model_name}'s forward takes no attention_mask; drop attention_mask (this model cannot mask padding)")
    return out
