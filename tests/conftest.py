"""Shared fixtures: quiet environment, a valid params mapping, tiny prepared task data."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from cpet.env import apply_quiet_defaults
from tinyproject import make_rows, tiny_rows, tiny_tokenizer

apply_quiet_defaults()
# The suite is the CPU suite, also on a GPU machine (tests/test_gpu.py opts into CUDA);
# CPET_DEVICE=cuda pytest runs it on the GPU instead.
os.environ.setdefault("CPET_DEVICE", "cpu")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw_params() -> dict:
    """The project's params.yaml as a fresh mutable mapping, with MLflow tracking off.

    Tests do not track unless they say so (no MLflow database per test, and nothing sent to a
    server that MLFLOW_TRACKING_URI may name); tests/test_tracking.py, test_registry.py and
    test_flow.py turn it on against a sqlite file in tmp_path.
    """
    raw = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    raw["track"]["enabled"] = False
    return raw


@pytest.fixture
def tiny_task(tmp_path: Path):
    """Write a clean two-class task under tmp_path/data/processed/tiny and return a writer."""
    from cpet import data, io

    def write(splits: dict[str, list] | None = None, labels=("neg", "pos")) -> Path:
        if splits is None:
            splits = {
                s: make_rows("neg", 12, s) + make_rows("pos", 12, s) for s in data.SPLITS
            }
        d = data.task_dir(tmp_path, "tiny")
        d.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            io.write_jsonl(d / f"{split}.jsonl", rows)
        io.write_json(d / "manifest.json", {"task": "tiny", "labels": list(labels)})
        return tmp_path

    return write


@pytest.fixture
def tiny_project(tmp_path: Path, raw_params: dict):
    """A complete, validated project root with a 2-layer Llama base model and one tiny task.

    Returns ``(root, params)``; stages run on it end to end in seconds.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpet import data, io
    from cpet.config import parse_params
    from cpet.stages.validate import validate

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "models/base")
    tok.save_pretrained(tmp_path / "models/base")
    words = {"neg": "bad awful poor dull".split(), "pos": "good great fine nice".split()}
    splits = {"train": tiny_rows(words, 96, 0), "validation": tiny_rows(words, 32, 1, 1000),
              "test": tiny_rows(words, 32, 2, 2000)}
    d = data.task_dir(tmp_path, "tiny")
    for split, rows in splits.items():
        io.write_jsonl(d / f"{split}.jsonl", rows)
    io.write_json(d / "manifest.json", {"task": "tiny", "labels": ["neg", "pos"]})
    raw_params["tasks"] = {"tiny": {"source": "sentiment", "template": "Review : {text} Sentiment :",
                                    "verbalizer": {"neg": "no", "pos": "yes"}, "scoring": "auto"}}
    raw_params["fetch"]["cache_dir"] = str(tmp_path / ".cache")
    raw_params["compress"]["calibration"].update(samples=16, max_length=32, batch_size=8)
    raw_params["compress"]["measure"].update(max_length=32, batch_size=16, latency_repeats=2,
                                             latency_seq_len=16)
    raw_params["compress"]["methods"] = {
        "int8": {"method": "int8"},
        "struct": {"method": "structured", "heads_ratio": 0.5, "ffn_ratio": 0.25},
    }
    small = {"steps": 6, "batch_size": 8, "lr": 5e-3, "warmup_steps": 1, "eval_every": 3,
             "checkpoint_every": 3, "seed": 0, "max_length": 32, "mixed_precision": "no",
             "attn_implementation": None}
    raw_params["teacher"]["train"].update(small)
    raw_params["recover"]["train"].update(small)
    raw_params["recover"]["recovery"]["rank"] = 4
    from cpet.config.recipes import TRAINED

    raw_params["recover"]["variants"] = list(TRAINED)  # every row of the comparison, ablations included
    raw_params["evaluate"].update(batch_size=16, max_length=32)
    params = parse_params(raw_params)
    validate(params, tmp_path)
    return tmp_path, params
