"""Stage ``bench`` (``cpet bench``): what compression + CPET buys at inference, measured side by side.

Models, for the ``bench.task`` bundles: ``original+pet`` (base + teacher adapter), and per
compression method the bare ``compressed`` model, ``compressed+pet`` and ``compressed+cpet``; each
in PyTorch (deployment form: packed quantized weights, adapters folded or as side paths, see
:mod:`cpet.export.sidepath`) and in ONNX Runtime (``compressed+cpet`` is the ``export`` stage's
model; the others are exported here into ``models/bench/`` and checked against PyTorch). With a
usable GPU (ORT's CUDA provider *and* torch CUDA) ``torch-cuda`` / ``onnxruntime-cuda`` rows are
added; a session that falls back to CPU is an error, never a GPU row.

Batch sizes ``bench.batch_sizes`` at ``bench.seq_len`` tokens, interleaved rounds (:mod:`cpet.bench`).
Writes ``reports/bench.json`` (rows ``variant, compression, runtime, batch, seq_len, p50_ms, p90_ms,
throughput`` (tokens/s at p50), ``bytes`` (model files), ``peak_mem_mb``) and ``reports/bench.md``.
"""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from cpet import io, paths
from cpet.config import Params
from cpet.config.recipes import ORIGINAL
from cpet.stages.export import OUT_DIR as ONNX_DIR
from cpet.stages.export import write_onnx

OUT_DIR = Path("models") / "bench"
REPORT_JSON = Path("reports") / "bench.json"
REPORT_MD = Path("reports") / "bench.md"
SERVE_MEMORY = Path("reports") / "serve_memory.json"

MODEL_FILES = (".onnx", ".onnx_data", ".safetensors")


@dataclass(frozen=True)
class Spec:
    """One benchmarked model: enough to rebuild it in another process."""

    variant: str  # original+pet | compressed | compressed+pet | compressed+cpet
    compression: str  # "none" or a compress.methods name
    runtime: str  # torch | onnxruntime (| torch-cuda | onnxruntime-cuda)
    root: str
    task: str

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.compression}/{self.runtime}"

    @property
    def device(self) -> str:
        return "cuda" if self.runtime.endswith("-cuda") else "cpu"

    def sources(self) -> list[Path]:
        """What PyTorch loads for this model (base folder + adapter or bundle folder)."""
        root = Path(self.root)
        if self.variant == ORIGINAL:
            return [root / paths.BASE, root / paths.teacher_adapter(self.task)]
        base = root / paths.compressed(self.compression)
        if self.variant == "compressed":
            return [base]
        return [base, root / paths.bundle(self.compression, self.task, self.variant)]

    def onnx_dir(self) -> Path:
        root = Path(self.root)
        if self.variant == "compressed+cpet":
            return root / ONNX_DIR / self.compression / self.task
        return root / OUT_DIR / self.variant / self.compression


def model_bytes(paths: list[Path]) -> int:
    """Bytes of the weight files (safetensors / ONNX) under ``paths``: what a deployment ships."""
    return sum(f.stat().st_size for p in paths for f in Path(p).rglob("*") if f.suffix in MODEL_FILES)


def torch_model(spec: Spec):
    """The PyTorch deployment form of ``spec`` (float32, eval)."""
    from cpet.export import deploy_model

    model, records = _peft_model(spec)
    return deploy_model(model, records, "torch")


def runner(spec: Spec, threads: int | None):
    """``(ids, mask) -> logits at the label position`` for ``spec`` on its runtime and device: what
    classification computes, the LM head at each row's last real token only, in both runtimes (a
    lean ONNX graph, ``logits_to_keep`` in PyTorch). ONNX runners are :class:`OnnxLM` objects
    (``.sess`` says which session options they run with)."""

    if spec.runtime.startswith("onnxruntime"):
        from cpet.export.onnx import OnnxLM, session

        return OnnxLM(session(spec.onnx_dir(), spec.device, threads))
    from cpet.lmcls import label_position_logits

    model = torch_model(spec).to(spec.device)
    dev = spec.device
    return lambda ids, mask: label_position_logits(model, {"input_ids": ids.to(dev), "attention_mask": mask.to(dev),
                                                           "use_cache": False})


def _peft_model(spec: Spec):
    """The PyTorch model ``spec`` is exported from (adapters unmerged) and its base's records."""
    from cpet.compress import load_compressed_model
    from cpet.pet import load_adapter, load_bundle

    if spec.variant == ORIGINAL:
        from cpet.stages.common import load_base

        return load_adapter(load_base(Path(spec.root))[0], spec.sources()[1]), None
    cm = load_compressed_model(spec.sources()[0])
    if spec.variant == "compressed":
        return cm.model, cm.records
    return load_bundle(copy.deepcopy(cm.model), spec.sources()[1]), cm.records


def export_missing(specs: list[Spec], tolerance: float, out: Path) -> dict:
    """ONNX models for every spec the export stage does not provide, into ``out`` (atomic), each
    checked against its PyTorch form on one random batch (logits at the label position: the
    graphs are lean like the export stage's, through the same ``write_onnx``)."""
    from transformers import AutoTokenizer

    from cpet.bench import inputs
    from cpet.errors import CpetError
    from cpet.export import torch_last_logits
    from cpet.export.onnx import OnnxLM, session

    done: dict = {}
    wanted = {(s.variant, s.compression): s for s in specs
              if s.runtime == "onnxruntime" and s.variant != "compressed+cpet"}
    with io.atomic_dir(out) as tmp:
        for (variant, compression), spec in wanted.items():
            folder = tmp / variant / compression
            model, records = _peft_model(spec)
            tok = AutoTokenizer.from_pretrained(Path(spec.root) / paths.BASE)
            graph = write_onnx(model, records, tok, folder,
                               {"variant": variant, "compression": compression, "task": spec.task})
            ids, mask = inputs(2, 16, model.config.vocab_size)
            mask[1, 11:] = 0  # one right-padded row: the label position is not always the last column
            batch = {"input_ids": ids, "attention_mask": mask}
            diff = float((OnnxLM(session(folder)).last_logits(batch) - torch_last_logits(model)(batch)).abs().max())
            if diff > tolerance:
                raise CpetError(f"bench: ONNX export of {variant}/{compression} differs from PyTorch by {diff:.3g} "
                                f"(> export.tolerance.max_abs_logit_diff {tolerance})")
            done[f"{variant}/{compression}"] = {**graph, "max_abs_logit_diff": diff}
    return done


def specs_for(params: Params, root: Path, task: str) -> list[Spec]:
    from cpet.export.onnx import cuda_usable

    runtimes = ["torch", "onnxruntime"] + (["torch-cuda", "onnxruntime-cuda"] if cuda_usable() else [])
    models = [(ORIGINAL, "none")]
    for method in params.recover_methods():
        models.append(("compressed", method))
        models += [(v, method) for v in ("compressed+pet", "compressed+cpet") if v in params.recover.variants]
    return [Spec(v, c, rt, str(root), task) for v, c in models for rt in runtimes]


def bench_task(params: Params, root: Path) -> str:
    """``bench.task``, or the first task scored by first token. Every row times one forward pass at
    the label position against lean graphs; a task scored whole (sum/mean) costs a pass over
    prompts x labels and its exported graph has the full head, so its rows would not compare."""
    from cpet.errors import ConfigError
    from cpet.stages.common import load_tokenizer, task_views

    first = [v.name for v in task_views(params, root, load_tokenizer(root)) if v.verbalizer.first_token]
    if params.bench.task is not None and params.bench.task not in first:
        raise ConfigError(f"bench.task: {params.bench.task!r} scores its words whole (not first-token); "
                          "bench times the first-token forward: name a first-token task")
    if not first:
        raise ConfigError("bench.task: no task is scored by first token; bench times the first-token forward")
    return params.bench.task or first[0]


def bench(params: Params, root: str | Path = ".") -> dict:
    import torch

    from cpet.bench import inputs, interleaved, measure_memory
    from cpet.export.onnx import describe_options

    root = Path(root)
    cfg = params.bench
    task = bench_task(params, root)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    specs = specs_for(params, root, task)
    for s in specs:  # every input present and whole before anything is timed or written
        needed = s.sources() + ([s.onnx_dir()] if s.variant == "compressed+cpet" and s.runtime.startswith("onnx") else [])
        for path in needed:
            paths.require(root, path.relative_to(root))
    exported = export_missing(specs, params.export.tolerance.max_abs_logit_diff, root / OUT_DIR)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(root / paths.BASE).vocab_size
    memory, serving = {}, {}
    if cfg.memory:  # before any timing: these processes run two at a time, which memory does not mind
        jobs = {s.name: ("cpet.stages.bench", {**asdict(s), "threads": cfg.threads, "batch": max(cfg.batch_sizes),
                                                "seq_len": cfg.seq_len, "vocab": vocab}) for s in specs}
        jobs |= serving_jobs(params, root, max(cfg.batch_sizes), cfg.seq_len, vocab)
        with ThreadPoolExecutor(max_workers=2) as pool:
            done = dict(zip(jobs, pool.map(lambda job: measure_memory(*job), jobs.values())))
        memory = {s.name: done[s.name] for s in specs}
        serving = serving_summary(params, done)
    rows = []
    for device in dict.fromkeys(s.device for s in specs):
        mine = [s for s in specs if s.device == device]
        runners = {s.name: runner(s, cfg.threads) for s in mine}
        ort_options = {name: describe_options(run.sess.get_session_options())
                       for name, run in runners.items() if hasattr(run, "sess")}  # read back from ORT
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for batch in cfg.batch_sizes:
            ids, mask = inputs(batch, cfg.seq_len, vocab)
            times = interleaved(runners, ids, mask, warmup=cfg.warmup, repeats=cfg.repeats, sync=sync)
            for s in mine:
                t = {k: round(v, 4) for k, v in times[s.name].items()}
                size = model_bytes([s.onnx_dir()] if s.runtime.startswith("onnxruntime") else s.sources())
                rows.append({"variant": s.variant, "compression": s.compression, "runtime": s.runtime,
                             "batch": batch, "seq_len": cfg.seq_len, "p50_ms": t["p50_ms"], "p90_ms": t["p90_ms"],
                             "throughput": round(batch * cfg.seq_len / (t["p50_ms"] / 1000), 1),
                             "bytes": size, "peak_mem_mb": memory.get(s.name, {}).get("peak_mb"),
                             **({"ort_options": ort_options[s.name]} if s.name in ort_options else {})})
                print(f"bench {s.name} batch {batch}: p50 {t['p50_ms']:.1f} ms", flush=True)
        del runners
    io.write_json(root / REPORT_JSON, rows)
    io.write_json(root / SERVE_MEMORY, serving)
    io.write_text(root / REPORT_MD, markdown(rows, task, cfg, exported) + serving_markdown(serving))
    return {"rows": len(rows), "task": task, "exported": list(exported), "serve_memory": serving}


def serving_jobs(params: Params, root: Path, batch: int, seq_len: int, vocab: int) -> dict:
    """Memory jobs per method: one compressed base + every task's bundle (``cpet serve``), and one
    merged model per task; each process runs every task once."""
    out = {}
    for method in params.recover_methods():
        spec = {"root": str(root), "method": method, "tasks": list(params.tasks), "variant": params.serve.variant,
                "batch": batch, "seq_len": seq_len, "vocab": vocab}
        for form in ("shared", "merged"):
            out[f"serve/{method}/{form}"] = ("cpet.serve", {**spec, "form": form})
    return out


def serving_summary(params: Params, done: dict) -> dict:
    out = {}
    for method in params.recover_methods():
        shared, merged = done[f"serve/{method}/shared"], done[f"serve/{method}/merged"]
        out[method] = {"tasks": list(params.tasks), "variant": params.serve.variant, "shared": shared,
                       "merged": merged, "merged_over_shared": round(merged["model_mb"] / shared["model_mb"], 2)
                       if shared["model_mb"] > 0 else None}
    return out


def serving_markdown(serving: dict) -> str:
    if not serving:
        return ""
    out = ["", "## Serving many tasks on one compressed base (`cpet serve`)", "",
           "Resident MB of a fresh process holding the models (model) and its peak during one forward pass "
           "per task (peak). Shared = the compressed base once, in deployment form, plus each task's bundle "
           "as switchable side paths; merged = one standalone model per task with its adapter merged into "
           "float weights (a merged adapter leaves the quantization grid).", "",
           "| compression | tasks | shared model MB | shared peak MB | merged model MB | merged peak MB | "
           "merged / shared |", "|---|---|---|---|---|---|---|"]
    for method, m in serving.items():
        out.append(f"| {method} | {len(m['tasks'])} | {m['shared']['model_mb']} | {m['shared']['peak_mb']} | "
                   f"{m['merged']['model_mb']} | {m['merged']['peak_mb']} | {m['merged_over_shared']}x |")
    return "\n".join(out) + "\n"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def markdown(rows: list[dict], task: str, cfg, exported: dict) -> str:
    """Tables per batch size with speed and size ratios to ``original+pet``, and CPET's module cost."""
    out = ["# Inference benchmark", "",
           f"Bundles of task `{task}`; random token ids, {cfg.seq_len} tokens per sequence; p50/p90 of "
           f"{cfg.repeats} interleaved rounds after {cfg.warmup} warm-up round(s); threads: "
           f"{cfg.threads or 'all cores'}. Throughput = tokens/s at p50. Speedup = p50 of `original+pet` "
           "(same runtime and batch) / p50 of the row; `vs torch orig` compares with `original+pet` in "
           "PyTorch. Size = weight files on disk; memory = peak resident MB of a fresh process during one "
           f"batch-{max(cfg.batch_sizes)} forward pass (model included). Every model computes the LM head "
           "at the label position only (lean ONNX graphs, `logits_to_keep` in PyTorch)."]
    settings = {json.dumps(r["ort_options"], sort_keys=True) for r in rows if "ort_options" in r}
    if settings:
        out.append("ONNX Runtime session options of every ONNX row (`cpet.export.onnx.session_options`): "
                   + " / ".join(f"`{s}`" for s in sorted(settings)) + ".")
    out.append("")
    key = {(r["variant"], r["compression"], r["runtime"], r["batch"]): r for r in rows}
    for batch in cfg.batch_sizes:
        out += [f"## batch {batch}", "",
                "| variant | compression | runtime | p50 ms | p90 ms | tokens/s | speedup | vs torch orig | "
                "size MB | size ratio | peak MB |", "|" + "---|" * 11]
        for r in (r for r in rows if r["batch"] == batch):
            orig = key.get((ORIGINAL, "none", r["runtime"], batch))
            torch_orig = key.get((ORIGINAL, "none", "torch", batch))
            out.append(
                f"| {r['variant']} | {r['compression']} | {r['runtime']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                f"{r['throughput']:.0f} | {_ratio(orig and orig['p50_ms'], r['p50_ms'])} | "
                f"{_ratio(torch_orig and torch_orig['p50_ms'], r['p50_ms'])} | {r['bytes'] / 1e6:.1f} | "
                f"{_ratio(r['bytes'], orig and orig['bytes'])} | {r['peak_mem_mb'] if r['peak_mem_mb'] is not None else ''} |")
        out.append("")
    out += ["## What CPET's modules cost over the bare compressed model", "",
            "p50 of `compressed+cpet` / p50 of `compressed` (1.00x = free), and the same for `compressed+pet`.", "",
            "| compression | runtime | batch | +pet | +cpet |", "|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] != "compressed":
            continue
        k = (r["compression"], r["runtime"], r["batch"])
        pet, cpet = key.get(("compressed+pet", *k)), key.get(("compressed+cpet", *k))
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {_ratio(pet and pet['p50_ms'], r['p50_ms'])} | "
                   f"{_ratio(cpet and cpet['p50_ms'], r['p50_ms'])} |")
    if exported:
        out += ["", "ONNX models exported for the benchmark (max |logit diff| vs PyTorch on a random batch): "
                + ", ".join(f"{k} {v['max_abs_logit_diff']:.1e}" for k, v in exported.items()) + "."]
    return "\n".join(out) + "\n"


def _memory_runner(raw: dict):
    """One benchmarked model from its :class:`Spec` fields (+ ``threads``), in a memory subprocess."""
    import torch

    if raw.get("threads"):
        torch.set_num_threads(raw["threads"])
    spec = Spec(**{k: raw[k] for k in ("variant", "compression", "runtime", "root", "task")})
    return runner(spec, raw.get("threads"))


if __name__ == "__main__":
    from cpet.bench import memory_main

    memory_main(_memory_runner)
