"""The registered models' pyfunc: texts in, labels and scores out.

Logged as *code* (``model_code.py`` calls ``mlflow.models.set_model``), so MLflow pickles
nothing: a registered model is this code plus folders of safetensors and JSON.

Artifacts (``context.artifacts``):

- ``tokenizer``: an HF tokenizer folder;
- ``tasks``: ``tasks.json``, ``{task: {"template", "verbalizer": {label: word}, "scoring", "max_length"}}``
  (``scoring`` as in params.yaml; a model registered before it existed scored first tokens);
- ``cpet``: ``cpet.json``, what the model is (``kind``, ``compression``, ``task``, ``base_model_uri``);
- ``base``: the compressed model folder (``cpet-base-*`` models), or instead
- ``bundle``: a cpet bundle (LoRA adapter + recovery modules, ``cpet-<task>-*`` models) whose base
  is the registered base version named by ``cpet.json``'s ``base_model_uri``
  (``models:/cpet-base-int3/4``): task models reference the base instead of copying its weights.
  Loading one therefore needs the registry it was registered in.

``predict`` accepts a list of texts, a pandas Series, or a DataFrame with a ``text`` column and
optionally a ``task`` column (a base model scores every configured task zero-shot; default: its
first task). It returns a DataFrame with one row per text: ``task``, ``label``, ``score`` (the
label's probability) and ``scores`` (``{label: probability}``, a softmax over the label scores:
the label words' first-token logits, or their whole-word log-probabilities for sum/mean scoring;
the same scores ``cpet evaluate`` ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc

from cpet.errors import CpetError


class CpetClassifier(mlflow.pyfunc.PythonModel):
    """A compressed base (zero-shot) or a task bundle on it, as label-word classification."""

    batch_size = 16
    # `predict` takes lists *or* frames, so it has no type hints to validate against; this is
    # MLflow's switch for that (otherwise it warns on every class definition, i.e. every load).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from cpet.lmcls import FIRST_TOKEN, Verbalizer

        arts = context.artifacts
        self.tokenizer = AutoTokenizer.from_pretrained(arts["tokenizer"])
        self.tasks = json.loads(Path(arts["tasks"]).read_text())
        self.verbalizers = {name: Verbalizer.build(self.tokenizer, t["verbalizer"], where=f"tasks.{name}",
                                                   scoring=t.get("scoring", FIRST_TOKEN))
                            for name, t in self.tasks.items()}
        if "bundle" in arts:
            from cpet.pet import load_bundle

            base_uri = json.loads(Path(arts["cpet"]).read_text()).get("base_model_uri")
            if not base_uri:
                raise CpetError("task model without base_model_uri in cpet.json")
            base = mlflow.pyfunc.load_model(base_uri).unwrap_python_model()
            self.model = load_bundle(base.model, arts["bundle"]).eval()
        else:
            from cpet.compress import load_compressed

            self.model = load_compressed(arts["base"], form="train").eval()

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from cpet.lmcls import predict

        texts, tasks = self._inputs(model_input)
        out = pd.DataFrame({"task": tasks, "label": [""] * len(texts), "score": [0.0] * len(texts),
                            "scores": [None] * len(texts)})
        for task in dict.fromkeys(tasks):
            if task not in self.tasks:
                raise CpetError(f"unknown task {task!r}; this model knows {sorted(self.tasks)}")
            rows = [i for i, t in enumerate(tasks) if t == task]
            spec, verbalizer = self.tasks[task], self.verbalizers[task]
            idx, logits = predict(self.model, self.tokenizer, [texts[i] for i in rows], spec["template"],
                                  verbalizer, max_length=spec["max_length"], batch_size=self.batch_size)
            probs = torch.softmax(logits, dim=1).tolist()
            for row, k, p in zip(rows, idx, probs, strict=True):
                out.at[row, "label"] = verbalizer.labels[k]
                out.at[row, "score"] = p[k]
                out.at[row, "scores"] = dict(zip(verbalizer.labels, p, strict=True))
        return out

    def _inputs(self, data) -> tuple[list[str], list[str]]:
        import pandas as pd

        default = next(iter(self.tasks))
        if isinstance(data, str):
            data = [data]
        if isinstance(data, pd.Series):
            data = data.tolist()
        if isinstance(data, dict):
            data = pd.DataFrame(data)
        if isinstance(data, pd.DataFrame):
            if "text" not in data.columns:
                if len(data.columns) != 1:
                    raise CpetError(f"input needs a 'text' column, got {list(data.columns)}")
                data = data.rename(columns={data.columns[0]: "text"})
            texts = [str(t) for t in data["text"]]
            tasks = [str(t) for t in data["task"]] if "task" in data.columns else [default] * len(texts)
            return texts, tasks
        texts = [str(t) for t in data]
        return texts, [default] * len(texts)
