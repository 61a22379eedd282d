"""The accuracy/latency front (issue 12): DVC overrides, the join of results and bench, the report."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from cpet import front
from cpet.config import load_params, parse_params
from cpet.errors import ConfigError, CpetError

ROOT = Path(__file__).resolve().parents[1]


def _applied(tmp_path, params_raw: dict) -> dict:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_raw, sort_keys=False))
    apply_overrides(str(path), front.overrides(load_params(path)))  # DVC's own -S parser and writer
    return yaml.safe_load(path.read_text())


def test_dvc_applies_the_overrides_to_exactly_the_front_methods(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    out = _applied(tmp_path, raw)
    assert out["compress"]["methods"] == raw["front"]["methods"]
    assert out["tasks"] == raw["tasks"] and out["recover"] == raw["recover"]  # nothing else changes


def test_awkward_values_survive_the_override_grammar(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["front"]["methods"] = {"odd": {"method": "int4", "group_size": 32, "exclude": ["*.mlp.down_proj", "a b"],
                                       "embeddings": True, "damp": 0.02}}
    assert _applied(tmp_path, raw)["compress"]["methods"] == raw["front"]["methods"]


def test_front_methods_are_validated_where_they_are_written():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["front"]["methods"] = {"bad": {"method": "w8a8", "alpha": 2}}
    with pytest.raises(ConfigError, match=r"front\.methods\.bad\.alpha"):
        parse_params(raw)


RESULTS = [
    {"task": t, "compression": c, "variant": v, "split": "test", "accuracy": a}
    for t, c, v, a in [
        ("a", "none", "original+pet", 0.90), ("b", "none", "original+pet", 0.80),
        ("a", "fast", "compressed+pet", 0.85), ("b", "fast", "compressed+pet", 0.70),
        ("a", "fast", "compressed+cpet", 0.895), ("b", "fast", "compressed+cpet", 0.795),
        ("a", "faster", "compressed+pet", 0.80), ("b", "faster", "compressed+pet", 0.60),
        ("a", "faster", "compressed+cpet", 0.88), ("b", "faster", "compressed+cpet", 0.80),
    ]
]
BENCH = [{"variant": v, "compression": c, "runtime": rt, "batch": b, "seq_len": 64, "p50_ms": ms}
         for v, c, rt, b, ms in [
             ("original+pet", "none", "onnxruntime", 1, 100.0), ("original+pet", "none", "onnxruntime", 16, 1000.0),
             ("original+pet", "none", "torch", 1, 10.0),  # other runtimes are ignored
             ("compressed+cpet", "fast", "onnxruntime", 1, 50.0), ("compressed+cpet", "fast", "onnxruntime", 16, 400.0),
             ("compressed+pet", "fast", "onnxruntime", 1, 45.0),
             ("compressed+cpet", "faster", "onnxruntime", 1, 25.0),
         ]]


def test_table_joins_accuracy_and_speed_and_picks_the_best_within_tolerance():
    t = front.table(RESULTS, BENCH, tolerance=0.01)
    assert t["tasks"] == ["a", "b"] and t["batches"] == [1, 16]
    rows = {r["compression"]: r for r in t["rows"]}
    fast, faster = rows["fast"], rows["faster"]
    assert fast["compressed+cpet speedup b1"] == 2.0 and fast["compressed+cpet speedup b16"] == 2.5
    assert fast["compressed+pet speedup b1"] == pytest.approx(100 / 45, abs=1e-3)
    assert fast["compressed+pet speedup b16"] is None  # not benchmarked: no number, not a guess
    assert fast["compressed+cpet max_drop"] == pytest.approx(0.005) and fast["compressed+cpet within_tolerance"]
    assert faster["compressed+cpet max_drop"] == pytest.approx(0.02) and not faster["compressed+cpet within_tolerance"]
    assert not fast["compressed+pet within_tolerance"]
    assert front.best(t, 1)["compression"] == "fast"  # "faster" is faster but 2 points down on task a
    assert "Best at batch 1: fast, 2.00x" in front.markdown(t)


def test_workspace_report_writes_json_markdown_and_plot(tmp_path):
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(CpetError, match="reports/results.json: missing"):
        front.write_report(params, tmp_path, workspace=True)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "results.json").write_text(json.dumps(RESULTS))
    (tmp_path / "reports" / "bench.json").write_text(json.dumps(BENCH))
    out = front.write_report(params, tmp_path, workspace=True)
    assert out["source"] == "workspace"
    assert json.loads((tmp_path / "reports" / "front.json").read_text())["rows"] == out["rows"]
    assert (tmp_path / "reports" / "front.md").read_text().startswith("| setting |")
    assert (tmp_path / "reports" / "front.png").stat().st_size > 1000


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_report_without_the_experiment_says_what_to_run(tmp_path):
    import subprocess
    import sys

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    with pytest.raises(CpetError, match="no DVC experiment named 'front'.*cpet front"):
        front.write_report(load_params(ROOT / "params.yaml"), tmp_path)
