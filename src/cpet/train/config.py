"""``TrainConfig``: one optimisation recipe for every variant (fresh / inherited LoRA, recovery, CPET)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    """Steps are optimizer steps; ``batch_size`` is per process (DDP: global = batch_size x processes)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(150, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per step and process")
    lr: float = Field(2e-4, gt=0, description="peak AdamW learning rate")
    warmup_steps: int = Field(10, ge=0, description="linear warmup from 0, then linear decay to 0")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay on the trainable set")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null = off")
    eval_every: int = Field(50, ge=0, description="validate every N steps (and at the end); 0 = only at the end")
    checkpoint_every: int = Field(50, ge=0, description="resumable checkpoint every N steps (and at the end); 0 = off")
    seed: int = Field(0, description="data order, dropout and init seed")
    max_length: int = Field(128, ge=2, description="prompt tokens (TokenizedExamples, teacher cache); texts cut to fit")
    restore_best: bool = Field(True, description="end with the trainable weights of the best validation step")
    mixed_precision: Literal["no", "bf16", "auto"] = Field(
        "no", description="bf16 = forward/backward and validation under torch.autocast(bfloat16); weights "
        "and optimizer stay float32; auto = bf16 where the device computes it natively (cpet.env.bf16_native)")
    attn_implementation: str | None = Field(
        None, description="transformers attention kernel while training (eager, sdpa, flash_attention_2, ...); "
        "null = the model's own; restored afterwards")

    @model_validator(mode="after")
    def _warmup_within_steps(self):
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) > steps ({self.steps})")
        return self
