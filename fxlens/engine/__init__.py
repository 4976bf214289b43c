"""What users call: ``Model``, ``ActivationCache`` and the programs behind them."""

from .activation_cache import ActivationCache
from .interventions import Ablate, Apply, InterventionError, Patch, Scale, Steer
from .model import Config, HookPoint, Model

__all__ = ["Model", "ActivationCache", "HookPoint", "Config", "Patch", "Ablate", "Steer", "Scale", "Apply", "InterventionError"]
