"""cpet bench on the tiny project: well-formed rows for every variant x runtime x batch."""

import json

import pytest

from cpet.config import parse_params
from cpet.stages import STAGES

KEYS = {"variant", "compression", "runtime", "batch", "seq_len", "p50_ms", "p90_ms", "throughput", "bytes"}


def test_bench_rows_are_well_formed(tiny_project):
    root, params = tiny_project
    raw = params.model_dump(by_alias=True)
    raw["compress"]["methods"] = {"int8": raw["compress"]["methods"]["int8"]}  # one method, one
    raw["recover"]["variants"] = ["compressed+cpet"]                            # variant: a short test
    raw["bench"].update(batch_sizes=[1, 4], seq_len=8, warmup=1, repeats=3, threads=1, memory=True)
    params = parse_params(raw)
    for name in ("compress", "teacher", "recover", "export"):
        STAGES[name](params, root)
    metrics = STAGES["bench"](params, root)

    rows = json.loads((root / "reports/bench.json").read_text())
    models = {("original+pet", "none"), ("compressed", "int8"), ("compressed+cpet", "int8")}
    assert metrics["rows"] == len(rows) == len(models) * 2 * 2  # x runtimes x batch sizes (no GPU here)
    assert {(r["variant"], r["compression"]) for r in rows} == models
    assert {r["runtime"] for r in rows} == {"torch", "onnxruntime"}  # a CPU host never reports GPU rows
    for r in rows:
        assert KEYS <= set(r)
        assert r["seq_len"] == 8 and r["batch"] in (1, 4)
        assert 0 < r["p50_ms"] <= r["p90_ms"]
        assert abs(r["throughput"] - r["batch"] * 8 / (r["p50_ms"] / 1000)) <= 0.1
        assert r["bytes"] > 0 and r["peak_mem_mb"] > 0
    size = {(r["variant"], r["compression"], r["runtime"]): r["bytes"] for r in rows}
    # int8 weights: the ONNX model (MatMulNBits) is smaller than the float original's
    assert size[("compressed", "int8", "onnxruntime")] < size[("original+pet", "none", "onnxruntime")]
    md = (root / "reports/bench.md").read_text()
    assert "## batch 1" in md and "## batch 4" in md and "| compressed+cpet | int8 | onnxruntime |" in md
    assert "What CPET's modules cost" in md
    assert (root / "models/bench/original+pet/none/model.onnx").is_file()
    # like with like: every ONNX row ran with the same session options (read back from ORT) on a
    # lean graph (LM head at the label position only), original+pet included
    from cpet.export.onnx import OnnxLM, describe_options, session, session_options

    options = [r["ort_options"] for r in rows if r["runtime"] == "onnxruntime"]
    assert len(options) == 3 * 2 and all(o == describe_options(session_options(1)) for o in options)
    assert all("ort_options" not in r for r in rows if r["runtime"] == "torch")
    assert "ONNX Runtime session options of every ONNX row" in md
    for folder in ("models/bench/original+pet/none", "models/bench/compressed/int8", "models/onnx/int8/tiny"):
        lm = OnnxLM(session(root / folder))
        assert lm.lean and lm.sess.get_outputs()[0].shape[1] == 1
    serving = json.loads((root / "reports/serve_memory.json").read_text())["int8"]
    assert serving["tasks"] == ["tiny"] and serving["shared"]["model_mb"] > 0 and serving["merged"]["model_mb"] > 0
    assert "Serving many tasks on one compressed base" in md


def test_bench_times_a_first_token_task_only(tiny_project):
    """Every bench row times one pass at the label position on lean graphs; a task scored whole
    (its export has the full head) is not silently timed against them."""
    from cpet.config import parse_params
    from cpet.errors import ConfigError
    from cpet.stages.bench import bench_task

    root, params = tiny_project
    assert bench_task(params, root) == "tiny"
    raw = params.model_dump(by_alias=True)
    raw["tasks"]["tiny"].update(verbalizer={"neg": "a no", "pos": "a yes"}, scoring="auto")
    with pytest.raises(ConfigError, match="^bench.task: no task is scored by first token"):
        bench_task(parse_params(raw), root)
    raw["bench"]["task"] = "tiny"
    with pytest.raises(ConfigError, match="^bench.task: 'tiny' scores its words whole"):
        bench_task(parse_params(raw), root)
