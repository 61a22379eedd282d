"""The study: DVC experiments over one cell and their statistics (issue 13)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cpet import study
from cpet.config import load_params, parse_params
from cpet.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _with_candidate(params):
    raw = params.model_dump(by_alias=True, mode="json")
    raw["study"]["candidates"] = {"alpha-3": ["recover.distill.alpha=3.0"]}
    return parse_params(raw)


def test_experiments_change_one_axis_at_a_time_per_seed():
    params = _with_candidate(load_params(ROOT / "params.yaml"))
    exps = study.experiments(params)
    s = params.study
    names = [e.name for e in exps]
    assert len(names) == len(set(names))
    assert {e.seed for e in exps} == set(s.seeds)
    assert [e.axis for e in exps][:2 * len(s.seeds)] == ["cells"] * len(s.seeds) + ["ablation"] * len(s.seeds)
    for e in exps:
        assert f"recover.train.seed={e.seed}" in e.overrides
        tasks = s.tasks if e.axis in ("cells", "candidate") else [s.task]
        methods = s.methods if e.axis in ("cells", "candidate") else [e.value.split(":")[0]] if e.axis == "strength" else [s.method]
        assert {t for t in params.tasks if f"~tasks.{t}" not in e.overrides} == set(tasks)
        assert {m for m in params.compress.methods if f"~compress.methods.{m}" not in e.overrides} == set(methods)
        variants = s.variants + (s.ablations if e.axis == "ablation" else [])
        assert f"recover.variants=[{','.join(variants)}]" in e.overrides
    steps = {e.value for e in exps if e.axis == "steps"}
    assert steps == {str(n) for n in s.steps if n != params.recover.train.steps}
    for name, over in s.settings.items():
        assert all(o in e.overrides for e in exps if e.value == name for o in over)
    assert {e.value for e in exps if e.axis == "setting"} == set(s.settings)
    assert [e.name for e in exps if e.axis == "candidate"] == [f"study-candidate-alpha-3-s{n}" for n in s.seeds]
    assert all("recover.distill.alpha=3.0" in e.overrides for e in exps if e.axis == "candidate")
    strength = [e for e in exps if e.axis == "strength" and e.seed == s.seeds[0]]
    assert len(strength) == sum(map(len, s.strength.values()))
    raw = params.model_dump(by_alias=True, mode="json")
    raw["study"]["task"] = "nope"
    with pytest.raises(ConfigError, match="study.task: 'nope' is not a configured task"):
        study.experiments(parse_params(raw))
    raw["study"]["task"] = s.task
    raw["study"]["strength"] = {"int9": [{}]}
    with pytest.raises(ConfigError, match="study.strength: 'int9' is not in compress.methods"):
        study.experiments(parse_params(raw))


def test_every_experiments_overrides_apply_through_dvcs_parser(tmp_path):
    """Each experiment's -S list, applied as `dvc exp run` applies it, gives valid params with the
    setting in place (a key the method entry lacks, e.g. heads_ratio, needs '++')."""
    from dvc.utils.hydra import apply_overrides

    params = _with_candidate(load_params(ROOT / "params.yaml"))
    for e in study.experiments(params):
        path = tmp_path / f"{e.name}.yaml"
        shutil.copy(ROOT / "params.yaml", path)
        apply_overrides(path, list(e.overrides))
        got = load_params(path)
        assert got.recover.train.seed == e.seed
        if e.axis == "strength":
            method, setting = e.value.split(":")
            entry = got.compress.method(method)
            for pair in setting.split(","):
                key, value = pair.split("=")
                assert str(getattr(entry, key)) == value, (e.name, key)


def _seed(rng, n, acc):
    gold = rng.integers(0, 2, n)
    out = {"gold": gold.tolist()}
    for name, p in acc.items():
        pred = np.where(rng.random(n) < p, gold, 1 - gold)
        out[name] = pred.tolist()
    return out


def test_cell_statistics_ratio_interval_and_mcnemar():
    rng = np.random.default_rng(0)
    seeds = [_seed(rng, 400, {"original+pet": 0.9, "compressed+pet": 0.7, "compressed+cpet": 0.85}) for _ in range(3)]
    stats = study.cell_stats(seeds, samples=500, confidence=0.95, seed=0)
    m = stats["mean_accuracy"]
    expected = (m["compressed+cpet"] - m["compressed+pet"]) / (m["original+pet"] - m["compressed+pet"])
    assert stats["recovery_ratio"] == pytest.approx(expected)
    lo, hi = stats["interval"]
    assert lo < stats["recovery_ratio"] < hi and 0.4 < lo and hi < 1.2
    assert stats["mcnemar_pooled"]["p_value"] < 1e-6  # 0.85 vs 0.70 on 1,200 rows
    a, b = stats["mcnemar_per_seed"][0]
    gold, pet, cpet = (np.asarray(seeds[0][k]) for k in ("gold", "compressed+pet", "compressed+cpet"))
    assert (a, b) == (int(((pet == gold) & (cpet != gold)).sum()), int(((cpet == gold) & (pet != gold)).sum()))

    same = [_seed(rng, 400, {"original+pet": 0.9, "compressed+pet": 0.7}) for _ in range(2)]
    for s in same:
        s["compressed+cpet"] = list(s["compressed+pet"])
    tie = study.cell_stats(same, samples=200, confidence=0.95, seed=0)
    assert tie["recovery_ratio"] == 0 and tie["interval"] == [0.0, 0.0]
    assert tie["mcnemar_pooled"] == {"only_pet_right": 0, "only_cpet_right": 0, "p_value": 1.0}


def _predictions(rng, tasks, methods, variants, n=200):
    out = {}
    for task in tasks:
        gold = rng.integers(0, 2, n)
        preds = {"gold": gold.tolist(), "none/original+pet": gold.tolist()}  # original: always right
        for method in methods:
            for k, v in enumerate(["compressed+inherit-only", *variants]):
                wrong = np.zeros(n, bool)
                wrong[: (len(variants) + 1 - k) * 10] = True  # later variants are wrong on fewer rows
                preds[f"{method}/{v}"] = np.where(wrong, 1 - gold, gold).tolist()
        out[task] = preds
    return out


def test_report_groups_cells_and_ablation_rows_with_known_ratios(tmp_path):
    """Two seeds of every experiment, predictions built so each variant's accuracy is known."""
    params = _with_candidate(load_params(ROOT / "params.yaml"))
    s = params.study
    rng = np.random.default_rng(0)
    runs = {}
    for e in study.experiments(params):
        if e.axis == "cells":  # a seed's gold rows are the same in every experiment
            runs[e.name] = _predictions(np.random.default_rng(e.seed), s.tasks, s.methods, s.variants)
        elif e.axis == "ablation":
            runs[e.name] = _predictions(rng, [s.task], [s.method], [*s.variants, *s.ablations])
        elif e.axis == "candidate":  # cpet wrong on 5 rows instead of 10: ratio 0.75
            runs[e.name] = _predictions(np.random.default_rng(e.seed), s.tasks, s.methods, s.variants)
            for preds in runs[e.name].values():
                for m in s.methods:
                    preds[f"{m}/compressed+cpet"][5:10] = preds["gold"][5:10]
    result = study.report(params, runs)
    cells = {(c["axis"], c["task"], c["method"]): c for c in result["cells"]}
    assert set(cells) == ({(axis, t, m) for axis in ("cells", "candidate") for t in s.tasks for m in s.methods}
                          | {("ablation", s.task, s.method)})
    assert cells[("candidate", s.tasks[0], s.methods[1])]["recovery_ratio"] == pytest.approx(0.75)
    # same seed, same rows: the candidate's cpet is right on 5 more rows per seed than the default's
    vs = cells[("candidate", s.tasks[0], s.methods[1])]["vs_default"]
    assert vs["seeds"] == s.seeds and vs["only_default_right"] == 0 and vs["only_candidate_right"] == 5 * len(s.seeds)
    grid = cells[("cells", s.tasks[0], s.methods[0])]
    # 200 rows; inherit-only wrong on 30, pet on 20, cpet on 10: ratio (0.95 - 0.90) / (1 - 0.90)
    assert grid["seeds"] == 2 and grid["mean_accuracy"]["compressed+pet"] == pytest.approx(0.90)
    assert grid["recovery_ratio"] == pytest.approx(0.5)
    assert grid["mcnemar_pooled"]["only_pet_right"] == 0 and grid["mcnemar_pooled"]["only_cpet_right"] == 20
    ablation = cells[("ablation", s.task, s.method)]
    order = [*s.variants, *s.ablations]
    wrong = {v: (len(order) - k) * 10 for k, v in enumerate(order)}  # pet is variant 0
    for v in order[1:]:
        expected = (wrong["compressed+pet"] - wrong[v]) / wrong["compressed+pet"]
        assert ablation["ratios"][v] == pytest.approx(expected)
        lo, hi = ablation["intervals"][v]
        assert lo <= expected <= hi
    assert ablation["ratios"]["compressed+inherit-only"] < 0
    md = study.markdown(result)
    assert "## Every cell, default recipe" in md and f"## Ablations on {s.task} x {s.method}" in md
    assert f"| {s.tasks[1]} | {s.methods[1]} | 2 | 1.000 | 0.850 | 0.900 | 0.950 | 0.50 [" in md
    assert f"| alpha-3 | {s.tasks[1]} | {s.methods[1]} | 2 | 0.900 | 0.975 | 0.75 [" in md
    row = next(line for line in md.splitlines() if line.startswith(f"| alpha-3 | {s.tasks[1]} | {s.methods[1]} |"))
    assert "| 0.950 | 0.50 [" in row  # the default recipe's cpet and ratio beside the candidate's
    assert f"| 0 / {5 * len(s.seeds)}, p = " in row  # paired: rows only the default / only the candidate got right
    study.plot(result, tmp_path / "study.png")
    assert (tmp_path / "study.png").stat().st_size > 1000


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def _head(root):
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def _dvc(root, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_study_runs_dvc_experiments_and_reports(tiny_project, monkeypatch):
    """Real DVC experiments (`dvc exp run --temp -S ...`) on the tiny project, then the report."""
    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(var, "cpet test")
    for var in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(var, "test@cpet.invalid")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    root, params = tiny_project
    raw = params.model_dump(by_alias=True, mode="json")
    raw["track"]["enabled"] = False
    raw["fetch"]["cache_dir"] = ".cache/cpet"  # relative: each temp experiment has its own
    raw["tasks"]["tiny"]["verbalizer"] = {"neg": "bad", "pos": "good"}  # DVC's -S writer unquotes 'no'
    raw["compress"]["methods"] = {"int8": {"method": "int8"}}
    raw["recover"]["variants"] = ["compressed+pet", "compressed+cpet"]
    raw["study"].update(tasks=["tiny"], methods=["int8"], task="tiny", method="int8", seeds=[0, 1],
                        variants=["compressed+pet", "compressed+cpet"], ablations=["compressed+inherit"],
                        steps=[raw["recover"]["train"]["steps"]], distill=[[0.0, 1.0]], strength={}, settings={},
                        candidates={})
    raw["study"]["bootstrap"]["samples"] = 200
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".gitignore").write_text("/models/base\n/data/processed\n/.cache\n")
    _git(root, "init", "-q")
    _dvc(root, "init", "-q")
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports/fetch.json").write_text("{}\n")
    _dvc(root, "commit", "-f", "-q", "fetch")  # the tiny project's data and base stand in for fetch's
    _dvc(root, "repro", "-q", "evaluate")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "baseline")

    params = load_params(root / "params.yaml")
    names = [e.name for e in study.experiments(params)]
    assert len(names) == 6  # cells, ablation and one distill setting, two seeds each
    study.run(params, root, only=["study-cells-*"])
    assert set(study._experiment_revs(root)) == {"study-cells-default-s0", "study-cells-default-s1"}
    study.run(params, root)
    assert yaml.safe_load((root / "params.yaml").read_text())["recover"]["train"]["seed"] == 0  # workspace untouched
    assert study.run(params, root) == []  # finished experiments are not rerun
    listed = _dvc(root, "exp", "list", "--name-only").split()
    assert set(names) <= set(listed)

    summary = study.write_report(params, root)
    assert summary == {"experiments": 6, "cells": 3}
    result = json.loads((root / "reports/study/study.json").read_text())
    cells = {(c["axis"], c["value"]): c for c in result["cells"]}
    assert set(cells) == {("cells", "default"), ("ablation", "default"), ("distill", "alpha=0.0,beta=1.0")}
    base = cells[("cells", "default")]
    assert base["seeds"] == 2 and len(base["accuracy"]["compressed+cpet"]) == 2
    assert len(base["mcnemar_per_seed"]) == 2
    ablation = cells[("ablation", "default")]
    assert set(ablation["accuracy"]) == {"original+pet", "compressed+inherit-only", "compressed+pet",
                                         "compressed+cpet", "compressed+inherit"}
    # same seed, same recipe, same data: the ablation run's pet/cpet equal the cells run's
    assert ablation["accuracy"]["compressed+cpet"] == base["accuracy"]["compressed+cpet"]
    md = (root / "reports/study/study.md").read_text()
    assert "| distill | alpha=0.0,beta=1.0 | tiny | int8 | 2 |" in md and "| compressed+inherit |" in md
    assert (root / "reports/study/study.png").stat().st_size > 1000

    # A new baseline changes one default: `cpet study` counts only its own experiments as done, so
    # the cells rerun there; the report takes each experiment from the newest baseline that has it.
    old = _head(root)
    raw["recover"]["train"]["lr"] = raw["recover"]["train"]["lr"] * 3
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _git(root, "commit", "-qam", "new default lr")
    params = load_params(root / "params.yaml")
    assert study._experiment_revs(root) == {}
    assert set(study.study_revs(root)) == set(names)  # all still reportable, from the old baseline
    study.run(params, root, only=["study-cells-*"])
    revs = study.study_revs(root)
    assert {n: b for n, (_, b) in revs.items()} == {n: _head(root) if n.startswith("study-cells-") else old for n in names}
    study.write_report(params, root)
    result = json.loads((root / "reports/study/study.json").read_text())
    by_axis = {c["axis"]: c for c in result["cells"]}
    assert by_axis["cells"]["baselines"] == [_head(root)[:7]] and by_axis["ablation"]["baselines"] == [old[:7]]
    assert by_axis["cells"]["accuracy"]["original+pet"] == base["accuracy"]["original+pet"]  # teacher untouched
    lr = raw["recover"]["train"]["lr"]
    assert by_axis["cells"]["drift"] == {} and by_axis["ablation"]["drift"] == {"recover.train.lr": [lr / 3, lr]}
    md = (root / "reports/study/study.md").read_text()
    assert f"| {_head(root)[:7]} |" in md and f"commit {old[:7]} (ran with recover.train.lr={lr / 3}))" in md


def test_drift_names_the_stage_params_an_older_experiment_ran_with():
    """A result from an older baseline is flagged with what it ran otherwise than today, study
    sections aside; a method entry only one side has is named once."""
    params = load_params(ROOT / "params.yaml")
    cells = next(e for e in study.experiments(params) if e.axis == "cells")
    then = params.model_dump(by_alias=True, mode="json")
    assert study.drift(params, cells, then) == {}
    then["study"]["seeds"] = [7]  # not a stage input
    then["recover"]["distill"]["alpha"] = 9.0
    then["compress"]["methods"]["old"] = then["compress"]["methods"].pop(params.study.methods[1])
    got = study.drift(params, cells, then)
    assert got["recover.distill.alpha"] == [9.0, params.recover.distill.alpha]
    assert not any(k.startswith("study.") for k in got)
    text = study._commit({"baselines": ["abc1234"], "drift": got})
    assert text.startswith("abc1234 (ran with ") and "recover.distill.alpha=9.0" in text
    assert "compress.methods.old (not in today's params)" in text
    assert f"no compress.methods.{params.study.methods[1]}" in text
    seed1 = next(e for e in study.experiments(params) if e.axis == "cells" and e.seed == 1)
    then = params.model_dump(by_alias=True, mode="json")  # seed 0: what the seed-1 run did not run
    assert study.drift(params, seed1, then) == {"recover.train.seed": [0, 1]}
