"""Everything that talks to MLflow lives in this package; the rest of cpet never imports mlflow.

- :mod:`cpet.tracking.runs`: one MLflow run per stage run (params, metrics, reports, lineage tags),
  entered by :class:`cpet.stages.Stage` itself, so ``cpet <stage>`` (DVC) and the Prefect flow
  track identically.
- :mod:`cpet.tracking.registry`: registered models per compressed base and per task bundle, and
  the one promotion rule (:func:`~cpet.tracking.registry.promote`).
- :mod:`cpet.tracking.gates`: the gates themselves (pure functions, no mlflow).
- :mod:`cpet.tracking.pyfunc` / ``model_code.py``: the pyfunc model, logged as code (no pickles).

Nothing here imports mlflow at import time: ``import cpet`` stays light.
"""

from cpet.tracking.runs import resolve_uri, stage_run

__all__ = ["resolve_uri", "stage_run"]
