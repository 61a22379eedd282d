"""Tiny causal LMs built in code (no hub), calibration batches and inputs for the compression tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=VOCAB, max_position_embeddings=64)  # fmt: skip


def build(kind: str = "llama", seed: int = 0, **over) -> torch.nn.Module:
    """A randomly initialised 2-layer model; llama is GQA (4 heads, 2 KV heads) with tied embeddings."""
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(**{**SMALL, "num_key_value_heads": 2, "tie_word_embeddings": True, **over})
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":  # biases on q/k/v, untied head
        cfg = Qwen2Config(**{**SMALL, "num_key_value_heads": 2, "tie_word_embeddings": False, **over})
        model = Qwen2ForCausalLM(cfg)
    elif kind == "neox":  # fused QKV, plain GELU MLP with biases, parallel residual
        cfg = GPTNeoXConfig(**{**SMALL, **over})
        model = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads crawl on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llama():
    return build("llama")


@pytest.fixture(scope="session")
def calib():
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        mask = torch.ones(2, 16, dtype=torch.long)
        batches.append({"input_ids": ids, "attention_mask": mask})
    batches[0]["attention_mask"][1, 11:] = 0  # some right padding
    return batches


@pytest.fixture(scope="session")
def inputs():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="session")
def make_model():
    """``make_model(kind, seed, **config_overrides)`` builds a fresh tiny model."""
    return build


@pytest.fixture(scope="session")
def run():
    """``run(model, ids)``: logits without gradients."""

    def _run(model, ids):
        with torch.no_grad():
            return model(input_ids=ids).logits

    return _run
