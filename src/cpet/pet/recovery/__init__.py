"""Recovery modules as a peft tuner (config / layer / model); importing registers it with peft.

peft 0.21's ``register_peft_method`` only accepts names of its closed ``PeftType`` enum, so
``register`` fills the same four mapping tables with the string type ``CPET_RECOVERY``; after it,
``peft.inject_adapter_in_model(RecoveryConfig(...), model, "recover")`` works like for LoRA.
"""

from cpet.pet.recovery.config import PEFT_TYPE, PREFIX, RecoveryConfig, RecoverySettings
from cpet.pet.recovery.layer import ACTIVATIONS, Linear, RecoveryLayer
from cpet.pet.recovery.model import RecoveryModel


def register() -> None:
    """Make the recovery tuner known to peft's mappings (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = RecoveryConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = RecoveryModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX


register()

__all__ = ["ACTIVATIONS", "Linear", "PEFT_TYPE", "RecoveryConfig", "RecoveryLayer", "RecoveryModel",
           "RecoverySettings", "register"]
