"""``cpet promote`` and ``cpet predict``: the registry from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from cpet.errors import CpetError
from cpet.tracking.registry import CHAMPION, latest_version, promote, version_metrics
from cpet.tracking.runs import connect, resolve_uri


#: what the registry stores answer for "no such alias" (sqlite: INVALID_PARAMETER_VALUE; REST and
#: file stores: RESOURCE_DOES_NOT_EXIST); any other MlflowException is a real failure
NO_ALIAS_CODES = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")


def champion_version(client, model: str) -> str | None:
    """The version ``model``'s champion alias points to, or None when it has no champion."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model, CHAMPION).version)
    except MlflowException as err:
        if err.error_code in NO_ALIAS_CODES:
            return None
        first = (str(err).strip().splitlines() or [err.error_code])[0]
        raise CpetError(f"{model}: looking up its {CHAMPION!r} alias failed: {first}") from None


def promote_command(params, root: Path, model: str, version: str | None) -> int:
    """Re-check ``model``'s version (default: latest) against today's gates in params.yaml.

    Prints the outcome as JSON; exit 0 when the version is (now) champion, 1 when a gate failed.
    """
    client = connect(resolve_uri(params.track, root))
    version = version or latest_version(client, model)
    gates = params.register_.base_gates if model.startswith("cpet-base-") else params.register_.task_gates
    decision = promote(client, model, version, version_metrics(client, model, version), gates)
    champion = champion_version(client, model)
    print(json.dumps({"model": model, "version": version, "champion": champion, **decision.tags()}, indent=2))
    if not decision.passed:
        failed = "; ".join(f"{c.gate} ({c.describe()})" for c in decision.failed)
        kept = f"champion stays v{champion}" if champion else "no champion"
        raise CpetError(f"{model} v{version}: gate failed: {failed}; {kept}")
    return 0


def predict_command(params, root: Path, model_uri: str, texts: list[str], task: str | None) -> int:
    """Classify ``texts`` with a registered (or local) model; one JSON line per text."""
    import mlflow

    from mlflow.exceptions import MlflowException

    uri = resolve_uri(params.track, root)
    connect(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise CpetError(f"{model_uri}: {str(err).splitlines()[0]}") from None
    import pandas as pd

    frame = pd.DataFrame({"text": texts, **({"task": [task] * len(texts)} if task else {})})
    from cpet.standalone import prediction_row

    for text, (_, row) in zip(texts, model.predict(frame).iterrows(), strict=True):
        print(json.dumps(prediction_row(text, row["task"], row["label"], row["score"], row["scores"])))
    return 0


def card_command(params, root: Path, target: str) -> int:
    """Print the model card of a registered model (``models:/name@alias``, ``models:/name/version``)
    or build it from a folder: a task bundle (``.../<method>/<task>/<variant>``) or a compressed base."""
    from cpet.tracking import card

    if not target.startswith("models:/"):
        print(card.render(card.folder_facts(params, root, Path(target))), end="")
        return 0
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_uri(params.track, root)
    client = connect(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name, _, ref = target.removeprefix("models:/").partition("@")
    if ref:
        version = champion_version(client, name) if ref == CHAMPION else None
        if version is None:
            try:
                version = str(client.get_model_version_by_alias(name, ref).version)
            except MlflowException as err:
                raise CpetError(f"{target}: {str(err).splitlines()[0]}") from None
    else:
        name, _, version = name.partition("/")
        version = version or latest_version(client, name)
    try:
        source = client.get_model_version_download_uri(name, version)
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/artifacts/{card.FILE}")
    except MlflowException as err:
        raise CpetError(f"{name} v{version}: no model card ({str(err).splitlines()[0]}); "
                        "registered before cards existed? run `cpet register` again") from None
    print(Path(path).read_text(), end="")
    return 0
