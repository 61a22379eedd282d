"""Where int8 speed comes from in ONNX Runtime, and where an exported model spends its time.

::

    PYTHONPATH=src python -m cpet.export.int8bench gemm [--m 64 --k 576 --n 1536 --rounds 50]
    PYTHONPATH=src python -m cpet.export.int8bench profile models/onnx/<method>/<task> [--batch 1 --seq-len 64]
    PYTHONPATH=src python -m cpet.export.int8bench models --base models/base models/compressed/<m> ... [--keep DIR]

``gemm``: one ``[m, k] x [k, n]`` product as single-layer ORT graphs, interleaved rounds, p50 in ms
and the speedup over fp32 ``MatMul``: ``per-token`` is the graph :mod:`cpet.export.int8` exports
(row absmax scales, ``Round``, uint8 with zero point 128, ``MatMulInteger`` u8 x s8, rescale);
``static`` a calibrated per-tensor scale (``QuantizeLinear``); ``dynamic-tensor`` ORT's own dynamic
quantization (``DynamicQuantizeLinear``, one scale per tensor: a row's result depends on the rest of
the batch); ``s8s8`` the integer product with int8 activations. Why w8a8 uses per-token u8 x s8.

``models``: the bare base and compressed model folders as lean ONNX graphs (``export_onnx`` of the
deployment form), timed in interleaved rounds at batch 1 and 16 x ``--seq-len``: p50 and the
speedup over the base, e.g. per-token vs static activation scales on the same method.

``profile``: ORT's profiler over ``--rounds`` runs of an exported model on random tokens, time
summed per operator type (which kernels ran, and where the time goes), as a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def _graph(nodes, inits, k: int):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def gemm_graphs(k: int, n: int, seed: int = 0) -> dict[str, bytes]:
    """Single-GEMM graphs computing ``x @ W`` in each arithmetic (module docstring)."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    ws = (np.abs(w).max(0) / 127).astype(np.float32)
    wq = np.clip(np.round(w / ws), -127, 127).astype(np.int8)
    c = lambda v, name, dt=np.float32: nh.from_array(np.array(v, dt), name)  # noqa: E731
    base = [nh.from_array(wq, "Wq"), nh.from_array(ws, "ws"), c(128, "zp", np.uint8)]
    rescale = [h.make_node("Cast", ["yi"], ["yf"], to=T.FLOAT), h.make_node("Mul", ["yf", "ws"], ["y"])]
    per_token = [
        h.make_node("Abs", ["x"], ["ax"]), h.make_node("ReduceMax", ["ax", "axes"], ["am"], keepdims=1),
        h.make_node("Max", ["am", "eps"], ["am2"]), h.make_node("Div", ["am2", "c127"], ["s"]),
        h.make_node("Div", ["x", "s"], ["xs"]), h.make_node("Round", ["xs"], ["xr"]),
        h.make_node("Add", ["xr", "c128"], ["xa"]), h.make_node("Cast", ["xa"], ["xu"], to=T.UINT8),
        h.make_node("MatMulInteger", ["xu", "Wq", "zp"], ["yi"]), h.make_node("Cast", ["yi"], ["yf"], to=T.FLOAT),
        h.make_node("Mul", ["yf", "s"], ["y1"]), h.make_node("Mul", ["y1", "ws"], ["y"])]
    return {
        "fp32": _graph([h.make_node("MatMul", ["x", "W"], ["y"])], [nh.from_array(w, "W")], k),
        "per-token": _graph(per_token, base + [c([-1], "axes", np.int64), c(1e-8, "eps"), c(127, "c127"),
                                               c(128, "c128")], k),
        "static": _graph([h.make_node("QuantizeLinear", ["x", "sx", "zp"], ["xu"]),
                          h.make_node("MatMulInteger", ["xu", "Wq", "zp"], ["yi"]), *rescale],
                         base + [c(0.05, "sx")], k),
        "dynamic-tensor": _graph([h.make_node("DynamicQuantizeLinear", ["x"], ["xu", "xs", "xz"]),
                                  h.make_node("MatMulInteger", ["xu", "Wq", "xz"], ["yi"]),
                                  h.make_node("Cast", ["yi"], ["yf"], to=T.FLOAT),
                                  h.make_node("Mul", ["yf", "ws"], ["y1"]), h.make_node("Mul", ["y1", "xs"], ["y"])],
                                 base, k),
        "s8s8": _graph([h.make_node("Cast", ["x"], ["xi"], to=T.INT8),
                        h.make_node("MatMulInteger", ["xi", "Wq"], ["yi"]), *rescale], base, k),
    }


def gemm(m: int, k: int, n: int, rounds: int, threads: int) -> dict:
    import onnxruntime as ort

    from cpet.export.onnx import session_options

    from cpet.export.headbench import measure

    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    sessions = {name: ort.InferenceSession(g, session_options(threads), providers=["CPUExecutionProvider"])
                for name, g in gemm_graphs(k, n).items()}
    runs = {name: (lambda _ids, _mask, s=sess: s.run(None, {"x": x})) for name, sess in sessions.items()}
    times = measure(runs, None, None, rounds, warmup=3)
    p50 = {name: statistics.median(v) for name, v in times.items()}
    return {"shape": [m, k, n], "rounds": rounds, "p50_ms": {k_: round(v, 3) for k_, v in p50.items()},
            "speedup_over_fp32": {k_: round(p50["fp32"] / v, 2) for k_, v in p50.items()}}


def profile(folder: str | Path, batch: int, seq_len: int, rounds: int, threads: int) -> dict:
    """Milliseconds per run summed per operator type, from ORT's profiler (largest first)."""
    import onnxruntime as ort

    from cpet.bench import inputs
    from cpet.export.onnx import OnnxLM, session_options

    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(str(Path(folder) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    lm = OnnxLM(sess)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    ids, mask = inputs(batch, seq_len, vocab)
    for _ in range(rounds):
        lm(ids, mask)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    runs = 0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1000
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs += 1
    total = sum(per_op.values())
    rows = sorted(((op, ms / max(runs, 1)) for op, ms in per_op.items()), key=lambda r: -r[1])
    return {"folder": str(folder), "batch": batch, "seq_len": seq_len, "runs": runs,
            "kernel_ms_per_run": round(total / max(runs, 1), 2),
            "ops": {op: {"ms": round(ms, 3), "share": round(ms * max(runs, 1) / total, 3)} for op, ms in rows}}


def models(base: str, folders: list[str], seq_len: int, rounds: int, threads: int, keep: str | None) -> dict:
    """Lean-graph ORT p50 of the base and each compressed folder, interleaved; speedups over the base."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpet.bench import inputs
    from cpet.compress import load_compressed_model
    from cpet.export import deploy_model
    from cpet.export.headbench import measure
    from cpet.export.onnx import OnnxLM, export_onnx, session
    from cpet.stages.export import quantized_linears

    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="int8bench-"))
    sessions = {}
    for name, src in [("base", base)] + [(Path(f).name, f) for f in folders]:
        out = work / name
        if not (out / "model.onnx").is_file():
            if name == "base":
                model, records = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), None
            else:
                cm = load_compressed_model(src)
                model, records = cm.model, cm.records
            export_onnx(deploy_model(model, records, "onnx"), out, expect_nbits=quantized_linears(records),
                        expect_int8=quantized_linears(records, act=True))
        sessions[name] = OnnxLM(session(out, threads=threads))
    vocab = json.loads((work / "base" / "config.json").read_text())["vocab_size"]
    result: dict = {"seq_len": seq_len, "folders": {"base": base, **{Path(f).name: f for f in folders}}}
    for batch, n in ((1, rounds), (16, max(rounds // 4, 3))):
        ids, mask = inputs(batch, seq_len, vocab)
        p50 = {k: statistics.median(v) for k, v in measure(sessions, ids, mask, n).items()}
        result[f"batch {batch}"] = {k: {"p50_ms": round(v, 1), "speedup": round(p50["base"] / v, 2)}
                                    for k, v in p50.items()}
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gemm", help="one GEMM in each int8 arithmetic vs fp32")
    g.add_argument("--m", type=int, default=64)
    g.add_argument("--k", type=int, default=576)
    g.add_argument("--n", type=int, default=1536)
    g.add_argument("--rounds", type=int, default=50)
    g.add_argument("--threads", type=int, default=0)
    p = sub.add_parser("profile", help="ORT profile of an exported model, time per operator type")
    p.add_argument("folder")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    m = sub.add_parser("models", help="bare base vs compressed folders as lean ONNX graphs, interleaved")
    m.add_argument("folders", nargs="+", help="compressed model folders (models/compressed/<m>)")
    m.add_argument("--base", default="models/base")
    m.add_argument("--seq-len", type=int, default=64)
    m.add_argument("--rounds", type=int, default=30, help="batch 1 rounds (batch 16: a quarter)")
    m.add_argument("--threads", type=int, default=0)
    m.add_argument("--keep", default=None, help="export into this folder (and reuse it)")
    args = ap.parse_args(argv)
    if args.command == "models":
        out = models(args.base, args.folders, args.seq_len, args.rounds, args.threads, args.keep)
    elif args.command == "gemm":
        out = gemm(args.m, args.k, args.n, args.rounds, args.threads)
    else:
        out = profile(args.folder, args.batch, args.seq_len, args.rounds, args.threads)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
