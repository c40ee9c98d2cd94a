"""MLflow at the edge: tracking URI, shared run tags, reachability, and patient-id hashing."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from smearnet.errors import SmearnetError

PIPELINE_TAG = "smearnet.pipeline_run"
_SALT_ENV = "SMEARNET_ID_SALT"


def tracking_uri(mlflow_cfg: Mapping) -> str:
    """MLFLOW_TRACKING_URI wins over the configured URI (sqlite:///mlflow.db by default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or str(mlflow_cfg["tracking_uri"])


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).read()
    except Exception as err:  # noqa: BLE001 - any failure means unreachable
        raise SmearnetError(
            f"The MLflow tracking server at {uri} is unreachable ({type(err).__name__}: {err}).",
            "start it (e.g. `mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db`) "
            "or unset MLFLOW_TRACKING_URI to log to the local sqlite:///mlflow.db.",
        ) from None


def setup_mlflow(mlflow_cfg: Mapping) -> str:
    """Point the mlflow client at the tracking store and experiment; return the URI."""
    import mlflow

    uri = tracking_uri(mlflow_cfg)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(str(mlflow_cfg["experiment"]))
    return uri


def revision_tags(params_path: Path = Path("params.yaml"), experiment: str | None = None) -> dict[str, str]:
    """Tags shared by every run of one `dvc repro`: git revision, params hash, experiment name."""
    git_rev = _git("rev-parse", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    params_hash = hashlib.sha256(params_path.read_bytes()).hexdigest()[:12] if params_path.is_file() else "none"
    tags = {
        "git_commit": git_rev,
        "git_dirty": str(dirty).lower(),
        "params_sha": params_hash,
        PIPELINE_TAG: f"{git_rev[:10]}{'-dirty' if dirty else ''}-{params_hash}",
    }
    if experiment:
        tags["smearnet.experiment"] = experiment
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def hash_patient_id(patient_id: str, salt: str | None = None) -> str:
    """A salted, one-way pseudonym for a patient id, safe for logs, MLflow and reports."""
    salt = salt if salt is not None else os.environ.get(_SALT_ENV, "smearnet-default-salt")
    return "pt-" + hashlib.sha256(f"{salt}:{patient_id}".encode()).hexdigest()[:12]


def flatten_metrics(metrics: dict, prefix: str) -> dict:
    """Scalar leaves of a nested metrics dict as `prefix/a/b` names (lists skipped)."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            flat[name] = float(value)
    return flat


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return ""
