"""Same seed, same data, deterministic CPU training: two fresh projects give identical results.

The slow tests run the tiny pipeline (`dvc repro`) in two fresh git projects at different paths, each
with its own MLflow store, and compare what a reviewer would compare: the manifests byte for byte, the
augmented images by hash, the trained weights, and every metrics file except wall-clock and registry
bookkeeping keys (and the ingest report). The same runs are scanned for patient and smear ids in the reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from test_cli_errors import make_params, run_stage, small_split, write_split
from test_pipeline import TINY, make_project, run

OVERRIDES = [*TINY, "trainer.deterministic=true"]
IDENTICAL_FILES = ("data/ingested/manifest.csv", "data/split/manifest.csv", "data/upsampled/manifest.csv",
             "data/ingested/validation.json", "data/ingested/validation.md")
# Wall-clock measurements, and registry bookkeeping that counts earlier registrations: not results.
VOLATILE_KEYS = {"train_seconds", "train_images_per_second", "registered_version", "total_seconds", "ms_per_image",
                 "images_per_second", "peak_memory_mb", "version", "run_id", "model_uri", "registered_at"}
# Everything under these is written for people (or MLflow) to read, so it must not hold patient ids.
REPORT_SUFFIXES = {".csv", ".md", ".json", ".txt", ".yaml", ".html"}


# --------------------------------------------------------------------------- helpers


def file_hashes(folder: Path, pattern: str = "*") -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob(pattern)) if path.is_file()}


def without_volatile(value):
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def metrics_of(project: Path) -> dict[str, object]:
    return {str(path.relative_to(project)): without_volatile(json.loads(path.read_text()))
            for path in sorted((project / "metrics").rglob("*.json"))}


def first_difference(a: Path, b: Path) -> str:
    for number, (line_a, line_b) in enumerate(zip(a.read_text().splitlines(), b.read_text().splitlines()), 1):
        if line_a != line_b:
            return f"line {number}:\n  {line_a}\n  {line_b}"
    return "one file is a prefix of the other"


@pytest.fixture(scope="module")
def two_runs(module_folder) -> tuple[Path, Path]:
    """The tiny pipeline run from scratch in two fresh projects (different paths, separate MLflow stores)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    env.pop("MLFLOW_TRACKING_URI", None)  # each project logs to its own ./mlflow.db (the configured default)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    projects = []
    for name in ("first", "second-at-another-path"):
        project = make_project(module_folder(name), OVERRIDES)
        run(["git", "init", "-q"], project, env)
        run(["git", "add", "-A"], project, env)
        run(["git", "commit", "-qm", "tiny"], project, env)
        run([sys.executable, "-m", "dvc", "repro"], project, env)
        projects.append(project)
    return projects[0], projects[1]


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.slow
def test_two_fresh_projects_give_identical_data_images_weights_and_metrics(two_runs) -> None:
    first, second = two_runs
    for name in IDENTICAL_FILES:
        a, b = first / name, second / name
        assert a.read_bytes() == b.read_bytes(), f"{name} differs at {first_difference(a, b)}"

    images = file_hashes(first / "data/upsampled/images")
    assert len(images) > 10 and images == file_hashes(second / "data/upsampled/images")
    weights = file_hashes(first / "models", "*.safetensors")
    assert weights and weights == file_hashes(second / "models", "*.safetensors")

    metrics = metrics_of(first)
    assert {"metrics/split.json", "metrics/upsample.json", "metrics/train/resnet18.json", "metrics/cell.json",
            "metrics/smear.json"} <= set(metrics)
    for name, value in metrics_of(second).items():
        assert value == metrics[name], name
    assert set(metrics_of(second)) == set(metrics)


def test_upsample_output_does_not_depend_on_where_the_project_lives(tmp_path: Path) -> None:
    """Paths in data/upsampled/manifest.csv (including `augmented_from`) are relative, so checkouts agree."""
    outputs = []
    for project in (tmp_path / "a", tmp_path / "elsewhere" / "b"):
        make_params(project, ["augment.per_class=5", "augment.workers=1"])
        write_split(project, small_split({"normal": 4, "classic_rl": 2, "covid_rl": 1}))
        result = run_stage("upsample.py", project)
        assert result.returncode == 0, result.stderr[-3000:]
        upsampled = project / "data" / "upsampled"
        outputs.append(((upsampled / "manifest.csv").read_bytes(), file_hashes(upsampled),
                        (project / "metrics" / "upsample.json").read_bytes()))
    assert outputs[0] == outputs[1]
    manifest = pd.read_csv(tmp_path / "a" / "data" / "upsampled" / "manifest.csv", keep_default_na=False)
    created = manifest[manifest["augmented_from"] != ""]
    assert len(created) == 1 + 3 + 4 and created["augmented_from"].str.startswith("../images/").all()


# --------------------------------------------------------------------------- privacy


def _id_pattern(project: Path) -> tuple[re.Pattern, set[str]]:
    manifest = pd.read_csv(project / "data/ingested/manifest.csv", dtype=str, keep_default_na=False)
    ids = set(manifest["patient_id"]) | set(manifest["smear_id"])
    return re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(ids, key=len, reverse=True))) + r")\b"), ids


@pytest.mark.slow
def test_reports_and_mlflow_runs_hold_no_patient_or_smear_ids(two_runs) -> None:
    import mlflow

    project = two_runs[0]
    pattern, ids = _id_pattern(project)
    assert len(ids) > 20 and pattern.search((project / "data/ingested/manifest.csv").read_text()), \
        "the scan must find the ids where they legitimately are (the manifest is data, not a report)"

    reports = [project / "data/ingested/validation.md", project / "data/ingested/validation.json"]
    reports += [p for folder in ("reports", "metrics") for p in sorted((project / folder).rglob("*"))
                if p.is_file() and p.suffix in REPORT_SUFFIXES]
    scanned = {str(p.relative_to(project)) for p in reports}
    assert {"reports/evaluate/predictions.csv", "reports/smear/smears.csv", "metrics/cell.json",
            "metrics/smear.json", "metrics/split.json"} <= scanned
    leaks = {str(p.relative_to(project)): sorted(set(pattern.findall(p.read_text(errors="replace"))))[:5]
             for p in reports}
    assert {name: found for name, found in leaks.items() if found} == {}

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    logged = [json.dumps([run.info.run_name, run.data.params, run.data.tags, sorted(run.data.metrics)])
              for run in runs]
    assert [text for text in logged if pattern.search(text)] == []
