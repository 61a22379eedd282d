"""cpet serve: a real HTTP round trip on loopback against the CLI, good and bad requests."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cpet import data, io
from cpet.config import parse_params
from cpet.stages import STAGES

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_tasks(tiny_project):
    """The tiny project with a second task (same texts; two-token words sharing their first token,
    scored whole: sum), one int8 base and its compressed+cpet bundles, params.yaml written."""
    root, params = tiny_project
    src = data.task_dir(root, "tiny")
    dst = data.task_dir(root, "swapped")  # same texts, other (two-token) label words: a second real task
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    io.write_json(dst / "manifest.json", {"task": "swapped", "labels": ["neg", "pos"]})
    raw = params.model_dump(by_alias=True)
    raw["tasks"]["swapped"] = {**raw["tasks"]["tiny"], "verbalizer": {"neg": "a yes", "pos": "a no"}, "scoring": "auto"}
    raw["compress"]["methods"] = {"int8": raw["compress"]["methods"]["int8"]}
    raw["recover"]["variants"] = ["compressed+cpet"]
    raw["serve"].update(max_texts=4, max_chars=80)
    params = parse_params(raw)
    for name in ("validate", "compress", "teacher", "recover"):
        STAGES[name](params, root)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root, params


@pytest.fixture
def server(tiny_project):
    """`cpet serve` in a subprocess on a free loopback port, over two tasks on one int8 base."""
    root, _ = two_tasks(tiny_project)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "cpet.cli", "--root", str(root), "--params",
                             str(root / "params.yaml"), "serve", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            if proc.poll() is not None:
                pytest.fail(f"cpet serve exited: {proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("cpet serve did not come up in 60 s")
        yield url, root
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_round_trip_good_and_bad_requests(server):
    url, root = server
    health = httpx.get(f"{url}/health").json()
    assert health == {"status": "ok", "compression": "int8", "tasks": ["tiny", "swapped"]}

    texts = ["good great movie 1", "awful dull plot 2"]
    one = httpx.post(f"{url}/predict", json={"task": "tiny", "texts": texts})
    assert one.status_code == 200
    results = one.json()["results"]
    assert [r["task"] for r in results] == ["tiny", "tiny"]
    for r in results:
        assert r["label"] in ("neg", "pos") and set(r["scores"]) == {"neg", "pos"}
        assert abs(sum(r["scores"].values()) - 1) < 1e-4
        assert r["label"] == max(r["scores"], key=r["scores"].get)

    # a mixed batch: grouped by task inside, answered in input order, each with its own adapter
    items = [{"task": "swapped", "text": texts[0]}, {"task": "tiny", "text": texts[0]},
             {"task": "swapped", "text": texts[1]}, {"task": "tiny", "text": texts[1]}]
    mixed = httpx.post(f"{url}/predict", json={"items": items})
    assert mixed.status_code == 200
    got = mixed.json()["results"]
    assert [r["task"] for r in got] == [i["task"] for i in items]
    assert got[1] == results[0] and got[3] == results[1]  # same text + task = same answer in any batch
    alone = httpx.post(f"{url}/predict", json={"task": "swapped", "texts": texts}).json()["results"]
    assert [got[0], got[2]] == alone
    # the multi-token task answers what its bundle predicts in process (whole-word log-probabilities)
    from transformers import AutoTokenizer

    from cpet.lmcls import Verbalizer, predict
    from cpet.pet import load_bundle
    from cpet.stages.common import load_compressed_base

    tok = AutoTokenizer.from_pretrained(root / "models/base")
    verbalizer = Verbalizer.build(tok, {"neg": "a yes", "pos": "a no"})
    assert verbalizer.scoring == "sum" and verbalizer.token_ids[0] == verbalizer.token_ids[1]
    bundle = load_bundle(load_compressed_base(root, "int8")[0], root / "models/recover/int8/swapped/compressed+cpet")
    idx, scores = predict(bundle, tok, texts, "Review : {text} Sentiment :", verbalizer, max_length=112)
    assert [r["label"] for r in alone] == [["neg", "pos"][i] for i in idx]
    for r, p in zip(alone, scores.softmax(1)):
        assert r["scores"] == pytest.approx({"neg": float(p[0]), "pos": float(p[1])}, abs=1e-3)

    bad = {
        "unknown task": ({"task": "nope", "texts": ["good"]}, 404, "unknown task 'nope'"),
        "unknown task in items": ({"items": [{"task": "tiny", "text": "a"}, {"task": "x", "text": "b"}]}, 404,
                                  "unknown task 'x'"),
        "empty list": ({"task": "tiny", "texts": []}, 422, "no texts"),
        "blank text": ({"task": "tiny", "texts": ["  "]}, 422, "text 0 is empty"),
        "too many": ({"task": "tiny", "texts": ["good"] * 5}, 422, "at most 4"),
        "too long": ({"task": "tiny", "texts": ["good " * 40]}, 422, "at most 80"),
        "both forms": ({"task": "tiny", "texts": ["a"], "items": []}, 422, "not both"),
        "wrong type": ({"task": "tiny", "texts": "good"}, 422, ""),
        "unknown key": ({"task": "tiny", "texts": ["a"], "temperature": 2}, 422, ""),
    }
    for case, (body, status, message) in bad.items():
        r = httpx.post(f"{url}/predict", json=body)
        assert r.status_code == status, case
        assert message in json.dumps(r.json()["detail"]), case
    r = httpx.post(f"{url}/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    # still serving, and still right, after every bad request
    assert httpx.post(f"{url}/predict", json={"task": "tiny", "texts": texts}).json()["results"] == results


def test_serving_some_tasks_reads_only_their_data(tiny_project):
    """`--tasks tiny` loads tiny's bundle and data alone: another task's data may be gone."""
    from cpet.errors import CpetError
    from cpet.serve import load_predictor

    root, params = two_tasks(tiny_project)
    for f in data.task_dir(root, "swapped").iterdir():
        f.unlink()
    predictor = load_predictor(params, root, "int8", ["tiny"])
    assert list(predictor.tasks) == ["tiny"]
    with pytest.raises(CpetError, match=r"processed/swapped/train.jsonl: missing since validation"):
        load_predictor(params, root, "int8")
    with pytest.raises(CpetError, match=r"--tasks: 'nope' is not a configured task \(tiny, swapped\)"):
        load_predictor(params, root, "int8", ["nope"])
