"""Stage ``register``: every compressed base and task bundle into the MLflow model registry, gated.

Reads ``models/compressed/<m>``, the ``register.variant`` bundles under ``models/recover``,
``reports/results.json`` and ``reports/compress/<m>.json``; writes ``reports/register.json``
(version, champion or not, gate outcomes and metrics per registered model). The registry itself
lives at the tracking URI (``track`` in params.yaml). See :mod:`cpet.tracking.registry`.
"""

from __future__ import annotations

from pathlib import Path

from cpet.config import Params


def register(params: Params, root: str | Path = ".") -> dict:
    from cpet.tracking.registry import register_all

    return register_all(params, Path(root))
