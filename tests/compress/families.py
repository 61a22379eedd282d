"""Tiny decoder LMs of nine families built in code (random weights, no hub) for the support matrix."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128  # the compression tests feed random token ids (no tokenizer), as in conftest.py
H = {"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": VOCAB}
ROPE = {"hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 64, **H}

#: family -> (config class, model class, config kwargs); a comment says what the family adds
FAMILIES: dict[str, tuple[type, type, dict]] = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {**ROPE, "num_key_value_heads": 2}),  # GQA, gated MLP, tied
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {**ROPE, "num_key_value_heads": 2, "tie_word_embeddings": False}),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, ROPE),  # fused QKV, parallel residual
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,  # Conv1D projections, fused c_attn, n_inner=None
             {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": VOCAB}),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM,  # fc1/fc2 directly on the decoder layer
            {"hidden_size": 64, "ffn_dim": 128, "word_embed_proj_dim": 64, "max_position_embeddings": 64, **H}),
    "bloom": (tf.BloomConfig, tf.BloomForCausalLM,  # fused QKV, MLP adds the residual, width 4 * hidden fixed
              {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB}),
    "falcon": (tf.FalconConfig, tf.FalconForCausalLM,  # multi-query fused QKV, ffn_hidden_size
               {"hidden_size": 64, "ffn_hidden_size": 128, **H}),
    "phi": (tf.PhiConfig, tf.PhiForCausalLM, ROPE),  # partial rotary, plain fc1/fc2 MLP, dense out
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {**ROPE, "num_key_value_heads": 2, "head_dim": 16}),
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).eval()
