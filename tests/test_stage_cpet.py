"""teacher -> inherit -> recover -> evaluate end to end on the tiny project."""

import json

import pytest
import torch

from cpet.config import VARIANTS
from cpet.stages import STAGES


@pytest.fixture
def pipeline_root(tiny_project):
    root, params = tiny_project
    for name in ("compress", "teacher", "inherit", "recover"):
        STAGES[name](params, root)
    return root, params


def test_cpet_pipeline_writes_every_variant(pipeline_root):
    root, params = pipeline_root
    metrics = STAGES["evaluate"](params, root)
    rows = json.loads((root / "reports/results.json").read_text())
    assert metrics["rows"] == len(rows) == 1 + 2 * 8  # original + 2 methods x (inherit-only + 7 trained)
    assert {r["variant"] for r in rows} == set(VARIANTS)
    for r in rows:
        assert set(r) == {"task", "compression", "variant", "split", "accuracy", "macro_f1"}
        assert r["split"] == "test" and 0 <= r["accuracy"] <= 1
    md = (root / "reports/results.md").read_text()
    assert "recovery ratio" in md and "| compressed+cpet |" in md and "McNemar p" in md
    assert set(metrics["cpet_vs_pet"]["tiny"]) == {"int8", "struct"}
    for test in metrics["cpet_vs_pet"]["tiny"].values():  # both counts are out of the test split's rows
        n_test = len((root / "data/processed/tiny/test.jsonl").read_text().splitlines())
        assert test["only_first_right"] + test["only_second_right"] <= n_test and 0 < test["p_value"] <= 1
    assert (root / "reports/results.png").stat().st_size > 1000
    teacher = json.loads((root / "reports/teacher/tiny.json").read_text())
    assert teacher["train"]["steps"] == 6 and teacher["train"]["best_step"] in (3, 6)

    # int8 barely changes weights, so the inherited adapter predicts like the teacher
    from cpet.pet import load_adapter, load_bundle, recovery_layers
    from cpet.stages.common import load_base, load_compressed_base

    teacher = load_adapter(load_base(root)[0], root / "models/teacher/tiny/adapter")
    student = load_adapter(load_compressed_base(root, "int8")[0], root / "models/inherit/int8/tiny")
    ids = torch.tensor([[5, 6, 7, 8, 9]], device=next(teacher.parameters()).device)  # CPET_DEVICE=cuda too
    torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=5e-2, rtol=0)

    # the CPET bundle reloads in one call, recovery modules included and trained
    bundle = root / "models/recover/struct/tiny/compressed+cpet"
    model = load_bundle(load_compressed_base(root, "struct")[0], bundle)
    assert recovery_layers(model)
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "rec_B" in n)


def _files(folder):
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*"))
            if f.is_file() and f.suffix == ".safetensors"}


def test_a_rerun_from_scratch_trains_the_same_adapters(tiny_project):
    """Seeded end to end: init of LoRA / recovery modules, data order, steps. Whatever the RNG
    state before the stage, deleting the checkpoints and rerunning gives identical weights."""
    import shutil

    root, params = tiny_project
    STAGES["compress"](params, root, method="struct")
    STAGES["teacher"](params, root)
    STAGES["inherit"](params, root, method="struct")
    STAGES["recover"](params, root, method="struct")
    teacher, bundles = _files(root / "models/teacher"), _files(root / "models/recover/struct")
    assert teacher and len(bundles) >= 4
    shutil.rmtree(root / params.fetch.cache_dir / "checkpoints")
    torch.manual_seed(12345)  # a different global RNG state than the first run saw
    STAGES["teacher"](params, root)
    STAGES["recover"](params, root, method="struct")
    assert _files(root / "models/teacher") == teacher
    assert _files(root / "models/recover/struct") == bundles


def test_mcnemar_counts_only_disagreements():
    from cpet.stages.evaluate import mcnemar

    gold = [1] * 30
    same = [1] * 20 + [0] * 10
    assert mcnemar(gold, same, same) == {"only_first_right": 0, "only_second_right": 0, "p_value": 1.0}
    better = [1] * 30  # right on the 10 that `same` gets wrong, wrong nowhere else
    out = mcnemar(gold, same, better)
    assert (out["only_first_right"], out["only_second_right"]) == (0, 10)
    assert out["p_value"] == pytest.approx(2 * 0.5**10)  # 10 of 10 coin flips one way, two-sided
    assert mcnemar(gold, better, same)["p_value"] == pytest.approx(out["p_value"])
    mixed = [1] * 15 + [0] * 5 + [1] * 6 + [0] * 4  # vs `same`: 5 lost, 6 gained
    out = mcnemar(gold, same, mixed)
    assert (out["only_first_right"], out["only_second_right"]) == (5, 6) and out["p_value"] == pytest.approx(1.0)


def test_recover_resumes_from_checkpoint(tiny_project):
    """A second recover run finds the finished checkpoints and does not train again."""
    root, params = tiny_project
    for name in ("compress", "teacher", "inherit"):
        STAGES[name](params, root, method="int8") if name != "teacher" else STAGES[name](params, root)
    first = STAGES["recover"](params, root, method="int8")["int8"]["tiny"]["compressed+cpet"]
    again = STAGES["recover"](params, root, method="int8")["int8"]["tiny"]["compressed+cpet"]
    assert first["resumed_from"] == 0 and again["resumed_from"] == 6
    assert again["best_validation_accuracy"] == first["best_validation_accuracy"]


def _with(params, **sections):
    from cpet.config import parse_params

    raw = params.model_dump(by_alias=True, mode="json")
    for dotted, value in sections.items():
        *path, last = dotted.split("__")
        node = raw
        for part in path:
            node = node[part]
        node[last] = value
    return parse_params(raw)


def test_changed_inputs_never_resume_a_stale_checkpoint(tiny_project):
    """Issue 11: a finished checkpoint used to be resumed after the task's template (or the
    compressed model, or the teacher adapter) changed, saving weights trained on old inputs."""
    root, params = tiny_project
    STAGES["compress"](params, root, method="int8")
    first = STAGES["teacher"](params, root)["tiny"]["train"]
    adapter = _files(root / "models/teacher")
    assert STAGES["teacher"](params, root)["tiny"]["train"]["resumed_from"] == 6  # same inputs: resumes

    changed = _with(params, tasks__tiny__template="Review : {text} Verdict :")
    again = STAGES["teacher"](changed, root)["tiny"]["train"]
    assert again["resumed_from"] == 0 and _files(root / "models/teacher") != adapter
    runs = list((root / params.fetch.cache_dir / "checkpoints/teacher/tiny").iterdir())
    assert len(runs) == 1  # the stale checkpoint is gone
    assert first["resumed_from"] == 0

    # recover: a recompressed base (other settings, same method name) trains afresh too
    STAGES["inherit"](changed, root, method="int8")
    STAGES["recover"](changed, root, method="int8")
    regrouped = _with(changed, compress__methods={"int8": {"method": "int8", "exclude": ["*.o_proj"]},
                                                  "struct": params.compress.methods["struct"]})
    STAGES["compress"](regrouped, root, method="int8")
    STAGES["inherit"](regrouped, root, method="int8")
    out = STAGES["recover"](regrouped, root, method="int8")["int8"]["tiny"]
    assert all(v["resumed_from"] == 0 for v in out.values())


def test_recover_runs_side_by_side_in_threads_equal_sequential_runs(tiny_project):
    """The Prefect thread runner trains fan-out items at once in one process; the global torch
    RNG (dropout, init) and transformers' init patches are shared state. Issue 11: the trainer
    reseeded the global RNG outside any lock, so thread runs could differ from `dvc repro`."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    root, params = tiny_project
    params = _with(params, teacher__lora__dropout=0.1, recover__variants=["compressed+pet", "compressed+cpet"],
                   compress__methods={"int8": {"method": "int8"}, "int8x": {"method": "int8", "exclude": ["*.o_proj"]}})
    methods = ["int8", "int8x"]
    for m in methods:
        STAGES["compress"](params, root, method=m)
    STAGES["teacher"](params, root)
    for m in methods:
        STAGES["inherit"](params, root, method=m)
        STAGES["recover"](params, root, method=m)
    sequential = {m: _files(root / "models/recover" / m) for m in methods}
    shutil.rmtree(root / params.fetch.cache_dir / "checkpoints")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda m: STAGES["recover"](params, root, method=m), methods))
    assert {m: _files(root / "models/recover" / m) for m in methods} == sequential


def test_every_recipe_row_trains_what_its_name_says(pipeline_root):
    """Issue 13: the paper's ablations (inherit+recover without distillation, inherit+distill
    without recovery, ...) are rows of one Recipe table, each trained by the same trainer."""
    from cpet.config.recipes import RECIPES

    root, params = pipeline_root
    for variant in params.recover.variants:
        recipe = RECIPES[variant]
        bundle = root / "models/recover/int8/tiny" / variant
        assert (bundle / "recovery.safetensors").is_file() == recipe.recovery, variant
        curve = json.loads((root / "reports/curves/recover/int8/tiny" / f"{variant}.json").read_text())
        assert ("kl" in curve[0] and "mse" in curve[0]) == recipe.distill, variant
