"""The trainer shared by all PET variants (fresh / inherited LoRA, recovery, CPET)."""

from cpet.train.config import TrainConfig
from cpet.train.data import DataOrder, Example, TokenizedExamples, pad_batch, tokenize_prompts
from cpet.train.evaluate import Evaluator
from cpet.train.loop import RNG_LOCK, TrainResult, linear_warmup_decay, select_trainable, train

__all__ = ["RNG_LOCK", "DataOrder", "Evaluator", "Example", "TokenizedExamples", "TrainConfig", "TrainResult",
           "linear_warmup_decay", "pad_batch", "select_trainable", "tokenize_prompts", "train"]
