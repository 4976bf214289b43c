"""Why a capture failed, in torch's words (trimmed) and ours: what setting or argument fixes it.

Problem: torch.export's errors carry the explanation a user needs (the guard that failed, the line of
model code that raised, torch's suggested fix) in the lines after the first, followed by pages of
generic advice and sometimes a whole printed graph. Keeping only the first line ("Constraints
violated (seq)!") throws the explanation away; keeping all of it buries it.

Mechanism: ``torch_text(err)`` keeps torch's message without its generic trailers ("The error above
occurred when calling torch.export.export ...", ``TORCH_LOGS`` and ``draft_export`` advice) and
without printed graphs (``def forward(...)`` and what follows), at most ``MAX_LINES`` lines of at most
``MAX_WIDTH`` characters. ``hints(model, text)`` recognises the usual causes and names the fix:

- a sequence-length constraint torch could not satisfy: ``config.max_position_embeddings`` (and the
  lengths capture tried);
- a branch on a tensor's values (``GuardOnDataDependentSymNode``, ``data-dependent``): the line of
  model code torch names, and each ``config.<name>`` that line reads, with its value;
- an attention implementation the trace cannot follow (flash, flex, sdpa errors):
  ``attn_implementation='eager'``;
- a cache object in the forward (``past_key_values``, ``DynamicCache``): ``config.use_cache=False``;
- a half-precision kernel missing on the device: ``torch_dtype=torch.float32``;
- a batch constraint: the batch size the model fixes.

When the model's own forward fails on the example input too (outside torch.export), the message
says so, shows that error instead, and names the config settings known to cause it
(``config_problems``: DeepSeek-V3's ``head_dim`` that must equal ``qk_rope_head_dim``, an expert count
that ``n_group`` does not divide): the config is at fault, not the capture.

Every message ends with the generic recourse (another attention implementation; capturing a
sub-module whose forward exports).

Example::

    raise CaptureError(explain(model, err)) from err

Gotchas: the hints are read from the text of torch's message; a cause not listed gets the generic
recourse only (torch's own explanation is always kept).
"""

from __future__ import annotations

import re

__all__ = ["explain", "torch_text", "hints", "config_problems", "MAX_LINES", "MAX_WIDTH"]

MAX_LINES = 24
MAX_WIDTH = 300

_TRAILERS = (
    "The error above occurred when calling torch.export",
    "For more information, run with TORCH_LOGS",
    "If you would like to view some more information about this error",
    "draft_export",
    "You can suppress this exception",
    "Set TORCHDYNAMO_VERBOSE",
    "For C++ stack trace",
    "To fix the error, insert one of the following checks",
    "For more information about this error, see",
    "For extended logs when we create symbols",
)


def torch_text(err: BaseException) -> list[str]:
    """torch's message as lines: trailers, printed graphs and blank runs dropped, trimmed to fit."""
    text = str(err).replace("\r", "")
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("def forward(", "class GraphModule(", "class GraphModule")):
            break  # a printed graph: pages of code the user did not write
        if any(t in line for t in _TRAILERS):
            # torch's advice on how to debug torch; the advice itself is in the preceding lines
            line = line.split(next(t for t in _TRAILERS if t in line))[0].rstrip()
            if not line.strip():
                continue
        if not stripped and (not lines or not lines[-1].strip()):
            continue
        if len(line) > MAX_WIDTH:
            line = line[: MAX_WIDTH - 5] + " ..."
        lines.append(line.rstrip())
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > MAX_LINES:
        more = len(lines) - MAX_LINES
        lines = lines[:MAX_LINES] + [f"... ({more} more lines of torch's message)"]
    return lines or [type(err).__name__]


_CONFIG_READ = re.compile(r"\bconfig\.([A-Za-z_]\w*)")
_CODE_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def _config_settings(model, text: str) -> list[str]:
    """``config.<name> = value`` for each config setting the quoted model code reads."""
    config = getattr(model, "config", None)
    out = []
    for name in dict.fromkeys(_CONFIG_READ.findall(text)):
        if config is not None and hasattr(config, name):
            out.append(f"config.{name} = {getattr(config, name)!r}")
    return out


def hints(model, text: str, *, seq_bounds: tuple[int, int] | None = None) -> list[str]:
    """What to change, for the causes recognised in torch's message ``text``."""
    config = getattr(model, "config", None)
    out = []
    if "Constraints violated" in text and re.search(r"\bseq\b", text):
        max_pos = getattr(config, "max_position_embeddings", None)
        tried = f" (capture tried lengths {seq_bounds[0]}..{seq_bounds[1]})" if seq_bounds else ""
        out.append(
            "The model does not accept every sequence length up to config.max_position_embeddings"
            f"{f' = {max_pos}' if max_pos is not None else ''}{tried}. Set config.max_position_embeddings to the "
            "longest length the model supports (torch's message above names the bound it needs) and wrap it again."
        )
    if "Constraints violated" in text and re.search(r"\bbatch\b", text):
        out.append(
            "The model fixes the batch size (the guard above names it); fxlens needs a model whose forward "
            "takes any batch size. Check that no config setting or buffer holds a batch size."
        )
    if "GuardOnDataDependentSymNode" in text or "data-dependent" in text or "data dependent" in text:
        where = _CODE_LINE.findall(text)
        line = f" ({where[-1][0].rsplit('/', 1)[-1]}, line {where[-1][1]})" if where else ""
        settings = _config_settings(model, text)
        reads = (f" That code reads {', '.join(settings)}: a setting that turns the branch off fixes it." if settings else "")
        out.append(
            f"The forward branches on the values of a tensor{line}, which torch.export cannot trace (it traces "
            f"one program for every input).{reads} Otherwise capture a sub-module whose forward has no such branch."
        )
    if re.search(r"flash|flex_attention|scaled_dot_product|sdpa", text, re.I):
        impl = getattr(config, "_attn_implementation", None)
        out.append(
            f"The failing code is in the attention implementation ({impl!r}): pass attn_implementation='eager' "
            "to Model.from_pretrained / Model.from_hf."
        )
    if re.search(r"past_key_values|DynamicCache|\bCache\b|use_cache", text):
        out.append(
            "The failing code builds or reads a key-value cache: set config.use_cache = False (and, for a model with "
            "sub-configs, text_config.use_cache = False) before wrapping."
        )
    if re.search(r"\bHalf\b|BFloat16|not implemented for '(Half|BFloat16)'", text):
        out.append("A half-precision kernel is missing on this device: load the model with torch_dtype=torch.float32.")
    if settings := ([] if out else _config_settings(model, text)):
        out.append(f"The failing model code reads {', '.join(settings)}; changing that setting may avoid it.")
    return out


GENERIC = (
    "fxlens captures a model with torch.export(strict=False) on input_ids of shape [2, 5] with use_cache=False. "
    "Other things to try: attn_implementation='eager' (or 'sdpa') in Model.from_pretrained / Model.from_hf; or "
    "wrapping a sub-module whose forward exports."
)


def config_problems(model) -> list[str]:
    """Config settings known to break a family's own forward, with the value that fixes them."""
    config = getattr(model, "config", None)
    out = []
    rope, head = getattr(config, "qk_rope_head_dim", None), getattr(config, "head_dim", None)
    if rope is not None and head is not None and rope != head and "deepseek_v3" in str(getattr(config, "model_type", "")):
        out.append(f"config.head_dim = {head} but config.qk_rope_head_dim = {rope}: DeepSeek-V3 builds its rotary "
                   f"embedding with head_dim, so the two must be equal (set head_dim={rope})")
    n_group, experts = getattr(config, "n_group", None), getattr(config, "n_routed_experts", None)
    if isinstance(n_group, int) and isinstance(experts, int) and n_group > 0 and experts % n_group:
        out.append(f"config.n_routed_experts = {experts} is not a multiple of config.n_group = {n_group}: set n_group "
                   "to a divisor of the expert count (and topk_group <= n_group)")
    return out


def explain(model, err: BaseException, *, seq_bounds: tuple[int, int] | None = None, own_error: BaseException | None = None) -> str:
    """The CaptureError text for ``err`` raised while exporting ``model``; ``own_error``: what the model's
    own forward raised on the same example input (outside torch.export), when it fails too."""
    name = type(model).__name__
    if own_error is not None:
        problems = config_problems(model)
        fix = ("\nWhat fixes it:\n" + "\n".join(f"- {p}" for p in problems)) if problems else (
            "\nFix the model's config (the sizes named above) so that a plain forward runs, then wrap it again.")
        own = "\n".join("  " + line for line in torch_text(own_error))
        return (f"could not capture {name}: the model's own forward fails on input_ids of shape [2, 5] (a plain call, "
                f"without torch.export), so the model or its config is at fault, not the capture. It raises "
                f"{type(own_error).__name__}:\n{own}{fix}")
    lines = torch_text(err)
    body = "\n".join("  " + line for line in lines)
    fixes = hints(model, "\n".join(lines) + "\n" + str(err), seq_bounds=seq_bounds)
    advice = "\n".join(f"- {h}" for h in fixes)
    return (
        f"could not capture {name} with torch.export: {type(err).__name__}: torch says:\n{body}\n"
        + (f"What fixes it:\n{advice}\n" if advice else "")
        + GENERIC
    )
