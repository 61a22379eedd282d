"""The model registry: what gets registered, and the one rule that moves ``champion``.

Per compression method ``<m>``:

- ``cpet-base-<m>``: the compressed model folder + tokenizer + every task's template/verbalizer
  (zero-shot). Metrics from ``reports/compress/<m>.json``: ``accuracy`` (the worst task's
  zero-shot validation accuracy), ``latency_ms``, ``size_ratio``, ``perplexity``.
- ``cpet-<task>-<m>``: the ``register.variant`` bundle (inherited LoRA adapter + recovery modules)
  + tokenizer + that task's template/verbalizer, *referencing* the base version registered in the
  same run (``models:/cpet-base-<m>/<n>``) instead of copying its weights (a bundle is 4-40 MB, a
  base 150-450 MB). Metrics from ``reports/results.json``: ``accuracy``, ``macro_f1``,
  ``recovery_ratio`` = (variant - pet) / (original - pet), plus the base's ``latency_ms``/``size_ratio``.

Every version carries a model card, ``artifacts/README.md`` (Hugging Face format, built by
:mod:`cpet.tracking.card`: base hash, compression and adapter recipes, data hashes, results,
lineage, how to load, limits); ``cpet card models:/<name>@champion`` prints it.

Every version is tagged ``metric.<name>`` and ``cpet.fingerprint`` (a hash of what it contains);
registering identical contents again reuses the version instead of piling up copies, and the
gates are re-checked. :func:`promote` is the only place the alias moves (``cpet promote``, the
``register`` stage and so the flow all call it).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from cpet import io, paths
from cpet.errors import CpetError
from cpet.tracking import card as card_module
from cpet.tracking.gates import Decision, check_gates
from cpet.tracking.runs import artifact_location, connect, experiment_id, resolve_uri

CHAMPION = "champion"
MODEL_CODE = Path(__file__).with_name("model_code.py")
REPORT = Path("reports") / "register.json"
# What a loading environment needs besides cpet itself (pinned as installed; no inference run).
REQUIREMENTS = ("torch", "transformers", "tokenizers", "peft", "safetensors", "mlflow", "pandas", "numpy")


def base_name(method: str) -> str:
    return f"cpet-base-{method}"


def task_name(task: str, method: str) -> str:
    return f"cpet-{task}-{method}"


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    decision: Decision
    metrics: dict
    reused: bool

    def summary(self) -> dict:
        return {"version": self.version, "champion": self.decision.passed, "reused": self.reused,
                "gates": self.decision.tags(), "metrics": self.metrics}


# --------------------------------------------------------------------------- metrics
def base_metrics(report: dict) -> dict[str, float | None]:
    """Gate metrics of a compressed base from its ``reports/compress/<m>.json``."""
    after = report["after"]
    accs = [t["accuracy"] for t in after.get("tasks", {}).values()]
    return {"accuracy": min(accs) if accs else None, "latency_ms": after.get("latency_ms"),
            "size_ratio": report.get("size_ratio"), "perplexity": after.get("perplexity")}


def task_metrics(rows: list[dict], report: dict, task: str, method: str, variant: str) -> dict[str, float | None]:
    """Gate metrics of one task bundle from ``reports/results.json`` rows (+ its base's report)."""
    acc = {(r["task"], r["compression"], r["variant"]): r for r in rows}
    row = acc.get((task, method, variant))
    if row is None:
        raise CpetError(f"reports/results.json: no row for {task}/{method}/{variant}; run `cpet evaluate`")
    orig = acc.get((task, "none", "original+pet"), {}).get("accuracy")
    pet = acc.get((task, method, "compressed+pet"), {}).get("accuracy")
    ratio = None
    if orig is not None and pet is not None and abs(orig - pet) > 1e-9:
        ratio = (row["accuracy"] - pet) / (orig - pet)
    return {"accuracy": row["accuracy"], "macro_f1": row["macro_f1"], "recovery_ratio": ratio,
            "original_accuracy": orig, "pet_accuracy": pet,
            "latency_ms": report["after"].get("latency_ms"), "size_ratio": report.get("size_ratio")}


# --------------------------------------------------------------------------- promotion
def promote(client, name: str, version: str, metrics: dict, gates: dict) -> Decision:
    """The promotion rule: ``champion`` moves to ``version`` only if every gate passes.

    The version is tagged with its metrics and each gate's outcome. A failing version is tagged
    ``gate_failed`` and keeps no alias (if it held ``champion``, it loses it); any other champion
    stays where it is.
    """
    decision = check_gates(metrics, gates)
    tags = {f"metric.{k}": "n/a" if v is None else f"{v:.6g}" for k, v in metrics.items()}
    tags.update(decision.tags())
    tags["gates.checked"] = json.dumps({k: v for k, v in gates.items() if v is not None}, sort_keys=True)
    current = client.get_model_version(name, version)
    for stale in set(current.tags) - set(tags):  # outcomes of gates checked last time
        if stale.startswith("gate"):
            client.delete_model_version_tag(name, version, stale)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if decision.passed:
        client.set_registered_model_alias(name, CHAMPION, version)
    elif CHAMPION in (current.aliases or []):
        client.delete_registered_model_alias(name, CHAMPION)
    return decision


def version_metrics(client, name: str, version: str) -> dict[str, float | None]:
    """Metrics a version was registered with (its ``metric.*`` tags)."""
    tags = client.get_model_version(name, version).tags
    out = {}
    for k, v in tags.items():
        if k.startswith("metric."):
            out[k.removeprefix("metric.")] = None if v == "n/a" else float(v)
    if not out:
        raise CpetError(f"{name} v{version}: no metric.* tags; was it registered by `cpet register`?")
    return out


def latest_version(client, name: str) -> str:
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise CpetError(f"registered model {name!r} not found (or has no versions)")
    return str(max(int(v.version) for v in versions))


# --------------------------------------------------------------------------- registration
def _fingerprint(artifacts: dict[str, Path]) -> str:
    h = hashlib.sha256()
    for name, path in sorted(artifacts.items()):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for f in files:
            rel = f.relative_to(path).as_posix() if Path(path).is_dir() else f.name
            h.update(f"{name}/{rel}:{io.sha256_file(f)}".encode())
    return h.hexdigest()


def _log(client, name: str, artifacts: dict[str, Path], about: dict, tmp: Path, card: str) -> tuple[str, bool]:
    """Log + register a pyfunc version (or reuse the version holding identical contents).

    ``about`` goes into the model as ``cpet.json`` (not ``model_config``, which MLflow also logs
    as run params, and those clash between the models one register run logs). ``card`` (the
    model card) is logged as ``artifacts/README.md``, next to the weights it describes; it is not
    part of the fingerprint (it names the git commit), so a reused version keeps the card it was
    registered with.
    """
    import mlflow

    about_file = tmp / name / "cpet.json"
    io.write_json(about_file, about)
    artifacts = {**artifacts, "cpet": about_file}
    fp = _fingerprint(artifacts)
    for v in client.search_model_versions(f"name = '{name}'"):
        if v.tags.get("cpet.fingerprint") == fp:
            return str(v.version), True
    card_file = tmp / name / card_module.FILE
    card_file.write_text(card)
    artifacts["card"] = card_file
    reqs = [f"{p}=={metadata.version(p)}" for p in REQUIREMENTS]
    info = mlflow.pyfunc.log_model(
        name=name, python_model=str(MODEL_CODE), artifacts={k: str(v) for k, v in artifacts.items()},
        pip_requirements=reqs, registered_model_name=name,
    )
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "cpet.fingerprint", fp)
    return version, False


def _task_spec(params, root: Path, task: str) -> dict:
    """What the pyfunc needs of a task; the words as the stages build them (a null verbalizer: the
    label names from the task's manifest)."""
    from cpet import data

    cfg = params.tasks[task]
    words = cfg.label_words(data.load_manifest(root, task)["labels"])
    return {"template": cfg.template, "verbalizer": words, "scoring": cfg.scoring,
            "max_length": params.evaluate.max_length}


def register_all(params, root: str | os.PathLike = ".") -> dict:
    """Register (or reuse) every base and task model, apply the gates; writes reports/register.json."""
    import mlflow
    from transformers import AutoTokenizer

    root = Path(root)
    uri = resolve_uri(params.track, root)
    client = connect(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.active_run() is None:  # tracking off: the logged models still need an experiment
        mlflow.set_experiment(experiment_id=experiment_id(client, params.track.experiment,
                                                          artifact_location(uri, root)))
    cfg = params.register_
    results = root / "reports" / "results.json"
    if not results.is_file():
        raise CpetError(f"{results}: missing; run `cpet evaluate` first")
    rows = json.loads(results.read_text())
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        AutoTokenizer.from_pretrained(root / paths.BASE).save_pretrained(tmp / "tokenizer")
        io.write_json(tmp / "all" / "tasks.json", {t: _task_spec(params, root, t) for t in params.tasks})
        for method in params.recover_methods():
            report = json.loads((root / "reports" / "compress" / f"{method}.json").read_text())
            name = base_name(method)
            metrics = base_metrics(report)
            version, reused = _log(client, name, {"base": root / paths.compressed(method),
                                                  "tokenizer": tmp / "tokenizer", "tasks": tmp / "all" / "tasks.json"},
                                   {"kind": "base", "compression": method}, tmp,
                                   card_module.render(card_module.base_facts(params, root, method, name)))
            done = Registered(name, version, promote(client, name, version, metrics, cfg.base_gates), metrics, reused)
            out[name] = done.summary()
            for task in params.tasks:
                bundle = root / paths.bundle(method, task, cfg.variant)
                if not (bundle / "bundle.json").is_file():
                    raise CpetError(f"{bundle}: no bundle; run `cpet recover --method {method}`")
                spec = tmp / task / "tasks.json"
                io.write_json(spec, {task: _task_spec(params, root, task)})
                tname = task_name(task, method)
                tmetrics = task_metrics(rows, report, task, method, cfg.variant)
                tversion, treused = _log(
                    client, tname, {"bundle": bundle, "tokenizer": tmp / "tokenizer", "tasks": spec},
                    {"kind": "task", "compression": method, "task": task, "variant": cfg.variant,
                     "base_model_uri": f"models:/{name}/{version}"}, tmp,
                    card_module.render(card_module.task_facts(params, root, method, task, cfg.variant, tname)))
                tdone = Registered(tname, tversion, promote(client, tname, tversion, tmetrics, cfg.task_gates),
                                   tmetrics, treused)
                out[tname] = tdone.summary()
    summary = {"models": out,
               "champions": sum(m["champion"] for m in out.values()), "registered": len(out)}
    io.write_json(root / REPORT, summary)
    return summary
