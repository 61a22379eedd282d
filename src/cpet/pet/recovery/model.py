"""``RecoveryModel``: the peft tuner that puts a ``recovery.Linear`` around each target layer."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from cpet.compress.arch import is_projection
from cpet.pet.recovery.config import PREFIX, RecoveryConfig
from cpet.pet.recovery.layer import Linear, RecoveryLayer


def _is_linear(module: nn.Module) -> bool:
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return is_projection(base)


class RecoveryModel(BaseTuner):
    """Peft tuner for recovery modules; use ``peft.inject_adapter_in_model(RecoveryConfig(...), model)``."""

    prefix: str = PREFIX
    tuner_layer_cls = RecoveryLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: RecoveryConfig, model_config: dict) -> RecoveryConfig:
        if peft_config.target_modules is None:
            raise ValueError("RecoveryConfig.target_modules must be set (cpet.pet.recovery_targets finds them)")
        return peft_config

    def _create_and_replace(self, config: RecoveryConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs) -> None:
        if isinstance(target, RecoveryLayer):
            target.update_layer(adapter_name, config.r, config.alpha, config.act)
            return
        if not _is_linear(target):
            raise ValueError(f"recovery modules support projections (nn.Linear, Conv1D) only; {current_key} is {type(target).__name__}")
        new = Linear(target, adapter_name, r=config.r, alpha=config.alpha, act=config.act)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)
