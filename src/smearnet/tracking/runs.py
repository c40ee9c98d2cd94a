"""MLflow at the edge: tracking URI, reachability, one parent run per pipeline execution with each stage nested
under it, shared tags, and datasets as run inputs."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from smearnet.errors import SmearnetError

PIPELINE_TAG = "smearnet.pipeline_run"


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


#: What a pipeline execution is made of: a change here is a new execution (stage outputs are not).
SOURCE_PATHS = ("src", "pipeline", "conf", "dvc.yaml", "params.yaml", "pyproject.toml")
PARENT_TAG = "smearnet.pipeline_parent"


def revision_tags(params_path: Path = Path("params.yaml"), experiment: str | None = None) -> dict[str, str]:
    """Tags shared by every run of one pipeline execution: git revision, params hash, experiment name.

    `git_dirty` looks at code and configuration only (`SOURCE_PATHS`), never at stage outputs, so a stage
    that writes `metrics/` does not make the next stage's run look dirty.  A dirty tree's uncommitted diff
    is part of the pipeline-run key, so two executions with different local edits never share a parent run.
    """
    git_rev = _git("rev-parse", "HEAD") or "unknown"
    diff = _git("diff", "HEAD", "--", *SOURCE_PATHS)
    dirty = bool(diff)
    params_hash = hashlib.sha256(params_path.read_bytes()).hexdigest()[:12] if params_path.is_file() else "none"
    dirty_part = f"-dirty{hashlib.sha256(diff.encode()).hexdigest()[:8]}" if dirty else ""
    tags = {
        "git_commit": git_rev,
        "git_dirty": str(dirty).lower(),
        "params_sha": params_hash,
        PIPELINE_TAG: f"{git_rev[:10]}{dirty_part}-{params_hash}",
    }
    if experiment:
        tags["smearnet.experiment"] = experiment
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def pipeline_parent_run(experiment_name: str, tags: Mapping[str, str]) -> str:
    """The id of this pipeline execution's parent run: found by its pipeline-run tag, else created.

    The first stage of an execution that runs creates it; later stages (and re-runs of a stage with the same
    code, config and params) nest under the same parent.  Named after the DVC experiment when `dvc exp run`
    runs the pipeline, else after the pipeline-run key.  `setup_mlflow` must have set up the experiment.
    """
    import mlflow
    from mlflow.entities import RunStatus

    experiment = mlflow.get_experiment_by_name(experiment_name)
    key = tags[PIPELINE_TAG]
    found = mlflow.search_runs([experiment.experiment_id], output_format="list", max_results=1,
                               filter_string=f"tags.`{PIPELINE_TAG}` = '{key}' and tags.`{PARENT_TAG}` = 'true'",
                               order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    name = tags.get("dvc_exp_name") or f"pipeline-{key}"
    run = client.create_run(experiment.experiment_id, run_name=name, tags={**tags, PARENT_TAG: "true"})
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run.info.run_id


def stage_tags(mlflow_cfg: Mapping, stage: str, **extra: str) -> dict[str, str]:
    """The tags of one stage's run: the execution's revision tags, the stage, and `mlflow.parentRunId` so the
    MLflow UI shows the stage nested under its pipeline execution (for loggers that create runs themselves)."""
    tags = revision_tags(experiment=str(mlflow_cfg["experiment"]))
    parent = pipeline_parent_run(str(mlflow_cfg["experiment"]), tags)
    return {**tags, "stage": stage, "mlflow.parentRunId": parent, **extra}


@contextmanager
def stage_run(mlflow_cfg: Mapping, stage: str, *, run_name: str | None = None, **extra_tags: str):
    """An MLflow run spanning a stage's work, nested under the pipeline execution's parent run.

    Open it before the work starts (not after), so the run's duration is the stage's.
    """
    import mlflow

    setup_mlflow(mlflow_cfg)
    tags = stage_tags(mlflow_cfg, stage, **extra_tags)
    parent = tags.pop("mlflow.parentRunId")
    with mlflow.start_run(run_name=run_name or stage, parent_run_id=parent, tags=tags) as run:
        yield run
    extend_parent_run(parent)


def extend_parent_run(parent_run_id: str) -> None:
    """Move the parent run's end to now, so its duration in the UI spans the stages run so far."""
    import mlflow

    mlflow.MlflowClient().set_terminated(parent_run_id)


def log_dataset(frame: pd.DataFrame, *, name: str, context: str, source: str, run_id: str | None = None) -> None:
    """Log a manifest as an MLflow dataset input (its digest, schema and size) of `run_id`, else the active run.

    Only the image path and label columns are described; patient identifiers never reach MLflow."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag

    columns = [c for c in ("path", "label") if c in frame.columns]
    described = frame[columns].astype(str).reset_index(drop=True)
    with warnings.catch_warnings():  # a relative path reads as two kinds of local source; both mean the file
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(described, source=source, name=name,
                                          targets="label" if "label" in columns else None)
    if run_id is None:
        mlflow.log_input(dataset, context=context)
        return
    entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
    mlflow.MlflowClient().log_inputs(run_id, datasets=[entity])



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


#: A pseudonym as `smearnet.pseudonyms` writes it: files holding one stay out of MLflow.
_PSEUDONYM = re.compile(rb"pt-[0-9a-f]{16}")


def log_stage_outputs(folder: Path, artifact_path: str) -> list[str]:
    """Log a stage's output folder to the active run, except files that name patients or smears by pseudonym
    (per-cell and per-smear tables): MLflow gets the figures, plots and rules, the pseudonyms stay in the
    project's DVC outputs.  Returns the files kept out (also recorded in the run's `smearnet.kept_out` tag)."""
    import mlflow

    folder = Path(folder)
    kept_out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if path.suffix in (".csv", ".json", ".md", ".txt", ".html") and _PSEUDONYM.search(path.read_bytes()):
            kept_out.append(relative.as_posix())
            continue
        parent = f"{artifact_path}/{relative.parent.as_posix()}" if relative.parent != Path(".") else artifact_path
        mlflow.log_artifact(str(path), artifact_path=parent)
    if kept_out:
        mlflow.set_tag("smearnet.kept_out", ", ".join(kept_out)[:5000])
    return kept_out
