"""Recovery-module configuration: the peft dataclass and the project's validated settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from cpet.config.library import RecoverySettings

#: peft has a closed ``PeftType`` enum, so the recovery tuner uses its own string type; ``PeftType``
#: is a ``str`` enum, so peft's mapping dicts key it exactly like a built-in method.
PEFT_TYPE = "CPET_RECOVERY"
PREFIX = "rec_"


@dataclass
class RecoveryConfig(PeftConfig):
    """A low-rank recovery module beside each compressed linear layer:
    ``y = W_c x + B_rec act(A_rec x) * alpha / r`` (``B_rec`` starts at zero)."""

    r: int = field(default=16, metadata={"help": "rank of the recovery module"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: s_rec = alpha / r"})
    act: str = field(default="gelu", metadata={"help": "activation between A_rec and B_rec: gelu | identity"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "module names or suffixes (peft matching); required"}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        from cpet.pet.recovery.layer import ACTIVATIONS  # the registry lives with the maths

        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


def peft_recovery_config(settings: RecoverySettings, target_modules: list[str]) -> RecoveryConfig:
    return RecoveryConfig(r=settings.rank, alpha=settings.alpha, act=settings.act, target_modules=list(target_modules))
