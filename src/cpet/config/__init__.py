"""Typed, validated view of ``params.yaml`` (``params``) and the library's settings (``library``).

Both are torch-free. Unknown keys, wrong types and missing values fail at load with a
:class:`~cpet.errors.ConfigError` naming the key path, e.g.
``params.yaml: recover.distill.beta: missing``.
"""

from cpet.config.base import Section
from cpet.config.library import DistillConfig, LoraSettings, RecoverySettings, TrainConfig
from cpet.config.params import GATES, TRAINED_VARIANTS, Params, TaskConfig, load_params, parse_params
from cpet.config.recipes import RECIPES, VARIANTS, Recipe

__all__ = ["GATES", "RECIPES", "TRAINED_VARIANTS", "VARIANTS", "Recipe", "DistillConfig", "LoraSettings", "Params",
           "RecoverySettings", "Section", "TaskConfig", "TrainConfig", "load_params", "parse_params"]
