"""``cpet compress-model``: compress any HF causal LM without running the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

from cpet import io
from cpet.data import read_jsonl
from cpet.errors import ConfigError, DataError


def _calibration(path: Path, tokenizer, samples: int, max_length: int, batch_size: int) -> list[dict]:
    """Batches from a .jsonl file of {"text": ...} rows or a plain text file (one text a line)."""
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict) or not isinstance(r.get("text"), str)), None)
        if bad is not None:
            raise DataError(f"{path}:{bad}: expected an object with a string 'text'")
        texts = [r["text"] for r in rows]
    else:
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise DataError(f"{path}: no calibration texts")
    texts = texts[:samples]
    return [
        dict(tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True,
                       truncation=True, max_length=max_length))
        for i in range(0, len(texts), batch_size)
    ]


def compress_model(model_path: str, method: dict, out: Path, *, calib: Path | None = None,
                   samples: int = 64, max_length: int = 128, batch_size: int = 8,
                   trust_remote_code: bool = False) -> dict:
    """Load ``model_path`` (safetensors only), compress it with ``method``, save to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpet.compress import compress, parse_config, save_compressed

    cfg = parse_config("--method", method, prefix="compress-model")
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = _calibration(calib, tokenizer, samples, max_length, batch_size) if calib else None
    cm = compress(model, cfg, batches)
    weights = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    source = io.sha256_file(weights[0]) if len(weights) == 1 else None
    manifest = save_compressed(cm, out, source_hash=source)
    return {k: manifest[k] for k in ("method", "parameters", "bytes_on_disk", "sparsity") if k in manifest}


def parse_method_arg(value: str, params_path: Path) -> dict:
    """``--method`` is a method name from params.yaml's compress.methods, or an inline JSON config."""
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--method: invalid JSON ({err.msg})") from None
    from cpet.config import load_params

    methods = load_params(params_path).compress.methods
    if value not in methods:
        raise ConfigError(f"--method: {value!r} is not in {params_path} compress.methods "
                          f"({', '.join(methods)}); or pass a JSON config")
    return methods[value]


def bundle_predict(params, root: Path, bundle: Path, texts: list[str], *, task: str | None = None,
                   base: Path | None = None) -> list[dict]:
    """Classify ``texts`` with a bundle folder, no registry: ``models/recover/<method>/<task>/<variant>``
    on its compressed base ``models/compressed/<method>`` (or ``base``), the task's template and
    label words from params.yaml (``task`` defaults to the folder's). Rows as ``cpet predict`` prints."""
    import torch

    from cpet import paths
    from cpet.compress import load_compressed
    from cpet.lmcls import predict
    from cpet.pet import load_bundle
    from cpet.stages.common import load_tokenizer, task_views

    bundle = Path(bundle)
    if not (bundle / "adapter").is_dir():
        raise DataError(f"{bundle}: not a bundle folder (no adapter/ inside; expected "
                        "models/recover/<method>/<task>/<variant>)")
    task = task or bundle.parent.name
    if task not in params.tasks:
        raise ConfigError(f"--task: {task!r} is not a configured task ({', '.join(params.tasks)}); "
                          "pass --task for a bundle outside models/recover/<method>/<task>/<variant>")
    base = Path(base) if base else paths.require(root, paths.compressed(bundle.parent.parent.name))
    tokenizer = load_tokenizer(root)
    (view,) = task_views(params, root, tokenizer, tasks=[task])
    model = load_bundle(load_compressed(base, form="train"), bundle).eval()
    idx, scores = predict(model, tokenizer, texts, view.template, view.verbalizer,
                          max_length=params.serve.max_length, batch_size=params.serve.batch_size)
    probs = torch.softmax(scores, dim=1).tolist()
    labels = view.verbalizer.labels
    return [prediction_row(t, task, labels[k], p[k], dict(zip(labels, p, strict=True)))
            for t, k, p in zip(texts, idx, probs, strict=True)]


def prediction_row(text: str, task: str, label: str, score: float, scores: dict[str, float]) -> dict:
    """One line of ``cpet predict``'s output (bundle or registered model alike)."""
    return {"text": text, "task": task, "label": label, "score": round(float(score), 6),
            "scores": {k: round(float(v), 6) for k, v in scores.items()}}
