"""The accuracy/latency front: which compression setting buys the most speed at what accuracy.

The engine is DVC's, as for the study: ``cpet front`` runs ONE experiment,
``dvc exp run --temp -n front -S ~compress.methods.<default> ... -S +compress.methods.<name>=<cfg> bench``,
so every setting of ``params.yaml: front.methods`` goes through the whole pipeline (compress,
inherit, recover, evaluate, export, bench) with the project's own recipes, and unchanged stages
(fetch, teacher) come from the run cache. ``cpet front-report`` joins that experiment's (or the
workspace's) ``reports/results.json`` (test accuracy per task and variant) and
``reports/bench.json`` (interleaved ONNX Runtime p50 per variant and batch) into
``reports/front.{json,md,png}``: per setting, accuracy of ``compressed+pet`` and
``compressed+cpet`` on every task and their ORT speedup over ``original+pet`` at each batch size.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from cpet import io
from cpet.config import Params
from cpet.config.recipes import CPET, ORIGINAL, PET
from cpet.errors import CpetError
from cpet.study import experiment_revs, read_json_at

EXPERIMENT = "front"
RUNTIME = "onnxruntime"
REPORTS = Path("reports")


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (what ``dvc exp run -S`` parses)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", text) else "'" + text.replace("'", "\\'") + "'"


def overrides(params: Params) -> list[str]:
    """Replace ``compress.methods`` by ``front.methods``; the bench times every one of them."""
    out = [f"~compress.methods.{m}" for m in params.compress.methods]
    out += [f"+compress.methods.{name}={hydra_value(raw)}" for name, raw in params.front.methods.items()]
    if params.export.variant != CPET:
        out.append(f"export.variant={CPET}")
    return out


def run(params: Params, root: Path, dry_run: bool = False) -> str:
    """Run the front's experiment (``dvc exp run --temp``); returns the command."""
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", EXPERIMENT]
    for o in overrides(params):
        cmd += ["-S", o]
    shown = " ".join(["dvc", *cmd[3:], "bench"])
    if not dry_run:
        proc = subprocess.run([*cmd, "bench"], cwd=root, text=True)
        if proc.returncode:
            raise CpetError(f"front: dvc exp run failed (exit {proc.returncode}); fix it and rerun `cpet front`")
    return shown


def _read(root: Path, rel: str, rev: str | None) -> Any:
    if rev is None:
        path = root / rel
        if not path.is_file():
            raise CpetError(f"{path}: missing; run the pipeline (`dvc repro bench`) or `cpet front` first")
        return json.loads(path.read_text())
    return read_json_at(root, rev, rel, EXPERIMENT)


def table(results: list[dict], bench: list[dict], tolerance: float) -> dict:
    """Per compression setting: accuracies, their drop from original+pet, ORT speedups (pure)."""
    acc: dict[tuple[str, str, str], float] = {(r["compression"], r["variant"], r["task"]): r["accuracy"]
                                              for r in results if r.get("split", "test") == "test"}
    tasks = sorted({t for _, _, t in acc})
    ort = {(r["compression"], r["variant"], r["batch"]): r["p50_ms"] for r in bench if r["runtime"] == RUNTIME}
    batches = sorted({b for _, _, b in ort})
    original = {t: acc[("none", ORIGINAL, t)] for t in tasks if ("none", ORIGINAL, t) in acc}
    settings = sorted({c for c, _, _ in acc if c != "none"})
    rows = []
    for c in settings:
        row: dict[str, Any] = {"compression": c}
        for v in (PET, CPET):
            row[v] = {t: acc.get((c, v, t)) for t in tasks}
            drops = [original[t] - a for t, a in row[v].items() if a is not None and t in original]
            row[f"{v} max_drop"] = max(drops) if drops and len(drops) == len(tasks) else None
            row[f"{v} within_tolerance"] = row[f"{v} max_drop"] is not None and row[f"{v} max_drop"] <= tolerance
            for b in batches:
                ms, ref = ort.get((c, v, b)), ort.get(("none", ORIGINAL, b))
                row[f"{v} speedup b{b}"] = round(ref / ms, 3) if ms and ref else None
        rows.append(row)
    return {"tasks": tasks, "batches": batches, "original": original, "tolerance": tolerance, "rows": rows}


def best(front: dict, batch: int) -> dict | None:
    """The fastest compressed+cpet setting within tolerance on every task at ``batch``."""
    ok = [r for r in front["rows"] if r[f"{CPET} within_tolerance"] and r.get(f"{CPET} speedup b{batch}")]
    return max(ok, key=lambda r: r[f"{CPET} speedup b{batch}"], default=None)


def markdown(front: dict) -> str:
    tasks, batches = front["tasks"], front["batches"]
    head = ["setting", *(f"{v.split('+')[1]} {t}" for v in (PET, CPET) for t in tasks),
            *(f"cpet x b{b}" for b in batches), *(f"pet x b{b}" for b in batches),
            f"cpet within {front['tolerance'] * 100:.0f} pt"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| original+pet | " + " | ".join(f"{front['original'].get(t, float('nan')):.3f}" for _ in (PET, CPET)
                                             for t in tasks) + " |" + " 1.00 |" * (2 * len(batches)) + " |"]
    fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
    for r in front["rows"]:
        cells = [r["compression"], *(fmt(r[v][t], ".3f") for v in (PET, CPET) for t in tasks),
                 *(fmt(r[f"{CPET} speedup b{b}"], ".2f") for b in batches),
                 *(fmt(r[f"{PET} speedup b{b}"], ".2f") for b in batches),
                 "yes" if r[f"{CPET} within_tolerance"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    for b in batches:
        top = best(front, b)
        lines.append("")
        lines.append(f"Best at batch {b}: " + (f"{top['compression']}, {top[f'{CPET} speedup b{b}']:.2f}x "
                                                 f"over original+pet" if top else "no setting within tolerance"))
    return "\n".join(lines) + "\n"


def plot(front: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(front["batches"]), figsize=(5 * len(front["batches"]), 4), squeeze=False)
    for ax, b in zip(axes[0], front["batches"]):
        for v, marker in ((PET, "o"), (CPET, "s")):
            pts = [(r[f"{v} speedup b{b}"], r[f"{v} max_drop"], r["compression"]) for r in front["rows"]
                   if r[f"{v} speedup b{b}"] is not None and r[f"{v} max_drop"] is not None]
            ax.scatter([p[0] for p in pts], [100 * p[1] for p in pts], marker=marker, label=v)
            for x, y, name in pts:
                ax.annotate(name, (x, 100 * y), fontsize=7)
        ax.axhline(100 * front["tolerance"], ls="--", c="grey", lw=0.8)
        ax.set(xlabel=f"ORT speedup over original+pet (batch {b})", ylabel="worst-task accuracy drop (points)")
        ax.legend()
    fig.tight_layout()
    io.save_figure(fig, path, dpi=120)


def write_report(params: Params, root: Path, workspace: bool = False) -> dict:
    """``reports/front.{json,md,png}`` from the front experiment (or, ``workspace``, the workspace)."""
    rev = None
    if not workspace:
        rev = experiment_revs(root).get(EXPERIMENT)
        if rev is None:
            raise CpetError(f"no DVC experiment named {EXPERIMENT!r} on this commit: run `cpet front` first "
                            "(or `cpet front-report --workspace` for the workspace's reports)")
    front = table(_read(root, "reports/results.json", rev), _read(root, "reports/bench.json", rev),
                  params.front.accuracy_tolerance)
    front["source"] = f"experiment {rev}" if rev else "workspace"
    out = root / REPORTS
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "front.json", front)
    io.write_text(out / "front.md", markdown(front))
    plot(front, out / "front.png")
    return front
