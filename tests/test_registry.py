"""Registry round trip on a real sqlite-backed MLflow: register, gate pass/fail, load by alias, predict."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from cpet.config import parse_params
from cpet.stages import STAGES
from cpet.tracking.gates import check_gates


def test_gates_pass_fail_and_missing_metric():
    gates = {"min_accuracy": 0.8, "max_latency_ms": 100.0, "min_recovery_ratio": None}
    ok = check_gates({"accuracy": 0.85, "latency_ms": 90.0}, gates)
    assert ok.passed and ok.tags() == {"gates": "passed", "gate.min_accuracy": "passed: accuracy 0.85 >= 0.8",
                                       "gate.max_latency_ms": "passed: latency_ms 90 <= 100"}
    bad = check_gates({"accuracy": 0.85, "latency_ms": 120.0}, gates)
    assert not bad.passed and bad.tags()["gate_failed"] == "max_latency_ms"
    assert bad.tags()["gate.max_latency_ms"] == "failed: latency_ms 120 > 100"
    missing = check_gates({"recovery_ratio": None}, {"min_recovery_ratio": 0.0})
    assert not missing.passed and missing.tags()["gate.min_recovery_ratio"] == "failed: recovery_ratio n/a < 0"


def _params(params, task_gates: dict, **track):
    raw = params.model_dump(by_alias=True, mode="json")
    raw["compress"]["methods"] = {"int8": {"method": "int8"}}
    raw["recover"]["variants"] = ["compressed+pet", "compressed+cpet"]
    raw["track"] = {"enabled": True, "tracking_uri": "sqlite:///mlflow.db", "experiment": "cpet", **track}
    raw["register"] = {"variant": "compressed+cpet", "base_gates": {"max_size_ratio": 1.0},
                       "task_gates": task_gates}
    return parse_params(raw), raw


def _cli(root: Path, raw: dict, *args: str) -> int:
    from cpet.cli import main

    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return main(["--root", str(root), "--params", str(root / "params.yaml"), *args])


def test_register_gate_promote_load_and_predict(tiny_project, monkeypatch, capsys):
    import mlflow
    from mlflow import MlflowClient
    from safetensors.torch import load_file, save_file

    from cpet.lmcls import Verbalizer, predict
    from cpet.pet import load_bundle
    from cpet.stages.common import load_compressed_base

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, params = tiny_project
    params, raw = _params(params, {"min_accuracy": 0.0, "min_recovery_ratio": None})
    for name in ("compress", "teacher", "inherit", "recover", "evaluate", "register"):
        STAGES[name](params, root)

    report = json.loads((root / "reports/register.json").read_text())
    assert report["models"]["cpet-base-int8"]["champion"] and report["models"]["cpet-tiny-int8"]["champion"]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    assert str(client.get_model_version_by_alias("cpet-tiny-int8", "champion").version) == "1"
    v1 = client.get_model_version("cpet-tiny-int8", "1")
    assert v1.tags["gates"] == "passed" and float(v1.tags["metric.accuracy"]) == pytest.approx(
        next(r["accuracy"] for r in json.loads((root / "reports/results.json").read_text())
             if r["compression"] == "int8" and r["variant"] == "compressed+cpet"), abs=1e-5)
    # the register stage's run holds the logged models and links to the evaluate run
    (run,) = client.search_runs([client.get_experiment_by_name("cpet").experiment_id],
                                "attributes.run_name = 'register'")
    assert run.data.metrics["models/cpet-tiny-int8/champion"] == 1.0

    # artifacts are safetensors/JSON folders and the model code: nothing pickled, no base copy in a task model
    task_dir = Path(mlflow.artifacts.download_artifacts("models:/cpet-tiny-int8/1"))
    base_dir = Path(mlflow.artifacts.download_artifacts("models:/cpet-base-int8/1"))
    for d in (task_dir, base_dir):
        assert not [p for p in d.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    assert (task_dir / "MLmodel").read_text().count("model_code.py") >= 1
    assert not list(task_dir.rglob("*compressed.safetensors")) and list(base_dir.rglob("compressed.safetensors"))

    # load by alias: the same labels and scores as the bundle in process
    texts = ["good great movie 1", "bad awful plot 2", "the film was nice 3", "dull poor it 4"]
    out = mlflow.pyfunc.load_model("models:/cpet-tiny-int8@champion").predict(texts)
    assert list(out.columns) == ["task", "label", "score", "scores"] and list(out["task"]) == ["tiny"] * 4
    bundle = root / "models/recover/int8/tiny/compressed+cpet"
    model = load_bundle(load_compressed_base(root, "int8")[0], bundle)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "models/base")
    spec = params.tasks["tiny"]
    idx, logits = predict(model, tok, texts, spec.template, Verbalizer.build(tok, spec.verbalizer),
                          max_length=params.evaluate.max_length)
    probs = torch.softmax(logits, 1)
    assert list(out["label"]) == [["neg", "pos"][i] for i in idx]
    for row, p in zip(out["scores"], probs):
        assert row == pytest.approx({"neg": float(p[0]), "pos": float(p[1])}, abs=1e-5)

    # the base model scores a task zero-shot; a DataFrame may name the task per row
    import pandas as pd

    zero = mlflow.pyfunc.load_model("models:/cpet-base-int8@champion").predict(
        pd.DataFrame({"text": texts[:2], "task": ["tiny", "tiny"]}))
    assert set(zero["label"]) <= {"neg", "pos"} and all(abs(sum(x.values()) - 1) < 1e-5 for x in zero["scores"])

    # a new version that fails a gate: no alias, tagged with the gate and values; champion stays v1
    lora = bundle / "adapter/adapter_model.safetensors"
    save_file({k: v * 0.5 for k, v in load_file(str(lora)).items()}, str(lora))
    strict, strict_raw = _params(params, {"min_accuracy": 1.01, "min_recovery_ratio": None})
    STAGES["register"](strict, root)
    v2 = client.get_model_version("cpet-tiny-int8", "2")
    assert v2.tags["gates"] == "failed" and v2.tags["gate_failed"] == "min_accuracy"
    assert v2.tags["gate.min_accuracy"].startswith("failed: accuracy ") and v2.tags["gate.min_accuracy"].endswith("< 1.01")
    assert not v2.aliases
    assert str(client.get_model_version_by_alias("cpet-tiny-int8", "champion").version) == "1"
    assert client.get_model_version("cpet-base-int8", "1").aliases == ["champion"]  # unchanged base reused
    assert len(client.search_model_versions("name = 'cpet-base-int8'")) == 1

    # `cpet promote` applies the same rule: still failing -> exit 1, one line; looser gate -> v2 is champion
    capsys.readouterr()
    assert _cli(root, strict_raw, "promote", "--model", "cpet-tiny-int8", "--version", "2") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cpet-tiny-int8 v2: gate failed: min_accuracy ({v2.tags['gate.min_accuracy']}); champion stays v1"]
    assert _cli(root, raw, "promote", "--model", "cpet-tiny-int8") == 0
    assert str(client.get_model_version_by_alias("cpet-tiny-int8", "champion").version) == "2"
    assert "gate_failed" not in client.get_model_version("cpet-tiny-int8", "2").tags

    # `cpet predict` by alias prints one JSON line per text
    capsys.readouterr()
    assert _cli(root, raw, "predict", "--model", "models:/cpet-tiny-int8@champion", *texts[:2]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["text"] for x in lines] == texts[:2] and all(x["label"] in ("neg", "pos") for x in lines)
    assert all(set(x["scores"]) == {"neg", "pos"} and x["score"] == max(x["scores"].values()) for x in lines)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["register"]["task_gates"].update(min_acc=0.5),
     "params.yaml: register.task_gates: unknown gate 'min_acc'; choose from"),
    (lambda r: r["register"].update(variant="compressed+recover"),
     "params.yaml: <root>: register.variant 'compressed+recover' is not in recover.variants"),
    (lambda r: r["track"].pop("experiment"), "params.yaml: track.experiment: missing"),
])
def test_bad_register_and_track_sections_name_the_key(raw_params, mutate, message):
    from cpet.errors import ConfigError

    mutate(raw_params)
    with pytest.raises(ConfigError) as err:
        parse_params(raw_params)
    assert str(err.value).startswith(message)


def test_pyfunc_scores_multi_token_words_whole(tmp_path):
    """The registered models' pyfunc on a compressed base folder: a task whose words share their
    first token is scored by whole-word log-probabilities (tasks.json ``scoring``), the same numbers
    ``lmcls.predict`` gives; a tasks.json without ``scoring`` (registered before it existed) keeps
    first-token scoring and refuses such words."""
    from mlflow.pyfunc import PythonModelContext
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpet import io
    from cpet.compress import compress, save_compressed
    from cpet.errors import ConfigError
    from cpet.lmcls import Verbalizer, predict
    from cpet.tracking.pyfunc import CpetClassifier
    from tinyproject import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    save_compressed(compress(LlamaForCausalLM(cfg).eval(), {"method": "int8"}, name="int8"), tmp_path / "base")
    words = {"neg": "a yes", "pos": "a no"}
    spec = {"template": "Review : {text} Sentiment :", "verbalizer": words, "scoring": "sum", "max_length": 32}
    io.write_json(tmp_path / "tasks.json", {"t": spec})
    arts = {"tokenizer": str(tmp_path / "tokenizer"), "tasks": str(tmp_path / "tasks.json"),
            "base": str(tmp_path / "base")}
    clf = CpetClassifier()
    clf.load_context(PythonModelContext(arts, None))
    texts = ["good great movie", "bad awful plot", "the film was nice"]
    out = clf.predict(None, texts)
    verbalizer = Verbalizer.build(tok, words, scoring="sum")
    idx, scores = predict(clf.model, tok, texts, spec["template"], verbalizer, max_length=32)
    assert list(out["label"]) == [["neg", "pos"][i] for i in idx]
    for row, p in zip(out["scores"], scores.softmax(1)):
        assert row == pytest.approx({"neg": float(p[0]), "pos": float(p[1])}, abs=1e-6)
    assert len({round(r["neg"], 6) for r in out["scores"]}) == 3  # not a constant tie on the shared token
    io.write_json(tmp_path / "tasks.json", {"t": {k: v for k, v in spec.items() if k != "scoring"}})
    with pytest.raises(ConfigError, match="tasks.t: label words must start with distinct tokens"):
        CpetClassifier().load_context(PythonModelContext(arts, None))
