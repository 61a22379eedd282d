"""LM classification: prompts, verbalizer, batched scoring and metrics on a tiny model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from cpet.errors import ConfigError
from cpet.lmcls import Verbalizer, accuracy_f1, encode_prompts, predict


@pytest.fixture(scope="module")
def tok():
    words = ["<pad>", "Review", ":", "Sentiment", "good", "bad", "movie", "the", "a", "very", "positive", "negative", "plot"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<unk>"] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


TEMPLATE = "Review : {text} Sentiment :"


def test_verbalizer_distinct_first_tokens(tok):
    v = Verbalizer.build(tok, {"pos": "positive", "neg": "negative"})
    assert v.labels == ("pos", "neg") and v.token_ids == (10, 11)
    with pytest.raises(ConfigError, match="tasks.x.verbalizer: label words must start with distinct"):
        Verbalizer.build(tok, {"pos": "good movie", "neg": "good plot"}, where="tasks.x.verbalizer")


def test_truncation_keeps_the_end_of_the_prompt(tok):
    long = " ".join(["very"] * 40) + " good movie"
    enc = encode_prompts(tok, [long, "bad"], TEMPLATE, max_length=12)
    ids = enc["input_ids"][0].tolist()
    n = int(enc["attention_mask"][0].sum())
    assert 8 <= n <= 12 and ids[:2] == tok("Review :")["input_ids"]
    assert tok.decode(ids[n - 2 : n]) == "Sentiment :"
    assert enc["attention_mask"][1].sum() == 5  # Review : bad Sentiment :


def test_batched_scores_equal_single_scores(tok, model):
    v = Verbalizer.build(tok, {"pos": "positive", "neg": "negative"})
    texts = ["good movie", "the plot a very very bad movie", "bad"]
    _, batched = predict(model, tok, texts, TEMPLATE, v, max_length=32, batch_size=3)
    single = torch.cat([predict(model, tok, [t], TEMPLATE, v, max_length=32)[1] for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_accuracy_and_macro_f1():
    m = accuracy_f1([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert accuracy_f1([0, 0], [0, 0], 3)["macro_f1"] == 1.0
