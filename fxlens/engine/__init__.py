"""What users call: ``Model``, ``ActivationCache`` and the programs behind them."""

from .activation_cache import ActivationCache
from .model import Config, HookPoint, Model

__all__ = ["Model", "ActivationCache", "HookPoint", "Config"]
