"""Bad inputs beyond ingest, through the real stage scripts and the `smearnet` command.

Each case runs the script as a subprocess in a temporary project (a composed params.yaml plus the
inputs the stage reads) and checks what the user sees: exit code 2 and one `smearnet: ...` paragraph
on stderr naming the cause (no traceback) when the run cannot continue, a printed warning when it
can, and input files unchanged either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from bad_inputs import snapshot
from conftest import REPO_ROOT, colour_cells
from smearnet.cli import compose_params
from smearnet.io import write_manifest

PIPELINE = REPO_ROOT / "pipeline"
CLASSES = ["normal", "classic_rl", "covid_rl"]


# --------------------------------------------------------------------------- helpers (also used by test_robustness)


def stage_env(mlflow_uri: str | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    if mlflow_uri is not None:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    return env


def run_stage(script: str, cwd: Path, *args: str, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run pipeline/<script> (or `smearnet` when script is "smearnet") with `cwd` as the project root."""
    command = ([sys.executable, "-m", "smearnet.cli"] if script == "smearnet"
               else [sys.executable, str(PIPELINE / script)])
    return subprocess.run([*command, *args], cwd=cwd, env=env or stage_env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one single-line `smearnet:` error naming every fragment; returns it."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("smearnet: ") and not line.startswith("smearnet: warning")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Fix:" in errors[0], errors[0]
    return errors[0]


def make_params(project: Path, overrides: list[str] = ()) -> Path:
    project.mkdir(parents=True, exist_ok=True)
    return compose_params(list(overrides), project / "params.yaml")


def write_split(project: Path, cells: list[tuple[str, str, str]], *, size: int = 72) -> pd.DataFrame:
    """data/split/manifest.csv for (label, patient, split) rows, with a coloured image each in data/images."""
    labels, patients, splits = (list(column) for column in zip(*cells))
    manifest = colour_cells(project / "data" / "images", labels, patients, size=size).assign(split=splits)
    write_manifest(manifest, project / "data" / "split" / "manifest.csv")
    return manifest


def small_split(train_counts: dict[str, int], held_out: tuple[str, ...] = tuple(CLASSES)) -> list[tuple[str, str, str]]:
    """Training cells per class (one patient each three cells) plus one val and one test cell per `held_out` class."""
    cells = [(label, f"P-{label}-{n // 3}", "train") for label, count in train_counts.items() for n in range(count)]
    for split in ("val", "test"):
        cells += [(label, f"P-{label}-{split}", split) for label in held_out]
    return cells


def hand_edit_params(params: Path, key: str, value) -> None:
    """What a hand edit of params.yaml does: set `key` without the checks `compose_params` runs."""
    cfg = OmegaConf.load(params)
    OmegaConf.update(cfg, key, value, force_add=True)
    params.write_text(OmegaConf.to_yaml(cfg))


# --------------------------------------------------------------------------- params.yaml itself


@pytest.mark.parametrize("script", ["generate.py", "split.py"])
def test_missing_params_yaml(tmp_path: Path, script: str) -> None:
    result = run_stage(script, tmp_path)
    assert_clean_failure(result, "params.yaml was not found")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("text, fragment", [("", "holds no parameters"),
                                            ("seed: [1, 2\nsplit: {", "is not a readable YAML file")])
def test_empty_or_unparsable_params_yaml(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    assert_clean_failure(run_stage("split.py", tmp_path), fragment)
    assert (tmp_path / "params.yaml").read_text() == text


@pytest.mark.parametrize("key, value", [("split.val", float("nan")), ("augment.per_class", -5),
                                        ("seed", -1), ("model.resnet18.drop_rate", float("inf")),
                                        ("registry.promote_if.min_smear_auc_gain", float("nan"))])
def test_nan_or_negative_param_stops_the_stage_naming_the_key(tmp_path: Path, key: str, value) -> None:
    params = make_params(tmp_path)
    hand_edit_params(params, key, value)
    before = snapshot(tmp_path)
    assert_clean_failure(run_stage("split.py", tmp_path), f"Parameter `{key}` is")
    assert snapshot(tmp_path) == before


def test_stale_params_yaml_missing_a_section_names_the_key(tmp_path: Path) -> None:
    params = make_params(tmp_path)
    cfg = OmegaConf.load(params)
    del cfg["split"]
    params.write_text(OmegaConf.to_yaml(cfg))
    (tmp_path / "data" / "ingested").mkdir(parents=True)
    (tmp_path / "data" / "ingested" / "manifest.csv").write_text("path,label,patient_id\n")
    before = snapshot(tmp_path)
    assert_clean_failure(run_stage("split.py", tmp_path), "has no value for `split`", "recompose params.yaml")
    assert snapshot(tmp_path) == before


def test_compose_params_refuses_nan_naming_the_key(tmp_path: Path) -> None:
    result = run_stage("smearnet", tmp_path, "compose-params", "train.lr_max=nan", "--output", "params.yaml")
    assert_clean_failure(result, "Parameter `train.lr_max` is nan")
    assert not (tmp_path / "params.yaml").exists()


def test_unknown_hydra_override_names_it_and_keeps_params_yaml(tmp_path: Path) -> None:
    params = make_params(tmp_path)
    before = params.read_bytes()
    result = run_stage("smearnet", tmp_path, "compose-params", "model=nope", "--output", "params.yaml")
    assert_clean_failure(result, "model=nope", "could not be composed")
    assert params.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]  # no temporary file left either


# --------------------------------------------------------------------------- stages run out of order


def test_missing_upstream_output_names_the_file(tmp_path: Path) -> None:
    make_params(tmp_path)
    result = run_stage("upsample.py", tmp_path)
    assert_clean_failure(result, "data/split/manifest.csv does not exist", "dvc repro")
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()


# --------------------------------------------------------------------------- ingest (the row-level corpus is in test_ingest)


def test_ingest_refuses_a_dataset_inside_its_own_output_folder(tmp_path: Path) -> None:
    """Re-ingesting data/ingested/manifest.csv would delete it: the stage replaces data/ingested whole."""
    make_params(tmp_path, ["data=manifest", "data.manifest=data/ingested/manifest.csv", "ingest.workers=1"])
    rows = colour_cells(tmp_path / "data" / "ingested" / "images", ["normal", "covid_rl"], ["P1", "P2"])
    rows["path"] = [os.path.relpath(path, tmp_path / "data" / "ingested") for path in rows["path"]]
    rows.to_csv(tmp_path / "data" / "ingested" / "manifest.csv", index=False)
    before = snapshot(tmp_path)
    assert_clean_failure(run_stage("ingest.py", tmp_path), "input file(s) lie inside the ingest output folder",
                         "data/ingested/manifest.csv")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- upsample


def test_class_without_training_images_stops_upsample_naming_the_class(tmp_path: Path) -> None:
    make_params(tmp_path, ["augment.per_class=8", "augment.workers=1"])
    # covid_rl cells exist, but only in val/test: the training split has none to augment.
    write_split(tmp_path, small_split({"normal": 6, "classic_rl": 3}))
    before = snapshot(tmp_path)
    assert_clean_failure(run_stage("upsample.py", tmp_path), "Class `covid_rl` has no training images",
                         "data.classes")
    assert snapshot(tmp_path) == before  # no data/upsampled, no metrics, no temporary folder


def test_per_class_below_the_largest_class_warns_and_keeps_every_original(tmp_path: Path) -> None:
    make_params(tmp_path, ["augment.per_class=4", "augment.workers=1"])
    write_split(tmp_path, small_split({"normal": 7, "classic_rl": 3, "covid_rl": 2}))
    inputs = {name: snapshot(tmp_path / "data" / name) for name in ("split", "images")}

    result = run_stage("upsample.py", tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("smearnet: warning")]
    assert "['normal']" in warning and "augment.per_class=4" in warning and "normal: 7" in warning
    summary = json.loads((tmp_path / "metrics" / "upsample.json").read_text())
    assert summary["above_target"] == ["normal"]
    assert summary["classes"]["normal"] == {"originals": 7, "created": 0, "total": 7}
    assert summary["classes"]["covid_rl"] == {"originals": 2, "created": 2, "total": 4}
    upsampled = pd.read_csv(tmp_path / "data" / "upsampled" / "manifest.csv", keep_default_na=False)
    assert upsampled["label"].value_counts().to_dict() == {"normal": 7, "classic_rl": 4, "covid_rl": 4}
    assert not (tmp_path / "data" / "upsampled" / "images" / "normal").exists()
    assert {name: snapshot(tmp_path / "data" / name) for name in inputs} == inputs


# --------------------------------------------------------------------------- train


def test_unknown_backbone_names_the_configured_ones(tmp_path: Path) -> None:
    make_params(tmp_path)
    split = write_split(tmp_path, small_split({"normal": 3, "classic_rl": 3, "covid_rl": 3}))
    write_manifest(split[split["split"] == "train"].assign(augmented_from="").drop(columns="split"),
                   tmp_path / "data" / "upsampled" / "manifest.csv")
    before = snapshot(tmp_path)
    assert_clean_failure(run_stage("train.py", tmp_path, "vit_huge"), "Backbone `vit_huge` is not configured",
                         "['resnet18']")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- smear


SMEAR_OVERRIDES = ["smear.bootstrap_resamples=50"]


def write_smear_cells(project: Path, rows: list[tuple[str, str, str, float]]) -> Path:
    """What the aggregate stage hands the smear stage: the proposed rule (the paper's share), the classes and
    reports/aggregate/evaluation_cells.csv, (smear_id, label, predicted, p_covid) per cell."""
    from smearnet.io import write_json
    from smearnet.smear import SmearRule, save_rule

    table = pd.DataFrame([{"smear_id": smear, "label": label, "predicted": predicted,
                           "prob_normal": round(1 - p, 6), "prob_classic_rl": 0.0, "prob_covid_rl": p}
                          for smear, label, predicted, p in rows],
                         columns=["smear_id", "label", "predicted", "prob_normal", "prob_classic_rl",
                                  "prob_covid_rl"])
    folder = project / "reports" / "aggregate"
    save_rule(SmearRule(score="share_predicted_positive", positive_class="covid_rl", threshold=0.5), folder)
    write_json({"classes": ["normal", "classic_rl", "covid_rl"], "smears_from": "assessment cohort"},
               folder / "selection.json")
    table.to_csv(folder / "evaluation_cells.csv", index=False)
    return folder / "evaluation_cells.csv"


def test_smears_of_one_cell_are_scored_explicitly(tmp_path: Path, mlflow_uri: str) -> None:
    make_params(tmp_path, SMEAR_OVERRIDES)
    rows = ([(f"pt-pos{i}", "covid_rl", "covid_rl", 0.9) for i in range(3)] + [("pt-pos3", "covid_rl", "normal", 0.2)]
            + [(f"pt-neg{i}", "normal", "normal", 0.1) for i in range(4)] + [("pt-neg4", "normal", "covid_rl", 0.7)])
    cells = write_smear_cells(tmp_path, rows)
    before = cells.read_bytes()

    result = run_stage("smear.py", tmp_path, env=stage_env(mlflow_uri))

    assert result.returncode == 0, result.stderr[-3000:]
    smears = pd.read_csv(tmp_path / "reports" / "smear" / "smears.csv")
    assert len(smears) == 9 and (smears["n_cells"] == 1).all()
    assert set(smears["share_predicted_positive"]) == {0.0, 1.0}  # one cell: the share is all or nothing
    metrics = json.loads((tmp_path / "metrics" / "smear.json").read_text())
    assert metrics["n_smears"] == 9 and metrics["n_empty_smears_excluded"] == 0
    assert metrics["n_positive_smears"] == 4 and metrics["n_negative_smears"] == 5
    assert cells.read_bytes() == before


def test_no_cells_at_all_stops_the_smear_stage(tmp_path: Path) -> None:
    make_params(tmp_path, SMEAR_OVERRIDES)
    cells = write_smear_cells(tmp_path, [])
    before = snapshot(tmp_path)
    assert_clean_failure(run_stage("smear.py", tmp_path), "got 0 positive and 0 negative")
    after = snapshot(tmp_path)
    after.pop("mlflow.db", None)  # the tracking store is opened first, so an unreachable one fails fast
    assert after == before  # nothing else written: no reports/smear, no metrics
