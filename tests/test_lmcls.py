"""LM classification: prompts, verbalizer, batched scoring and metrics on a tiny model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from cpet.errors import ConfigError
from cpet.lmcls import (MULTI_TOKEN_DEFAULT, Verbalizer, accuracy_f1, encode_prompts, expand_labels,
                        label_scores, last_token_logits, predict)


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
    assert v.scoring == "first-token" and v.sequences == ((10,), (11,))  # auto, one-token words
    with pytest.raises(ConfigError, match="tasks.x.verbalizer: label words must start with distinct"):
        Verbalizer.build(tok, {"pos": "good movie", "neg": "good plot"}, where="tasks.x.verbalizer",
                         scoring="first-token")


def test_verbalizer_multi_token_words(tok):
    words = {"pos": "good movie", "neg": "good plot"}  # same first token: only whole words tell them apart
    v = Verbalizer.build(tok, words)
    assert v.scoring == MULTI_TOKEN_DEFAULT and v.sequences == ((4, 6), (4, 12)) and v.token_ids == (4, 4)
    assert Verbalizer.build(tok, words, scoring="mean").scoring == "mean"
    # distinct first tokens: first-token scoring of multi-token words only when asked for
    assert Verbalizer.build(tok, {"pos": "very good", "neg": "bad"}).scoring == MULTI_TOKEN_DEFAULT
    assert Verbalizer.build(tok, {"pos": "very good", "neg": "bad"}, scoring="first-token").token_ids == (9, 5)
    with pytest.raises(ConfigError, match="^t: two label words are the same tokens"):
        Verbalizer.build(tok, {"pos": "good  movie", "neg": "good movie"}, where="t")
    with pytest.raises(ConfigError, match="^t: scoring 'max' is not one of"):
        Verbalizer.build(tok, words, where="t", scoring="max")


def hand_scores(model, tok, texts, words, mean=False):
    """Each word's log-probability after each prompt, one unpadded sequence at a time."""
    out = torch.zeros(len(texts), len(words))
    for i, text in enumerate(texts):
        prompt = tok(TEMPLATE.format(text=text), add_special_tokens=False)["input_ids"]
        for k, word in enumerate(words):
            w = tok(word, add_special_tokens=False)["input_ids"]
            logp = model(input_ids=torch.tensor([prompt + w])).logits[0].log_softmax(-1)
            total = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(w))
            out[i, k] = total / len(w) if mean else total
    return out


TEXTS = ["good movie", "the plot a very very bad movie", "bad", "a plot"]


@pytest.mark.parametrize("scoring", ["sum", "mean"])
def test_multi_token_scores_are_word_log_probabilities(tok, model, scoring):
    words = {"pos": "very good movie", "neg": "bad", "meh": "the plot"}  # 3, 1 and 2 tokens
    v = Verbalizer.build(tok, words, scoring=scoring)
    pred, scores = predict(model, tok, TEXTS, TEMPLATE, v, max_length=32, batch_size=3)
    with torch.no_grad():
        want = hand_scores(model, tok, TEXTS, list(words.values()), mean=scoring == "mean")
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-5)
    assert pred == want.argmax(1).tolist()


def test_sum_and_mean_equal_first_token_log_softmax_for_one_token_words(tok, model):
    words = {"pos": "positive", "neg": "negative", "x": "plot"}
    first = Verbalizer.build(tok, words)
    batch = encode_prompts(tok, TEXTS, TEMPLATE, 32)
    with torch.no_grad():
        logits = last_token_logits(model(**batch).logits, batch["attention_mask"])
        want = logits.log_softmax(-1)[:, list(first.token_ids)]
        assert torch.equal(label_scores(model, batch, first).scores, logits[:, list(first.token_ids)])
        for scoring in ("sum", "mean"):
            got = label_scores(model, batch, Verbalizer.build(tok, words, scoring=scoring)).scores
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_label_order_and_padding_do_not_change_a_rows_scores(tok, model):
    words = {"pos": "very good movie", "neg": "bad", "meh": "the plot"}
    v = Verbalizer.build(tok, words, scoring="sum")
    shuffled = Verbalizer.build(tok, {k: words[k] for k in ("meh", "pos", "neg")}, scoring="sum")
    with torch.no_grad():
        batched = predict(model, tok, TEXTS, TEMPLATE, v, max_length=32, batch_size=4)[1]  # padded rows
        alone = torch.cat([predict(model, tok, [t], TEMPLATE, v, max_length=32)[1] for t in TEXTS])
        reordered = predict(model, tok, TEXTS, TEMPLATE, shuffled, max_length=32, batch_size=4)[1]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reordered[:, [1, 2, 0]], batched, atol=1e-5, rtol=1e-5)


def test_expanded_batch_layout(tok):
    v = Verbalizer.build(tok, {"pos": "very good", "neg": "bad"}, scoring="sum")
    batch = encode_prompts(tok, ["good", "the plot"], TEMPLATE, 32)  # lengths 5 and 6
    lb = expand_labels(batch, v)
    assert lb.input_ids.shape == (4, 8) and lb.n_labels == 2
    assert lb.input_ids[0, :7].tolist() == batch["input_ids"][0, :5].tolist() + [9, 4]
    assert lb.attention_mask.sum(1).tolist() == [7, 6, 8, 7]
    assert lb.positions.tolist() == [[4, 5], [4, 4], [5, 6], [5, 5]]
    assert lb.valid.tolist() == [[True, True], [True, False], [True, True], [True, False]]


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
