"""The method registry: a name -> :class:`Method` dict that methods add themselves to.

A method is a config class plus an ``apply(cm, cfg, calib) -> dict`` function that changes a
:class:`~cpet.compress.core.CompressedModel` in place and returns what the manifest should say
about the step. New methods plug in with :func:`register`; nothing branches on method names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cpet.compress.config import MethodConfig
from cpet.errors import ConfigError

if TYPE_CHECKING:
    from cpet.compress.core import Calibration, CompressedModel

# Order of method kinds inside ``mixed``: a later kind may not precede an earlier one.
STRUCTURED, MOE, PRUNING, QUANTIZATION = 0, 1, 2, 3


@dataclass(frozen=True)
class Method:
    """One registered compression method."""

    name: str
    config_cls: type[MethodConfig]
    apply: Callable[[CompressedModel, Any, Calibration | None], dict]
    stage: int | None  # position in a ``mixed`` pipeline; None: cannot be a step
    summary: str = ""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (a second registration under one name is an error)."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"compression method '{method.name}' is already registered")
    METHODS[method.name] = method
    return method


def parse_config(name: str, raw: Any, prefix: str = "compress.methods") -> MethodConfig:
    """Validate one method config: ``raw["method"]`` picks the registered class.

    ``name`` is the config's name under ``prefix``; error messages start with
    ``<prefix>.<name>.<key>``.
    """
    where = f"{prefix}.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping with a 'method' key, got {type(raw).__name__}")
    method = raw.get("method")
    if method is None:
        raise ConfigError(f"{where}.method: missing; known methods: {', '.join(sorted(METHODS))}")
    if method not in METHODS:
        raise ConfigError(f"{where}.method: unknown method {method!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[method].config_cls.from_raw(raw, where)
