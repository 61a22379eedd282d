"""``TrainConfig``: one optimisation recipe for every variant (defined torch-free in cpet.config.library)."""

from cpet.config.library import TrainConfig

__all__ = ["TrainConfig"]
