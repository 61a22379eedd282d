"""Losses: the task loss on the verbalizer's label scores, and CPET's distillation from a cached teacher.

Label scores (``cpet.lmcls.label_scores``): with ``first-token`` scoring the label tokens' logits
at the last prompt position (only the last positions' logits are computed); with ``sum``/``mean``
each label word's (length-normalised) log-probability after the prompt. Either way
``[batch, n_labels]``, and the task loss is the cross-entropy over them.
Distillation (student = compressed model + inherited LoRA + recovery; teacher = the *uncompressed*
model + its task adapter, frozen)::

    loss = task + alpha * mean_l MSE(h_s[l], h_t[l])      (real tokens only, layers l of output_hidden_states)
                + beta * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))    (label scores z)

The teacher runs once over the training set (``build_teacher_cache``); a step reads its outputs by
example index, so a CPET step costs about as much as a plain LoRA step.

Cache file (one safetensors file; tensors per example are ragged, concatenated along tokens)::

    offsets       int64 [N+1]           tokens of example i are rows offsets[i]:offsets[i+1]
    input_ids     int32 [T]             the prompt tokens (checked against the student's batch)
    hidden.<l>    fp16  [T, hidden]     teacher hidden state l (index into output_hidden_states)
    label_logits  fp32  [N, n_labels]   teacher label scores (logits or log-probs, per scoring)
    metadata: one entry "cpet", JSON of format, layers, template, max_length and the verbalizer's
              identity (scoring, label_token_ids, label_sequences): a cache is refused by a
              student whose verbalizer differs (a cache without scoring was first-token)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from cpet.config.library import DistillConfig
from cpet.errors import ConfigError, DataError
from cpet.lmcls import FIRST_TOKEN, Verbalizer, label_scores
from cpet.train.data import pad_batch, tokenize_prompts

CACHE_FORMAT = "cpet-teacher-cache/2"  # 2: metadata as one JSON entry (deterministic bytes)


@dataclass
class LMOutput:
    label_logits: torch.Tensor  # [batch, n_labels] label scores, float32 (logits for first-token scoring)
    hidden: dict[int, torch.Tensor]  # layer -> [batch, seq, hidden]; empty unless asked for


def lm_forward(model: nn.Module, batch: dict, verbalizer: Verbalizer, layers: Sequence[int] = ()) -> LMOutput:
    """One forward pass: the verbalizer's label scores per row (+ the prompts' hidden states if asked).

    See ``cpet.lmcls.label_scores``: logits only where labels are scored, hidden states only when
    ``layers`` is non-empty, no KV cache.
    """
    out = label_scores(model, batch, verbalizer, layers)
    return LMOutput(out.scores, out.hidden)


def task_loss(label_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the label scores (for first-token scoring: restricted to the label tokens'
    logits, which equals it over their log-probabilities)."""
    return F.cross_entropy(label_logits, labels)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real (non-pad) tokens and hidden units, in float32 (also under autocast)."""
    m = mask.unsqueeze(-1).float()
    return ((student.float() - teacher.float()).square() * m).sum() / (m.sum() * student.shape[-1])


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` on tempered label-score distributions, mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    log_target=True, reduction="batchmean") * t * t


class TaskLoss:
    """``loss_fn`` for plain PET training: task loss only, no hidden states."""

    def __init__(self, verbalizer: Verbalizer) -> None:
        self.verbalizer = verbalizer

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss = task_loss(lm_forward(model, batch, self.verbalizer).label_logits, batch["labels"])
        return loss, {"task": float(loss.detach())}


@dataclass
class TeacherOutput:
    label_logits: torch.Tensor
    hidden: dict[int, torch.Tensor]


class TeacherCache:
    """Teacher outputs on the training set, read by example index (``batch["index"]``)."""

    def __init__(self, offsets: torch.Tensor, input_ids: torch.Tensor, hidden: dict[int, torch.Tensor],
                 label_logits: torch.Tensor, meta: dict) -> None:
        self.offsets, self.input_ids, self.hidden, self.label_logits, self.meta = (
            offsets, input_ids, hidden, label_logits, meta)

    @property
    def layers(self) -> list[int]:
        return list(self.hidden)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def save(self, path: str | os.PathLike) -> Path:
        from cpet.io import write_bytes
        from safetensors.torch import save

        tensors = {"offsets": self.offsets, "input_ids": self.input_ids, "label_logits": self.label_logits,
                   **{f"hidden.{l}": h for l, h in self.hidden.items()}}
        # One metadata entry: safetensors writes a multi-key metadata map in random order, and
        # identical caches must be identical bytes (DVC hashes them to decide what reruns).
        meta = {"cpet": json.dumps({"format": CACHE_FORMAT, **self.meta}, sort_keys=True)}
        return write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TeacherCache:
        with safe_open(str(path), framework="pt") as f:
            try:
                raw = json.loads((f.metadata() or {}).get("cpet", "{}"))
            except json.JSONDecodeError:
                raw = {}
            if raw.get("format") != CACHE_FORMAT:
                raise DataError(f"{path}: not a teacher cache of this cpet version (format {raw.get('format')!r}, "
                                f"want {CACHE_FORMAT!r}); rerun the teacher stage")
            t = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in raw.items() if k != "format"}
        hidden = {l: t[f"hidden.{l}"] for l in meta["layers"]}
        return cls(t["offsets"], t["input_ids"], hidden, t["label_logits"], meta)

    def lookup(self, batch: dict, layers: Sequence[int]) -> TeacherOutput:
        """Teacher outputs for the batch's examples, right-padded like the batch (float32)."""
        index = batch["index"].cpu()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        width = ids.shape[1]
        missing = [l for l in layers if l not in self.hidden]
        if missing:
            raise ConfigError(f"distill.layers: {missing} not in the teacher cache (has {self.layers})")
        hidden = {l: torch.zeros(len(index), width, self.hidden[l].shape[1]) for l in layers}
        lengths = mask.sum(1).cpu()
        for row, i in enumerate(index.tolist()):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            if b - a != int(lengths[row]) or not torch.equal(self.input_ids[a:b].long(), ids[row, : b - a].cpu()):
                raise DataError(f"teacher cache row {i} does not hold this example's tokens "
                                "(other data, template or max_length than the cache was built with)")
            for l in layers:
                hidden[l][row, : b - a] = self.hidden[l][a:b]
        dev = ids.device
        return TeacherOutput(self.label_logits[index].to(dev), {l: h.to(dev) for l, h in hidden.items()})


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, batch: dict, verbalizer: Verbalizer, layers: Sequence[int]) -> TeacherOutput:
    was = teacher.training
    teacher.eval()
    out = lm_forward(teacher, batch, verbalizer, layers)
    teacher.train(was)
    return TeacherOutput(out.label_logits, {l: h.float() for l, h in out.hidden.items()})


@torch.no_grad()
def build_teacher_cache(teacher: nn.Module, tokenizer, texts: Sequence[str], template: str, verbalizer: Verbalizer,
                        layers: Sequence[int] = (-1,), max_length: int = 128, batch_size: int = 16) -> TeacherCache:
    """Run the frozen teacher once over ``texts`` (row i = texts[i]); batches are length-sorted."""
    seqs = tokenize_prompts(tokenizer, texts, template, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(teacher.parameters()).device
    lengths = torch.tensor([len(s) for s in seqs])
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    hidden: dict[int, torch.Tensor] = {}
    logits = torch.zeros(len(seqs), len(verbalizer.labels))
    by_length = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(seqs), batch_size):
        rows = by_length[start : start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([seqs[i] for i in rows], pad).items()}
        out = teacher_outputs(teacher, batch, verbalizer, layers)
        logits[rows] = out.label_logits.cpu()
        for l, h in out.hidden.items():
            if l not in hidden:
                hidden[l] = torch.zeros(int(offsets[-1]), h.shape[-1], dtype=torch.float16)
            for j, i in enumerate(rows):
                hidden[l][offsets[i] : offsets[i + 1]] = h[j, : len(seqs[i])].cpu().half()
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
    meta = {"layers": list(layers), **verbalizer.identity(), "template": template, "max_length": max_length}
    return TeacherCache(offsets, ids, hidden, logits, meta)


def check_cache_verbalizer(meta: dict, verbalizer: Verbalizer) -> None:
    """Refuse a teacher cache whose label scores came from another verbalizer: other scoring, other
    first tokens or other word tokens (the KL would pull the student toward other labels' scores).
    A cache written before multi-token labels holds no scoring (it was first-token) nor sequences."""
    cached = {"scoring": meta.get("scoring", FIRST_TOKEN), "label_token_ids": meta.get("label_token_ids")}
    if "label_sequences" in meta:
        cached["label_sequences"] = meta["label_sequences"]
    mine = {k: v for k, v in verbalizer.identity().items() if k in cached}
    diff = [k for k in cached if _as_lists(cached[k]) != _as_lists(mine[k])]
    if diff:
        raise ConfigError(f"distill: the teacher cache was built with another verbalizer ({', '.join(diff)} "
                          f"differ: cache {[cached[k] for k in diff]}, task {[mine[k] for k in diff]}); "
                          "rerun the teacher stage")


def _as_lists(value):
    """JSON round trips turn tuples into lists: compare as lists."""
    return [_as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


class DistillLoss:
    """``loss_fn`` for CPET: task loss + alpha * hidden MSE + beta * KL, teacher from cache or live."""

    def __init__(self, verbalizer: Verbalizer, config: DistillConfig, *, cache: TeacherCache | None = None,
                 teacher: nn.Module | None = None) -> None:
        if (cache is None) == (teacher is None):
            raise ConfigError("distill: give exactly one of a teacher cache or a live teacher")
        if cache is not None:
            check_cache_verbalizer(cache.meta, verbalizer)
        self.verbalizer = verbalizer
        self.config, self.cache, self.teacher = config, cache, teacher
        self.layers = list(config.layers) if config.alpha > 0 else []

    def teacher_for(self, batch: dict) -> TeacherOutput:
        if self.cache is not None:
            return self.cache.lookup(batch, self.layers)
        return teacher_outputs(self.teacher, batch, self.verbalizer, self.layers)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        student = lm_forward(model, batch, self.verbalizer, self.layers)
        teacher = self.teacher_for(batch)
        task = task_loss(student.label_logits, batch["labels"])
        loss, logs = task, {"task": float(task.detach())}
        if self.layers:
            mse = sum(hidden_mse(student.hidden[l], teacher.hidden[l], batch["attention_mask"]) for l in self.layers)
            mse = mse / len(self.layers)
            loss = loss + cfg.alpha * mse
            logs["mse"] = float(mse.detach())
        if cfg.beta > 0:
            kl = kl_loss(student.label_logits, teacher.label_logits, cfg.temperature)
            loss = loss + cfg.beta * kl
            logs["kl"] = float(kl.detach())
        return loss, logs
