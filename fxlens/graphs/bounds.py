"""The sequence lengths a capture allows, read from torch.export's "Constraints violated" errors.

Problem: capture exports with a dynamic sequence dimension ``Dim("seq", min=1, max=max_pos)``. Some
families do not allow every length in that range, and torch.export then refuses the whole capture:

- the declared range holds lengths for which torch cannot prove a guard of the model's code: at the
  top (the length reaches ``max_position_embeddings`` inclusive where the code needs it below) or at
  the bottom (Aria's ``seq * min(64, 64 * seq) == 64 * seq`` holds for every length, but torch proves
  it only from a length of 2): torch says "Not all values of seq in the specified range seq <= 64
  satisfy the generated guard", sometimes with a suggested ``Dim("seq", max=63)``;
- the model needs a minimum length (a suggested ``Dim("seq", min=2, ...)``);
- the model fixes the length (state-space models loop over positions or chunk them): "You marked seq
  as dynamic but your code specialized it to be a constant (5)", suggested fix ``seq = 5``.

Mechanism: ``next_bounds(text, lo, hi)`` reads torch's message and says what to try next: torch's
own suggested range; else ``REFINE``: export again with ``Dim.DYNAMIC(min=lo, max=hi)``, under which
torch narrows the range to what the model's guards need instead of refusing (Aria: lengths 2..64);
``STATIC`` when the length was specialised; None when the message is about something else. Capture
reads the range it exported with back from ``ep.range_constraints`` and records it as the model's
usable lengths (``CapturedGraph.min_seq``/``max_seq``), so an input outside it is refused before it
runs, with the reason.

Example::

    next_bounds("... range seq <= 64 satisfy the generated guard ...", 1, 64)    # REFINE
    next_bounds("Suggested fixes:\n  seq = Dim('seq', min=3, max=64)", 1, 64)  # (3, 64)
    next_bounds("Suggested fixes:\\n  seq = 5", 1, 64)                           # STATIC

Gotchas: only the sequence dimension is adjusted; a batch constraint is left to the error message. A
config's ``max_position_embeddings`` of 0 or less (XLNet's -1) is a sentinel for "no learned positions,
any length": ``max_positions`` reads it as no bound, never as a length of -1.
"""

from __future__ import annotations

import re

__all__ = ["STATIC", "REFINE", "next_bounds", "is_seq_constraint", "max_positions"]

STATIC = "static"
REFINE = "refine"

_DIM_FIX = re.compile(r"seq\s*=\s*Dim\(\s*['\"]seq['\"]\s*(?:,\s*min\s*=\s*(\d+))?\s*(?:,\s*max\s*=\s*(\d+))?\s*\)")
_CONST_FIX = re.compile(r"^\s*seq\s*=\s*(\d+)\s*$", re.M)
_UPPER = re.compile(r"specified range (?:(\d+) <= )?seq <= (\d+) satisfy")
_LOWER = re.compile(r"specified range (\d+) <= seq satisfy")


def max_positions(config) -> int | None:
    """The longest input ``config`` declares (``max_position_embeddings`` or ``n_positions``), or None when it
    declares none or a sentinel of 0 or less (XLNet's -1: relative positions, no limit)."""
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def is_seq_constraint(text: str) -> bool:
    return "Constraints violated (seq)" in text or "Constraints violated (batch, seq)" in text or (
        "Constraints violated" in text and re.search(r"\bseq\b", text) is not None)


def next_bounds(text: str, lo: int, hi: int, tried=()):
    """What to try after torch's error ``text`` for the range ``lo..hi``: torch's suggested range,
    ``STATIC`` when the length was specialised, ``REFINE`` for a range torch could not prove (export
    again with ``Dim.DYNAMIC(min=lo, max=hi)``, which lets torch narrow the range to what the model's
    guards need, read back from the exported program), or None (not a sequence-length problem).
    ``tried``: the ranges (and ``REFINE``) already tried."""
    if not is_seq_constraint(text):
        return None
    if "specialized it to be a constant" in text or _CONST_FIX.search(text):
        return STATIC
    tried = set(tried) | {(lo, hi)}
    fix = _DIM_FIX.search(text)
    if fix is not None:
        step = (int(fix.group(1)) if fix.group(1) else lo, int(fix.group(2)) if fix.group(2) else hi)
        if step not in tried and step[0] <= step[1]:
            return step
    return REFINE if REFINE not in tried else None
