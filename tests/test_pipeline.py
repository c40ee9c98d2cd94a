"""The whole DVC pipeline on a tiny configuration, in a temporary git repository."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, class_folders

# The default inference engine of conf/config.yaml (auto: the benchmark stage builds and times five candidates; the
# demo experiment pins OpenVINO int8 instead, so that its committed figures reproduce); the end-to-end test runs
# auto, the other pipeline tests pin eager bf16 (TINY) so they build nothing they do not check.
TINY_BASE = ["data.synthetic.scale=0.02", "augment.per_class=24", "model.resnet18.input_size=[32,32]",
             "train.cycles=1", "train.batch_size=16", "benchmark.repeats=1", "benchmark.warmup=0",
             "smear.bootstrap_resamples=200", "evaluation.bootstrap_resamples=200", "registry.model_name=pipeline-test",
             "benchmark.engines=[]"]
TINY_AUTO = [*TINY_BASE, "inference.engine=auto"]
TINY = [*TINY_BASE, "inference.engine=eager", "inference.precision=bf16", "inference.channels_last=true"]


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def make_project(root: Path, overrides: list[str]) -> Path:
    """A git repo holding this project's pipeline definition, with params composed from `overrides`."""
    project = root / "project"
    project.mkdir()
    for item in ("dvc.yaml", "conf", "pipeline", "src", ".dvc", ".gitignore"):
        source = REPO_ROOT / item
        if source.is_dir():
            shutil.copytree(source, project / item, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__",
                                                                                 "config.local"))
        else:
            shutil.copy2(source, project / item)
    (project / "data").mkdir()
    if sys.prefix != sys.base_prefix:  # the project's .venv, as `make` creates it: stages run on it (pipeline/python)
        (project / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    from smearnet.cli import compose_params

    compose_params(overrides, project / "params.yaml")
    return project


@pytest.fixture
def pipeline_env(mlflow_uri):
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=mlflow_uri, GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def smear_calls_of_the_pipeline(project: Path) -> dict[str, str]:
    """The smear stage's call of every evaluation smear (the rule it measured and register packages)."""
    import pandas as pd

    smears = pd.read_csv(project / "reports/smear/smears.csv", dtype={"smear_id": str})
    return dict(zip(smears["smear_id"], smears["call"], strict=True))


def assessment_cells(project: Path):
    """The assessment cells with their smears' pseudonyms (the ids the smear stage writes)."""
    from smearnet.io import read_table
    from smearnet.pseudonyms import pseudonym

    split = read_table(project / "data/split/manifest.csv")
    cells = split[split["split"] == "assessment"]
    return cells.assign(smear_id=[pseudonym(s) for s in cells["smear_id"]])[["path", "smear_id"]]


def calls_of_predict(project: Path, model_uri: str, env: dict) -> dict[str, str]:
    """`smearnet predict` on a registered version, as a user runs it, over the assessment cells."""
    manifest = project / "assessment.csv"
    assessment_cells(project).to_csv(manifest, index=False)
    run([sys.executable, "-m", "smearnet.cli", "predict", str(manifest), "--model", model_uri, "--json",
         str(project / "predicted.json")], project, env)
    smears = json.loads((project / "predicted.json").read_text())["smears"]
    return {row["smear_id"]: row["call"] for row in smears}


def calls_of_the_served_model(project: Path, model_uri: str, env: dict) -> dict[str, str]:
    """The served version over HTTP (`mlflow models serve`), one row per cell, each carrying its smear's call."""
    import base64
    import urllib.request

    from test_serving import free_port, server

    port = free_port()
    cells = assessment_cells(project)
    rows = [[base64.b64encode(Path(path).read_bytes()).decode(), smear]
            for path, smear in zip(cells["path"], cells["smear_id"], strict=True)]
    serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with server(serve, f"http://127.0.0.1:{port}/ping", project / "serving.log", env):
        body = json.dumps({"dataframe_split": {"columns": ["image", "smear_id"], "data": rows}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=300).read())["predictions"]
    calls: dict[str, set[str]] = {}
    for row in answer:
        calls.setdefault(row["smear_id"], set()).add(row["smear_call"])
    assert all(len(called) == 1 for called in calls.values()), "every cell of a smear carries one call"
    return {smear: called.pop() for smear, called in calls.items()}


def assert_round_trip(project: Path, env: dict, model_name: str) -> str:
    """The pipeline's, predict's and the served model's calls of every assessment smear are identical."""
    import mlflow

    register = json.loads((project / "reports/register/decision.json").read_text())
    uri = f"models:/{model_name}/{register['version']}"
    rule = json.loads((project / "reports/smear/smear_rule.json").read_text())
    packaged = mlflow.MlflowClient().get_model_version(model_name, register["version"]).tags
    assert packaged["smear_score"] == rule["score"], "register packages the rule the smear stage measured"
    pipeline = smear_calls_of_the_pipeline(project)
    assert calls_of_predict(project, uri, env) == pipeline
    assert calls_of_the_served_model(project, uri, env) == pipeline
    return rule["score"]


def without_the_venv_on_path(env: dict) -> dict:
    """`env` as a shell that never activated the venv has it: the stages must still find their interpreter."""
    venv_bin = str(Path(sys.executable).parent)
    return {**env, "PATH": os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)}


def pseudonyms_in_files_git_would_track(project: Path, env: dict) -> list[str]:
    """Every pseudonym (``pt-`` + 16 hex) in a file git tracks or would track (not ignored) in `project`."""
    import re

    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], project, env).stdout.split()
    pattern = re.compile(r"pt-[0-9a-f]{16}")
    hits = []
    for name in listed:
        path = project / name
        if path.is_file() and not name.startswith(("src/", "pipeline/", "conf/")):
            hits += [f"{name}: {match}" for match in pattern.findall(path.read_text(errors="replace"))]
    return hits


def assert_one_parent_run_with_nested_stages(tracking_uri: str, experiment_name: str, project: Path) -> None:
    """One pipeline execution is one parent run; each stage that ran is a run nested under it, spanning its
    work; training logs its datasets as inputs with their digests."""
    import mlflow

    from smearnet.tracking.runs import PARENT_TAG, PIPELINE_TAG

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(PARENT_TAG) == "true"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags.get("stage") for r in children} >= {"train", "benchmark", "evaluate", "aggregate", "smear",
                                                            "report", "register"}
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}

    def root(run_id: str) -> str:
        while parent_of.get(run_id):
            run_id = parent_of[run_id]
        return run_id

    assert {root(r.info.run_id) for r in runs} == {parent.info.run_id}, "every run nests under the execution"
    assert all(r.data.tags[PIPELINE_TAG] == parent.data.tags[PIPELINE_TAG] for r in runs)
    assert all(r.data.tags["git_dirty"] == "false" for r in runs), "stage outputs must not make the tree dirty"
    train = next(r for r in children if r.data.tags.get("stage") == "train")
    inputs = {d.dataset.name: d.dataset.digest for d in train.inputs.dataset_inputs}
    assert {"train", "val"} <= set(inputs) and all(inputs.values())
    evaluate = next(r for r in children if r.data.tags.get("stage") == "evaluate")
    # The run spans the work: the stage's metrics file (uncached, so DVC leaves it as written) was written while
    # the run was open. Not a duration: how long the tiny evaluation takes depends on the machine.
    written_ms = (project / "metrics/cell.json").stat().st_mtime_ns // 1_000_000
    assert evaluate.info.start_time <= written_ms <= evaluate.info.end_time, "the evaluate run spans its work"


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_noop(tmp_path, pipeline_env):
    import mlflow

    from smearnet.io import read_table
    from smearnet.models.engines import EngineSpec
    from smearnet.registry.store import local_model_dir
    from workspace import patient_ids, scan_mlflow_for

    experiment = f"e2e-{tmp_path.name}"
    project = make_project(tmp_path, [*TINY_AUTO, f"mlflow.experiment={experiment}"])
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], project, pipeline_env)
    run(["git", "add", "-A"], project, pipeline_env)
    run(["git", "commit", "-qm", "tiny"], project, pipeline_env)
    run([*dvc, "repro"], project, without_the_venv_on_path(pipeline_env))

    # What each stage must show.
    split = json.loads((project / "metrics/split.json").read_text())
    assert {"train", "val", "test", "assessment"} <= set(split)
    trained = json.loads((project / "metrics/train/resnet18.json").read_text())
    assert math.isfinite(trained["best_val_loss"]) and trained["global_steps"] > 0
    cell = json.loads((project / "metrics/cell.json").read_text())
    selection = json.loads((project / "reports/benchmark/selection.json").read_text())
    picked = EngineSpec(**selection["inference"])  # inference.engine: auto, resolved by the benchmark stage
    assert cell["n_cells"] > 0 and cell["engine"] == picked.label and "positive" in cell  # evaluated as picked
    assert selection["engine_reason"] and selection["timed_on"]
    aggregate = json.loads((project / "metrics/aggregate.json").read_text())
    assert aggregate["smears_from"] == "assessment cohort" and aggregate["development_splits"] == ["val", "test"]
    assert aggregate["chosen_score"] in aggregate["development_composed"]["auc"]
    smear = json.loads((project / "metrics/smear.json").read_text())
    assert smear["score"] == aggregate["chosen_score"] == smear["deployed_rule"]["score"]  # smear.score: auto
    assert smear["n_smears"] >= 6 and 0.0 <= smear["auc"]["value"] <= 1.0
    assert smear["n_blind_smears"] + smear["n_selection_smears"] == smear["n_smears"]
    assert "blind_smear_ids" not in smear  # pseudonyms stay out of git-tracked metrics
    for report in ("reports/benchmark/table1.md", "reports/evaluate/confusion.png", "reports/smear/roc.png",
                   "reports/aggregate/scores.md", "data/ingested/validation.md"):
        assert (project / report).stat().st_size > 0, report

    started = time.perf_counter()
    second = run([*dvc, "repro"], project, pipeline_env)
    assert time.perf_counter() - started < 30
    assert "up to date" in second.stdout.lower(), second.stdout

    shown = run([*dvc, "metrics", "show"], project, pipeline_env).stdout
    assert "metrics/cell.json" in shown and "metrics/smear.json" in shown

    # Privacy: no pseudonym in a file git tracks, no raw patient or smear id anywhere in MLflow.
    assert pseudonyms_in_files_git_would_track(project, pipeline_env) == []
    identifiers = patient_ids(read_table(project / "data/split/manifest.csv"))
    mlflow.set_tracking_uri(pipeline_env["MLFLOW_TRACKING_URI"])
    assert scan_mlflow_for(identifiers, tmp_path / "download") == []
    assert_one_parent_run_with_nested_stages(pipeline_env["MLFLOW_TRACKING_URI"], experiment, project)

    mlflow.set_tracking_uri(pipeline_env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'evaluate'")
    assert len(runs) >= 1
    assert [str(v.version) for v in mlflow.MlflowClient().search_model_versions("name='pipeline-test'")] == ["1"]
    version = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/pipeline-test/1",
                                                       dst_path=str(tmp_path / "version")))
    served = json.loads((local_model_dir(version) / "serving.json").read_text())["inference"]
    assert EngineSpec(**{k: served[k] for k in selection["inference"]}) == picked  # registered as evaluated

    # The rule that was measured is the rule that ships: the score auto picked, then the paper's share.
    scores = {assert_round_trip(project, pipeline_env, "pipeline-test")}
    from smearnet.cli import compose_params

    compose_params([*TINY_AUTO, f"mlflow.experiment={experiment}", "smear.score=share_predicted_positive"],
                   project / "params.yaml")
    rerun = run([*dvc, "repro"], project, pipeline_env).stdout
    assert "Stage 'train@resnet18' didn't change" in rerun and "Running stage 'aggregate'" in rerun
    scores.add(assert_round_trip(project, pipeline_env, "pipeline-test"))
    assert "share_predicted_positive" in scores


@pytest.mark.slow
def test_experiment_finetune_starts_from_pretrained_weights_that_dvc_keeps(tmp_path, pipeline_env):
    """experiment=finetune end to end on the synthetic cohort, pretraining on a tiny class-folder tree (the PBC
    layout); a changed fine-tuning recipe re-runs train but not the cached pretraining."""
    cells = class_folders(tmp_path / "cells", 8)
    overrides = ["experiment=finetune", *TINY, f"pretrain.root={cells}", "pretrain.train.cycles=1",
                 "pretrain.train.batch_size=8", "pretrain.val_fraction=0.25", "trainer.precision=32-true",
                 f"mlflow.experiment=finetune-{tmp_path.name}", "registry.model_name=finetune-test"]
    project = make_project(tmp_path, overrides)
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        run(cmd, project, pipeline_env)
    run([*dvc, "repro"], project, pipeline_env)
    card = json.loads((project / "models/pretrained/resnet18/card.json").read_text())
    assert card["enabled"] and card["data"]["classes"] == ["blue", "green", "red"] and card["data"]["val_cells"] == 6
    model = json.loads((project / "models/resnet18/model.json").read_text())
    assert model["model_cfg"]["cell_weights"] == "models/pretrained/resnet18/weights.safetensors"
    assert json.loads((project / "metrics/smear.json").read_text())["n_smears"] >= 6
    with open(project / "reports/benchmark/table1.csv", newline="") as table:  # the recipe's 8-view TTA ran
        assert {row["tta"] for row in csv.DictReader(table)} == {"True"}

    from smearnet.cli import compose_params

    compose_params([*overrides, "train.cycles=2"], project / "params.yaml")
    # Up to the train stage only: the stages after it have run above, and DVC checks every stage upstream of it.
    rerun = run([*dvc, "repro", "train@resnet18"], project, pipeline_env).stdout
    assert "Stage 'pretrain@resnet18' didn't change" in rerun and "Running stage 'train@resnet18'" in rerun
    assert json.loads((project / "metrics/train/resnet18.json").read_text())["epochs"] == 2
