"""Stage ``export``: each task's bundle on its compressed base as an ONNX Runtime model, checked.

Per compression method ``<m>`` and task ``<t>``: ``models/onnx/<m>/<t>/`` (``model.onnx``,
``config.json``, tokenizer, ``cpet_export.json``), loadable by ORT and by optimum's
``ORTModelForCausalLM`` (``use_cache=False``). A task with first-token scoring gets the lean graph
(logits at the last position only); one whose words are scored whole (sum/mean) the full-head
graph, whose logits at every position the word tokens need (:mod:`cpet.export.onnx`). The
deployment form is exact (see :mod:`cpet.export.sidepath`); a parity check against the PyTorch
bundle on the ``export.split`` fails the stage beyond ``export.tolerance``
(``export.tolerance_int8_activations`` for a w8a8 base), and then nothing of the method's folder
is written.
``reports/export/<m>.json`` holds the parity numbers per task and, for quantized bases, the
accuracy of the naive "fold LoRA into the weights, re-quantize" form.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from cpet import io, paths
from cpet.config import Params
from cpet.stages.common import load_tokenizer, task_views

OUT_DIR = Path("models") / "onnx"
REPORT_DIR = Path("reports") / "export"
META = "cpet_export.json"


def quantized_linears(records, act: bool = False) -> int:
    """Quantized linear layers: weight-only ones (MatMulNBits), or with ``act`` the w8a8 ones
    (int8 activations: MatMulInteger)."""
    return sum(1 for r in (records or {}).values()
               if r.quant is not None and r.kind == "linear" and (r.act is not None) == act)


def write_onnx(model, records, tokenizer, out: Path, meta: dict, lean: bool = True) -> dict:
    """Deployment form of ``model`` (a bundle or bare model on a base with ``records``) into ``out``;
    ``lean``: the LM head at the last position only (first-token scoring)."""
    from cpet.export import deploy_model
    from cpet.export.onnx import export_onnx, folder_bytes

    t0 = time.perf_counter()
    graph = export_onnx(deploy_model(model, records, "onnx"), out, expect_nbits=quantized_linears(records),
                        expect_int8=quantized_linears(records, act=True), lean=lean)
    tokenizer.save_pretrained(out)
    io.write_json(out / META, meta)
    return {**graph, "bytes": folder_bytes(out), "export_seconds": round(time.perf_counter() - t0, 1)}


def export_task(params: Params, root: Path, method: str, cm, view, tokenizer, out: Path) -> dict:
    """Export one task's bundle, then run the parity check (raises beyond tolerance)."""
    from cpet.export import check, parity, plain_model, torch_position_logits
    from cpet.export.onnx import OnnxLM, session
    from cpet.pet import load_bundle

    cfg = params.export
    bundle = load_bundle(copy.deepcopy(cm.model), root / paths.bundle(method, view.name, cfg.variant))
    meta = {"task": view.name, "compression": method, "variant": cfg.variant, "template": view.template,
            "labels": list(view.verbalizer.labels), **view.verbalizer.identity(), "max_length": cfg.max_length}
    graph = write_onnx(bundle, cm.records, tokenizer, out, meta, lean=view.verbalizer.first_token)
    others = {}
    if cfg.naive_baseline and (quantized_linears(cm.records) or quantized_linears(cm.records, act=True)):
        # float weights on the new grid: the values a packed deployment would compute with, faster here
        others["naive_requantized"] = torch_position_logits(plain_model(bundle, cm.records, requantize=True)[0])
    rows = view.rows(cfg.split)[: cfg.max_examples]
    onnx_lm = OnnxLM(session(out, "cpu"))
    t0 = time.perf_counter()
    result = parity(torch_position_logits(bundle), onnx_lm.position_logits, tokenizer, rows, view.template,
                    view.verbalizer, max_length=cfg.max_length, batch_size=cfg.batch_size, others=others)
    result["parity_seconds"] = round(time.perf_counter() - t0, 1)
    int8_acts = any(r.act is not None for r in (cm.records or {}).values())
    key = "export.tolerance_int8_activations" if int8_acts else "export.tolerance"
    check(result, cfg.tolerance_int8_activations if int8_acts else cfg.tolerance, f"export {method}/{view.name}", key)
    print(f"export {method}/{view.name}: max|diff| {result['max_abs_logit_diff']:.2e}, "
          f"top-1 {result['top1_agreement']:.3f}, acc torch {result['accuracy_torch']:.3f} "
          f"onnx {result['accuracy_onnx']:.3f} ({graph['export_seconds']} s export, "
          f"{result['parity_seconds']} s parity)", flush=True)
    return {"split": cfg.split, **result, "graph": graph}


def export(params: Params, root: str | Path = ".", method: str | None = None) -> dict:

    from cpet.compress import load_compressed_model

    root = Path(root)
    tokenizer = load_tokenizer(root)
    views = task_views(params, root, tokenizer)
    out: dict = {}
    for name in params.recover_methods():
        if method not in (None, name):
            continue
        cm = load_compressed_model(paths.require(root, paths.compressed(name)))
        with io.atomic_dir(root / OUT_DIR / name) as tmp:
            metrics = {view.name: export_task(params, root, name, cm, view, tokenizer, tmp / view.name)
                       for view in views}
        io.write_json(root / REPORT_DIR / f"{name}.json", metrics)
        out[name] = metrics
    return out
