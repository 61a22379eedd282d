"""Stage ``evaluate``: every variant on every task and compression method, on one split.

Writes ``reports/results.json`` (rows ``{"task", "compression", "variant", "split", "accuracy",
"macro_f1"}``), ``reports/results.md`` (a table per task with the recovery ratio
``(cpet - pet) / (original - pet)`` per compression method and an exact McNemar test of CPET
against vanilla PET on the same test examples) and ``reports/results.png``; ``reports/evaluate.json``
holds the ratios, the tests and the numerics used (``evaluate.mixed_precision``);
``reports/predictions.json`` every model's predicted label per test row (``{task: {"gold": [...],
"<compression>/<variant>": [...]}}``), what the study's bootstrap intervals resample.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpet import io, paths
from cpet.config import Params
from cpet.env import device, use_bf16
from cpet.lmcls import accuracy_f1
from cpet.stages.common import evaluator, load_base, load_compressed_base, load_tokenizer, task_views
from cpet.stages.inherit import OUT_DIR as INHERIT_DIR

def _predict(model, ev, bf16: bool) -> list[int]:
    import torch

    kind = next(model.parameters()).device.type
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
        return ev.scores(model).argmax(1).tolist()


def mcnemar(gold: list[int], a: list[int], b: list[int]) -> dict:
    """Exact two-sided McNemar test of two classifiers on the same examples: only the examples
    exactly one of them gets right count; under "equally good" each such example is a fair coin."""
    from scipy.stats import binomtest

    only_a = sum(x == g != y for g, x, y in zip(gold, a, b, strict=True))
    only_b = sum(y == g != x for g, x, y in zip(gold, a, b, strict=True))
    p = binomtest(only_b, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_first_right": only_a, "only_second_right": only_b, "p_value": float(p)}


def evaluate(params: Params, root: str | Path = ".") -> dict:
    import copy


    from cpet.pet import load_adapter, load_bundle

    root = Path(root)
    tokenizer = load_tokenizer(root)
    cfg = params.evaluate
    bf16 = use_bf16(cfg.mixed_precision, device())
    numerics = "bf16" if bf16 else "no"
    rows, paired, predictions = [], {}, {}

    def score(task: str, ev, compression: str, variant: str, model) -> list[int]:
        pred = _predict(model, ev, bf16)
        predictions.setdefault(task, {"gold": list(ev.labels)})[f"{compression}/{variant}"] = pred
        metrics = accuracy_f1(ev.labels, pred, len(ev.verbalizer.labels))
        rows.append({"task": task, "compression": compression, "variant": variant, "split": cfg.split,
                     "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]})
        print(f"evaluate {task} {compression} {variant}: {metrics['accuracy']:.3f}", flush=True)
        return pred

    for view in task_views(params, root, tokenizer):
        ev = evaluator(view, tokenizer, cfg.split, cfg.max_length, cfg.batch_size)  # tokenized once
        model = load_adapter(load_base(root)[0], paths.require(root, paths.teacher_adapter(view.name)))
        score(view.name, ev, "none", "original+pet", model)
        for method in params.recover_methods():
            base = load_compressed_base(root, method)[0]  # read once; each variant gets a copy
            model = load_adapter(copy.deepcopy(base), root / INHERIT_DIR / method / view.name)
            score(view.name, ev, method, "compressed+inherit-only", model)
            preds = {}
            for variant in params.recover.variants:
                model = load_bundle(copy.deepcopy(base), root / paths.bundle(method, view.name, variant))
                preds[variant] = score(view.name, ev, method, variant, model)
            if {"compressed+pet", "compressed+cpet"} <= preds.keys():
                paired.setdefault(view.name, {})[method] = mcnemar(ev.labels, preds["compressed+pet"],
                                                                   preds["compressed+cpet"])
    io.write_json(root / "reports" / "results.json", rows)
    io.write_text(root / "reports" / "predictions.json", json.dumps(predictions) + "\n")  # one line per file: small diffs
    io.write_text(root / "reports" / "results.md", markdown(rows, numerics, paired))
    plot(rows, root / "reports" / "results.png")
    metrics = {"rows": len(rows), "mixed_precision": numerics,
               "recovery_ratio": recovery_ratios(rows), "cpet_vs_pet": paired}
    io.write_json(root / "reports" / "evaluate.json", metrics)
    return metrics


def recovery_ratios(rows: list[dict]) -> dict:
    """``(cpet - pet) / (original - pet)`` accuracy per task and compression (None if undefined)."""
    acc = {(r["task"], r["compression"], r["variant"]): r["accuracy"] for r in rows}
    out: dict = {}
    for task, comp, variant in acc:
        if variant != "compressed+cpet":
            continue
        pet, orig = acc.get((task, comp, "compressed+pet")), acc.get((task, "none", "original+pet"))
        ratio = None
        if pet is not None and orig is not None and abs(orig - pet) > 1e-9:
            ratio = (acc[(task, comp, variant)] - pet) / (orig - pet)
        out.setdefault(task, {})[comp] = ratio
    return out


def markdown(rows: list[dict], mixed_precision: str = "no", paired: dict | None = None) -> str:
    ratios = recovery_ratios(rows)
    numerics = "bf16 autocast, as in training" if mixed_precision == "bf16" else "float32"
    out = ["# CPET comparison", "", f"Forward passes in {numerics} (params.yaml evaluate.mixed_precision).", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        comps = [c for c in dict.fromkeys(r["compression"] for r in mine) if c != "none"]
        variants = list(dict.fromkeys(r["variant"] for r in mine if r["compression"] != "none"))
        orig = next(r for r in mine if r["variant"] == "original+pet")
        out += [f"## {task} ({orig['split']} split; accuracy / macro-F1)", "",
                "| variant | " + " | ".join(comps) + " |", "|---|" + "---|" * len(comps),
                "| original+pet | " + " | ".join(f"{orig['accuracy']:.3f} / {orig['macro_f1']:.3f}" for _ in comps) + " |"]
        for v in variants:
            cells = []
            for c in comps:
                r = next((x for x in mine if x["compression"] == c and x["variant"] == v), None)
                cells.append(f"{r['accuracy']:.3f} / {r['macro_f1']:.3f}" if r else "")
            out.append(f"| {v} | " + " | ".join(cells) + " |")
        cells = [ratios.get(task, {}).get(c) for c in comps]
        out.append("| recovery ratio (cpet-pet)/(orig-pet) | "
                   + " | ".join("n/a" if x is None else f"{x:.2f}" for x in cells) + " |")
        tests = [(paired or {}).get(task, {}).get(c) for c in comps]
        if any(tests):
            out.append("| cpet vs pet: only-pet-right / only-cpet-right, McNemar p | "
                       + " | ".join("" if t is None else
                                    f"{t['only_first_right']} / {t['only_second_right']}, p = {t['p_value']:.2g}"
                                    for t in tests) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        orig = next(r["accuracy"] for r in mine if r["variant"] == "original+pet")
        comps = [c for c in dict.fromkeys(r["compression"] for r in mine) if c != "none"]
        variants = list(dict.fromkeys(r["variant"] for r in mine if r["compression"] != "none"))
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            ys = [next((r["accuracy"] for r in mine if r["compression"] == c and r["variant"] == v), 0) for c in comps]
            ax.bar([j + i * width for j in range(len(comps))], ys, width, label=v)
        ax.axhline(orig, color="black", linestyle="--", label="original+pet")
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(comps))], comps)
        ax.set_title(task)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    io.save_figure(fig, path)
