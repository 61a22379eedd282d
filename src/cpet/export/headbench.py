"""Lean vs full LM head in ONNX Runtime: interleaved p50 ratios (issue 12, "fair, lean graphs").

::

    PYTHONPATH=src python -m cpet.export.headbench [--base models/base] [--methods int3,struct25kv]
        [--batch 1 --seq-len 64 --rounds 30 --threads 0]

Models, with params.yaml's adapter shapes (``teacher.lora``, ``recover.recovery``) and random
non-zero factors (latency does not depend on trained values): ``original+pet`` (base + LoRA) and,
per method of ``compress.methods``, the bare ``compressed`` model and ``compressed+cpet`` (LoRA +
recovery). GPTQ and activation-aware importance are replaced by RTN / magnitude (same shapes and
graph, no calibration data needed). Each is exported twice, the full head (every position) and the
lean one (label position), through :func:`cpet.export.onnx.export_onnx`, and every session gets
:func:`cpet.export.onnx.session_options`; ``compressed+cpet`` also as ``lean-apart``, its side
paths one A and one B GEMM each (``deploy_model(..., share=False)``), to price the shared GEMMs. ``--base`` absent: the tiny 2-layer Llama of the tests.

Prints per model the p50 over rounds (all models run once per round, in turn) and the ratios;
``per-round`` is the median of the per-round ratio, which cancels load bursts on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "rec_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model.eval()


def _rtn(cfg: dict) -> dict:
    """The method's shapes without calibration: GPTQ -> RTN, activation-aware importance -> magnitude."""
    cfg = dict(cfg)
    if cfg.get("algorithm") == "gptq":
        cfg["algorithm"] = "rtn"
    if cfg.get("method") == "structured":
        cfg["importance"] = "magnitude"
    return cfg


def models(params, base: torch.nn.Module, methods: list[str]) -> dict[str, tuple[torch.nn.Module, dict | None]]:
    """``name -> (model, records)`` in the deployment form's input (bundle or bare)."""
    from cpet.compress import compress
    from cpet.pet import attach_lora, attach_recovery

    out = {"original+pet": (_randomize(attach_lora(copy.deepcopy(base), params.teacher.lora), 1), None)}
    for name in methods:
        raw = params.compress.methods[name]
        raw = raw.model_dump(by_alias=True, exclude_none=True) if hasattr(raw, "model_dump") else dict(raw)
        cm = compress(base, _rtn(raw), name=name)
        out[f"compressed/{name}"] = (cm.model, cm.records)
        bundle = attach_lora(attach_recovery(copy.deepcopy(cm.model), params.recover.recovery), params.teacher.lora)
        out[f"compressed+cpet/{name}"] = (_randomize(bundle, 2), cm.records)
    return out


def measure(sessions: dict, ids: torch.Tensor, mask: torch.Tensor, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(warmup + rounds):
        for name, lm in sessions.items():
            t0 = time.perf_counter()
            lm(ids, mask)
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
    return times


def ratio(times: dict, a: str, b: str) -> dict:
    """p50(a) / p50(b), and the median over rounds of a / b in the same round."""
    p50 = statistics.median(times[a]) / statistics.median(times[b])
    per_round = statistics.median(x / y for x, y in zip(times[a], times[b]))
    return {"p50": round(p50, 3), "per_round": round(per_round, 3)}


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    from cpet.bench import inputs
    from cpet.config import load_params
    from cpet.export import deploy_model
    from cpet.export.onnx import (
        OnnxLM,
        describe_options,
        export_onnx,
        session,
        session_options,
    )
    from cpet.stages.export import quantized_linears

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--base", default=None, help="an HF causal LM folder (default: the tests' tiny Llama)")
    ap.add_argument("--methods", default=None, help="comma-separated compress.methods names (default: all)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: every core)")
    ap.add_argument("--keep", default=None, help="export into this folder (and reuse it) instead of a temporary one")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    methods = args.methods.split(",") if args.methods else list(params.compress.methods)
    if args.base:
        base = AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32).eval()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True)).eval()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="headbench-"))
    sessions = {}
    for name, (model, records) in models(params, base, methods).items():
        forms = {"compressed/": ["lean"], "compressed+cpet/": ["full", "lean", "lean-apart"]}
        for form in next((f for k, f in forms.items() if name.startswith(k)), ["full", "lean"]):
            folder = work / name.replace("/", "_") / form
            if not (folder / "model.onnx").is_file():  # "apart": one A and one B GEMM per side path
                export_onnx(deploy_model(model, records, "onnx", share=form != "lean-apart"), folder,
                            expect_nbits=quantized_linears(records),
                            expect_int8=quantized_linears(records, act=True), lean=form != "full")
            sessions[f"{name} {form}"] = OnnxLM(session(folder, threads=args.threads))
        print(f"exported {name}", flush=True)
    ids, mask = inputs(args.batch, args.seq_len, base.config.vocab_size)
    times = measure(sessions, ids, mask, args.rounds)
    result = {"batch": args.batch, "seq_len": args.seq_len, "rounds": args.rounds,
              "ort_options": describe_options(session_options(args.threads)),
              "p50_ms": {k: round(statistics.median(v), 2) for k, v in times.items()}, "ratios": {}}
    for name in ["original+pet", *(f"compressed+cpet/{m}" for m in methods)]:
        result["ratios"][f"{name}: full / lean"] = ratio(times, f"{name} full", f"{name} lean")
    for m in methods:
        for head in ("full", "lean"):
            result["ratios"][f"compressed+cpet/{m} {head}: original+pet {head} / it (speedup)"] = ratio(
                times, f"original+pet {head}", f"compressed+cpet/{m} {head}")
        for form in ("lean", "lean-apart"):
            result["ratios"][f"compressed+cpet/{m} {form} / compressed/{m} lean (side-path cost)"] = ratio(
                times, f"compressed+cpet/{m} {form}", f"compressed/{m} lean")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
