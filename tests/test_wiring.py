"""dvc.yaml and the Prefect flow drive the same stage functions."""

from pathlib import Path

import yaml

from cpet.stages import ORDER, STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_every_dvc_stage_maps_to_a_stage_function():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert tuple(stages) == ORDER
    outs = {o if isinstance(o, str) else next(iter(o)) for b in stages.values() for o in b.get("outs", [])}
    for name, body in stages.items():
        assert body["cmd"] == f"cpet {name}"
        assert callable(STAGES[name])
        for dep in body.get("deps", []):
            assert dep in outs or (ROOT / dep).exists(), f"{name}: dep {dep} does not exist"
        for section in body.get("params", []):
            assert section in yaml.safe_load((ROOT / "params.yaml").read_text()), section


def test_flow_runs_the_same_stage_functions():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline", ROOT / "flows" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.STAGES is STAGES and mod.ORDER == ORDER
