"""dvc.yaml and the Prefect flow drive the same stage functions."""

from pathlib import Path

import yaml

from cpet.config import load_params
from cpet.stages import ORDER, STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_every_dvc_stage_maps_to_a_stage_function():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert tuple(stages) == ORDER
    bodies = {n: b.get("do", b) for n, b in stages.items()}
    outs = {o if isinstance(o, str) else next(iter(o)) for b in bodies.values() for o in b.get("outs", [])}
    for name, body in bodies.items():
        stage = STAGES[name]
        if "foreach" in stages[name]:
            assert stage.fan_out, f"{name}: dvc foreach but the stage does not fan out"
            assert body["cmd"] == f"cpet {name} --{stage.fan_out} ${{key}}"
            source = {"method": "${compress.methods}", "task": "${tasks}"}[stage.fan_out]
            assert stages[name]["foreach"] == source
        else:
            assert body["cmd"] == f"cpet {name}"
        for dep in body.get("deps", []):
            produced = any(o.split("${key}")[0].rstrip("/").startswith(dep.split("${key}")[0].rstrip("/"))
                           or dep.startswith(o.split("${key}")[0]) for o in outs)
            assert produced or (ROOT / dep).exists(), f"{name}: dep {dep} is neither a file nor an output"
        for key in body.get("params", []):
            node = params
            for part in key.split("."):
                if part == "${key}":
                    part = next(iter(node))
                assert part in node, f"{name}: params key {key} not in params.yaml"
                node = node[part]


def test_fan_out_items_come_from_params():
    params = load_params(ROOT / "params.yaml")
    assert STAGES["compress"].items(params) == list(params.compress.methods)


def test_flow_runs_the_same_stage_functions():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline", ROOT / "flows" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.STAGES is STAGES and mod.ORDER == ORDER


def test_mlflow_lives_only_in_cpet_tracking():
    """The rest of the library never imports mlflow, and importing the stages does not load it."""
    import re
    import subprocess
    import sys

    pattern = re.compile(r"^\s*(import|from)\s+mlflow\b", re.M)
    offenders = [p for p in (ROOT / "src/cpet").rglob("*.py")
                 if "tracking" not in p.relative_to(ROOT / "src/cpet").parts and pattern.search(p.read_text())]
    assert offenders == []
    code = "import sys, cpet.cli, cpet.stages, cpet.tracking; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


import pytest  # noqa: E402


@pytest.mark.parametrize("stage", [s for s in ORDER if STAGES[s].fan_out])
def test_unknown_item_is_refused_naming_the_known_ones(stage, tmp_path, capsys):
    """`cpet recover --method typo` used to print {} and exit 0."""
    from cpet.cli import main

    option = STAGES[stage].fan_out
    code = main(["--params", str(ROOT / "params.yaml"), "--root", str(tmp_path), stage, f"--{option}", "typo"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"no {option} named 'typo'" in err and "configured:" in err
    assert not any(tmp_path.iterdir())


def test_dvc_code_deps_cover_every_module_each_stage_imports():
    """Issue 11: no stage listed stages/common.py or lmcls.py, so a prompt-encoding change left
    `dvc status` clean. Deps are derived from imports; `cpet stage-deps --write` syncs dvc.yaml."""
    from cpet.stages.codedeps import stage_files, sync_dvc_yaml

    assert sync_dvc_yaml(ROOT / "dvc.yaml") == {}, "run `cpet stage-deps --write`"
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, entry in stages.items():
        deps = [Path(d) for d in entry.get("do", entry)["deps"]]
        for f in stage_files(name):
            assert any(f == d or d in f.parents for d in deps), f"{name}: {f} not in dvc.yaml deps"
    assert Path("src/cpet/stages/common.py") in stage_files("teacher")
    assert Path("src/cpet/lmcls.py") in stage_files("evaluate")
    assert {Path("src/cpet/serve.py"), Path("src/cpet/bench.py")} <= stage_files("bench")


def test_code_deps_follow_lazy_imports_and_drift_is_reported(tmp_path):
    import shutil

    from cpet.stages.codedeps import closure, sync_dvc_yaml

    assert "cpet.pet.bundle" in closure("cpet.stages.recover")  # imported inside a function
    assert "cpet.stages.bench" not in closure("cpet.stages.teacher")  # the registry is not followed
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    text = (tmp_path / "dvc.yaml").read_text().replace("        - src/cpet/lmcls.py\n", "", 1)
    (tmp_path / "dvc.yaml").write_text(text)
    drift = sync_dvc_yaml(tmp_path / "dvc.yaml")
    assert drift and all("src/cpet/lmcls.py" in derived for _, derived in drift.values())
    sync_dvc_yaml(tmp_path / "dvc.yaml", write=True)
    assert sync_dvc_yaml(tmp_path / "dvc.yaml") == {}
