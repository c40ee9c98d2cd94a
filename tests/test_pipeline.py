"""The whole DVC pipeline on a tiny configuration, in a temporary git repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

TINY = ["data.synthetic.scale=0.02", "augment.per_class=24", "model.resnet18.input_size=[32,32]",
        "train.cycles=1", "train.batch_size=16", "benchmark.repeats=1", "benchmark.warmup=0",
        "smear.bootstrap_resamples=200", "evaluation.bootstrap_resamples=200", "registry.model_name=pipeline-test"]


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def make_project(root: Path, overrides: list[str]) -> Path:
    """A git repo holding this project's pipeline definition, with params composed from `overrides`."""
    project = root / "project"
    project.mkdir()
    for item in ("dvc.yaml", "conf", "pipeline", "src", ".dvc"):
        source = REPO_ROOT / item
        if source.is_dir():
            shutil.copytree(source, project / item, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__",
                                                                                 "config.local"))
        else:
            shutil.copy2(source, project / item)
    (project / "data").mkdir()
    from smearnet.cli import compose_params

    compose_params(overrides, project / "params.yaml")
    return project


@pytest.fixture
def pipeline_env(mlflow_uri):
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=mlflow_uri, GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def test_dvc_repro_end_to_end_then_noop(tmp_path, pipeline_env):
    import mlflow

    project = make_project(tmp_path, TINY)
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], project, pipeline_env)
    run(["git", "add", "-A"], project, pipeline_env)
    run(["git", "commit", "-qm", "tiny"], project, pipeline_env)
    run([*dvc, "repro"], project, pipeline_env)

    cell = json.loads((project / "metrics/cell.json").read_text())
    smear = json.loads((project / "metrics/smear.json").read_text())
    assert 0.0 <= cell["accuracy"]["value"] <= 1.0 and "positive" in cell
    assert smear["n_smears"] >= 6 and "auc" in smear and "threshold" in smear
    split = json.loads((project / "metrics/split.json").read_text())
    assert {"train", "val", "test", "assessment"} <= set(split)
    for report in ("reports/benchmark/table1.md", "reports/evaluate/confusion.png", "reports/smear/roc.png",
                   "data/ingested/validation.md"):
        assert (project / report).stat().st_size > 0, report

    started = time.perf_counter()
    second = run([*dvc, "repro"], project, pipeline_env)
    assert time.perf_counter() - started < 30
    assert "up to date" in second.stdout.lower(), second.stdout

    shown = run([*dvc, "metrics", "show"], project, pipeline_env).stdout
    assert "metrics/cell.json" in shown and "metrics/smear.json" in shown

    mlflow.set_tracking_uri(pipeline_env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'evaluate'")
    assert len(runs) >= 1
    assert mlflow.MlflowClient().search_model_versions("name='pipeline-test-resnet18'")
