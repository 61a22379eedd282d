"""Typed, validated view of ``params.yaml`` (torch-free).

Each top-level section is named after the stage that reads it (``fetch``, ``validate``, ...);
``tasks`` is shared by every stage. Unknown keys, wrong types and missing required values fail
at load with a :class:`~cpet.errors.ConfigError` whose message names the key path, e.g.
``params.yaml: fetch.split.seed: Input should be a valid integer``.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from cpet.config.base import Section, describe
from cpet.config.recipes import TRAINED
from cpet.config.library import DistillConfig, LoraSettings, RecoverySettings, TrainConfig
from cpet.errors import ConfigError


# --------------------------------------------------------------------------- tasks
TASK_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")  # task and method names become folder names


def _folder_names(kind: str, names: dict) -> dict:
    """At least one entry, each name usable as a folder name."""
    if not names:
        raise ValueError(f"at least one {kind} is required")
    for name in names:
        if not TASK_NAME.match(name):
            raise ValueError(f"{kind} name {name!r} must match {TASK_NAME.pattern}")
    return names


# Sources that read the user's own data (cpet.sources.files); the column options apply to these.
USER_SOURCES = ("jsonl", "csv", "tsv", "parquet", "hf")


class CleanConfig(Section):
    """Rows fetch drops, each rule counted in the manifest and fetch report. The defaults are
    what every task always had: conflicting labels and duplicate texts are dropped."""

    min_chars: int | None = Field(None, ge=1, description="Drop texts shorter than this (normalised).")
    max_chars: int | None = Field(None, ge=1, description="Drop (not truncate) texts longer than this.")
    drop_duplicates: bool = Field(True, description="Drop exact repeats of a text (keep the first).")
    drop_conflicts: bool = Field(True, description="Drop every row of a text seen with two labels.")
    drop_unknown_labels: bool = Field(
        False, description="Drop labels outside the verbalizer's keys (else they are an error).")

    @model_validator(mode="after")
    def _bounds(self) -> CleanConfig:
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError("min_chars must not exceed max_chars")
        return self


class TaskConfig(Section):
    """One classification task, posed to a causal LM as "prompt -> label word"."""

    source: str = Field(description="Loader: 'sentiment', 'topic', 'bigbench:<task path>', or the "
                                    "user's data: 'jsonl:', 'csv:', 'tsv:', 'parquet:<path>', "
                                    "'hf:<saved dataset dir>' or 'hf:<hub id>[:config]'.")
    template: str = Field(description="Prompt with a '{text}' slot; the label word follows it.")
    verbalizer: dict[str, str] | None = Field(
        description="Label -> label word (one or several tokens); null = ' ' + each label name as the "
                    "source gives it (package sources only: your own data declares its labels here).")
    scoring: Literal["auto", "first-token", "sum", "mean"] = Field(
        description="How a label word is scored after the prompt: first-token (its first token's "
                    "logit), sum (the word's log-probability), mean (per token); auto = first-token "
                    "when every word is one token, else cpet.lmcls.MULTI_TOKEN_DEFAULT.")
    text_column: str | None = Field(None, description="User data: the text column (default 'text').")
    label_column: str | None = Field(None, description="User data: the label column (default 'label').")
    text_template: str | None = Field(
        None, description="User data: text built from columns, e.g. '{premise} / {hypothesis}'.")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Cleaning rules (counted).")

    @model_validator(mode="after")
    def _columns(self) -> TaskConfig:
        prefix, sep, arg = self.source.partition(":")
        user = prefix in USER_SOURCES
        if user and not (sep and arg):
            raise ValueError(f"source {self.source!r} needs a path: '{prefix}:<path>'")
        mapped = [k for k in ("text_column", "label_column", "text_template") if getattr(self, k)]
        if mapped and not user:
            raise ValueError(f"{', '.join(mapped)} apply only to sources "
                             f"{', '.join(p + ':' for p in USER_SOURCES)}")
        if self.text_column is not None and self.text_template is not None:
            raise ValueError("give text_column or text_template, not both")
        if self.text_template is not None:
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(self.text_template) if f is not None]
            except ValueError as err:
                raise ValueError(f"text_template: {err}") from None
            if not fields or any(not f.isidentifier() for f in fields):
                raise ValueError("text_template needs named column slots, e.g. '{premise} / {hypothesis}'")
        return self

    def loader_options(self, root: Path) -> dict[str, Any]:
        """Keyword options for the source's loader: the project root, the declared labels and
        the column mapping for the user's data; nothing for a package source."""
        if self.source.partition(":")[0] not in USER_SOURCES:
            return {}
        return {"root": root, "labels": sorted(self.verbalizer), "text_column": self.text_column,
                "label_column": self.label_column, "text_template": self.text_template}

    @field_validator("template")
    @classmethod
    def _slot(cls, template: str) -> str:
        try:
            filled = template.format(text="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"template must have exactly one '{{text}}' slot ({err})") from None
        if "{text}" not in template or filled == template:
            raise ValueError("template must contain '{text}'")
        return template

    def label_words(self, labels: list[str]) -> dict[str, str]:
        """Label -> word for the task's ``labels`` (the data's): the verbalizer's, or without one
        ``" " + label`` (a BIG-bench task's label names are its answer words, e.g. ' True')."""
        if self.verbalizer is None:
            return {label: " " + label for label in labels}
        return {label: self.verbalizer[label] for label in labels}

    @model_validator(mode="after")
    def _own_data_declares_labels(self) -> TaskConfig:
        if self.verbalizer is None and self.source.partition(":")[0] in USER_SOURCES:
            raise ValueError("verbalizer: null only for package sources (their data names the labels); "
                             "your own data declares its labels as the verbalizer's keys")
        return self

    @field_validator("verbalizer")
    @classmethod
    def _words(cls, words: dict[str, str] | None) -> dict[str, str] | None:
        if words is None:
            return None
        if len(words) < 2:
            raise ValueError("needs at least two labels")
        if len(set(words.values())) != len(words):
            raise ValueError("label words must be distinct")
        return words


# --------------------------------------------------------------------------- fetch
class ModelSource(Section):
    """Where the base ("original") model comes from: a GGUF inside a pinned package, or HF."""

    package: str | None = Field(None, description="Pinned wheel 'name==version' holding a GGUF.")
    gguf_member: str | None = Field(None, description="Path of the GGUF file inside the wheel.")
    name_or_path: str | None = Field(None, description="Local HF folder or hub id (safetensors).")
    trust_remote_code: bool = Field(False, description="Run model code from the hub: off unless asked.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        gguf = self.package is not None or self.gguf_member is not None
        if gguf == (self.name_or_path is not None):
            raise ValueError("give either package + gguf_member or name_or_path, not both or neither")
        if gguf and (self.package is None or self.gguf_member is None):
            raise ValueError("package and gguf_member go together")
        return self


class SplitConfig(Section):
    """Deterministic stratified train/validation/test split with per-split size caps."""

    seed: int
    validation_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    max_train: int = Field(gt=0)
    max_validation: int = Field(gt=0)
    max_test: int = Field(gt=0)

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must leave room for train")
        return self


class FetchConfig(Section):
    cache_dir: str = Field(description="Package archives cache (outside DVC outputs).")
    max_chars: int = Field(gt=0, description="Texts are truncated to this many characters.")
    model: ModelSource
    split: SplitConfig


# --------------------------------------------------------------------------- validate
class ValidateConfig(Section):
    min_chars: int = Field(ge=1)
    max_chars: int = Field(gt=0)
    min_per_class: int = Field(ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must not exceed max_chars")
        return self


# --------------------------------------------------------------------------- compress
class CalibrationConfig(Section):
    """Calibration prompts (task templates over train texts) for data-aware compression."""

    samples: int = Field(gt=0, description="prompts in total, drawn evenly from every task's train split")
    max_length: int = Field(gt=0, description="tokens per prompt")
    batch_size: int = Field(gt=0)
    seed: int


class MeasureConfig(Section):
    """How compressed models are measured (same settings before and after compression)."""

    max_length: int = Field(gt=0, description="prompt tokens for zero-shot accuracy and perplexity")
    batch_size: int = Field(gt=0)
    max_examples: int = Field(gt=0, description="validation examples per task for zero-shot accuracy")
    ppl_texts: int = Field(gt=0, description="validation texts per task for perplexity")
    latency_batch: int = Field(gt=0)
    latency_seq_len: int = Field(gt=0)
    latency_repeats: int = Field(gt=0, description="timed forward passes; the median is reported")


class CompressConfig(Section):
    calibration: CalibrationConfig
    measure: MeasureConfig
    methods: dict[str, dict[str, Any]] = Field(
        description="name -> method config ({method: ..., ...}); see cpet.compress"
    )

    @field_validator("methods")
    @classmethod
    def _names(cls, methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return _folder_names("method", methods)

    def method(self, name: str):
        """The validated config of one method (a :class:`cpet.compress.MethodConfig`)."""
        from cpet.compress import parse_config

        if name not in self.methods:
            raise ConfigError(f"compress.methods: no method named {name!r}; have {', '.join(self.methods)}")
        return parse_config(name, self.methods[name])


# --------------------------------------------------------------------------- CPET core
class TeacherCacheConfig(Section):
    layers: list[int] = Field(description="hidden layers cached for distillation (indices into hidden_states)")
    batch_size: int = Field(gt=0)


class TeacherConfig(Section):
    lora: LoraSettings
    train: TrainConfig
    cache: TeacherCacheConfig
    adapters: dict[str, str] = Field(
        default_factory=dict, description="task -> existing peft adapter dir used instead of training"
    )


TRAINED_VARIANTS = TRAINED


def _trained(v: list[str]) -> list[str]:
    """Names from the recipe table that the recover stage trains, each once."""
    bad = [x for x in v if x not in TRAINED_VARIANTS]
    if bad:
        raise ValueError(f"unknown variant {bad[0]!r}; choose from {list(TRAINED_VARIANTS)}")
    if len(set(v)) != len(v):
        raise ValueError("variants must be distinct")
    return v


TrainedVariants = Annotated[list[str], AfterValidator(_trained)]


class RecoverConfig(Section):
    variants: TrainedVariants = Field(description=f"trained variants, from {list(TRAINED_VARIANTS)}")
    train: TrainConfig = Field(description="the same recipe for every variant")
    recovery: RecoverySettings
    distill: DistillConfig




class EvaluateConfig(Section):
    split: Literal["validation", "test"]
    batch_size: int = Field(gt=0)
    max_length: int = Field(gt=0)
    mixed_precision: Literal["no", "bf16", "auto"] = Field(
        "no", description="bf16 = forward passes under torch.autocast(bfloat16), as in training; no = float32; "
        "auto = bf16 where the device computes it natively")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml11_no(cls, v):
        return "no" if v is False else v  # `mixed_precision: no` unquoted (or rewritten by `dvc exp run -S`)


# --------------------------------------------------------------------------- tracking / registry
class TrackConfig(Section):
    """MLflow tracking of every stage run (cpet.tracking); ``MLFLOW_TRACKING_URI`` overrides the URI."""

    enabled: bool = Field(description="log each stage run (params, metrics, reports, lineage tags)")
    tracking_uri: str = Field(description="MLflow tracking/registry URI; sqlite paths are relative to the project root")
    experiment: str = Field(min_length=1, description="experiment holding the stage runs")


GATES = {  # gate name -> (metric it reads, comparison); see cpet.tracking.gates
    "min_accuracy": ("accuracy", ">="),
    "min_recovery_ratio": ("recovery_ratio", ">="),
    "max_latency_ms": ("latency_ms", "<="),
    "max_size_ratio": ("size_ratio", "<="),
}


def _gates(gates: dict[str, float | None]) -> dict[str, float | None]:
    bad = [g for g in gates if g not in GATES]
    if bad:
        raise ValueError(f"unknown gate {bad[0]!r}; choose from {sorted(GATES)}")
    return gates


class RegisterConfig(Section):
    """Registered models and the gates a version must pass to become ``champion``."""

    variant: str = Field(description="the recover variant registered as each task's model")
    base_gates: dict[str, float | None] = Field(description="gates for cpet-base-<compression> (null = off)")
    task_gates: dict[str, float | None] = Field(description="gates for cpet-<task>-<compression> (null = off)")

    @field_validator("base_gates", "task_gates")
    @classmethod
    def _known(cls, gates: dict[str, float | None]) -> dict[str, float | None]:
        return _gates(gates)

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str) -> str:
        if v not in TRAINED_VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {list(TRAINED_VARIANTS)}")
        return v


# --------------------------------------------------------------------------- export / bench / serve
class ExportTolerance(Section):
    """Parity of the ONNX model with the PyTorch bundle; beyond any bound the export stage fails."""

    max_abs_logit_diff: float = Field(gt=0, description="largest |logit difference| at the label position")
    min_top1_agreement: float = Field(ge=0, le=1, description="fraction of examples with the same predicted label")
    max_accuracy_drop: float = Field(ge=0, description="accuracy(PyTorch) - accuracy(ONNX) on the split")


class ExportConfig(Section):
    variant: str = Field(description="the recover variant exported per task (a bundle)")
    split: Literal["validation", "test"]
    max_examples: int | None = Field(None, gt=0, description="parity examples per task (null = the whole split)")
    batch_size: int = Field(gt=0)
    max_length: int = Field(gt=0)
    naive_baseline: bool = Field(description="also measure 'merge LoRA, re-quantize' on quantized bases")
    tolerance: ExportTolerance
    tolerance_int8_activations: ExportTolerance = Field(
        description="parity bounds for bases with int8 activations (w8a8): per-token rounding is "
                    "discontinuous, so float summation order can flip a rounding and move logits")


class BenchConfig(Section):
    task: str | None = Field(None, description="whose bundles are timed (null = the first task scored by first token)")
    batch_sizes: list[int] = Field(min_length=1)
    seq_len: int = Field(gt=0)
    warmup: int = Field(ge=0)
    repeats: int = Field(gt=0, description="timed rounds; p50/p90 over them")
    threads: int | None = Field(None, gt=0, description="intra-op threads of both runtimes (null = all cores)")
    memory: bool = Field(description="peak memory of each model, measured in a fresh subprocess")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be >= 1")
        return v


class ServeConfig(Section):
    host: str
    port: int = Field(ge=0, le=65535)
    variant: str = Field(description="the recover variant served per task")
    max_texts: int = Field(gt=0, description="texts per request; more is refused with 422")
    max_chars: int = Field(gt=0, description="characters per text; longer is refused with 422")
    max_length: int = Field(gt=0, description="prompt tokens (texts are cut as in training)")
    batch_size: int = Field(gt=0)


# --------------------------------------------------------------------------- study
class BootstrapConfig(Section):
    samples: int = Field(gt=0, description="bootstrap resamples of (seeds, test rows)")
    confidence: float = Field(gt=0, lt=1, description="two-sided interval, e.g. 0.95")
    seed: int


class StudyConfig(Section):
    """``cpet study``: DVC experiments over cells of the comparison, aggregated by ``cpet study-report``.

    Axis ``cells``: every ``tasks`` x ``methods`` cell with the default recipe. The other axes run on
    one focus cell (``task`` x ``method``): ``ablation`` (the default recipe with ``variants`` +
    ``ablations``: the reference point of the curves), ``distill``, ``steps``, ``setting`` (any
    overrides, named) and ``strength``. Axis ``candidate``: named overrides on every cell, to
    weigh a candidate default against the ``cells`` axis before it becomes the default."""

    tasks: list[str] = Field(min_length=1, description="tasks of the 'cells' axis (others are removed)")
    methods: list[str] = Field(min_length=1, description="compress.methods entries of the 'cells' axis")
    task: str = Field(description="the focus cell's task: every other axis trains and evaluates only it")
    method: str = Field(description="the focus cell's compress.methods entry")
    seeds: list[int] = Field(min_length=1, description="recover.train.seed values: adapter init and data order")
    variants: TrainedVariants = Field(min_length=1, description="recover.variants of every experiment")
    ablations: TrainedVariants = Field(description="variants trained besides `variants` on the focus cell (axis 'ablation')")
    steps: list[int] = Field(description="recover.train.steps values (axis 'steps')")
    max_train: int | None = Field(None, gt=0, description="fetch.split.max_train for the steps axis (null = as is)")
    strength: dict[str, list[dict[str, Any]]] = Field(
        description="compress.methods entry -> settings merged into it, each on study.task ({} = as is; axis 'strength')")
    distill: list[tuple[float, float]] = Field(description="(alpha, beta) of recover.distill (axis 'distill')")
    settings: dict[str, list[str]] = Field(
        description="name -> `dvc exp run -S` overrides, each on the focus cell (axis 'setting')")
    candidates: dict[str, list[str]] = Field(
        default_factory=dict,
        description="name -> `dvc exp run -S` overrides, each on every cell of the 'cells' axis (axis 'candidate')")
    bootstrap: BootstrapConfig


# --------------------------------------------------------------------------- front
class FrontConfig(Section):
    """``cpet front``: one DVC experiment over these compression settings; ``cpet front-report``."""

    methods: dict[str, dict[str, Any]] = Field(
        min_length=1, description="name -> method config, replacing compress.methods in the experiment")
    accuracy_tolerance: float = Field(
        ge=0, lt=1, description="largest accuracy drop from original+pet, on every task, for 'within tolerance'")

    @field_validator("methods")
    @classmethod
    def _names(cls, methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from cpet.compress import parse_config

        for name, raw in _folder_names("method", methods).items():
            parse_config(name, raw, prefix="front.methods")
        return methods


# --------------------------------------------------------------------------- all
class Params(Section):
    tasks: dict[str, TaskConfig]
    fetch: FetchConfig
    validate_: ValidateConfig = Field(alias="validate")
    compress: CompressConfig
    teacher: TeacherConfig
    recover: RecoverConfig
    evaluate: EvaluateConfig
    track: TrackConfig
    register_: RegisterConfig = Field(alias="register")
    export: ExportConfig
    bench: BenchConfig
    serve: ServeConfig
    study: StudyConfig
    front: FrontConfig

    def recover_methods(self) -> list[str]:
        """Compression methods in the CPET comparison: every configured one."""
        return list(self.compress.methods)

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        return _folder_names("task", tasks)

    @model_validator(mode="after")
    def _cross(self) -> Params:
        if self.validate_.max_chars < self.fetch.max_chars:
            raise ValueError(
                "validate.max_chars must be >= fetch.max_chars (fetch truncates to that length)"
            )
        if self.register_.variant not in self.recover.variants:
            raise ValueError(f"register.variant {self.register_.variant!r} is not in recover.variants")
        return self


def _format(err: ValidationError, source: str) -> str:
    return f"{source}: {describe(err)}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a raw mapping; raise ConfigError naming the first bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None
    try:
        for name in params.compress.methods:  # method configs live with their methods
            params.compress.method(name)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    _check_library_sections(params, source)
    return params


def _check_library_sections(params: Params, source: str) -> None:
    """Cross-section checks (names that must exist elsewhere in the file)."""
    for task in params.teacher.adapters:
        if task not in params.tasks:
            raise ConfigError(f"{source}: teacher.adapters.{task}: not a configured task")
    for where, variant in (("export.variant", params.export.variant), ("serve.variant", params.serve.variant)):
        if variant not in params.recover.variants:
            raise ConfigError(f"{source}: {where}: {variant!r} is not one of recover.variants {params.recover.variants}")
    if params.bench.task is not None and params.bench.task not in params.tasks:
        raise ConfigError(f"{source}: bench.task: {params.bench.task!r} is not a configured task")
    missing = set(params.recover.distill.layers) - set(params.teacher.cache.layers)
    if missing:
        raise ConfigError(f"{source}: recover.distill.layers: {sorted(missing)} not in teacher.cache.layers")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    return parse_params(raw, str(path))
