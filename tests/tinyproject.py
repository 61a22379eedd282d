"""Tiny data and a word-level tokenizer for stage tests (imported by tests/conftest.py)."""

from __future__ import annotations


def make_rows(label: str, n: int, prefix: str = "") -> list[dict]:
    return [{"text": f"{prefix}{label} example number {i} here", "label": label} for i in range(n)]


WORDS = ("good great fine nice bad awful poor dull movie film plot the a very was is it this "
         "Review Sentiment yes no sport match team game vote party law tax Topic").split()


def tiny_tokenizer():
    """A word-level tokenizer saved/loaded like any HF tokenizer; every word is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", ":", "\n", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<pad>")


def tiny_rows(label_words: dict[str, list[str]], n: int, seed: int, offset: int = 0) -> list[dict]:
    """Texts whose label is signalled by its words (so a tiny model can learn it)."""
    import random

    rng = random.Random(seed)
    filler = "the a very was is it this movie film plot".split()
    rows = []
    for i in range(n):
        label = sorted(label_words)[i % len(label_words)]
        words = [rng.choice(label_words[label]) for _ in range(2)] + rng.sample(filler, 4)
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {offset + i}", "label": label})
    return rows
