"""Stage ``validate``: the data gate. Nothing trains on a task whose report is not green.

Outputs: ``reports/validation/<task>.json`` (full GX results), ``reports/validation/summary.md``
and ``reports/validate.json`` (metrics). On any failure it raises DataError whose message has one
line per failed expectation (task, split, expectation, count); the reports are still written so
the failure can be inspected, and :func:`require_valid` refuses the data downstream.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpet import data, io
from cpet.config import Params
from cpet.errors import DataError
from cpet.validation import failures, validate_task

REPORT_DIR = Path("reports") / "validation"


def validate(params: Params, root: str | Path = ".") -> dict:
    root = Path(root)
    out = root / REPORT_DIR
    metrics: dict = {"success": True, "tasks": {}}
    lines: list[str] = []
    reports = {}
    for task in params.tasks:
        manifest = data.load_manifest(root, task)
        splits = {s: data.load_split(root, task, s) for s in data.SPLITS}
        report = validate_task(task, manifest["labels"], splits, params.validate_)
        report["data_hashes"] = {
            s: io.sha256_file(data.task_dir(root, task) / f"{s}.jsonl") for s in data.SPLITS
        }
        reports[task] = report
        failed = failures(report)
        lines += [f.line() for f in failed]
        metrics["tasks"][task] = {"success": report["success"], "failed_expectations": len(failed)}
        metrics["success"] &= report["success"]
    with io.atomic_dir(out) as tmp:
        for task, report in reports.items():
            io.write_json(tmp / f"{task}.json", report)
        io.write_text(tmp / "summary.md", _summary(reports, lines))
    io.write_json(root / "reports" / "validate.json", metrics)
    if lines:
        raise DataError("\n".join(lines))
    return metrics


def _summary(reports: dict, lines: list[str]) -> str:
    out = ["# Data validation", ""]
    for task, r in reports.items():
        n = sum(len(s["results"]) for s in r["splits"].values())
        rows = ", ".join(f"{s} {b['rows']}" for s, b in r["splits"].items())
        out.append(f"- **{task}**: {'passed' if r['success'] else 'FAILED'} ({n} expectations; {rows})")
    if lines:
        out += ["", "## Failures", ""] + [f"- {line}" for line in lines]
    return "\n".join(out) + "\n"


def require_valid(root: str | Path, task: str) -> None:
    """Refuse a task's data unless its validation report passed on exactly these files."""
    root = Path(root)
    path = root / REPORT_DIR / f"{task}.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; run the validate stage before training on '{task}'")
    report = json.loads(path.read_text())
    if not report.get("success"):
        raise DataError(f"{task}: data failed validation (see {path}); refusing to use it")
    for split, digest in report.get("data_hashes", {}).items():
        file = data.task_dir(root, task) / f"{split}.jsonl"
        if not file.is_file():
            raise DataError(f"{file}: missing since validation; run fetch and validate again")
        if io.sha256_file(file) != digest:
            raise DataError(f"{task}/{split}: data changed since validation; run validate again")
