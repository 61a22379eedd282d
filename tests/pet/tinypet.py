"""Tiny Llama + word-level tokenizer built in code (importable by the DDP worker script too)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["<pad>", "<unk>", "Review", ":", "Sentiment", "good", "bad", "movie", "the", "a", "very", "positive",
         "negative", "plot", "great", "awful", "fine", "boring", "fun", "story", "acting", "not", "and", "was"]
TEMPLATE = "Review : {text} Sentiment :"
LABEL_WORDS = {"neg": "negative", "pos": "positive"}


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>")


def config(**kw) -> LlamaConfig:
    base = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                tie_word_embeddings=True)
    return LlamaConfig(**{**base, **kw})


def model(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config(**kw)).eval()


def texts_and_labels(n: int = 24, seed: int = 0) -> tuple[list[str], list[int]]:
    """A learnable toy task: sentiment words decide the label."""
    g = torch.Generator().manual_seed(seed)
    pos, neg, filler = ["good", "great", "fine", "fun"], ["bad", "awful", "boring"], ["the", "movie", "plot", "story",
                                                                                       "acting", "was", "very", "a"]
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = [filler[int(j)] for j in torch.randint(len(filler), (int(torch.randint(1, 6, (1,), generator=g)),),
                                                         generator=g)]
        cue = (pos if label else neg)[int(torch.randint(3, (1,), generator=g))]
        words.insert(int(torch.randint(len(words) + 1, (1,), generator=g)), cue)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def randomize_adapters(model, std: float = 0.2, seed: int = 1) -> None:
    """Make zero-initialised factors (lora_B, rec_B) non-zero so adapters change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "rec_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
