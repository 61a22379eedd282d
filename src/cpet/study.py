"""Where CPET recovers, and by how much: DVC experiments over the comparison's cells, and their report.

The engine is DVC's: each experiment is ``dvc exp run --temp -n <name> -S <override> ... evaluate``
(a temporary copy of the project; the workspace and its results stay as they are; unchanged stages
come from the run cache), kept as a DVC experiment ref (``dvc exp show`` lists them). What is ours
is only the list of overrides (:func:`experiments`) and the statistics (:func:`report`):

* per experiment and seed, accuracy of every variant on the test split (``reports/predictions.json``);
* the recovery ratio ``(cpet - pet) / (original - pet)`` pooled over seeds, with a percentile
  bootstrap interval that resamples seeds and test rows (the same rows for every model of a seed),
  and every ablation row's share of the gap with the same interval;
* McNemar CPET vs PET per seed and over all seeds' rows together;
* the ratio against each axis (recover steps, compression strength, distillation weights), and
  every cell under a candidate default next to the cells under the current one.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cpet import io
from cpet.config import Params
from cpet.config.recipes import CPET, INHERIT_ONLY, ORIGINAL, PET
from cpet.errors import ConfigError, CpetError

PREFIX = "study-"


@dataclass(frozen=True)
class Experiment:
    name: str
    axis: str  # cells | ablation | distill | steps | setting | strength | candidate
    value: str
    seed: int
    overrides: tuple[str, ...] = field(default=())


def _keep(params: Params, seed: int, tasks: list[str], methods: list[str], variants: list[str]) -> list[str]:
    """Overrides that keep these tasks and methods, train these variants with this seed."""
    out = [f"~tasks.{t}" for t in params.tasks if t not in tasks]
    out += [f"~compress.methods.{m}" for m in params.compress.methods if m not in methods]
    out += [f"recover.variants=[{','.join(variants)}]", f"recover.train.seed={seed}"]
    if params.bench.task not in (None, *tasks):
        out.append("bench.task=null")
    return out


def _check(params: Params) -> None:
    s = params.study
    for where, tasks in (("study.tasks", s.tasks), ("study.task", [s.task])):
        for t in tasks:  # checked here: other runs may configure other tasks
            if t not in params.tasks:
                raise ConfigError(f"{where}: {t!r} is not a configured task ({', '.join(params.tasks)})")
    for where, methods in (("study.methods", s.methods), ("study.method", [s.method]), ("study.strength", s.strength)):
        for m in methods:
            if m not in params.compress.methods:
                raise ConfigError(f"{where}: {m!r} is not in compress.methods ({', '.join(params.compress.methods)})")


def _slug(value: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in value)[:40].strip("-")


def experiments(params: Params) -> list[Experiment]:
    """Every experiment of the study, most telling first: the default recipe on every cell per
    seed, then the focus cell's ablation rows, then one axis changed at a time on the focus cell."""
    _check(params)
    s, train, distill = params.study, params.recover.train, params.recover.distill
    focus = ([s.task], [s.method], list(s.variants))
    axes: list[tuple[str, str, tuple, list[str]]] = [
        ("cells", "default", (list(s.tasks), list(s.methods), list(s.variants)), []),
        ("ablation", "default", ([s.task], [s.method], list(dict.fromkeys([*s.variants, *s.ablations]))), [])]
    for alpha, beta in s.distill:
        if (alpha, beta) != (distill.alpha, distill.beta):
            axes.append(("distill", f"alpha={alpha},beta={beta}", focus,
                         [f"recover.distill.alpha={alpha}", f"recover.distill.beta={beta}"]))
    for steps in s.steps:
        if steps != train.steps or s.max_train:
            every = max(1, steps // 2)
            over = [f"recover.train.steps={steps}", f"recover.train.eval_every={every}",
                    f"recover.train.checkpoint_every={every}",
                    f"recover.train.warmup_steps={min(train.warmup_steps, steps)}"]
            if s.max_train:
                over.append(f"fetch.split.max_train={s.max_train}")
            axes.append(("steps", str(steps), focus, over))
    for name, over in s.settings.items():
        axes.append(("setting", name, focus, list(over)))
    for name, over in s.candidates.items():
        axes.append(("candidate", name, (list(s.tasks), list(s.methods), list(s.variants)), list(over)))
    for method, settings in s.strength.items():
        for setting in settings:
            value = ",".join(f"{k}={v}" for k, v in sorted(setting.items())) or "as-is"
            axes.append(("strength", f"{method}:{value}", ([s.task], [method], list(s.variants)),
                         [f"++compress.methods.{method}.{k}={json.dumps(v)}" for k, v in setting.items()]))
    out = []
    for axis, value, (tasks, methods, variants), over in axes:
        for seed in s.seeds:
            out.append(Experiment(f"{PREFIX}{axis}-{_slug(value)}-s{seed}", axis, value, seed,
                                  tuple(_keep(params, seed, tasks, methods, variants) + over)))
    return out


def run(params: Params, root: Path, only: list[str] | None = None, dry_run: bool = False) -> list[str]:
    """Run the study's experiments one at a time (``dvc exp run --temp``); returns the commands."""
    done = set(_experiment_revs(root)) if not dry_run else set()
    commands = []
    for exp in experiments(params):
        if (only and not any(fnmatch.fnmatchcase(exp.name, pat) for pat in only)) or exp.name in done:
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


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)


def _study_refs(root: Path) -> list[tuple[str, str, str]]:
    """``(name, experiment commit, baseline commit)`` of every finished study experiment. DVC keeps
    one as the git ref ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>`` (failed and queued ones
    have none)."""
    proc = _git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps/")
    if proc.returncode:
        raise CpetError(f"git for-each-ref refs/exps: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    out = []
    for line in proc.stdout.splitlines():
        rev, ref = line.split(" ", 1)
        parts = ref.split("/")
        if len(parts) == 5 and len(parts[2]) == 2 and parts[4].startswith(PREFIX):
            out.append((parts[4], rev, parts[2] + parts[3]))
    return out


def _experiment_revs(root: Path) -> dict[str, str]:
    """Study experiment name -> commit, for the experiments on the current baseline (HEAD)."""
    head = _git(root, "rev-parse", "HEAD").stdout.strip()
    return {name: rev for name, rev, base in _study_refs(root) if base == head}


def study_revs(root: Path) -> dict[str, tuple[str, str]]:
    """Study experiment name -> (experiment commit, baseline commit), for the report.

    Each name is taken from the newest baseline in HEAD's history that has it (HEAD's own first),
    so changing one default and rerunning only the experiments it touches (``cpet study --only
    ...``) keeps the others; the report names every experiment's baseline commit. ``cpet study``
    itself reruns whatever the current baseline lacks."""
    refs = _study_refs(root)
    distance: dict[str, int | None] = {}
    for base in {b for _, _, b in refs}:
        ancestor = _git(root, "merge-base", "--is-ancestor", base, "HEAD").returncode == 0
        count = _git(root, "rev-list", "--count", f"{base}..HEAD") if ancestor else None
        distance[base] = int(count.stdout) if count is not None and not count.returncode else None
    best: dict[str, tuple[int, str, str]] = {}
    for name, rev, base in refs:
        if distance[base] is not None and (name not in best or distance[base] < best[name][0]):
            best[name] = (distance[base], rev, base)
    return {name: (rev, base) for name, (_, rev, base) in best.items()}


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


UNTRACKED = ("study", "front", "track")  # params.yaml sections no stage reads


def _flat(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _stage_params(raw: dict) -> dict:
    return _flat({k: v for k, v in raw.items() if k not in UNTRACKED})


def _dump(params: Params) -> dict:
    return params.model_dump(by_alias=True, mode="json")  # defaults filled in, whatever the file omitted


def drift(params: Params, exp: Experiment, then: dict) -> dict[str, list]:
    """Stage params an experiment ran with (``then``: its commit's params.yaml) that differ from
    what it would run with today (``params`` with its overrides): ``key -> [then, today]``. A
    result kept from an older baseline is only comparable where this is empty."""
    import tempfile

    from dvc.utils.hydra import apply_overrides

    from cpet.config import parse_params

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(_dump(params), sort_keys=False))
        apply_overrides(path, list(exp.overrides))
        today = _stage_params(_dump(parse_params(yaml.safe_load(path.read_text()))))
    then = {**then, **{k: v for k, v in _dump(params).items() if k in UNTRACKED}}  # not stage inputs
    try:
        ran = _stage_params(_dump(parse_params(then, f"{exp.name}: params.yaml")))
    except ConfigError as err:
        return {"params.yaml": [str(err), "loads today"]}
    return {k: [ran.get(k), today.get(k)] for k in sorted(ran.keys() | today.keys()) if ran.get(k) != today.get(k)}


def collect(params: Params, root: Path) -> dict[str, dict]:
    """Experiment name -> its ``reports/predictions.json`` (``{task: {"gold", "<comp>/<variant>"}}``),
    the short baseline commit it ran on (key ``"baseline"``) and its :func:`drift` (``"drift"``)."""
    revs = study_revs(root)
    out = {}
    for exp in experiments(params):
        if exp.name not in revs:
            continue
        rev, base = revs[exp.name]
        then = yaml.safe_load(_git(root, "show", f"{rev}:params.yaml").stdout or "{}")
        out[exp.name] = {**read_json_at(root, rev, "reports/predictions.json", exp.name),
                         "baseline": base[:7], "drift": drift(params, exp, then)}
    return out


# --------------------------------------------------------------------------- statistics
def _ratio(orig: float, pet: float, cpet: float) -> float | None:
    return None if abs(orig - pet) < 1e-12 else (cpet - pet) / (orig - pet)


def cell_stats(per_seed: list[dict[str, list[int]]], samples: int, confidence: float, seed: int) -> dict:
    """Statistics of one cell from its seeds' predictions (``{"gold", ORIGINAL, PET, CPET, ...}``
    per seed, same test rows). Every variant's share of the gap it closes, ``(v - pet) / (original
    - pet)``, gets a percentile interval that resamples seeds, then test rows within each; the
    recovery ratio is CPET's."""
    import numpy as np
    from scipy.stats import binomtest

    names = [k for k in per_seed[0] if k != "gold"]
    correct = [np.stack([np.asarray(s[k]) == np.asarray(s["gold"]) for k in names]) for s in per_seed]
    acc = {k: [float(c[i].mean()) for c in correct] for i, k in enumerate(names)}
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    gaps = [k for k in names if k not in (ORIGINAL, PET)] if {ORIGINAL, PET} <= mean.keys() else []
    ratios = {k: _ratio(mean[ORIGINAL], mean[PET], mean[k]) for k in gaps}
    draws: dict[str, list[float]] = {k: [] for k in gaps}
    if gaps and any(r is not None for r in ratios.values()):
        rng = np.random.default_rng(seed)
        n, idx = len(per_seed[0]["gold"]), {k: i for i, k in enumerate(names)}
        for _ in range(samples):
            picked = rng.integers(0, len(correct), len(correct))
            rows = rng.integers(0, n, (len(correct), n))
            m = np.mean([correct[s][:, r].mean(axis=1) for s, r in zip(picked, rows)], axis=0)
            for k in gaps:
                r = _ratio(m[idx[ORIGINAL]], m[idx[PET]], m[idx[k]])
                if r is not None:
                    draws[k].append(r)
    intervals = {k: ([float(np.quantile(d, (1 - confidence) / 2)), float(np.quantile(d, (1 + confidence) / 2))]
                     if d else [None, None]) for k, d in draws.items()}
    tests = []
    if {PET, CPET} <= mean.keys():
        pet, cpet = names.index(PET), names.index(CPET)
        for c in correct:
            tests.append((int((c[pet] & ~c[cpet]).sum()), int((c[cpet] & ~c[pet]).sum())))
    pooled = None
    if tests:
        a, b = sum(t[0] for t in tests), sum(t[1] for t in tests)
        pooled = {"only_pet_right": a, "only_cpet_right": b,
                  "p_value": float(binomtest(b, a + b, 0.5).pvalue) if a + b else 1.0}
    return {"seeds": len(per_seed), "accuracy": acc, "mean_accuracy": mean,
            "recovery_ratio": ratios.get(CPET), "interval": intervals.get(CPET, [None, None]),
            "ratios": ratios, "intervals": intervals, "mcnemar_per_seed": tests, "mcnemar_pooled": pooled}


def _cells_of(name: str, predictions: dict) -> dict[tuple[str, str], dict]:
    """``(task, method) -> {"gold", ORIGINAL, variant: predictions}`` of one experiment."""
    out = {}
    for task, preds in predictions.items():
        if f"none/{ORIGINAL}" not in preds:
            raise CpetError(f"{name}: predictions of task {task!r} hold no {ORIGINAL}")
        for key in preds:
            method, _, variant = key.partition("/")
            if method == "none" or key == "gold":
                continue
            cell = out.setdefault((task, method), {"gold": preds["gold"], ORIGINAL: preds[f"none/{ORIGINAL}"]})
            cell[variant] = preds[key]
    return out


def report(params: Params, runs: dict[str, dict]) -> dict:
    """Group experiments by (axis, value, task, method); each group's statistics over its seeds."""
    s = params.study
    groups: dict[tuple[str, str, str, str], list[dict]] = {}
    baselines: dict[tuple[str, str, str, str], list[str]] = {}
    drifts: dict[tuple[str, str, str, str], dict] = {}
    seeds_of: dict[tuple[str, str, str, str], list[int]] = {}
    for exp in experiments(params):
        if exp.name in runs:
            run = dict(runs[exp.name])
            base, changed = run.pop("baseline", None), run.pop("drift", {})
            for (task, method), rows in _cells_of(exp.name, run).items():
                groups.setdefault((exp.axis, exp.value, task, method), []).append(rows)
                baselines.setdefault((exp.axis, exp.value, task, method), []).append(base)
                drifts.setdefault((exp.axis, exp.value, task, method), {}).update(changed)
                seeds_of.setdefault((exp.axis, exp.value, task, method), []).append(exp.seed)
    b = s.bootstrap
    cells = [{"axis": axis, "value": value, "task": task, "method": method,
              "baselines": [x for x in dict.fromkeys(baselines[key]) if x], "drift": drifts[key],
              **cell_stats(seeds, b.samples, b.confidence, b.seed)}
             for key, seeds in groups.items() for axis, value, task, method in [key]]
    for c in cells:
        if c["axis"] == "candidate":
            key, ref = (c["axis"], c["value"], c["task"], c["method"]), ("cells", "default", c["task"], c["method"])
            if ref in groups:
                c["vs_default"] = paired_test(dict(zip(seeds_of[ref], groups[ref])), dict(zip(seeds_of[key], groups[key])))
    return {"task": s.task, "method": s.method, "confidence": b.confidence, "cells": cells}


def paired_test(default: dict[int, dict], candidate: dict[int, dict], variant: str = CPET) -> dict | None:
    """McNemar of ``variant`` under a candidate against the default recipe, over the seeds both ran
    (same seed: same test rows): rows only the default / only the candidate got right."""
    from scipy.stats import binomtest

    seeds = [n for n in default if n in candidate and variant in default[n] and variant in candidate[n]
             and default[n]["gold"] == candidate[n]["gold"]]  # other test rows (e.g. another split): no pairs
    if not seeds:
        return None
    a = b = 0
    for n in seeds:
        gold = default[n]["gold"]
        d = [x == g for x, g in zip(default[n][variant], gold)]
        c = [x == g for x, g in zip(candidate[n][variant], gold)]
        a += sum(x and not y for x, y in zip(d, c))
        b += sum(y and not x for x, y in zip(d, c))
    return {"seeds": seeds, "only_default_right": a, "only_candidate_right": b,
            "p_value": float(binomtest(b, a + b, 0.5).pvalue) if a + b else 1.0}


def _fmt_ratio(r, lo_hi) -> str:
    if r is None:
        return "n/a"
    return f"{r:.2f} [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi[0] is not None else f"{r:.2f}"


def _fmt_paired(t) -> str:
    return "n/a" if t is None else f"{t['only_default_right']} / {t['only_candidate_right']}, p = {t['p_value']:.2g}"


def _fmt_test(t) -> str:
    return "" if t is None else f"{t['only_pet_right']} / {t['only_cpet_right']}, p = {t['p_value']:.2g}"


def _drift_text(changed: dict[str, list]) -> list[str]:
    """``key=then`` per drifted param; a whole entry that only one side has, once by its name."""
    out, done = [], set()
    for key, (then, _) in changed.items():
        parent = key.rsplit(".", 1)[0]
        if key in done:
            continue
        sub = {k: v for k, v in changed.items() if k.rsplit(".", 1)[0] == parent}
        if "." in key and len(sub) > 1 and (all(v[0] is None for v in sub.values()) or all(v[1] is None for v in sub.values())):
            done |= sub.keys()
            gone = all(v[1] is None for v in sub.values())
            out.append(f"{parent} (not in today's params)" if gone else f"no {parent}")
        else:
            out.append(f"{key}={then}")
    return out


def _commit(c: dict) -> str:
    """The baseline commit(s), and the stage params that ran otherwise than today's (up to 3)."""
    out = "+".join(c.get("baselines") or []) or "?"
    changed = _drift_text(c.get("drift") or {})
    if changed:
        out += " (ran with " + ", ".join(changed[:3]) + (f", +{len(changed) - 3} more" if len(changed) > 3 else "") + ")"
    return out


def markdown(result: dict) -> str:
    cells = result["cells"]
    lines = ["# CPET study", "",
             f"Recovery ratio (v - pet) / (original - pet), means pooled over seeds; "
             f"{result['confidence']:.0%} bootstrap interval over seeds and test rows. McNemar CPET vs "
             "PET over all seeds' test rows (rows only PET / only CPET got right, two-sided p). "
             "Commit: the baseline each experiment ran on (the newest in HEAD's history that has it), "
             "and the stage params it ran with that differ from today's params.yaml (none listed: "
             "comparable as is).", "",
             "## Every cell, default recipe", "",
             "| task | method | seeds | original+pet | inherit-only | compressed+pet | compressed+cpet | "
             "ratio [interval] | McNemar | commit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in (c for c in cells if c["axis"] == "cells"):
        m = c["mean_accuracy"]
        lines.append(f"| {c['task']} | {c['method']} | {c['seeds']} | {m.get(ORIGINAL, 0):.3f} | "
                     f"{m.get(INHERIT_ONLY, float('nan')):.3f} | {m.get(PET, 0):.3f} | {m.get(CPET, 0):.3f} | "
                     f"{_fmt_ratio(c['recovery_ratio'], c['interval'])} | {_fmt_test(c['mcnemar_pooled'])} | "
                     f"{_commit(c)} |")
    for c in (c for c in cells if c["axis"] == "ablation"):
        lines += ["", f"## Ablations on {c['task']} x {c['method']} (recipe rows; commit {_commit(c)})", "",
                  "| variant | accuracy per seed | mean | share of the gap closed [interval] |",
                  "|---|---|---|---|"]
        for k, accs in sorted(c["accuracy"].items(), key=lambda kv: c["mean_accuracy"][kv[0]]):
            share = "reference" if k in (ORIGINAL, PET) else _fmt_ratio(c["ratios"].get(k), c["intervals"].get(k, [None]))
            lines.append(f"| {k} | {' / '.join(f'{a:.3f}' for a in accs)} | {c['mean_accuracy'][k]:.3f} | {share} |")
    default = {(c["task"], c["method"]): c for c in cells if c["axis"] == "cells"}
    candidates = [c for c in cells if c["axis"] == "candidate"]
    if candidates:
        lines += ["", "## Candidate defaults on every cell (against the default recipe's row above)", "",
                  "| candidate | task | method | seeds | compressed+pet | compressed+cpet | ratio [interval] | "
                  "McNemar | default: compressed+cpet | default: ratio | cpet default / candidate only right | commit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in candidates:
            m, d = c["mean_accuracy"], default.get((c["task"], c["method"]))
            was = (f"{d['mean_accuracy'].get(CPET, 0):.3f} | {_fmt_ratio(d['recovery_ratio'], d['interval'])}"
                   if d else "n/a | n/a")
            lines.append(f"| {c['value']} | {c['task']} | {c['method']} | {c['seeds']} | {m.get(PET, 0):.3f} | "
                         f"{m.get(CPET, 0):.3f} | {_fmt_ratio(c['recovery_ratio'], c['interval'])} | "
                         f"{_fmt_test(c['mcnemar_pooled'])} | {was} | {_fmt_paired(c.get('vs_default'))} | {_commit(c)} |")
    lines += ["", "## One setting changed at a time (focus cell; the reference is the ablation run)", "",
              "| axis | value | task | method | seeds | original+pet | inherit-only | compressed+pet | "
              "compressed+cpet | ratio [interval] | McNemar | commit |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in (c for c in cells if c["axis"] not in ("cells", "candidate")):
        m = c["mean_accuracy"]
        lines.append(f"| {c['axis']} | {c['value']} | {c['task']} | {c['method']} | {c['seeds']} | "
                     f"{m.get(ORIGINAL, 0):.3f} | {m.get(INHERIT_ONLY, float('nan')):.3f} | "
                     f"{m.get(PET, 0):.3f} | {m.get(CPET, 0):.3f} | "
                     f"{_fmt_ratio(c['recovery_ratio'], c['interval'])} | {_fmt_test(c['mcnemar_pooled'])} | "
                     f"{_commit(c)} |")
    return "\n".join(lines) + "\n"


def _panel(ax, title: str, labels: list[str], ratios: list, intervals: list) -> None:
    ys = [r if r is not None else float("nan") for r in ratios]
    err = [[max(0, y - (i[0] if i[0] is not None else y)) for y, i in zip(ys, intervals)],
           [max(0, (i[1] if i[1] is not None else y) - y) for y, i in zip(ys, intervals)]]
    ax.errorbar(range(len(ys)), ys, yerr=err, fmt="o", capsize=4)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(1, color="black", ls="--", lw=0.8)
    ax.set_xticks(range(len(ys)), labels, rotation=25, ha="right", fontsize=7)
    low, high = ax.get_ylim()  # a ratio over a gap of a point or two has a huge interval: clip
    ax.set_ylim(max(low, -1.5), min(high, 2.0))
    ax.set_title(title + ("\n(intervals clipped to [-1.5, 2])" if low < -1.5 or high > 2.0 else ""), fontsize=9)


def plot(result: dict, path: Path) -> None:
    """Recovery ratio with its interval: per cell, per ablation row, and along each axis (the
    ablation run, i.e. the focus cell's default, first where the axis changes its recipe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    ref = next((c for c in cells if c["axis"] == "ablation"), None)
    panels = []
    grid = [c for c in cells if c["axis"] == "cells"]
    if grid:
        panels.append(("ratio per cell", [f"{c['task']}/{c['method']}" for c in grid],
                       [c["recovery_ratio"] for c in grid], [c["interval"] for c in grid]))
    if ref:
        keys = sorted(ref["ratios"], key=lambda k: ref["ratios"][k] if ref["ratios"][k] is not None else -9)
        panels.append((f"share of gap closed, {ref['task']}/{ref['method']}", [k.removeprefix("compressed+") for k in keys],
                       [ref["ratios"][k] for k in keys], [ref["intervals"][k] for k in keys]))
    cands = [c for c in cells if c["axis"] == "candidate"]
    if cands:
        by_cell = {(c["task"], c["method"]): c for c in grid}
        row = []
        for (task, method) in dict.fromkeys((c["task"], c["method"]) for c in cands):
            here = [by_cell[(task, method)]] if (task, method) in by_cell else []
            here += [c for c in cands if (c["task"], c["method"]) == (task, method)]
            row += [{**c, "value": f"{task}/{method} {c['value'] if c['axis'] == 'candidate' else 'default'}"}
                    for c in here]
        panels.append(("ratio per cell, default vs candidate", [c["value"] for c in row],
                       [c["recovery_ratio"] for c in row], [c["interval"] for c in row]))
    for axis in dict.fromkeys(c["axis"] for c in cells if c["axis"] not in ("cells", "ablation", "candidate")):
        row = [c for c in cells if c["axis"] == axis]
        if ref and axis != "strength":
            row = [{**ref, "value": "default"}] + row
        elif ref:
            row = [{**ref, "value": f"{ref['method']}:default"}] + [c for c in row if c["method"] == ref["method"]] + \
                  [c for c in row if c["method"] != ref["method"]]
        panels.append((f"CPET ratio vs {axis}", [c["value"] for c in row],
                       [c["recovery_ratio"] for c in row], [c["interval"] for c in row]))
    panels = panels or [("no cells", [], [], [])]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, subplots = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, panel in zip(subplots.flat, panels):
        _panel(ax, *panel)
    for ax in list(subplots.flat)[len(panels):]:
        ax.axis("off")
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
