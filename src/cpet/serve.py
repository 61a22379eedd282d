"""``cpet serve``: one compressed base in memory, N task bundles, an HTTP endpoint that switches per request.

The base is loaded once in its deployment form (packed quantized weights, see
:mod:`cpet.compress.runtime`). Each task's bundle becomes per-layer side paths (its LoRA and
identity recovery terms stacked into one low-rank path, each GELU recovery module its own; see
:mod:`cpet.export.sidepath`) behind a :class:`TaskSwitchLinear`, which adds the active task's
paths only. Adapters are never merged into the shared base: a merged adapter would change the
weights every other task uses (and leave a quantized grid).

API (FastAPI; bound to 127.0.0.1 unless told otherwise)::

    GET  /health                                   {"status": "ok", "compression": ..., "tasks": [...]}
    POST /predict {"task": "t", "texts": [...]}     one task
    POST /predict {"items": [{"task", "text"}...]}  a batch that mixes tasks
      -> {"results": [{"task", "label", "scores": {label: probability}}]}  in input order
         (probabilities: a softmax over the task's label scores, see cpet.lmcls)

Unknown task: 404; empty, oversized or malformed input: 422; a failure inside prediction: 500 with
the error's first line. The server keeps serving after any of them.
Requests run one at a time (a lock): the active task is model state, and two CPU-bound batches
side by side would only slow each other down.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cpet import paths
from cpet.compress.arch import projection
from cpet.errors import CpetError
from cpet.export.sidepath import SidePath, layer_terms, side_terms
from cpet.lmcls import Verbalizer, predict


class UnknownTaskError(CpetError):
    """A request named a task this server does not hold (the only error answered with 404)."""

    def __init__(self, task: str, served: list[str]) -> None:
        super().__init__(f"unknown task {task!r}; served: {', '.join(served)}")
        self.task = task


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    text: str


class PredictRequest(BaseModel):
    """``{"task", "texts"}`` or ``{"items": [{"task", "text"}]}`` (checked in the endpoint)."""

    model_config = ConfigDict(extra="forbid")
    task: str | None = Field(None, description="one task for every text in `texts`")
    texts: list[str] | None = None
    items: list[Item] | None = Field(None, description="a mixed batch: a task per text")


class TaskSwitchLinear(nn.Module):
    """``base(x) + sum side(x)`` over the side paths of the active task (none: the bare base)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.tasks = nn.ModuleDict()
        self.active: str | None = None
        p = projection(base)  # a float Linear / Conv1D, else a packed layer with its own *_features
        self.in_features, self.out_features = (p or base).in_features, (p or base).out_features

    def add(self, task: str, sides: list[SidePath]) -> None:
        self.tasks[task] = nn.ModuleList(sides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.active is not None and self.active in self.tasks:
            for side in self.tasks[self.active]:
                y = y + side(x)
        return y


class MultiTaskModel(nn.Module):
    """A deployment-form base with switchable per-task side paths."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.model = base
        self.task_names: list[str] = []

    def add_task(self, task: str, bundle: nn.Module) -> None:
        """Copy ``bundle``'s low-rank terms (a bundle loaded on the same base) in as ``task``."""
        dtype = next(self.model.parameters()).dtype
        for name, (_, terms) in layer_terms(bundle).items():
            layer = self.model.get_submodule(name)
            if not isinstance(layer, TaskSwitchLinear):
                layer = TaskSwitchLinear(layer)
                self.model.set_submodule(name, layer)
            layer.add(task, [SidePath(t, dtype) for t in side_terms(terms)])
        self.task_names.append(task)

    def set_task(self, task: str | None) -> None:
        for m in self.model.modules():
            if isinstance(m, TaskSwitchLinear):
                m.active = task

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


@dataclass(frozen=True)
class TaskInfo:
    template: str
    verbalizer: Verbalizer


def build_model(root: Path, method: str, tasks: list[str], variant: str) -> MultiTaskModel:
    """The compressed base ``models/compressed/<method>`` once, plus each task's bundle."""
    from cpet.compress import load_compressed_model
    from cpet.compress.runtime import to_deploy
    from cpet.pet import load_bundle

    cm = load_compressed_model(Path(root) / paths.compressed(method))
    # to_deploy works on a copy: cm.model stays the plain base each task's bundle is loaded onto
    multi = MultiTaskModel(to_deploy(cm.model, cm.records))
    for task in tasks:
        bundle_dir = Path(root) / paths.bundle(method, task, variant)
        if not (bundle_dir / "bundle.json").is_file():
            raise CpetError(f"serve: no {variant} bundle for task {task!r} at {bundle_dir} (run the recover stage)")
        multi.add_task(task, load_bundle(copy.deepcopy(cm.model), bundle_dir))
    return multi.eval().requires_grad_(False)


class Predictor:
    """Label predictions for ``(task, text)`` items, grouped by task, returned in input order."""

    def __init__(self, model: MultiTaskModel, tokenizer, tasks: dict[str, TaskInfo], *, max_length: int,
                 batch_size: int) -> None:
        self.model, self.tokenizer, self.tasks = model, tokenizer, tasks
        self.max_length, self.batch_size = max_length, batch_size
        self.lock = threading.Lock()

    def __call__(self, items: list[tuple[str, str]]) -> list[dict]:
        unknown = sorted({t for t, _ in items if t not in self.tasks})
        if unknown:
            raise UnknownTaskError(unknown[0], list(self.tasks))
        results: list[dict | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (task, _) in enumerate(items):
            groups.setdefault(task, []).append(i)
        with self.lock:
            for task, idx in groups.items():
                info = self.tasks[task]
                self.model.set_task(task)
                try:
                    pred, scores = predict(self.model, self.tokenizer, [items[i][1] for i in idx], info.template,
                                           info.verbalizer, max_length=self.max_length,
                                           batch_size=self.batch_size)
                finally:
                    self.model.set_task(None)
                probs = scores.softmax(dim=1)
                for row, i in enumerate(idx):
                    labels = info.verbalizer.labels
                    results[i] = {"task": task, "label": labels[pred[row]],
                                  "scores": {lab: round(float(p), 6) for lab, p in zip(labels, probs[row])}}
        return results  # type: ignore[return-value]


def load_predictor(params, root: Path, method: str, tasks: list[str] | None = None) -> Predictor:
    """Everything ``cpet serve`` holds in memory, from the pipeline's artifacts."""
    from transformers import AutoTokenizer

    from cpet.stages.common import task_views

    tasks = tasks or list(params.tasks)
    for t in tasks:
        if t not in params.tasks:
            raise CpetError(f"serve: --tasks: {t!r} is not a configured task ({', '.join(params.tasks)})")
    tokenizer = AutoTokenizer.from_pretrained(Path(root) / paths.BASE)
    views = {v.name: v for v in task_views(params, Path(root), tokenizer, tasks=tasks)}  # served tasks' data only
    if method not in params.compress.methods:
        raise CpetError(f"serve: --method: {method!r} is not in compress.methods ({', '.join(params.compress.methods)})")
    model = build_model(Path(root), method, tasks, params.serve.variant)
    infos = {t: TaskInfo(views[t].template, views[t].verbalizer) for t in tasks}
    return Predictor(model, tokenizer, infos, max_length=params.serve.max_length, batch_size=params.serve.batch_size)


def create_app(predictor: Predictor, *, max_texts: int, max_chars: int, compression: str = ""):
    """The FastAPI application around ``predictor`` (limits from ``params.yaml: serve``)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    app = FastAPI(title="cpet serve", description=__doc__.splitlines()[0])

    def refuse(msg: str):
        raise HTTPException(status_code=422, detail=msg)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "compression": compression, "tasks": list(predictor.tasks)}

    @app.post("/predict")
    def predict_endpoint(req: PredictRequest):
        if req.items is not None:
            if req.task is not None or req.texts is not None:
                refuse("give either 'items' or 'task' + 'texts', not both")
            items = [(it.task, it.text) for it in req.items]
        elif req.task is not None and req.texts is not None:
            items = [(req.task, t) for t in req.texts]
        else:
            refuse("give 'task' and 'texts', or 'items'")
        if not items:
            refuse("no texts given")
        if len(items) > max_texts:
            refuse(f"{len(items)} texts; at most {max_texts} per request")
        for i, (_, text) in enumerate(items):
            if not text.strip():
                refuse(f"text {i} is empty")
            if len(text) > max_chars:
                refuse(f"text {i} has {len(text)} characters; at most {max_chars}")
        try:
            return {"results": predictor(items)}
        except UnknownTaskError as err:
            return JSONResponse(status_code=404, content={"detail": str(err)})
        except Exception as err:  # noqa: BLE001 - any other failure is the server's: 500, keep serving
            first = (str(err).strip().splitlines() or [""])[0]
            detail = f"prediction failed: {type(err).__name__}" + (f": {first}" if first else "")
            return JSONResponse(status_code=500, content={"detail": detail})

    return app


def serve(params, root: Path, method: str, tasks: list[str] | None, host: str, port: int) -> None:
    """Load everything, then answer HTTP until interrupted."""
    import uvicorn

    predictor = load_predictor(params, root, method, tasks)
    app = create_app(predictor, max_texts=params.serve.max_texts, max_chars=params.serve.max_chars,
                     compression=method)
    print(f"cpet serve: {method} base + tasks {', '.join(predictor.tasks)} on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


# --------------------------------------------------------------------------- memory
def merged_models(root: Path, method: str, tasks: list[str], variant: str) -> list[nn.Module]:
    """The usual alternative: one standalone model per task with its adapter merged into the weights
    (float: a merged adapter leaves the quantization grid; GELU recovery stays a side path)."""
    from cpet.compress import load_compressed_model
    from cpet.export import deploy_model
    from cpet.pet import load_bundle

    cm = load_compressed_model(Path(root) / paths.compressed(method))
    return [deploy_model(load_bundle(copy.deepcopy(cm.model), Path(root) / paths.bundle(method, t, variant)))
            for t in tasks]


def _memory_runner(spec: dict):
    """Memory subprocess (``cpet bench``): one shared base + N bundles, or N merged models, each
    task run once per call."""
    from cpet.lmcls import label_position_logits

    root, method, tasks, variant = Path(spec["root"]), spec["method"], spec["tasks"], spec["variant"]
    # the LM head at the label position only, as `predict` computes it (not [batch, seq, vocab])
    if spec["form"] == "shared":
        model = build_model(root, method, tasks, variant)

        def run(i, m):
            for t in tasks:
                model.set_task(t)
                label_position_logits(model, {"input_ids": i, "attention_mask": m, "use_cache": False})
        return run
    models = merged_models(root, method, tasks, variant)
    return lambda i, m: [label_position_logits(mod, {"input_ids": i, "attention_mask": m, "use_cache": False})
                         for mod in models]


if __name__ == "__main__":
    from cpet.bench import memory_main

    memory_main(_memory_runner)
