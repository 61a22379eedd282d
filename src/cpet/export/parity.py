"""Parity of an exported model with the PyTorch model it came from, on a task split.

Both see the same tokenized, length-sorted, right-padded batches (``cpet.train`` helpers, as the
evaluate stage builds them) and score labels as the task's verbalizer says (``cpet.lmcls``).
Measured: the largest absolute difference of the logits at the scored positions (whole
vocabulary: each prompt's last position for first-token scoring, every word token's position of
the prompt + word rows for sum/mean), the largest label-score difference, how often both predict
the same label, and both accuracies. :func:`check` turns tolerances into one clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cpet.errors import CpetError
from cpet.lmcls import Verbalizer, accuracy_f1, expand_labels, forward_at, label_position_logits, scores_from_logits
from cpet.train.data import pad_batch, tokenize_prompts

#: batch -> logits at the last real position of each row, [batch, vocab]
LastLogits = Callable[[dict], torch.Tensor]
#: (batch, positions [rows, P]) -> logits at those positions of each row, [rows, P, vocab]
PositionLogits = Callable[[dict, torch.Tensor], torch.Tensor]


def torch_last_logits(model) -> LastLogits:
    model.eval()
    return lambda batch: label_position_logits(model, batch).float()


def torch_position_logits(model) -> PositionLogits:
    """:data:`PositionLogits` of a PyTorch causal LM: its head runs at the asked positions only."""
    model.eval()

    def logits(batch: dict, positions: torch.Tensor) -> torch.Tensor:
        keep = torch.unique(positions)
        out = forward_at(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, keep, ())
        rows = torch.arange(positions.shape[0])[:, None].expand_as(positions)
        return out.logits[rows, torch.searchsorted(keep, positions)].float()
    return logits


def scored_logits(fn: PositionLogits, batch: dict, verbalizer: Verbalizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Label scores ``[batch, n_labels]`` (as ``cpet.lmcls.label_scores``) and the logits they come
    from, ``[scored positions, vocab]``."""
    if verbalizer.first_token:
        last = batch["attention_mask"].sum(1, keepdim=True) - 1
        out = fn(batch, last)[:, 0].float()
        return out[:, list(verbalizer.token_ids)], out
    labels = expand_labels(batch, verbalizer)
    out = fn(labels.model_inputs(), labels.positions).float()
    columns = torch.arange(out.shape[1])[None].expand_as(labels.positions)
    return scores_from_logits(out, columns, labels, verbalizer.scoring), out[labels.valid]


def label_scores(fns: Sequence[PositionLogits], tokenizer, rows: Sequence[dict], template: str,
                 verbalizer: Verbalizer, *, max_length: int, batch_size: int
                 ) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """Label scores ``[n, n_labels]`` of each model, the gold labels, and per model the largest
    absolute difference of its logits at the scored positions from the first model's."""
    seqs = tokenize_prompts(tokenizer, [r["text"] for r in rows], template, max_length)
    index = {label: i for i, label in enumerate(verbalizer.labels)}
    gold = [index[r["label"]] for r in rows]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = [torch.zeros(len(seqs), len(verbalizer.labels)) for _ in fns]
    diffs = [0.0 for _ in fns]
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = pad_batch([seqs[i] for i in chunk], pad)
            outs = [scored_logits(fn, batch, verbalizer) for fn in fns]
            for k, (score, logits) in enumerate(outs):
                scores[k][chunk] = score
                if k:
                    diffs[k] = max(diffs[k], float((logits - outs[0][1]).abs().max()))
    return scores, gold, diffs


def parity(reference: PositionLogits, candidate: PositionLogits, tokenizer, rows, template, verbalizer, *,
           max_length: int, batch_size: int, others: dict[str, PositionLogits] | None = None) -> dict:
    """``max_abs_logit_diff``, ``top1_agreement`` and both accuracies (reference = PyTorch); the
    accuracy of each of ``others`` (e.g. the naive merge) as ``accuracy_<name>``, on the same batches."""
    others = others or {}
    scores, gold, diffs = label_scores([reference, candidate, *others.values()], tokenizer, rows, template,
                                       verbalizer, max_length=max_length, batch_size=batch_size)
    ref, cand, diff = scores[0], scores[1], diffs[1]
    n = len(verbalizer.labels)
    p_ref, p_cand = ref.argmax(1).tolist(), cand.argmax(1).tolist()
    acc_ref = accuracy_f1(gold, p_ref, n)["accuracy"]
    acc_cand = accuracy_f1(gold, p_cand, n)["accuracy"]
    return {"examples": len(rows), "max_abs_logit_diff": diff,
            "max_abs_label_logit_diff": float((ref - cand).abs().max()) if len(rows) else 0.0,
            "top1_agreement": sum(a == b for a, b in zip(p_ref, p_cand)) / max(len(rows), 1),
            "accuracy_torch": acc_ref, "accuracy_onnx": acc_cand, "accuracy_drop": acc_ref - acc_cand,
            **{f"accuracy_{name}": accuracy_f1(gold, s.argmax(1).tolist(), n)["accuracy"]
               for name, s in zip(others, scores[2:])}}


def check(result: dict, tolerance, where: str, key: str = "export.tolerance") -> None:
    """Raise one CpetError naming every tolerance ``result`` breaks (``tolerance``: params ``key``)."""
    bad = []
    if result["max_abs_logit_diff"] > tolerance.max_abs_logit_diff:
        bad.append(f"max |logit diff| {result['max_abs_logit_diff']:.3g} > {tolerance.max_abs_logit_diff}")
    if result["top1_agreement"] < tolerance.min_top1_agreement:
        bad.append(f"top-1 agreement {result['top1_agreement']:.4f} < {tolerance.min_top1_agreement}")
    if result["accuracy_drop"] > tolerance.max_accuracy_drop:
        bad.append(f"accuracy drop {result['accuracy_drop']:.4f} > {tolerance.max_accuracy_drop}")
    if bad:
        raise CpetError(f"{where}: ONNX parity check failed ({'; '.join(bad)}; "
                        f"tolerances in params.yaml {key})")
