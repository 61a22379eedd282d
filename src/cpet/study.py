"""Where CPET recovers, and by how much: DVC experiments on one cell, and their report.

The engine is DVC's: each experiment is ``dvc exp run --temp -n <name> -S <override> ... evaluate``
(a temporary copy of the project; the workspace and its results stay as they are; unchanged stages
come from the run cache), kept as a DVC experiment ref (``dvc exp show`` lists them). What is ours
is only the list of overrides (:func:`experiments`) and the statistics (:func:`report`):

* per experiment and seed, accuracy of every variant on the test split (``reports/predictions.json``);
* the recovery ratio ``(cpet - pet) / (original - pet)`` pooled over seeds, with a percentile
  bootstrap interval that resamples seeds and test rows (the same rows for every model of a seed);
* McNemar CPET vs PET per seed and over all seeds' rows together;
* the ratio against each axis (recover steps, compression strength, distillation weights).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cpet import io
from cpet.config import Params
from cpet.errors import ConfigError, CpetError

PREFIX = "study-"
ORIGINAL, PET, CPET = "original+pet", "compressed+pet", "compressed+cpet"


@dataclass(frozen=True)
class Experiment:
    name: str
    axis: str  # base | steps | strength | distill
    value: str
    seed: int
    overrides: tuple[str, ...] = field(default=())


def _focus(params: Params, seed: int) -> list[str]:
    """Overrides that keep one task and one method, the study's variants and this seed."""
    s = params.study
    out = [f"~tasks.{t}" for t in params.tasks if t != s.task]
    out += [f"~compress.methods.{m}" for m in params.compress.methods if m != s.method]
    out += [f"recover.variants=[{','.join(s.variants)}]", f"recover.train.seed={seed}"]
    if params.bench.task not in (None, s.task):
        out.append("bench.task=null")
    return out


def experiments(params: Params) -> list[Experiment]:
    """Every experiment of the study: the default recipe per seed, then one axis changed at a time."""
    s, train, distill = params.study, params.recover.train, params.recover.distill
    if s.task not in params.tasks:  # checked here: other runs may configure other tasks
        raise ConfigError(f"study.task: {s.task!r} is not a configured task ({', '.join(params.tasks)})")
    if s.method not in params.compress.methods:
        raise ConfigError(f"study.method: {s.method!r} is not in compress.methods ({', '.join(params.compress.methods)})")
    axes: list[tuple[str, str, list[str]]] = [("base", "default", [])]
    for steps in s.steps:
        if steps != train.steps or s.max_train:
            every = max(1, steps // 2)
            over = [f"recover.train.steps={steps}", f"recover.train.eval_every={every}",
                    f"recover.train.checkpoint_every={every}",
                    f"recover.train.warmup_steps={min(train.warmup_steps, steps)}"]
            if s.max_train:
                over.append(f"fetch.split.max_train={s.max_train}")
            axes.append(("steps", str(steps), over))
    for i, setting in enumerate(s.strength):
        axes.append(("strength", json.dumps(setting, sort_keys=True),
                     [f"compress.methods.{s.method}.{k}={json.dumps(v)}" for k, v in setting.items()]))
    for alpha, beta in s.distill:
        if (alpha, beta) != (distill.alpha, distill.beta):
            axes.append(("distill", f"alpha={alpha},beta={beta}",
                         [f"recover.distill.alpha={alpha}", f"recover.distill.beta={beta}"]))
    out = []
    for axis, value, over in axes:
        for seed in s.seeds:
            slug = "".join(c if c.isalnum() else "-" for c in value)[:40].strip("-")
            out.append(Experiment(f"{PREFIX}{axis}-{slug}-s{seed}", axis, value, seed,
                                  tuple(_focus(params, seed) + over)))
    return out


def run(params: Params, root: Path, only: list[str] | None = None, dry_run: bool = False) -> list[str]:
    """Run the study's experiments one at a time (``dvc exp run --temp``); returns the commands."""
    done = set(_experiment_revs(root)) if not dry_run else set()
    commands = []
    for exp in experiments(params):
        if (only and exp.name not in only) or exp.name in done:
            continue
        cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", exp.name]
        for o in exp.overrides:
            cmd += ["-S", o]
        commands.append(" ".join(["dvc", *cmd[3:]]))
        if dry_run:
            continue
        print(f"study: {exp.name}", flush=True)
        proc = subprocess.run([*cmd, "evaluate"], cwd=root, text=True)
        if proc.returncode:
            raise CpetError(f"study: experiment {exp.name} failed (exit {proc.returncode}); "
                            "fix it and rerun `cpet study` (finished experiments are kept)")
    return commands


def _experiment_revs(root: Path) -> dict[str, str]:
    """DVC experiment name -> commit, for this study's experiments on the current baseline."""
    return {name: rev for name, rev in experiment_revs(root).items() if name.startswith(PREFIX)}


def experiment_revs(root: Path) -> dict[str, str]:
    """DVC experiment name -> commit, for every finished experiment on the current baseline."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise CpetError(f"dvc exp show: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    out = {}
    for commit in json.loads(proc.stdout or "[]"):
        for exp in commit.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") not in (None, "success"):
                continue  # queued or still running: no results yet
            for rev in exp.get("revs") or []:
                if rev.get("name") and not rev.get("error"):
                    out[rev["name"]] = rev["rev"]
    return out


def read_json_at(root: Path, rev: str, rel: str, where: str):
    """The JSON file ``rel`` as committed in experiment commit ``rev`` (``where`` names it in errors)."""
    proc = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise CpetError(f"{where}: no {rel} in experiment {rev[:8]}")
    return json.loads(proc.stdout)


def collect(params: Params, root: Path) -> dict[str, dict]:
    """Experiment name -> its ``reports/predictions.json`` (``{task: {"gold", "<comp>/<variant>"}}``)."""
    revs = _experiment_revs(root)
    out = {}
    for exp in experiments(params):
        if exp.name not in revs:
            continue
        out[exp.name] = read_json_at(root, revs[exp.name], "reports/predictions.json", exp.name)
    return out


# --------------------------------------------------------------------------- statistics
def _ratio(orig: float, pet: float, cpet: float) -> float | None:
    return None if abs(orig - pet) < 1e-12 else (cpet - pet) / (orig - pet)


def cell_stats(per_seed: list[dict[str, list[int]]], samples: int, confidence: float, seed: int) -> dict:
    """Statistics of one cell from its seeds' predictions (``{"gold", ORIGINAL, PET, CPET, ...}``
    per seed, same test rows). The interval resamples seeds, then test rows within each."""
    import numpy as np
    from scipy.stats import binomtest

    correct = [{k: np.asarray(v) == np.asarray(s["gold"]) for k, v in s.items() if k != "gold"} for s in per_seed]
    acc = {k: [float(c[k].mean()) for c in correct] for k in correct[0]}
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    point = _ratio(mean[ORIGINAL], mean[PET], mean[CPET]) if {ORIGINAL, PET, CPET} <= mean.keys() else None
    rng = np.random.default_rng(seed)
    draws = []
    if point is not None:
        n = len(per_seed[0]["gold"])
        for _ in range(samples):
            picked = rng.integers(0, len(correct), len(correct))
            rows = rng.integers(0, n, (len(correct), n))
            m = {k: np.mean([correct[s][k][r].mean() for s, r in zip(picked, rows)]) for k in (ORIGINAL, PET, CPET)}
            r = _ratio(m[ORIGINAL], m[PET], m[CPET])
            if r is not None:
                draws.append(r)
    lo, hi = ((float(np.quantile(draws, (1 - confidence) / 2)), float(np.quantile(draws, (1 + confidence) / 2)))
              if draws else (None, None))
    tests = []
    if {PET, CPET} <= mean.keys():
        for c in correct:
            tests.append((int((c[PET] & ~c[CPET]).sum()), int((c[CPET] & ~c[PET]).sum())))
    pooled = None
    if tests:
        a, b = sum(t[0] for t in tests), sum(t[1] for t in tests)
        pooled = {"only_pet_right": a, "only_cpet_right": b,
                  "p_value": float(binomtest(b, a + b, 0.5).pvalue) if a + b else 1.0}
    return {"seeds": len(per_seed), "accuracy": acc, "mean_accuracy": mean, "recovery_ratio": point,
            "interval": [lo, hi], "mcnemar_per_seed": tests, "mcnemar_pooled": pooled}


def report(params: Params, runs: dict[str, dict]) -> dict:
    """Group experiments by (axis, value), compute each group's cell statistics."""
    s = params.study
    groups: dict[tuple[str, str], list[dict]] = {}
    for exp in experiments(params):
        if exp.name not in runs:
            continue
        task = runs[exp.name].get(s.task)
        if task is None:
            raise CpetError(f"{exp.name}: predictions hold no task {s.task!r}")
        rows = {"gold": task["gold"], ORIGINAL: task[f"none/{ORIGINAL}"]}
        rows |= {k.split("/", 1)[1]: v for k, v in task.items() if k.startswith(f"{s.method}/")}
        groups.setdefault((exp.axis, exp.value), []).append(rows)
    b = s.bootstrap
    cells = [{"axis": axis, "value": value, **cell_stats(seeds, b.samples, b.confidence, b.seed)}
             for (axis, value), seeds in groups.items()]
    return {"task": s.task, "method": s.method, "confidence": b.confidence, "cells": cells}


def markdown(result: dict) -> str:
    lines = [f"# CPET study: {result['task']} on {result['method']}", "",
             f"Recovery ratio (cpet - pet) / (original - pet) pooled over seeds, "
             f"{result['confidence']:.0%} bootstrap interval over seeds and test rows; "
             "McNemar CPET vs PET over all seeds' test rows.", "",
             "| axis | value | seeds | original+pet | compressed+pet | compressed+cpet | ratio [interval] | "
             "only pet / only cpet right, p |", "|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        m, lo_hi, t = c["mean_accuracy"], c["interval"], c["mcnemar_pooled"]
        ratio = "n/a" if c["recovery_ratio"] is None else (
            f"{c['recovery_ratio']:.2f} [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi[0] is not None
            else f"{c['recovery_ratio']:.2f}")
        test = "" if t is None else f"{t['only_pet_right']} / {t['only_cpet_right']}, p = {t['p_value']:.2g}"
        lines.append(f"| {c['axis']} | {c['value']} | {c['seeds']} | {m.get(ORIGINAL, 0):.3f} | "
                     f"{m.get(PET, 0):.3f} | {m.get(CPET, 0):.3f} | {ratio} | {test} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [a for a in dict.fromkeys(c["axis"] for c in result["cells"]) if a != "base"]
    base = next((c for c in result["cells"] if c["axis"] == "base"), None)
    fig, subplots = plt.subplots(1, max(len(axes), 1), figsize=(5 * max(len(axes), 1), 3.5), squeeze=False)
    for ax, name in zip(subplots[0], axes or ["base"]):
        cells = ([base] if base else []) + [c for c in result["cells"] if c["axis"] == name and c is not base]
        labels = [c["value"] for c in cells]
        ys = [c["recovery_ratio"] if c["recovery_ratio"] is not None else float("nan") for c in cells]
        err = [[max(0, y - (c["interval"][0] if c["interval"][0] is not None else y)) for y, c in zip(ys, cells)],
               [max(0, (c["interval"][1] if c["interval"][1] is not None else y) - y) for y, c in zip(ys, cells)]]
        ax.errorbar(range(len(cells)), ys, yerr=err, fmt="o", capsize=4)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(1, color="black", ls="--", lw=0.8)
        ax.set_xticks(range(len(cells)), labels, rotation=20, fontsize=8)
        ax.set_title(f"recovery ratio vs {name}")
    fig.tight_layout()
    io.save_figure(fig, path)


def write_report(params: Params, root: Path) -> dict:
    """``reports/study/study.{json,md,png}`` from every finished experiment of the study."""
    runs = collect(params, root)
    if not runs:
        raise CpetError("study: no finished experiments; run `cpet study` first")
    result = report(params, runs)
    out = Path(root) / "reports" / "study"
    io.write_json(out / "study.json", result)
    io.write_text(out / "study.md", markdown(result))
    plot(result, out / "study.png")
    return {"experiments": len(runs), "cells": len(result["cells"])}
