"""The data gate: every kind of bad data is refused with a line naming task, split, expectation."""

import json

import pytest

from cpet.config import parse_params
from cpet.errors import DataError
from cpet.stages.validate import require_valid, validate
from tinyproject import make_rows


@pytest.fixture
def params(raw_params):
    raw_params["tasks"] = {"tiny": {"source": "topic", "template": "{text} =", "verbalizer": {"neg": " no", "pos": " yes"}, "scoring": "auto"}}
    raw_params["validate"].update(min_chars=10, max_chars=400, min_per_class=5)
    return parse_params(raw_params)


def _clean():
    return {s: make_rows("neg", 12, s) + make_rows("pos", 12, s) for s in ("train", "validation", "test")}


def test_clean_data_passes_and_unlocks_downstream(params, tiny_task):
    root = tiny_task()
    metrics = validate(params, root)
    assert metrics["success"] is True
    report = json.loads((root / "reports/validation/tiny.json").read_text())
    assert report["success"] and len(report["splits"]["test"]["results"]) >= 10
    require_valid(root, "tiny")  # does not raise


def _mutations():
    def extra_column(s):
        s["train"][0]["source"] = "x"

    def missing_label(s):
        del s["validation"][0]["label"]

    def null_text(s):
        s["train"][1]["text"] = None

    def blank_text(s):
        s["test"][2]["text"] = "               "

    def bad_label(s):
        s["train"][3]["label"] = "neutral"

    def too_short(s):
        s["validation"][1]["text"] = "short"

    def too_long(s):
        s["test"][0]["text"] = "word " * 100

    def duplicate(s):
        s["train"][5]["text"] = s["train"][6]["text"]

    def leakage(s):
        s["test"][4]["text"] = s["train"][7]["text"]

    def few_per_class(s):
        s["validation"] = make_rows("neg", 12, "v") + make_rows("pos", 3, "v")

    def missing_class(s):
        s["test"] = make_rows("neg", 12, "t")

    def not_an_object(s):
        s["train"].append(["a", "list"])

    return [
        (extra_column, "train", "expect_table_columns_to_match_set"),
        (missing_label, "validation", "expect_column_values_to_not_be_null on 'label'"),
        (null_text, "train", "expect_column_values_to_not_be_null on 'text': 1 unexpected"),
        (blank_text, "test", "expect_column_values_to_match_regex on 'text': 1 unexpected"),
        (bad_label, "train", "expect_column_values_to_be_in_set on 'label': 1 unexpected"),
        (too_short, "validation", "expect_column_value_lengths_to_be_between on 'text': 1 unexpected"),
        (too_long, "test", "expect_column_value_lengths_to_be_between on 'text': 1 unexpected"),
        (duplicate, "train", "expect_column_values_to_be_unique on 'text': 2 unexpected"),
        (leakage, "test", "expect_column_values_to_not_be_in_set on 'text': 1 unexpected"),
        (few_per_class, "validation", "expect_column_values_to_be_between on 'count': 1 unexpected"),
        (missing_class, "test", "expect_column_distinct_values_to_equal_set on 'label'"),
        (not_an_object, "train", "expect_table_columns_to_match_set"),
    ]


@pytest.mark.parametrize(("mutate", "split", "expected"), _mutations(), ids=lambda x: getattr(x, "__name__", None))
def test_bad_data_is_refused(params, tiny_task, mutate, split, expected):
    splits = _clean()
    mutate(splits)
    root = tiny_task(splits)
    with pytest.raises(DataError) as err:
        validate(params, root)
    lines = str(err.value).splitlines()
    assert any(line.startswith(f"validation failed: tiny/{split}: {expected}") for line in lines), lines
    report = json.loads((root / "reports/validation/tiny.json").read_text())
    assert report["success"] is False
    assert json.loads((root / "reports/validate.json").read_text())["success"] is False
    with pytest.raises(DataError, match="failed validation"):
        require_valid(root, "tiny")


def test_few_per_class_names_the_class(params, tiny_task):
    splits = _clean()
    splits["validation"] = make_rows("neg", 12, "v") + make_rows("pos", 3, "v")
    with pytest.raises(DataError, match=r"pos=3"):
        validate(params, tiny_task(splits))


def test_require_valid_detects_changed_or_unvalidated_data(params, tiny_task):
    root = tiny_task()
    with pytest.raises(DataError, match="run the validate stage"):
        require_valid(root, "tiny")
    validate(params, root)
    path = root / "data/processed/tiny/train.jsonl"
    path.write_text(path.read_text() + '{"text": "sneaked in later", "label": "neg"}\n')
    with pytest.raises(DataError, match="changed since validation"):
        require_valid(root, "tiny")


def test_cli_validate_exits_nonzero_with_one_line_per_failure(params, tiny_task, tmp_path, capsys, raw_params):
    import yaml

    from cpet.cli import main

    splits = _clean()
    splits["train"][3]["label"] = "neutral"
    splits["test"][4]["text"] = splits["train"][7]["text"]
    root = tiny_task(splits)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(params.model_dump(by_alias=True)))
    assert main(["--params", str(p), "--root", str(root), "validate"]) == 1
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    found = {tuple(l.split(": ")[2:4]) for l in err}
    assert len(err) == len(found) == 4, err
    assert {(split, exp.split(" on ")[0]) for split, exp in found} == {
        ("tiny/train", "expect_column_values_to_be_in_set"),  # the bad label itself
        ("tiny/train", "expect_column_distinct_values_to_equal_set"),  # an undeclared class
        ("tiny/train", "expect_column_values_to_be_between"),  # ... with 1 example < min
        ("tiny/test", "expect_column_values_to_not_be_in_set"),  # leakage
    }
