"""Parity of an exported model with the PyTorch model it came from, on a task split.

Both see the same tokenized, length-sorted, right-padded batches (``cpet.train`` helpers, as the
evaluate stage builds them). Measured: the largest absolute difference of the next-token logits at
each prompt's last position (whole vocabulary), how often both predict the same label, and both
accuracies. :func:`check` turns tolerances into one clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cpet.errors import CpetError
from cpet.lmcls import Verbalizer, accuracy_f1, label_position_logits
from cpet.train.data import pad_batch, tokenize_prompts

#: batch -> logits at the last real position of each row, [batch, vocab]
LastLogits = Callable[[dict], torch.Tensor]


def torch_last_logits(model) -> LastLogits:
    model.eval()
    return lambda batch: label_position_logits(model, batch).float()


def label_scores(fns: Sequence[LastLogits], tokenizer, rows: Sequence[dict], template: str,
                 verbalizer: Verbalizer, *, max_length: int, batch_size: int
                 ) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """Label-word logits ``[n, n_labels]`` of each model, the gold labels, and per model the largest
    absolute difference of its full last-position logits from the first model's."""
    seqs = tokenize_prompts(tokenizer, [r["text"] for r in rows], template, max_length)
    index = {label: i for i, label in enumerate(verbalizer.labels)}
    gold = [index[r["label"]] for r in rows]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor(verbalizer.token_ids)
    scores = [torch.zeros(len(seqs), len(ids)) for _ in fns]
    diffs = [0.0 for _ in fns]
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = pad_batch([seqs[i] for i in chunk], pad)
            outs = [fn(batch) for fn in fns]
            for k, out in enumerate(outs):
                scores[k][chunk] = out[:, ids].float()
                if k:
                    diffs[k] = max(diffs[k], float((out.float() - outs[0].float()).abs().max()))
    return scores, gold, diffs


def parity(reference: LastLogits, candidate: LastLogits, tokenizer, rows, template, verbalizer, *,
           max_length: int, batch_size: int, others: dict[str, LastLogits] | None = None) -> dict:
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


def check(result: dict, tolerance, where: str) -> None:
    """Raise one CpetError naming every tolerance ``result`` breaks (``tolerance``: export.tolerance)."""
    bad = []
    if result["max_abs_logit_diff"] > tolerance.max_abs_logit_diff:
        bad.append(f"max |logit diff| {result['max_abs_logit_diff']:.3g} > {tolerance.max_abs_logit_diff}")
    if result["top1_agreement"] < tolerance.min_top1_agreement:
        bad.append(f"top-1 agreement {result['top1_agreement']:.4f} < {tolerance.min_top1_agreement}")
    if result["accuracy_drop"] > tolerance.max_accuracy_drop:
        bad.append(f"accuracy drop {result['accuracy_drop']:.4f} > {tolerance.max_accuracy_drop}")
    if bad:
        raise CpetError(f"{where}: ONNX parity check failed ({'; '.join(bad)}; "
                        f"tolerances in params.yaml export.tolerance)")
