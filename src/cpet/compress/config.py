"""Typed, validated configs for every compression method.

Each method has a pydantic model with ``extra="forbid"``; a raw dict (one entry of
``params.yaml: compress.methods.<name>``) is turned into one by :func:`parse_config`, which
selects the class by the dict's ``method`` key through the registry. Every error is a
:class:`~cpet.errors.ConfigError` whose message starts with the full key, e.g.
``compress.methods.my_int4.group_size: Input should be greater than 0``.

Checks that need the model (does ``group_size`` divide every layer's width?) happen in
``compress`` and name the key the same way, through :meth:`MethodConfig.key`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SerializeAsAny, ValidationError, model_validator

from cpet.errors import ConfigError

Score = Literal["magnitude", "wanda"]


class MethodConfig(BaseModel):
    """Base of every method config: the ``method`` name plus the key path used in messages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(description="registered method name")
    _where: str = PrivateAttr(default="compress")

    #: methods that need calibration batches whatever their parameters say
    needs_calibration: ClassVar[bool] = False

    def key(self, field: str | None = None) -> str:
        """The params.yaml key of this config (or one of its fields), for error messages."""
        return self._where if field is None else f"{self._where}.{field}"

    def error(self, field: str | None, message: str) -> ConfigError:
        """A ConfigError whose message starts with the offending key."""
        return ConfigError(f"{self.key(field)}: {message}")

    @classmethod
    def from_raw(cls, raw: dict[str, Any], where: str) -> MethodConfig:
        """Validate ``raw``; any failure becomes one ConfigError naming each offending key."""
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            parts = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = f"unknown key for method '{raw.get('method')}'"
                parts.append(f"{where}{'.' + loc if loc else ''}: {msg}")
            raise ConfigError("; ".join(parts)) from None
        cfg._where = where
        return cfg


class _Selective(MethodConfig):
    exclude: list[str] = Field(
        default_factory=list,
        description="fnmatch patterns of module names left untouched, e.g. ['*.mlp.down_proj']",
    )


class Int8Config(_Selective):
    """Per-output-channel symmetric int8 weights (levels -127..127); activations stay float."""

    method: Literal["int8"] = "int8"
    embeddings: bool = Field(False, description="also quantize the input embedding and the output head")


class W8A8Config(_Selective):
    """SmoothQuant int8 weights (per output channel) and int8 activations (per token)."""

    method: Literal["w8a8"] = "w8a8"
    alpha: float = Field(0.5, ge=0, le=1, description="SmoothQuant migration strength; 0 = no smoothing")
    activations: Literal["per-token", "static"] = Field(
        "per-token", description="per-token: a scale per row at run time (batch-independent, no calibrated "
                                 "range to break); static: one calibrated scale per layer input (fewer ops)")
    guard: float = Field(
        0.1, gt=0, description="largest relative output error int8 activations may cause on calibration "
                               "data; a layer above it keeps float activations (int8 weights)")

    needs_calibration: ClassVar[bool] = True
    embeddings: ClassVar[bool] = False  # embeddings and the head stay float (no GEMM to speed up)


class IntNConfig(_Selective):
    """Group-wise symmetric 4- or 3-bit weights; GPTQ error compensation when calibrated."""

    method: Literal["int4", "int3"] = "int4"
    group_size: int = Field(
        64, gt=0, description="input columns sharing one scale; must divide in_features (576 = 9 x 64 in SmolLM2)"
    )
    algorithm: Literal["auto", "rtn", "gptq"] = Field(
        "auto", description="auto: gptq when calibration data is given, else round-to-nearest"
    )
    damp: float = Field(0.01, gt=0, lt=1, description="GPTQ damping, fraction of the mean Hessian diagonal")
    block_size: int = Field(128, gt=0, description="GPTQ lazy-update block (rounded up to a multiple of group_size)")
    embeddings: bool = Field(False, description="also quantize the input embedding and output head (always RTN)")

    @property
    def bits(self) -> int:
        return {"int4": 4, "int3": 3}[self.method]


class Nf4Config(_Selective):
    """bitsandbytes NF4 (4-bit normal-float levels, absmax per block); CUDA hosts only."""

    method: Literal["nf4"] = "nf4"
    block_size: int = Field(64, gt=0, description="weights sharing one absmax; must divide in_features")


class UnstructuredConfig(_Selective):
    """Remove the lowest-scoring individual weights until ``sparsity`` of each matrix is zero."""

    method: Literal["unstructured"] = "unstructured"
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of weights set to zero")
    score: Score = Field("magnitude", description="magnitude: |W|; wanda: |W| * ||X_j||_2 (needs calibration)")
    granularity: Literal["row", "layer"] = Field(
        "row", description="compare scores within each output row or whole matrix"
    )


class NMConfig(_Selective):
    """Semi-structured N:M sparsity: in every M consecutive input weights of a row at most N survive."""

    method: Literal["2:4", "nm"] = "2:4"
    n: int = Field(2, ge=1, description="weights kept per group")
    m: int = Field(4, ge=2, description="group length along the input dimension")
    score: Score = Field("magnitude", description="magnitude or wanda (needs calibration)")

    @model_validator(mode="after")
    def _check(self) -> NMConfig:
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        if self.method == "2:4" and (self.n, self.m) != (2, 4):
            raise ValueError("method '2:4' fixes n=2, m=4; use method 'nm' for other ratios")
        return self


class StructuredConfig(MethodConfig):
    """Remove whole KV groups (a KV head and its query heads) and FFN neurons, uniformly per layer."""

    method: Literal["structured"] = "structured"
    heads_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of KV groups removed in every layer")
    ffn_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of FFN neurons removed in every layer")
    importance: Literal["activation", "magnitude"] = Field(
        "activation", description="activation: output contribution on calibration data; magnitude: weight norm only"
    )

    @model_validator(mode="after")
    def _check(self) -> StructuredConfig:
        if self.heads_ratio == 0 and self.ffn_ratio == 0:
            raise ValueError("heads_ratio and ffn_ratio are both 0: nothing to remove")
        return self


class MoEConfig(MethodConfig):
    """MoEfication: FFN neurons clustered into equal experts, a router picks top_k per token."""

    method: Literal["moe"] = "moe"
    num_experts: int = Field(8, ge=2, description="experts per FFN; must divide the intermediate size")
    top_k: int = Field(2, ge=1, description="experts computed per token")
    router: Literal["fitted", "centroid"] = Field(
        "fitted", description="fitted: ridge regression of expert output norms on calibration; centroid: no data"
    )
    kmeans_iters: int = Field(10, ge=1, description="balanced k-means iterations for the neuron clustering")
    ridge: float = Field(1e-2, ge=0, description="fitted router: L2 penalty relative to the mean input energy")
    seed: int = Field(0, description="k-means initialisation seed")

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
        return self


class MixedConfig(MethodConfig):
    """An ordered list of steps: structured, then moe, then pruning, then quantization (each at most once)."""

    method: Literal["mixed"] = "mixed"
    steps: list[SerializeAsAny[MethodConfig]] = Field(min_length=1, description="method configs applied in order")

    @classmethod
    def from_raw(cls, raw: dict[str, Any], where: str) -> MixedConfig:
        from cpet.compress.registry import METHODS, parse_config  # registry imports this module

        unknown = sorted(set(raw) - {"method", "steps"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key for method 'mixed'")
        steps = raw.get("steps")
        if not isinstance(steps, list) or not steps:
            raise ConfigError(f"{where}.steps: must be a non-empty list of method configs")
        parsed: list[MethodConfig] = []
        last = None
        for i, step in enumerate(steps):
            cfg = parse_config(f"steps[{i}]", step, prefix=where)
            stage = METHODS[cfg.method].stage
            if stage is None:
                raise ConfigError(f"{cfg.key('method')}: '{cfg.method}' cannot be a step of 'mixed'")
            if last is not None and stage <= last[0]:
                raise ConfigError(
                    f"{cfg.key('method')}: '{cfg.method}' cannot follow '{last[1]}' "
                    "(order: structured, moe, pruning (unstructured | 2:4 | nm), quantization "
                    "(int8 | int4 | int3 | nf4 | w8a8); each kind at most once)"
                )
            last = (stage, cfg.method)
            parsed.append(cfg)
        cfg = cls(method="mixed", steps=parsed)
        cfg._where = where
        return cfg
