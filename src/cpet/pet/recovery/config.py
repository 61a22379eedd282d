"""Recovery-module configuration: the peft dataclass and the project's validated settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from pydantic import BaseModel, ConfigDict, Field

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


class RecoverySettings(BaseModel):
    """``params.yaml`` section for recovery modules (reference code: rank 32 T5, 16 LLaMA-13B, 64 Llama-2)."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, description="rank of A_rec / B_rec")
    alpha: float = Field(16.0, gt=0, description="s_rec = alpha / rank")
    act: Literal["gelu", "identity"] = Field("gelu", description="identity = a plain, mergeable second LoRA")
    target_modules: list[str] | None = Field(
        None, description="module names/suffixes; None = every linear layer except the LM head"
    )

    def to_peft(self, target_modules: list[str]) -> RecoveryConfig:
        return RecoveryConfig(r=self.rank, alpha=self.alpha, act=self.act, target_modules=list(target_modules))
