"""Slow: the default CPET pipeline on the real model and data, as ``dvc repro evaluate`` runs it.

The project's own ``dvc.yaml`` and ``params.yaml`` in a fresh DVC project, with only the budget
shrunk (steps, caps, repeats) so it takes minutes: fetch through evaluate, both default tasks and
compression methods, the comparison table at the end, and ``dvc status`` with nothing left to
do. (export, bench and register have their own tests on tiny models.)
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpet.config import VARIANTS, parse_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CPET_TEST_CACHE", Path.home() / ".cache" / "cpet-test"))

SMOKE = {  # dotted params key -> value: the default run at a smoke budget
    "fetch.split.max_train": 64, "fetch.split.max_validation": 50, "fetch.split.max_test": 50,
    "validate.min_per_class": 5,
    "compress.calibration.samples": 16,
    "compress.measure.max_examples": 20, "compress.measure.ppl_texts": 5, "compress.measure.latency_repeats": 2,
    "teacher.train.steps": 6, "teacher.train.warmup_steps": 1, "teacher.train.eval_every": 3,
    "teacher.train.checkpoint_every": 3,
    "recover.train.steps": 4, "recover.train.warmup_steps": 1, "recover.train.eval_every": 2,
    "recover.train.checkpoint_every": 2,
}


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree[key]
    assert leaf in tree, dotted  # only shrink what exists
    tree[leaf] = value


def _dvc(*args, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, check=True,
                          capture_output=True, text=True)


def test_dvc_repro_runs_the_default_pipeline(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", project)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in SMOKE.items():
        _set(raw, key, value)
    raw["fetch"]["cache_dir"] = str(CACHE)  # absolute: downloads reused across test runs
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = parse_params(raw)
    _dvc("init", "--no-scm", cwd=project)
    _dvc("repro", "evaluate", cwd=project)

    rows = json.loads((project / "reports/results.json").read_text())
    methods = list(params.compress.methods)
    assert len(rows) == len(params.tasks) * (1 + len(methods) * (1 + len(params.recover.variants)))
    assert {r["task"] for r in rows} == set(params.tasks)
    assert {r["variant"] for r in rows} <= set(VARIANTS)
    assert all(0 <= r["accuracy"] <= 1 and r["split"] == "test" for r in rows)
    teacher = {r["task"]: r["accuracy"] for r in rows if r["variant"] == "original+pet"}
    assert teacher["sentiment"] > 0.6 and teacher["topic"] > 0.4  # real model, 6 steps: above chance
    for method in methods:
        report = json.loads((project / f"reports/compress/{method}.json").read_text())
        assert report["after"]["perplexity"] > report["before"]["perplexity"] * 0.9
    assert "recovery ratio" in (project / "reports/results.md").read_text()
    status = _dvc("status", "evaluate", "--json", cwd=project).stdout
    assert json.loads(status) == {}, status  # everything recorded in dvc.lock: nothing to rerun
