"""CI retraining: a second hospital arrives, `smearnet retrain` reproduces downstream stages and gates the model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import REPO_ROOT, colour_cells
from smearnet import retrain as retraining
from smearnet.cli import compose_params
from smearnet.config import compose_config
from smearnet.data.sites import ingest_site
from smearnet.data.sources import load_dataset_manifest
from smearnet.data.synthetic import generate_cohort
from smearnet.errors import SmearnetError
from test_pipeline import TINY, make_project, pseudonyms_in_files_git_would_track, run
from workspace import scan_mlflow_for


def retrain(project: Path, env: dict, *args: str) -> str:
    result = run([sys.executable, "-m", "smearnet.cli", "retrain", "--base", "main", *args], project, env)
    return result.stdout + result.stderr


@pytest.mark.slow
def test_new_site_reruns_downstream_only_and_the_gate_decides(tmp_path, monkeypatch):
    import mlflow  # seconds to import: only the slow test needs it

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=store, GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env.pop("GITHUB_STEP_SUMMARY", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    project = make_project(tmp_path, [o for o in TINY if not o.startswith("registry.")]
                           + ["registry.model_name=retrain-test"])
    remote = tmp_path / "dvc-remote"
    run(["git", "init", "-q", "-b", "main"], project, env)
    run([sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", str(remote)], project, env)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "pipeline"], project, env)

    first = retrain(project, env, "--summary", str(tmp_path / "summary-1.md"))
    assert "Running stage 'generate'" in first and "Running stage 'register'" in first
    assert json.loads((project / "reports/register/decision.json").read_text())["promoted"]
    first_split = pd.read_csv(project / "data/split/manifest.csv", dtype=str, keep_default_na=False)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "first model"], project, env)

    incoming = tmp_path / "incoming" / "hospital_b"
    generate_cohort(incoming, scale=0.02, seed=7, site="hospital_b", id_prefix="B", stain_shift=(0.25, -0.15, 0.1),
                    progress=False)
    second = retrain(project, env, "--site-folder", str(incoming), "--site", "hospital_b",
                     "--summary", str(tmp_path / "summary-2.md"))

    # Only the stages downstream of the new data ran; generate (hospital A's cohort) did not.
    assert "Stage 'generate' didn't change, skipping" in second and "Running stage 'generate'" not in second
    for stage in ("ingest", "split", "upsample", "train@resnet18", "evaluate", "smear", "register"):
        assert f"Running stage '{stage}'" in second, stage

    split = pd.read_csv(project / "data/split/manifest.csv", dtype=str, keep_default_na=False)
    assert {"hospital_a", "hospital_b"} <= set(split.loc[split["split"] == "test", "site"])
    decision = json.loads((project / "reports/register/decision.json").read_text())
    assert decision["version"] == "2" and decision["champion_before"] == "1"
    # The frozen set is today's test split minus the patients the champion (version 1) trained on: adding a
    # site reshuffles the split, and those patients would favour the champion.
    test = split[split["split"] == "test"]
    champion_seen = set(first_split.loc[first_split["split"].isin(["train", "val"]), "patient_id"])
    excluded = int(test["patient_id"].isin(champion_seen).sum())
    assert decision["evaluation_set"]["champion_training_patients"] == "excluded"
    assert decision["evaluation_set"]["excluded_test_cells"] == excluded
    assert decision["evaluation_set"]["test_cells"] == len(test) - excluded
    # Challenger and champion were both measured on this same evaluation set.
    assert decision["challenger"]["n_test_cells"] == decision["champion"]["n_test_cells"] == len(test) - excluded
    assert decision["challenger"]["n_smears"] == decision["champion"]["n_smears"]
    assert len(decision["reasons"]) == 3 and all(r.endswith(("pass", "fail")) for r in decision["reasons"])

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient()
    champion = str(client.get_model_version_by_alias("retrain-test", "champion").version)
    assert champion == ("2" if decision["promoted"] else "1")
    assert str(client.get_model_version_by_alias("retrain-test", "challenger").version) == "2"
    assert client.get_model_version("retrain-test", "2").tags["gate.promoted"] == str(decision["promoted"]).lower()

    summary = (tmp_path / "summary-2.md").read_text()
    assert "## Metrics diff" in summary and "metrics/register.json" in summary
    assert "## Registry gate: retrain-test version 2" in summary and "## Plots diff" in summary
    assert (project / "data/sites/hospital_b.dvc").is_file() and any(remote.rglob("*"))
    cloud = run([sys.executable, "-m", "dvc", "status", "--cloud"], project, env).stdout
    assert "in sync" in cloud, cloud

    raw_ids = pd.concat([pd.read_csv(project / "data/synthetic/manifest.csv", dtype=str),
                         pd.read_csv(project / "data/sites/hospital_b/manifest.csv", dtype=str),
                         pd.read_csv(incoming / "manifest.csv", dtype=str)])
    identifiers = set(raw_ids["patient_id"]) | set(raw_ids["smear_id"])
    assert {"P0001", "BP0001", "hospital_b-BP0001"} <= identifiers
    assert scan_mlflow_for(identifiers, tmp_path / "scan") == []
    # What `make retrain` commits (metrics, dvc.lock, params, the site list) holds no pseudonym either.
    assert pseudonyms_in_files_git_would_track(project, env) == []


def test_retrain_without_remote_prints_a_note(tmp_path, monkeypatch, capsys):
    """No DVC remote configured: pull and push are skipped with a note, repro still runs."""
    calls: list[list[str]] = []

    def fake_dvc(args, project, *, check=True, capture=False):
        calls.append(args)
        stdout = "" if args[:2] == ["remote", "list"] else "| Path | Metric |"
        return subprocess.CompletedProcess(args, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(retraining, "dvc", fake_dvc)
    text = retraining.retrain(tmp_path, base="main", summary=tmp_path / "summary.md")
    assert "no DVC remote configured" in capsys.readouterr().out
    assert ["repro"] in calls and not any(c[0] in ("pull", "push") for c in calls)
    assert "(no decision: the register stage did not run)" in text
    assert (tmp_path / "summary.md").read_text() == text


def site_folder(folder: Path, patients: list[str], seed: int) -> Path:
    """A hospital delivery: images plus a manifest.csv with paths relative to the folder."""
    labels = ["normal", "classic_rl", "covid_rl"] * (len(patients) // 3)
    cells = colour_cells(folder / "images", labels, patients, size=64, seed=seed)
    cells["path"] = [os.path.relpath(p, folder) for p in cells["path"]]
    cells.to_csv(folder / "manifest.csv", index=False)
    return folder


@pytest.fixture
def small_project(tmp_path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(REPO_ROOT / "conf", project / "conf")
    compose_params(["train.cycles=1"], project / "params.yaml")
    return project


def test_ingest_site_copies_namespaces_and_lists_the_site(tmp_path, small_project):
    base = site_folder(tmp_path / "hospital_a", [f"P{1 + i // 3:04d}" for i in range(6)], seed=1)
    delivery = site_folder(tmp_path / "delivery", [f"P{1 + i // 3:04d}" for i in range(6)], seed=2)
    result = ingest_site(delivery, "hospital_b", project=small_project, dvc_add=False)
    site = pd.read_csv(result.manifest, dtype=str)
    assert result.images == 6 and result.patients == 2 and not result.dvc_tracked
    assert set(site["patient_id"]) == {"hospital_b-P0001", "hospital_b-P0002"} and set(site["site"]) == {"hospital_b"}
    assert all((result.manifest.parent / p).is_file() for p in site["path"])
    entry = {"manifest": "data/sites/hospital_b/manifest.csv", "sha256": result.sha256}
    params = OmegaConf.load(small_project / "params.yaml")
    assert OmegaConf.to_container(params.data.extra_manifests) == [entry] and params.train.cycles == 1
    composed = compose_config(["train.cycles=1"], conf_dir=small_project / "conf")
    assert OmegaConf.to_yaml(composed) == (small_project / "params.yaml").read_text()  # conf/ and params agree

    ingest_site(delivery, "hospital_b", project=small_project, dvc_add=False)  # re-delivery: replaced, not added
    assert len(OmegaConf.load(small_project / "params.yaml").data.extra_manifests) == 1

    data = {"source": "manifest", "manifest": str(base / "manifest.csv"),
            "extra_manifests": [{**entry, "manifest": str(small_project / entry["manifest"])}]}
    combined = load_dataset_manifest(data)
    assert len(combined) == 12 and list(combined["row"]) == list(range(2, 14))
    assert list(combined["site"]) == ["default"] * 6 + ["hospital_b"] * 6
    assert combined.attrs["manifest_path"].endswith("hospital_a/manifest.csv")

    first_image = result.manifest.parent / site["path"][0]
    first_image.write_bytes(first_image.read_bytes()[:-10])  # changed after ingest (or half pulled)
    with pytest.raises(SmearnetError, match="changed since it was ingested"):
        load_dataset_manifest(data)


def test_sites_sharing_patient_ids_are_refused(tmp_path, small_project):
    base = site_folder(tmp_path / "hospital_a", ["P0001"] * 3, seed=1)
    result = ingest_site(site_folder(tmp_path / "delivery", ["P0001"] * 3, seed=2), "hospital_b",
                         project=small_project, id_prefix="", dvc_add=False)
    data = {"source": "manifest", "manifest": str(base / "manifest.csv"), "extra_manifests": [str(result.manifest)]}
    with pytest.raises(SmearnetError, match="also appear in an earlier manifest"):
        load_dataset_manifest(data)


def test_bad_site_name_is_refused(tmp_path, small_project):
    with pytest.raises(SmearnetError, match="not allowed"):
        ingest_site(tmp_path, "../hospital", project=small_project, dvc_add=False)
