"""Stage ``compress``: one compressed model per configured method, with its measurements.

Outputs per method ``<name>``: ``models/compressed/<name>/`` (safetensors + config +
``manifest.json``, see :mod:`cpet.compress`) and ``reports/compress/<name>.json``: size ratio,
sparsity, validation perplexity and zero-shot accuracy before and after, forward latency.
The measurements of the original model are cached under ``fetch.cache_dir`` keyed by the base
model's hash and the measurement settings, so each method's run does not redo them.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from cpet import io
from cpet.config import Params
from cpet.evaluation import forward_latency_ms, perplexity, task_metrics
from cpet.stages.common import BASE_DIR, calibration_batches, load_base, task_views

OUT_DIR = Path("models") / "compressed"
REPORT_DIR = Path("reports") / "compress"


def measure(model, tokenizer, views, params: Params) -> dict:
    """Zero-shot accuracy/F1 per task (validation split), perplexity, forward latency."""
    m = params.compress.measure
    out: dict = {"tasks": {}}
    texts = []
    for view in views:
        rows = view.rows("validation")[: m.max_examples]
        out["tasks"][view.name] = task_metrics(
            model, tokenizer, rows, view.template, view.verbalizer,
            max_length=m.max_length, batch_size=m.batch_size,
        )
        texts += [r["text"] for r in rows[: m.ppl_texts]]
    out["perplexity"] = perplexity(model, tokenizer, texts, max_length=m.max_length, batch_size=m.batch_size)
    out["latency_ms"] = forward_latency_ms(
        model, batch=m.latency_batch, seq_len=m.latency_seq_len, repeats=m.latency_repeats
    )
    return out


def _baseline(model, tokenizer, views, params: Params, root: Path, base_hash: str) -> dict:
    key = json.dumps([base_hash, params.compress.measure.model_dump(), io.code_hash(),
                      {v.name: [v.template, v.verbalizer.labels, v.verbalizer.identity()] for v in views},
                      [io.sha256_file(Path(root) / "data/processed" / v.name / "validation.jsonl") for v in views]])
    path = Path(root) / params.fetch.cache_dir / "measure" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = measure(model, tokenizer, views, params)
    io.write_json(path, result)
    return result


def compress_one(params: Params, root: Path, name: str) -> dict:
    """Compress the base model with method ``name`` and measure before/after."""
    from cpet.compress import compress as run_method
    from cpet.compress import save_compressed

    cfg = params.compress.method(name)
    root = Path(root)
    model, tokenizer = load_base(root)
    views = task_views(params, root, tokenizer)
    base_file = root / BASE_DIR / "model.safetensors"
    base_hash = io.sha256_file(base_file)
    before = _baseline(model, tokenizer, views, params, root, io.tree_hash(root / BASE_DIR))
    c = params.compress.calibration
    calib = calibration_batches(views, tokenizer, samples=c.samples, max_length=c.max_length,
                                batch_size=c.batch_size, seed=c.seed)
    t0 = time.perf_counter()
    cm = run_method(model, cfg, calib)
    seconds = time.perf_counter() - t0
    out = root / OUT_DIR / name
    manifest = save_compressed(cm, out, source_hash=base_hash)
    after = measure(cm.model, tokenizer, views, params)
    m = params.compress.measure
    after["deploy_latency_ms"] = forward_latency_ms(  # packed weights, dequantized per call
        cm.deploy_model(), batch=m.latency_batch, seq_len=m.latency_seq_len, repeats=m.latency_repeats
    )
    base_bytes = sum(f.stat().st_size for f in (root / BASE_DIR).glob("*.safetensors"))
    keys = ("parameters", "parameters_nonzero", "bytes_on_disk", "sparsity", "bits",
            "skipped_ffn_fraction", "router_cost_fraction")
    metrics = {
        "method": name,
        "config": json.loads(cfg.model_dump_json()),
        "compress_seconds": round(seconds, 1),
        "size_ratio": manifest["bytes_on_disk"] / base_bytes,
        "summary": {k: manifest[k] for k in keys if k in manifest},
        "before": before,
        "after": after,
    }
    io.write_json(root / REPORT_DIR / f"{name}.json", metrics)
    return metrics


def compress(params: Params, root: str | Path = ".", method: str | None = None) -> dict:
    """Run one method (``method``) or all configured methods in order."""
    names = [method] if method else list(params.compress.methods)
    return {name: compress_one(params, Path(root), name) for name in names}


def table(root: str | Path = ".") -> str:
    """Markdown table of every ``reports/compress/<name>.json``: size, speed, accuracy."""
    rows = [json.loads(p.read_text()) for p in sorted((Path(root) / REPORT_DIR).glob("*.json"))]
    if not rows:
        return "no compressed models measured yet\n"
    tasks = list(rows[0]["before"]["tasks"])
    head = ["method", "params (M)", "size vs fp32", "sparsity", "perplexity"]
    head += [f"{t} acc" for t in tasks] + ["latency ms (train form)", "latency ms (packed)"]
    b = rows[0]["before"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out.append("| original (fp32) | | 1.00 | 0 | " + f"{b['perplexity']:.1f} | "
               + " | ".join(f"{b['tasks'][t]['accuracy']:.3f}" for t in tasks)
               + f" | {b['latency_ms']:.0f} | |")
    for r in rows:
        a, s = r["after"], r["summary"]
        skip = f", {s['skipped_ffn_fraction']:.0%} FFN skipped" if "skipped_ffn_fraction" in s else ""
        out.append(
            f"| {r['method']} | {s['parameters'] / 1e6:.1f} | {r['size_ratio']:.2f} | "
            f"{s.get('sparsity', 0):.2f}{skip} | {a['perplexity']:.1f} | "
            + " | ".join(f"{a['tasks'][t]['accuracy']:.3f}" for t in tasks)
            + f" | {a['latency_ms']:.0f} | {a.get('deploy_latency_ms', float('nan')):.0f} |"
        )
    return "\n".join(out) + "\n"
