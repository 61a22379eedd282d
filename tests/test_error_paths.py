"""Error paths end in one line naming the bad thing (and a non-zero exit), not a traceback."""

from __future__ import annotations

import pytest
import yaml

from cpet.config import parse_params
from cpet.errors import CpetError


# --- a prepared split with bytes that are not UTF-8 ------------------------------------------

def test_cli_validate_names_task_split_and_line_of_non_utf8_bytes(raw_params, tiny_task, tmp_path, capsys):
    from cpet.cli import main

    raw_params["tasks"] = {"tiny": {"source": "topic", "template": "{text} =",
                                    "verbalizer": {"neg": " no", "pos": " yes"}, "scoring": "auto"}}
    root = tiny_task()
    split = root / "data/processed/tiny/validation.jsonl"
    lines = split.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"example", b"ex\xffample")  # one latin-1-ish byte on line 3
    split.write_bytes(b"".join(lines))
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(parse_params(raw_params).model_dump(by_alias=True)))
    assert main(["--params", str(p), "--root", str(root), "validate"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: tiny/validation: ") and err[0].endswith(
        "validation.jsonl:3: not valid UTF-8 (byte 0xff at column 27)"), err[0]


# --- serve: only an unknown task is a 404 ------------------------------------------------------

class FailingPredictor:
    """Stands in for cpet.serve.Predictor: a fixed task list and a prediction that raises."""

    tasks = {"tiny": None}

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __call__(self, items):
        raise self.error


@pytest.mark.parametrize("error, detail", [
    (KeyError("input_ids"), "prediction failed: KeyError: 'input_ids'"),
    (RuntimeError("shape mismatch\nat layer 3"), "prediction failed: RuntimeError: shape mismatch"),
])
def test_serve_internal_error_is_500_with_message_not_404(error, detail):
    from fastapi.testclient import TestClient

    from cpet.serve import create_app

    client = TestClient(create_app(FailingPredictor(error), max_texts=4, max_chars=80),
                        raise_server_exceptions=False)
    r = client.post("/predict", json={"task": "tiny", "texts": ["good"]})
    assert (r.status_code, r.json()) == (500, {"detail": detail})
    assert client.get("/health").status_code == 200  # still serving


def test_serve_unknown_task_is_404_and_bad_bodies_are_4xx():
    from fastapi.testclient import TestClient

    from cpet.serve import Predictor, create_app

    predictor = Predictor(model=None, tokenizer=None, tasks={"tiny": None, "other": None},
                          max_length=8, batch_size=1)
    client = TestClient(create_app(predictor, max_texts=4, max_chars=80), raise_server_exceptions=False)
    r = client.post("/predict", json={"items": [{"task": "tiny", "text": "a"}, {"task": "nope", "text": "b"}]})
    assert (r.status_code, r.json()) == (404, {"detail": "unknown task 'nope'; served: tiny, other"})
    for body in (b"{not json", b"[]", b'{"task": "tiny", "texts": [1, 2]}', b'{"task": 3, "texts": ["a"]}'):
        r = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, body


# --- bench: a failed memory subprocess -------------------------------------------------------

def test_failed_memory_subprocess_is_one_line_with_its_last_stderr_line():
    from cpet.bench import measure_memory

    with pytest.raises(CpetError) as err:
        measure_memory("cpet.no_such_module", {"name": "int8 shared"})
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("memory measurement of int8 shared (python -m cpet.no_such_module) failed "
                          "with exit code 1: ")
    assert msg.endswith("No module named cpet.no_such_module")


# --- tracking: only "no such alias" means "no champion" --------------------------------------

class AliasClient:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def get_model_version_by_alias(self, model, alias):
        raise self.error


def test_champion_lookup_distinguishes_no_alias_from_a_failure():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

    from cpet.tracking.commands import champion_version

    for code in (INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST):
        missing = MlflowException("Registered model alias champion not found.", error_code=code)
        assert champion_version(AliasClient(missing), "m") is None
    broken = MlflowException("database is locked\nmore", error_code=INTERNAL_ERROR)
    with pytest.raises(CpetError, match=r"^m: looking up its 'champion' alias failed: database is locked$"):
        champion_version(AliasClient(broken), "m")
    with pytest.raises(ConnectionError):  # not an mlflow answer at all: not swallowed either
        champion_version(AliasClient(ConnectionError("refused")), "m")


def test_real_registry_without_champion_answers_none(tmp_path):
    from mlflow import MlflowClient

    from cpet.tracking.commands import champion_version

    client = MlflowClient(f"sqlite:///{tmp_path / 'r.db'}")
    client.create_registered_model("m")
    assert champion_version(client, "m") is None
