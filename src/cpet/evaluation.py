"""Model measurements shared by stages: zero-shot/adapted task accuracy, perplexity, latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from cpet.lmcls import Verbalizer, accuracy_f1


def rows_evaluator(tokenizer, rows: Sequence[dict], template: str, verbalizer: Verbalizer,
                   *, max_length: int, batch_size: int):
    """A :class:`cpet.train.Evaluator` over ``text``/``label`` rows (tokenized once, length-sorted)."""
    from cpet.train import Evaluator

    index = {label: i for i, label in enumerate(verbalizer.labels)}
    return Evaluator(tokenizer, [r["text"] for r in rows], [index[r["label"]] for r in rows], template,
                     verbalizer, max_length=max_length, batch_size=batch_size)


def task_metrics(model, tokenizer, rows: Sequence[dict], template: str, verbalizer: Verbalizer,
                 *, max_length: int, batch_size: int) -> dict[str, float]:
    """Accuracy and macro-F1 of label-word classification on ``rows`` (``text``/``label``), scored
    as ``verbalizer.scoring`` says."""
    ev = rows_evaluator(tokenizer, rows, template, verbalizer, max_length=max_length, batch_size=batch_size)
    return accuracy_f1(ev.labels, ev.scores(model).argmax(1).tolist(), len(verbalizer.labels))


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int) -> float:
    """exp(mean next-token NLL) over all real tokens of ``texts`` (each cut to max_length)."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length, add_special_tokens=False)
        enc = enc.to(_device(model))
        logits = model(**enc).logits[:, :-1].float()
        target = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
        nll += loss.item()
        count += int(mask.sum())
    model.train(was_training)
    return float(torch.exp(torch.tensor(nll / max(count, 1))))


@torch.no_grad()
def forward_latency_ms(model, *, batch: int, seq_len: int, repeats: int, warmup: int = 2,
                       vocab_size: int | None = None) -> float:
    """Median wall time of one forward pass on random tokens, in milliseconds."""
    vocab = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    dev = _device(model)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # kernels run asynchronously: time their completion
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    model.train(was_training)
    return statistics.median(times)
