"""Fixtures for cpet.pet / distill / train tests: a tiny Llama and a word-level tokenizer."""

from __future__ import annotations

import pytest
import torch
import tinypet as tiny  # pytest's default (prepend) import mode puts this folder on sys.path


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny tensors: threading costs more than it saves
    yield


@pytest.fixture(scope="session")
def tok():
    return tiny.tokenizer()


@pytest.fixture(scope="session")
def verbalizer(tok):
    from cpet.lmcls import Verbalizer

    return Verbalizer.build(tok, tiny.LABEL_WORDS)


@pytest.fixture
def batch(tok):
    from cpet.lmcls import encode_prompts

    texts, _ = tiny.texts_and_labels(6)
    return encode_prompts(tok, texts, tiny.TEMPLATE, 32)
