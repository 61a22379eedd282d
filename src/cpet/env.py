"""Quiet, offline-friendly defaults: no telemetry, no hub calls, unless the user set otherwise."""

import os

QUIET = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one bar per artifact download floods the logs
    "ORT_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_quiet_defaults() -> None:
    """Set each variable in :data:`QUIET` unless already set (a user may turn the hub back on)."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
