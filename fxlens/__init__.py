"""fxlens: mechanistic interpretability of HuggingFace models as torch.fx graph rewrites.

Example::

    import fxlens
    model = fxlens.Model.from_hf(hf_model, tokenizer)
    logits, cache = model.run_with_cache("The Eiffel Tower is in")
    cache["pattern", 3]
"""

from . import heads, lens, metrics  # fxlens.plot is imported on its own: it needs matplotlib
from .engine import (
    Ablate,
    ActivationCache,
    Apply,
    Config,
    During,
    HookPoint,
    Intervention,
    InterventionError,
    Lowered,
    Model,
    Patch,
    Seq2SeqModel,
    Scale,
    StaleModelError,
    Steer,
)
from .factored import FactoredMatrix
from .graphs.capture import CaptureError
from .graphs.sites import SiteError
from .passes import HookError, PassError

__version__ = "0.1.0"

__all__ = [
    "Model",
    "Seq2SeqModel",
    "ActivationCache",
    "HookPoint",
    "Config",
    "FactoredMatrix",
    "Patch",
    "Ablate",
    "Steer",
    "Scale",
    "Apply",
    "During",
    "Intervention",
    "Lowered",
    "StaleModelError",
    "metrics",
    "lens",
    "heads",
    "CaptureError",
    "SiteError",
    "HookError",
    "PassError",
    "InterventionError",
]
