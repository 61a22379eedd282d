"""Settings of the library's own pieces (LoRA, recovery modules, trainer, distillation).

Torch-free, so ``params.yaml`` validates without importing torch. No field has a default:
``params.yaml`` holds the project's one set of defaults, and a value missing there is refused
naming its key (``recover.distill.beta: missing``) instead of silently taking a code default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cpet.config.base import Section


class LoraSettings(Section):
    """The task adapter (peft LoRA)."""

    rank: int = Field(ge=1, description="LoRA rank r")
    alpha: float = Field(gt=0, description="scaling alpha / r")
    dropout: float = Field(ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | None = Field(
        description="module names/suffixes; null = linear layers under attention modules")


class RecoverySettings(Section):
    """Recovery modules (reference code: rank 32 T5, 16 LLaMA-13B, 64 Llama-2)."""

    rank: int = Field(ge=1, description="rank of A_rec / B_rec")
    alpha: float = Field(gt=0, description="s_rec = alpha / rank")
    act: Literal["gelu", "identity"] = Field(description="identity = a plain, mergeable second LoRA")
    target_modules: list[str] | None = Field(
        description="module names/suffixes; null = every linear layer except the LM head")


class TrainConfig(Section):
    """One optimisation recipe for every variant. Steps are optimizer steps; ``batch_size`` is
    per process (DDP: global = batch_size x processes)."""

    steps: int = Field(ge=1, description="optimizer steps")
    batch_size: int = Field(ge=1, description="examples per step and process")
    lr: float = Field(gt=0, description="peak AdamW learning rate")
    warmup_steps: int = Field(ge=0, description="linear warmup from 0, then linear decay to 0")
    weight_decay: float = Field(ge=0, description="AdamW decoupled weight decay on the trainable set")
    max_grad_norm: float | None = Field(gt=0, description="gradient clipping; null = off")
    eval_every: int = Field(ge=0, description="validate every N steps (and at the end); 0 = only at the end")
    checkpoint_every: int = Field(ge=0, description="resumable checkpoint every N steps (and at the end); 0 = off")
    seed: int = Field(description="data order, dropout and init seed")
    max_length: int = Field(ge=2, description="prompt tokens (TokenizedExamples, teacher cache); texts cut to fit")
    restore_best: bool = Field(description="end with the trainable weights of the best validation step")
    mixed_precision: Literal["no", "bf16", "auto"] = Field(
        description="bf16 = forward/backward and validation under torch.autocast(bfloat16); weights and "
        "optimizer stay float32; auto = bf16 where the device computes it natively (cpet.env.bf16_native)")
    attn_implementation: str | None = Field(
        description="transformers attention kernel while training (eager, sdpa, flash_attention_2, ...); "
        "null = the model's own; restored afterwards")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml11_no(cls, v):
        return "no" if v is False else v  # `mixed_precision: no` unquoted (or rewritten by `dvc exp run -S`)

    @model_validator(mode="after")
    def _warmup_within_steps(self):
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) > steps ({self.steps})")
        return self


class DistillConfig(Section):
    """Distillation from the uncompressed teacher (reference alpha: 1.0 LLaMA-13B, 0.055 Llama-2)."""

    alpha: float = Field(ge=0, description="weight of the hidden-state MSE")
    beta: float = Field(ge=0, description="weight of KL(teacher || student) on the label scores (cpet.lmcls.label_scores)")
    temperature: float = Field(gt=0, description="KL temperature T (loss scaled by T^2)")
    layers: list[int] = Field(min_length=1, description="indices into output_hidden_states; -1 = last")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"layers must be distinct, got {v}")
        return v
