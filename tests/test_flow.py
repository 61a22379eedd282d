"""The Prefect flow runs the stage functions; a failed data gate stops the flow."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from tinyproject import make_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=60):
        yield


def _flow():
    spec = importlib.util.spec_from_file_location("pipeline", ROOT / "flows" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.pipeline


def test_flow_validates_and_stops_on_bad_data(harness, tiny_task, raw_params, tmp_path):
    raw_params["tasks"] = {"tiny": {"source": "topic", "template": "{text} =", "verbalizer": {"neg": " no", "pos": " yes"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    root = tiny_task()
    pipeline = _flow()
    result = pipeline(root=str(root), stages=["validate"])
    assert result["validate"]["success"] is True

    bad = {s: make_rows("neg", 12, s) + make_rows("pos", 12, s) for s in ("train", "validation", "test")}
    bad["test"][0]["label"] = "other"
    tiny_task(bad)
    state = pipeline(root=str(root), stages=["validate"], return_state=True)
    assert state.is_failed()
    assert "tiny/test: expect_column_values_to_be_in_set" in str(state.result(raise_on_failure=False))
