"""Small pieces several stages share: loading the base model, task views, calibration prompts."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cpet import data, io, paths
from cpet.config import Params
from cpet.env import TORCH_GLOBALS, cuda_devices, device, is_main_process
from cpet.errors import ConfigError
from cpet.lmcls import Verbalizer
from cpet.stages.validate import require_valid

BASE_DIR = paths.BASE


def load_base(root: Path):
    """The original model (float32, eval mode, on :func:`cpet.env.device`) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = paths.require(root, BASE_DIR)
    with TORCH_GLOBALS:  # from_pretrained patches torch globally while it builds the model
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    return model.to(device()).eval(), AutoTokenizer.from_pretrained(path)


def load_tokenizer(root: Path):
    """The base model's tokenizer (checked present and whole first)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(paths.require(root, BASE_DIR))


@dataclass(frozen=True)
class TaskView:
    """One validated task: its rows per split, prompt template and verbalizer."""

    name: str
    template: str
    verbalizer: Verbalizer
    root: Path

    def rows(self, split: str) -> list[dict]:
        return data.load_split(self.root, self.name, split)


def task_views(params: Params, root: Path, tokenizer, tasks: list[str] | None = None) -> list[TaskView]:
    """Every configured task (or those of ``tasks``), after checking its data passed validation
    and its verbalizer covers exactly the task's labels (a null verbalizer: each label's name is
    its word)."""
    views = []
    for name, cfg in params.tasks.items():
        if tasks is not None and name not in tasks:
            continue
        require_valid(root, name)
        labels = data.load_manifest(root, name)["labels"]
        if cfg.verbalizer is not None and sorted(cfg.verbalizer) != sorted(labels):
            raise ConfigError(
                f"tasks.{name}.verbalizer: labels {sorted(cfg.verbalizer)} != data labels {labels}"
            )
        words = cfg.label_words(labels)
        verbalizer = Verbalizer.build(tokenizer, words, where=f"tasks.{name}.verbalizer", scoring=cfg.scoring)
        views.append(TaskView(name, cfg.template, verbalizer, Path(root)))
    return views


def calibration_batches(views: list[TaskView], tokenizer, *, samples: int, max_length: int,
                        batch_size: int, seed: int) -> list[dict]:
    """Prompts drawn evenly from every task's train split, tokenized into batches."""
    rng = random.Random(seed)
    per_task = -(-samples // len(views))
    prompts: list[tuple[str, str]] = []
    for view in views:
        rows = view.rows("train")
        prompts += [(view.template, r["text"]) for r in rng.sample(rows, min(per_task, len(rows)))]
    rng.shuffle(prompts)
    prompts = prompts[:samples]
    from cpet.train import pad_batch, tokenize_prompts

    seqs = [tokenize_prompts(tokenizer, [text], template, max_length)[0] for template, text in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [pad_batch(seqs[i : i + batch_size], pad) for i in range(0, len(seqs), batch_size)]


def task_identity(view: TaskView) -> dict:
    """What of a task decides a trained adapter besides its data: the prompt, the labels, their
    words' whole token sequences and the scoring (a changed word or scoring retrains, even when
    its first token stays)."""
    return {"task": view.name, "template": view.template, "labels": list(view.verbalizer.labels),
            **view.verbalizer.identity()}


def data_hashes(root: Path, task: str) -> dict:
    """The splits training reads: train (steps) and validation (best-step choice)."""
    folder = Path(root) / "data" / "processed" / task
    return {split: io.sha256_file(folder / f"{split}.jsonl") for split in ("train", "validation")}


def checkpoint_dir(params: Params, root: Path, stage: str, *parts: str, inputs: dict) -> tuple[Path, str]:
    """Resumable-checkpoint folder (outside the DVC outputs, which DVC deletes before a run) and
    its key: a hash of ``inputs`` (everything that decides the trained weights: content hashes of
    the models and data read, the task's prompt, label words' tokens and scoring, the recipe) plus the package's
    code. A changed input gets a fresh folder, so a rerun never resumes a stale run; the other
    keys' folders for the same item are stale and removed."""
    key = hashlib.sha256(json.dumps({**inputs, "code": io.code_hash()}, sort_keys=True,
                                    default=str).encode()).hexdigest()
    parent = Path(root) / params.fetch.cache_dir / "checkpoints" / stage / Path(*parts)
    if is_main_process() and parent.is_dir():
        for old in parent.iterdir():
            if old.name != key[:16]:
                shutil.rmtree(old, ignore_errors=True)
    return parent / key[:16], key



@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build new trainable modules under this: python, numpy and torch (CPU and CUDA) are seeded
    first, so their initial weights (peft's LoRA A, the recovery modules' down-projections) follow
    the recipe's seed and a rerun from scratch trains the same adapter. The trainer's RNG lock
    keeps stages that a Prefect thread runner runs side by side from drawing from each other's
    seeded stream; the global RNG state is restored afterwards."""
    import torch
    from transformers import set_seed

    with TORCH_GLOBALS, torch.random.fork_rng(devices=cuda_devices()):
        set_seed(seed)
        yield


def train_examples(view: TaskView, split: str = "train"):
    """``cpet.train.Example`` rows; ``index`` is the row in the split (= the teacher-cache row)."""
    from cpet.train import Example

    index = {label: i for i, label in enumerate(view.verbalizer.labels)}
    return [Example(r["text"], index[r["label"]], i) for i, r in enumerate(view.rows(split))]


def evaluator(view: TaskView, tokenizer, split: str, max_length: int, batch_size: int = 32):
    """Validation/test callback over one split of a task."""
    from cpet.evaluation import rows_evaluator

    return rows_evaluator(tokenizer, view.rows(split), view.template, view.verbalizer,
                          max_length=max_length, batch_size=batch_size)


CURVES = Path("reports") / "curves"  # per-step learning curves: DVC plots and MLflow step metrics


def train_adapter(model, tokenizer, view: TaskView, config, ckpt: tuple[Path, str],
                  loss_fn=None) -> tuple[dict, list[dict]]:
    """Train ``model``'s trainable parameters on the task (best step chosen on validation);
    ``ckpt`` = :func:`checkpoint_dir`'s folder and key. Returns the run's summary and its
    per-step history (``step``, ``lr``, ``loss``, loss terms; ``validation`` accuracy at
    evaluation steps)."""
    from cpet.distill import TaskLoss
    from cpet.train import TokenizedExamples, train

    data = TokenizedExamples.build(tokenizer, train_examples(view), view.template, config.max_length)
    result = train(model, data, loss_fn or TaskLoss(view.verbalizer), config,
                   evaluate=evaluator(view, tokenizer, "validation", config.max_length),
                   checkpoint_dir=ckpt[0], checkpoint_key=ckpt[1])
    return {"steps": result.steps, "best_step": result.best_step,
            "best_validation_accuracy": result.best_metric, "final_loss": result.final_loss,
            "examples_per_s": round(result.examples_per_s, 2), "resumed_from": result.resumed_from,
            "bf16": result.bf16}, result.history


def load_compressed_base(root: Path, method: str):
    """The compressed model ``models/compressed/<method>`` in training form (on
    :func:`cpet.env.device`), and its kept map."""
    from cpet.compress import load_compressed, read_manifest

    folder = paths.require(root, paths.compressed(method))
    return load_compressed(folder, form="train").to(device()).eval(), read_manifest(folder).get("kept")
