"""``python -m cpet.labelbench``: zero-shot accuracy of first-token vs sum vs mean label scoring.

Why: a multi-token label word can be scored by its first token only, by its whole
log-probability (``sum``) or by that divided by its length (``mean``); which one ``auto`` picks
for multi-token words (``cpet.lmcls.MULTI_TOKEN_DEFAULT``) should follow a measurement, not a
guess. The default tasks' words are single tokens (then all three rank alike), so this scores
the same labels with multi-token words: words of equal length (a shared suffix such as
``" news"``) and of unequal length (where ``sum`` penalises the longer word and ``mean`` does not).

It reads the base model folder and the processed validation splits, runs one thread (the machine
is shared) and prints a markdown table; ``docs/labels.md`` holds the measured table. sum and mean
come from the same forward pass over the expanded batch; first-token from the prompt pass.
``--task <t> --words '{"label": " word", ...}'`` measures your own task's words instead (its
template from ``<root>/params.yaml``, its rows from ``data/processed/<t>/validation.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from cpet.lmcls import (FIRST_TOKEN, MEAN, SUM, Verbalizer, accuracy_f1, expand_labels, label_scores,
                        scores_from_logits)
from cpet.train.data import pad_batch, tokenize_prompts

#: task -> name -> label words; "default" = params.yaml's words (one token each with SmolLM2)
VERBALIZERS: dict[str, dict[str, dict[str, str]]] = {
    "sentiment": {
        "default": {"negative": " negative", "positive": " positive"},
        "review (2+2 tokens)": {"negative": " negative review", "positive": " positive review"},
        "bad / very good (1+2)": {"negative": " bad", "positive": " very good"},
        "not good / good (2+1)": {"negative": " not good", "positive": " good"},
    },
    "topic": {
        "default": {"business": " business", "entertainment": " entertainment", "politics": " politics",
                    "sports": " sports", "tech": " tech"},
        "<word> news (2 each)": {"business": " business news", "entertainment": " entertainment news",
                                 "politics": " politics news", "sports": " sports news", "tech": " tech news"},
        "mixed lengths (1-3)": {"business": " business and finance", "entertainment": " film and music",
                                "politics": " politics", "sports": " sport", "tech": " science and technology"},
    },
}


@torch.no_grad()
def score_all(model, seqs: list[list[int]], verbalizer: Verbalizer, pad: int, batch_size: int) -> dict[str, torch.Tensor]:
    """``{first-token, sum, mean}`` -> ``[n, n_labels]`` scores; length-sorted batches."""
    first = Verbalizer(verbalizer.labels, verbalizer.token_ids, verbalizer.sequences, FIRST_TOKEN)
    n, k = len(seqs), len(verbalizer.labels)
    out = {name: torch.zeros(n, k) for name in (FIRST_TOKEN, SUM, MEAN)}
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        batch = pad_batch([seqs[i] for i in rows], pad)
        out[FIRST_TOKEN][rows] = label_scores(model, batch, first).scores
        labels = expand_labels(batch, verbalizer)
        keep = torch.unique(labels.positions)  # the head at the scored positions only, as label_scores does
        logits = model(**labels.model_inputs(), logits_to_keep=keep, use_cache=False).logits
        columns = torch.searchsorted(keep, labels.positions)
        for name in (SUM, MEAN):
            out[name][rows] = scores_from_logits(logits, columns, labels, name)
    return out


def run(root: Path, model_dir: Path, rows: int, max_length: int, batch_size: int,
        verbalizers: dict[str, dict[str, dict[str, str]]]) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # the prompt templates as configured (read raw: only tasks.<t>.template is needed)
    templates = {t: c["template"] for t, c in yaml.safe_load((root / "params.yaml").read_text())["tasks"].items()}
    results = []
    for task, sets in verbalizers.items():
        data = [json.loads(line) for line in (root / "data/processed" / task / "validation.jsonl").open()][:rows]
        seqs = tokenize_prompts(tokenizer, [r["text"] for r in data], templates[task], max_length)
        for name, words in sets.items():
            v = Verbalizer.build(tokenizer, words, where=f"{task}.{name}", scoring=SUM)
            gold = [v.labels.index(r["label"]) for r in data]
            t0 = time.perf_counter()
            scores = score_all(model, seqs, v, pad, batch_size)
            row = {"task": task, "words": name, "lengths": [len(s) for s in v.sequences], "rows": len(data),
                   "seconds": round(time.perf_counter() - t0, 1)}
            for scoring, s in scores.items():
                row[scoring] = accuracy_f1(gold, s.argmax(1).tolist(), len(v.labels))["accuracy"]
            if len(set(v.token_ids)) < len(v.token_ids):  # shared first tokens tie: not a usable scoring
                row[FIRST_TOKEN] = None
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| task | label words | tokens per word | first-token | sum | mean |", "|---|---|---|---|---|---|"]
    for r in results:
        first = "n/a (shared first token)" if r[FIRST_TOKEN] is None else f"{r[FIRST_TOKEN]:.3f}"
        lines.append(f"| {r['task']} | {r['words']} | {r['lengths']} | {first} | {r[SUM]:.3f} | {r[MEAN]:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="project root (data/processed/<task>/)")
    ap.add_argument("--model", type=Path, default=None, help="HF model folder (default <root>/models/base)")
    ap.add_argument("--rows", type=int, default=200, help="validation rows per task")
    ap.add_argument("--max-length", type=int, default=112, help="prompt tokens (= evaluate.max_length)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--task", help="measure this task's words (--words) instead of the built-in table")
    ap.add_argument("--words", type=json.loads, help='JSON {label: word}, e.g. \'{"yes": " it follows", ...}\'')
    args = ap.parse_args(argv)
    if (args.task is None) != (args.words is None):
        ap.error("--task and --words go together")
    table = {args.task: {"given": args.words}} if args.task else VERBALIZERS
    torch.set_num_threads(args.threads)
    results = run(args.root, args.model or args.root / "models/base", args.rows, args.max_length, args.batch_size,
                  table)
    print(markdown(results))


if __name__ == "__main__":
    main()
