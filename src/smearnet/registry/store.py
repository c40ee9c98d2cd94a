"""MLflow model-registry I/O: log and register a packaged version, find it by fingerprint, read aliases, download.

The store names what it keeps: versions carry `FINGERPRINT_TAG` (their content, `model_fingerprint`) and
`GATE_TAG` (the recorded gate decision); register runs carry `MODEL_NAME_TAG`; the aliases `CHAMPION` and
`CHALLENGER` point at the served version and the latest candidate.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.signature import infer_signature
from mlflow.types.schema import ColSpec, Schema

from smearnet.errors import SmearnetError
from smearnet.models.inference import load_trained, read_serving
from smearnet.registry.package import PACKAGE_DIR, SERVING_CODE, example_request, pip_requirements
from smearnet.serving.requests import ServingLimits, classify_request
from smearnet.smear.calls import served_rule

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_DIR_ARTIFACT = "model_dir"
FINGERPRINT_TAG = "smearnet.model_fingerprint"
MODEL_NAME_TAG = "smearnet.registered_model"
GATE_TAG = "smearnet.gate"


def log_model_version(model_dir: Path, registered_name: str, *, tags: Mapping[str, str] | None = None,
                      metadata: Mapping[str, Any] | None = None) -> ModelVersion:
    """Log `model_dir` as a pyfunc model (models-from-code, weights as safetensors) in the active run,
    register it under `registered_name` with `tags` set at creation, and return the new ModelVersion.

    The output schema comes from running the model on the input example (a plain grey image)."""
    example = example_request()
    serving = read_serving(model_dir)
    rule, aggregator = served_rule(Path(model_dir), serving)
    model = load_trained(Path(model_dir))
    # What the served model answers, through the very code it answers with.
    output = classify_request(model, rule, aggregator, example, ServingLimits.from_config(serving.get("limits")))
    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "smear_id", required=False)])
    signature = ModelSignature(inputs=inputs, outputs=infer_signature(example, output).outputs)
    info = mlflow.pyfunc.log_model(name="model", python_model=str(SERVING_CODE),
                                   artifacts={MODEL_DIR_ARTIFACT: str(model_dir)}, code_paths=[str(PACKAGE_DIR)],
                                   pip_requirements=pip_requirements(), signature=signature, input_example=example,
                                   metadata=dict(metadata) if metadata else None)
    return mlflow.register_model(info.model_uri, registered_name,
                                 tags={key: str(value) for key, value in (tags or {}).items()})


def find_version(client: MlflowClient, name: str, fingerprint: str) -> ModelVersion | None:
    """The registered version of `name` tagged with `fingerprint` (the newest if several), else None."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
    except MlflowException:  # a store without tag search: filter here
        found = client.search_model_versions(f"name = '{name}'")
    # Some stores return versions without tags from search: read each one back.
    versions = [client.get_model_version(name, v.version) for v in found]
    matching = [v for v in versions if v.tags.get(FINGERPRINT_TAG) == fingerprint]
    return max(matching, key=lambda v: int(v.version)) if matching else None


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at, or None (no such alias or registered model)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def close_abandoned_runs(client: MlflowClient, experiment: str, model_name: str, fingerprint: str) -> None:
    """Mark register runs of this model left RUNNING by a killed attempt as KILLED."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return
    query = (f"attributes.status = 'RUNNING' and tags.`{MODEL_NAME_TAG}` = '{model_name}' "
             f"and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
    for run in client.search_runs([found.experiment_id], query):
        client.set_terminated(run.info.run_id, status="KILLED")


def download_model_dir(model_uri: str, dst: Path) -> Path:
    """Download a logged smearnet pyfunc model and return its model directory (weights + serving.json)."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    return local_model_dir(local)


def local_model_dir(local_model: Path) -> Path:
    """The `model_dir` artifact inside a downloaded pyfunc model folder (the one holding MLmodel)."""
    flavor = Model.load(str(local_model)).flavors.get("python_function", {})
    artifact = flavor.get("artifacts", {}).get(MODEL_DIR_ARTIFACT)
    if not artifact:
        raise SmearnetError(f"{local_model} is not a smearnet pyfunc model (no `{MODEL_DIR_ARTIFACT}` artifact).",
                            "register models with smearnet (the register stage).")
    return Path(local_model) / artifact["path"]


__all__ = ["CHALLENGER", "CHAMPION", "FINGERPRINT_TAG", "GATE_TAG", "MODEL_DIR_ARTIFACT", "MODEL_NAME_TAG",
           "alias_version", "close_abandoned_runs", "download_model_dir", "find_version", "local_model_dir",
           "log_model_version"]
