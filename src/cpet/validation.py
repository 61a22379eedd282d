"""Data gate: a Great Expectations suite per task, run on every split before anything trains.

Checks: schema (exactly ``text`` and ``label``), no null or blank text, labels in the task's
declared set, text length bounds, no duplicate text within a split, no text shared between
train and validation/test (leakage), and a minimum number of examples per class.

GX runs in an ephemeral context (no network, writes nothing); the report this module returns is
what the ``validate`` stage writes under ``reports/validation/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from cpet.data import SPLITS


@dataclass(frozen=True)
class Failure:
    task: str
    split: str
    expectation: str
    column: str | None
    unexpected_count: int | None
    detail: str

    def line(self) -> str:
        where = f"{self.task}/{self.split}"
        col = f" on '{self.column}'" if self.column else ""
        count = f": {self.unexpected_count} unexpected" if self.unexpected_count is not None else ""
        return f"validation failed: {where}: {self.expectation}{col}{count} ({self.detail})"


def _frame(rows: list[Any]) -> pd.DataFrame:
    """Rows as a DataFrame; non-object rows become a row with only a ``_not_an_object`` column."""
    fixed = [r if isinstance(r, dict) else {"_not_an_object": repr(r)} for r in rows]
    return pd.DataFrame(fixed) if fixed else pd.DataFrame(columns=["text", "label"])


def _row_suite(gx, labels: list[str], cfg, train_texts: list[str] | None):
    e = gx.expectations
    suite = [
        e.ExpectTableColumnsToMatchSet(column_set=["text", "label"], exact_match=True),
        e.ExpectTableRowCountToBeBetween(min_value=1),
        e.ExpectColumnValuesToNotBeNull(column="text"),
        e.ExpectColumnValuesToNotBeNull(column="label"),
        e.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S"),
        e.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=cfg.min_chars, max_value=cfg.max_chars
        ),
        e.ExpectColumnValuesToBeInSet(column="label", value_set=labels),
        e.ExpectColumnValuesToBeUnique(column="text"),
    ]
    if train_texts is not None:
        suite.append(e.ExpectColumnValuesToNotBeInSet(column="text", value_set=train_texts))
    return suite


def _count_suite(gx, labels: list[str], cfg):
    e = gx.expectations
    return [
        e.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=labels),
        e.ExpectColumnValuesToBeBetween(column="count", min_value=cfg.min_per_class),
    ]


_DETAIL = {
    "expect_table_columns_to_match_set": "schema must be exactly text, label",
    "expect_table_row_count_to_be_between": "split is empty",
    "expect_column_values_to_not_be_null": "null values",
    "expect_column_values_to_match_regex": "blank text",
    "expect_column_value_lengths_to_be_between": "text length out of bounds",
    "expect_column_values_to_be_in_set": "label outside the declared label set",
    "expect_column_values_to_be_unique": "duplicate texts within the split",
    "expect_column_values_to_not_be_in_set": "texts also in train (leakage)",
    "expect_column_distinct_values_to_equal_set": "split lacks some class or has an undeclared one",
    "expect_column_values_to_be_between": "too few examples for some class",
}


def _run(context, name: str, df: pd.DataFrame, expectations: list) -> list[dict]:
    import great_expectations as gx

    source = context.data_sources.add_pandas(name)
    batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for exp in expectations:
        suite.add_expectation(exp)
    result = batch.get_batch(batch_parameters={"dataframe": df}).validate(suite)
    out = []
    for r in result.results:
        cfg = r.expectation_config
        res = r.result or {}
        out.append(
            {
                "expectation": cfg.type,
                "column": cfg.kwargs.get("column"),
                "success": bool(r.success),
                "unexpected_count": res.get("unexpected_count"),
                "observed_value": _jsonable(res.get("observed_value")),
                "partial_unexpected_list": _jsonable(res.get("partial_unexpected_list", [])[:5]),
                "exception": (r.exception_info or {}).get("exception_message")
                if (r.exception_info or {}).get("raised_exception")
                else None,
            }
        )
    return sorted(out, key=lambda x: (x["expectation"], x["column"] or ""))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def validate_task(task: str, labels: list[str], splits: dict[str, list[Any]], cfg) -> dict:
    """Run the suite on every split of one task. Returns ``{"task", "success", "splits": ...}``."""
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    frames = {s: _frame(splits[s]) for s in SPLITS}
    train_texts = (
        [t for t in frames["train"].get("text", pd.Series(dtype=str)).tolist() if isinstance(t, str)]
    )
    report: dict[str, Any] = {
        "task": task, "labels": labels, "min_per_class": cfg.min_per_class, "splits": {}
    }
    for split in SPLITS:
        df = frames[split]
        leak = None if split == "train" else train_texts
        rows = _run(context, f"{task}-{split}-rows", df, _row_suite(gx, labels, cfg, leak))
        if {"label"} <= set(df.columns):
            counts = df["label"].value_counts(dropna=True).rename_axis("label").reset_index()
            counts["label"] = counts["label"].astype(str)
            class_rows = _run(context, f"{task}-{split}-classes", counts, _count_suite(gx, labels, cfg))
            few = counts.loc[counts["count"] < cfg.min_per_class]
            for r in class_rows:  # name the classes, not just their counts
                if r["expectation"] == "expect_column_values_to_be_between" and not r["success"]:
                    r["partial_unexpected_list"] = [f"{l}={c}" for l, c in zip(few["label"], few["count"])]
            rows += class_rows
        report["splits"][split] = {"rows": len(df), "results": rows}
    report["success"] = all(
        r["success"] for s in report["splits"].values() for r in s["results"]
    )
    return report


def failures(report: dict) -> list[Failure]:
    """One :class:`Failure` per failed expectation, in a stable order."""
    min_per_class = report.get("min_per_class")
    out = []
    for split, body in report["splits"].items():
        for r in body["results"]:
            if r["success"]:
                continue
            detail = r["exception"] or _DETAIL.get(r["expectation"], r["expectation"])
            if r["expectation"] == "expect_column_values_to_be_between":
                detail += f"; at least {min_per_class} per class required"
            if r["partial_unexpected_list"]:
                sample = ", ".join(repr(v)[:40] for v in r["partial_unexpected_list"][:3])
                detail += f"; e.g. {sample}"
            out.append(
                Failure(report["task"], split, r["expectation"], r["column"],
                        r["unexpected_count"], detail)
            )
    return out
