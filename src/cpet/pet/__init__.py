"""Parameter-efficient tuning for CPET: LoRA (peft), knowledge inheritance, recovery modules, bundles.

Importing ``cpet.pet`` registers the recovery tuner with peft (see ``cpet.pet.recovery``).
"""

from cpet.pet.bundle import (
    RECOVERY_NAME,
    attach_recovery,
    load_bundle,
    merge_bundle,
    recovery_layers,
    recovery_parameters,
    recovery_state,
    save_bundle,
)
from cpet.pet.inherit import inherit_adapter, slice_lora_state
from cpet.pet.lora import (
    ADAPTER_NAME,
    LoraSettings,
    attach_lora,
    attention_targets,
    linear_targets,
    load_adapter,
    save_adapter,
)
from cpet.pet.recovery import RecoveryConfig, RecoverySettings

__all__ = [
    "ADAPTER_NAME", "RECOVERY_NAME", "LoraSettings", "RecoveryConfig", "RecoverySettings", "attach_lora",
    "attach_recovery", "attention_targets", "inherit_adapter", "linear_targets", "load_adapter", "load_bundle",
    "merge_bundle", "recovery_layers", "recovery_parameters", "recovery_state", "save_adapter", "save_bundle",
    "slice_lora_state",
]
