"""The user's own task data (jsonl/csv/tsv/parquet/hf sources) and fetch's counted cleaning rules."""

import csv
import json

import pytest

from cpet import data
from cpet.config import parse_params
from cpet.errors import ConfigError, DataError
from cpet.sources.tasks import PREFIX_LOADERS
from cpet.stages.fetch import prepare_task

VERB = {"neg": " no", "pos": " yes"}


def _rows(n=12, split=True):
    """n rows per class; with split: 8/2/2 per class as train/validation/test."""
    rows = []
    for label in ("neg", "pos"):
        for i in range(n):
            row = {"body": f"{label} review number {i} says so", "stars": label, "extra": i}
            if split:
                row["split"] = "train" if i < n - 4 else ("validation" if i < n - 2 else "test")
            rows.append(row)
    return rows


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt in ("csv", "tsv"):
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _params(raw_params, tmp_path, **task):
    raw_params["tasks"] = {"mine": {"template": "Review: {text} ->", "verbalizer": VERB, "scoring": "auto", **task}}
    raw_params["fetch"]["cache_dir"] = str(tmp_path / ".cache")
    return parse_params(raw_params)


def _prepare(raw_params, tmp_path, **task):
    params = _params(raw_params, tmp_path, **task)
    return prepare_task("mine", params.tasks["mine"].source, params, tmp_path)


def test_config_lists_every_user_loader():
    from cpet.config.params import USER_SOURCES
    assert set(USER_SOURCES) <= set(PREFIX_LOADERS)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_each_format_maps_columns_and_keeps_its_splits(tmp_path, raw_params, fmt):
    _write(tmp_path / f"d.{fmt}", _rows(), fmt)
    meta = _prepare(raw_params, tmp_path, source=f"{fmt}:d.{fmt}", text_column="body",
                    label_column="stars")
    assert meta["splits_from_source"] and meta["counts"] == {"train": 16, "validation": 4, "test": 4}
    assert meta["labels"] == ["neg", "pos"]
    src = meta["source"]
    assert src["format"] == fmt and src["path"] == f"d.{fmt}" and len(src["sha256"]) == 64
    test = data.load_split(tmp_path, "mine", "test")
    assert {r["text"] for r in test} == {f"{c} review number {i} says so" for c in ("neg", "pos")
                                         for i in (10, 11)}
    assert all(set(r) == {"text", "label"} for r in test)


def test_template_over_columns_and_seeded_split_without_split_column(tmp_path, raw_params):
    rows = [{"premise": f"p{i} {lab}", "hypothesis": f"h{i}", "label": lab}
            for lab in ("neg", "pos") for i in range(20)]
    _write(tmp_path / "nli.jsonl", rows, "jsonl")
    meta = _prepare(raw_params, tmp_path, source="jsonl:nli.jsonl",
                    text_template="{premise} / {hypothesis}")
    assert not meta["splits_from_source"]
    assert meta["counts"] == {"train": 28, "validation": 4, "test": 8}
    texts = {r["text"] for s in data.SPLITS for r in data.load_split(tmp_path, "mine", s)}
    assert "p3 neg / h3" in texts


def test_column_options_are_cross_checked(tmp_path, raw_params):
    with pytest.raises(ConfigError, match="text_column or text_template, not both"):
        _params(raw_params, tmp_path, source="csv:d.csv", text_column="a", text_template="{a}")
    with pytest.raises(ConfigError, match="apply only to sources"):
        _params(raw_params, tmp_path, source="sentiment", text_column="a")
    with pytest.raises(ConfigError, match="needs a path"):
        _params(raw_params, tmp_path, source="csv:")
    with pytest.raises(ConfigError, match="named column slots"):
        _params(raw_params, tmp_path, source="csv:d.csv", text_template="{} {0}")
    with pytest.raises(ConfigError, match="min_chars must not exceed max_chars"):
        _params(raw_params, tmp_path, source="csv:d.csv", clean={"min_chars": 9, "max_chars": 3})


def _refused(raw_params, tmp_path, match, **task):
    with pytest.raises(DataError, match=match) as err:
        _prepare(raw_params, tmp_path, **task)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data" / "processed").exists()


def test_refusals_name_file_column_and_row(tmp_path, raw_params):
    _write(tmp_path / "d.csv", _rows(), "csv")
    _refused(raw_params, tmp_path, r"d.csv: no column 'text' \(columns: body, stars, extra, split\)",
             source="csv:d.csv", label_column="stars")
    (tmp_path / "empty.jsonl").write_text("")
    _refused(raw_params, tmp_path, "empty.jsonl: empty file", source="jsonl:empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    _refused(raw_params, tmp_path, "blank.jsonl: empty", source="jsonl:blank.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "neg"}\n{"text": oops}\n')
    _refused(raw_params, tmp_path, "bad.jsonl line 2: invalid JSON", source="jsonl:bad.jsonl")
    (tmp_path / "null.jsonl").write_text('{"text": "a", "label": "neg"}\n{"text": null, "label": "neg"}\n')
    _refused(raw_params, tmp_path, "null.jsonl line 2: column 'text': expected str, got None",
             source="jsonl:null.jsonl")
    (tmp_path / "short.csv").write_text("text,label\nfine,neg\nmissing\n")
    _refused(raw_params, tmp_path, "short.csv line 3: expected 2 fields, got 1", source="csv:short.csv")
    rows = _rows()
    rows[5]["stars"] = "meh"
    _write(tmp_path / "lab.tsv", rows, "tsv")
    _refused(raw_params, tmp_path, r"lab.tsv line 7: column 'stars': label 'meh' is not a declared "
             r"label \(neg, pos\); 1 such row", source="tsv:lab.tsv", text_column="body",
             label_column="stars")
    rows[5]["stars"], rows[6]["split"] = "neg", "dev"
    _write(tmp_path / "split.parquet", rows, "parquet")
    _refused(raw_params, tmp_path, "split.parquet row 7: column 'split': 'dev' is not one of",
             source="parquet:split.parquet", text_column="body", label_column="stars")
    _refused(raw_params, tmp_path, r"nope.csv: file not found", source="csv:nope.csv")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    _refused(raw_params, tmp_path, "junk.parquet: not a readable Parquet file", source="parquet:junk.parquet")


def test_cleaning_rules_are_counted_in_manifest_and_metrics(tmp_path, raw_params, monkeypatch):
    rows = _rows(split=False)
    rows += [{"body": "x", "stars": "neg", "extra": 0},                       # min_chars
             {"body": "y" * 300, "stars": "pos", "extra": 0},                 # max_chars (pre-cut)
             {"body": rows[0]["body"], "stars": "neg", "extra": 1},           # duplicate
             {"body": "both ways", "stars": "neg", "extra": 0},               # conflict x2
             {"body": "both ways", "stars": "pos", "extra": 0},
             {"body": "a label we never declared", "stars": "meh", "extra": 0}]  # unknown
    _write(tmp_path / "d.jsonl", rows, "jsonl")
    clean = {"min_chars": 3, "max_chars": 280, "drop_unknown_labels": True}
    params = _params(raw_params, tmp_path, source="jsonl:d.jsonl", text_column="body",
                     label_column="stars", clean=clean)
    assert params.fetch.max_chars < 300  # the long row is dropped, not truncated
    import importlib
    fetch_stage = importlib.import_module("cpet.stages.fetch")
    monkeypatch.setattr(fetch_stage, "prepare_base_model", lambda *a, **k: {"stub": True})
    metrics = fetch_stage.fetch(params, tmp_path)
    expected = {"drop_unknown_labels": 1, "min_chars": 1, "max_chars": 1, "drop_conflicts": 2,
                "drop_duplicates": 1}
    meta = data.load_manifest(tmp_path, "mine")
    assert meta["cleaning"]["dropped"] == expected
    assert meta["cleaning"]["rows_loaded"] == len(rows)
    assert sum(meta["counts"].values()) == len(rows) - sum(expected.values())
    assert metrics["tasks"]["mine"]["dropped"] == expected
    assert json.loads((tmp_path / "reports" / "fetch.json").read_text())["tasks"]["mine"]["dropped"] == expected


def test_a_row_is_dropped_only_by_a_rule(tmp_path, raw_params):
    rows = _rows(split=False) + [{"body": rows_body, "stars": "neg", "extra": 0}
                                 for rows_body in ("x", "neg review number 0 says so")]
    _write(tmp_path / "d.jsonl", rows, "jsonl")
    off = {"drop_duplicates": False, "drop_conflicts": False}
    meta = _prepare(raw_params, tmp_path, source="jsonl:d.jsonl", text_column="body",
                    label_column="stars", clean=off)
    assert meta["cleaning"]["dropped"] == {} and sum(meta["counts"].values()) == len(rows)
    kept, dropped = data.clean([{"text": "a", "label": "neg"}] * 2, labels=["neg"])
    assert len(kept) == 1 and dropped == {"drop_conflicts": 0, "drop_duplicates": 1}


def _old_dedupe(examples):
    """cpet.data.dedupe before the cleaning rules (commit c586db9), verbatim in effect."""
    from collections import defaultdict
    labels_by_text = defaultdict(set)
    for ex in examples:
        labels_by_text[ex["text"]].add(ex["label"])
    seen, kept = set(), []
    for ex in examples:
        if ex["text"] in seen or len(labels_by_text[ex["text"]]) > 1:
            continue
        seen.add(ex["text"])
        kept.append(ex)
    return kept, len(examples) - len(kept)


def test_default_rules_match_the_old_dedupe():
    rows = [{"text": f"t{i % 7}", "label": "ab"[i % 7 % 2 if i < 30 else i % 2]} for i in range(40)]
    rows += [{"text": f"u{i}", "label": "ab"[i % 2]} for i in range(20)]
    old_kept, old_n = _old_dedupe(rows)
    kept, dropped = data.clean(rows, labels=None)
    assert kept == old_kept and sum(dropped.values()) == old_n and old_n > 0
    assert data.dedupe(rows) == (old_kept, old_n)


def test_user_task_passes_the_same_gate(tmp_path, raw_params):
    from cpet.stages.validate import validate
    _write(tmp_path / "d.csv", _rows(n=20, split=False), "csv")
    raw_params["validate"]["min_per_class"] = 2
    params = _params(raw_params, tmp_path, source="csv:d.csv", text_column="body", label_column="stars")
    prepare_task("mine", "csv:d.csv", params, tmp_path)
    assert validate(params, tmp_path)["tasks"]["mine"] == {"success": True, "failed_expectations": 0}


def test_hf_hub_id_offline_is_one_clear_line(tmp_path, raw_params, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not a saved dataset folder and HF_HUB_OFFLINE is set"):
        _prepare(raw_params, tmp_path, source="hf:someone/reviews:plain_text")


def test_hf_saved_dataset_dir_keeps_its_splits(tmp_path, raw_params):
    import datasets
    rows = _rows()
    parts = {s: datasets.Dataset.from_list([{"text": r["body"], "label": r["stars"]}
                                            for r in rows if r["split"] == s]) for s in data.SPLITS}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    meta = _prepare(raw_params, tmp_path, source="hf:saved")
    assert meta["splits_from_source"] and meta["counts"] == {"train": 16, "validation": 4, "test": 4}
    assert meta["source"]["format"] == "hf" and len(meta["source"]["sha256"]) == 64


def test_cli_fetch_refusal_is_one_line_and_nonzero(tmp_path, raw_params, capsys, monkeypatch):
    import importlib

    import yaml

    from cpet.cli import main
    monkeypatch.setattr(importlib.import_module("cpet.stages.fetch"), "prepare_base_model",
                        lambda *a, **k: {"stub": True})
    _write(tmp_path / "d.csv", _rows(), "csv")
    params = _params(raw_params, tmp_path, source="csv:d.csv", text_column="body", label_column="label")
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(params.model_dump(by_alias=True)))
    assert main(["--params", str(p), "--root", str(tmp_path), "fetch"]) == 1
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert err == ["error: d.csv: no column 'label' (columns: body, stars, extra, split)"]
    assert not (tmp_path / "data" / "processed").exists()


def test_readme_example_entries_parse(raw_params, tmp_path):
    import re
    from pathlib import Path

    import yaml
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your own data"):readme.index("## Pipeline")]
    tasks = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1))["tasks"]
    raw_params["tasks"] = tasks
    params = parse_params(raw_params)
    assert params.tasks["reviews"].clean.drop_unknown_labels
    assert params.tasks["nli"].loader_options(tmp_path)["text_template"] == "{premise} / {hypothesis}"


def test_jsonl_row_missing_a_column_is_named(tmp_path, raw_params):
    (tmp_path / "gap.jsonl").write_text('{"text": "fine", "label": "neg"}\n{"label": "pos"}\n')
    _refused(raw_params, tmp_path, "gap.jsonl line 2: column 'text': expected str, got None",
             source="jsonl:gap.jsonl")


def test_hf_saved_dataset_with_class_labels_and_a_missing_split(tmp_path, raw_params):
    """A real saved DatasetDict whose label column is a ClassLabel (ints on disk, names in the
    features): names come back as labels; a dict without validation is refused by name."""
    import datasets
    rows = _rows()
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    parts = {s: datasets.Dataset.from_list([{"text": r["body"], "label": ["neg", "pos"].index(r["stars"])}
                                            for r in rows if r["split"] == s], features=features)
             for s in data.SPLITS}
    datasets.DatasetDict({k: v for k, v in parts.items() if k != "validation"}).save_to_disk(
        str(tmp_path / "gap"))
    _refused(raw_params, tmp_path, "hf:gap: splits train, test; need train, validation and test",
             source="hf:gap")
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    meta = _prepare(raw_params, tmp_path, source="hf:saved")
    assert meta["splits_from_source"] and meta["counts"] == {"train": 16, "validation": 4, "test": 4}
    assert meta["source"]["format"] == "hf" and len(meta["source"]["sha256"]) == 64
    assert {r["label"] for r in data.load_split(tmp_path, "mine", "train")} == {"neg", "pos"}


def test_hf_single_split_dataset_is_divided_by_fetch(tmp_path, raw_params):
    import datasets
    rows = _rows()
    datasets.Dataset.from_list([{"text": r["body"], "label": r["stars"]} for r in rows]).save_to_disk(
        str(tmp_path / "flat"))
    meta = _prepare(raw_params, tmp_path, source="hf:flat")
    assert not meta["splits_from_source"] and sum(meta["counts"].values()) == len(rows)