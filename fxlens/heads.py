"""Head detectors: how much each attention head attends as a previous-token, duplicate-token or
induction head would, or as any pattern the user supplies (TransformerLens' ``detect_head``).

Problem: finding heads of a known kind means comparing every head's attention pattern with an ideal
pattern built from the tokens. TransformerLens' ``head_detector.detect_head`` is the reference users
know; it scores head by head in Python.

Mechanism: one run caches every layer's ``hook_pattern``; the ideal pattern [pos, pos] is built from the
tokens exactly as TransformerLens builds it; all heads are scored at once. ``error_measure="mul"``: the
share of each head's attention that falls where the ideal pattern is 1 (with ``exclude_bos`` the first
column, with ``exclude_current_token`` the diagonal, taken out of the head's pattern first).
``"abs"``: ``1 - mean |pattern - ideal| * pos``, rounded to three places, as in TransformerLens.

Example::

    scores = fxlens.heads.detect_head(model, text, "induction_head")     # [n_layers, n_heads]
    scores = fxlens.heads.detect_head(model, text, my_pattern, heads=[(3, 1), (4, 0)])

Gotchas: heads not asked for score -1. A list of texts scores each text in its own run and averages,
as TransformerLens does; ``cache`` can be passed only with one text.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["detect_head", "HEAD_NAMES", "get_previous_token_head_detection_pattern",
           "get_duplicate_token_head_detection_pattern", "get_induction_head_detection_pattern"]

HEAD_NAMES = ("previous_token_head", "duplicate_token_head", "induction_head")


def get_previous_token_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """1 where a position attends to the one before it: [pos, pos]."""
    n = tokens.shape[-1]
    return torch.diag(torch.ones(n - 1), -1)


def get_duplicate_token_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """1 where a position attends to an earlier occurrence of its own token: [pos, pos]."""
    t = tokens.reshape(-1).cpu()
    same = (t[:, None] == t[None, :]).float()
    return torch.tril(same, diagonal=-1)


def get_induction_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """1 where a position attends to the token after an earlier occurrence of its own token: [pos, pos]."""
    dup = get_duplicate_token_head_detection_pattern(tokens)
    shifted = torch.zeros_like(dup)
    shifted[:, 1:] = dup[:, :-1]
    return torch.tril(shifted)


def _scores(pattern: torch.Tensor, ideal: torch.Tensor, exclude_bos: bool, exclude_current_token: bool, error_measure: str) -> torch.Tensor:
    """Score every head of ``pattern`` [..., q, k] against ``ideal`` [q, k]."""
    eye = torch.eye(pattern.shape[-1], dtype=torch.bool, device=pattern.device)
    if error_measure == "mul":
        if exclude_bos:
            pattern = pattern.clone()
            pattern[..., :, 0] = 0
        if exclude_current_token:
            pattern = pattern.masked_fill(eye, 0)
        return (pattern * ideal).sum((-2, -1)) / pattern.sum((-2, -1))
    diff = (pattern - ideal).abs()
    if exclude_bos:
        diff = diff.clone()
        diff[..., :, 0] = 0
    if exclude_current_token:
        diff = diff.masked_fill(eye, 0)
    size = diff.shape[-1]
    return 1 - torch.round(diff.mean((-2, -1)) * size, decimals=3)


def detect_head(model, seq, detection_pattern, heads=None, cache=None, *, exclude_bos: bool = False,
                exclude_current_token: bool = False, error_measure: str = "mul") -> torch.Tensor:
    """Each head's similarity to ``detection_pattern`` on ``seq``: [n_layers, n_heads] (-1 where not asked).

    ``seq``: a text, a list of texts (scored one by one, then averaged) or token ids [pos] / [1, pos].
    ``detection_pattern``: one of ``HEAD_NAMES`` or a lower-triangular [pos, pos] tensor. ``heads``: a
    list of (layer, head) or a dict layer -> heads. ``cache``: a cache of this run's patterns to reuse.
    ``error_measure``: "mul" or "abs" (see the module docstring)."""
    if error_measure not in ("mul", "abs"):
        raise ValueError(f"error_measure must be 'mul' or 'abs'; got {error_measure!r}")
    if isinstance(seq, list) and seq and isinstance(seq[0], str):
        if cache is not None:
            raise ValueError("a cache holds one run, so cache= needs one text; pass the texts one at a time, or omit cache")
        if not isinstance(detection_pattern, str):
            raise ValueError("a list of texts needs a named detection_pattern (the pattern depends on each text's tokens)")
        return torch.stack([detect_head(model, s, detection_pattern, heads, exclude_bos=exclude_bos,
                                        exclude_current_token=exclude_current_token, error_measure=error_measure) for s in seq]).mean(0)
    ids = model.to_tokens(seq) if isinstance(seq, str) else torch.as_tensor(seq)
    if ids.ndim > 2 or (ids.ndim == 2 and ids.shape[0] != 1):
        raise ValueError(f"detect_head scores one sequence; got token ids of shape {tuple(ids.shape)} (pass a list of texts to average)")
    ids = ids.reshape(1, -1)
    n_pos = ids.shape[-1]
    if isinstance(detection_pattern, str):
        if detection_pattern not in HEAD_NAMES:
            raise ValueError(f"detection_pattern must be a tensor or one of {', '.join(HEAD_NAMES)}; got {detection_pattern!r}")
        ideal = globals()[f"get_{detection_pattern}_detection_pattern"](ids)
    else:
        ideal = torch.as_tensor(detection_pattern, dtype=torch.float32)
        if ideal.shape != (n_pos, n_pos) or not torch.equal(ideal, torch.tril(ideal)):
            raise ValueError(f"the detection pattern must be a lower-triangular [{n_pos}, {n_pos}] tensor for these "
                             f"{n_pos} tokens; got shape {tuple(ideal.shape)}")
    if error_measure == "mul" and not set(ideal.unique().tolist()) <= {0.0, 1.0}:
        warnings.warn("error_measure='mul' with a detection pattern holding values other than 0 and 1", UserWarning, stacklevel=2)
    if n_pos < 2:
        raise ValueError("the sequence needs at least two tokens")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [model.get_act_name("pattern", i) for i in range(n_layers)]
    if cache is None:
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names_filter=names, return_type=None)
    patterns = torch.stack([cache[name] for name in names]).float()
    if patterns.ndim == 5:  # [layer, batch, head, q, k]: a cache with its batch dim
        if patterns.shape[1] != 1:
            raise ValueError(f"the cache holds {patterns.shape[1]} rows; detect_head scores one sequence")
        patterns = patterns[:, 0]
    if patterns.shape[-1] != n_pos:
        raise ValueError(f"the cache's patterns cover {patterns.shape[-1]} positions; seq has {n_pos} tokens")
    scores = _scores(patterns, ideal.to(patterns.device), exclude_bos, exclude_current_token, error_measure)
    if heads is None:
        return scores
    wanted = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, hs in (heads.items() if isinstance(heads, dict) else ((l, [h]) for l, h in heads)):
        wanted[layer, list(hs)] = True
    return torch.where(wanted.to(scores.device), scores, torch.full_like(scores, -1.0))
