"""What users call: ``Model``, ``ActivationCache``, interventions, and the engine behind them.

A map: ``model.py`` (the Model), ``derived.py`` (the one owner of everything derived from a capture),
``plan.py`` (the plan builder: intents -> passes and graph inputs), ``programs.py`` (the bounded
program cache), ``interventions.py`` and ``ablation.py`` (the intervention protocol and the ablation
vocabulary), ``rows/`` (the layered-row engine), ``sweep.py`` (activation sweeps as rows),
``activation_cache.py`` (with its analysis helpers in ``cache_analysis.py``, the maps they read from the
graph in ``component_maps.py`` and TransformerLens' ``Slice`` in ``slices.py``), ``tokens.py``, ``weights.py``.
"""

from .activation_cache import ActivationCache
from .derived import StaleModelError
from .generate import During
from .interventions import Ablate, Apply, Intervention, InterventionError, Lowered, Patch, Scale, Steer
from .model import Config, HookPoint, Model
from .seq2seq import Seq2SeqModel

__all__ = [
    "Model",
    "Seq2SeqModel",
    "ActivationCache",
    "HookPoint",
    "Config",
    "Intervention",
    "Lowered",
    "Patch",
    "Ablate",
    "Steer",
    "Scale",
    "Apply",
    "During",
    "InterventionError",
    "StaleModelError",
]
