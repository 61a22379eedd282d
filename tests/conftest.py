"""Shared fixtures: quiet environment, a valid params mapping, tiny prepared task data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cpet.env import apply_quiet_defaults

apply_quiet_defaults()

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw_params() -> dict:
    """The project's params.yaml as a fresh mutable mapping."""
    return copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))


def make_rows(label: str, n: int, prefix: str = "") -> list[dict]:
    return [{"text": f"{prefix}{label} example number {i} here", "label": label} for i in range(n)]


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
