"""The registry: pure promotion gate, register + gate against a real sqlite store, crash safety, privacy."""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import uuid
from pathlib import Path

import pytest
import torch

from smearnet.errors import SmearnetError
from smearnet.registry.frozen import frozen_set, training_patients
from smearnet.registry.gate import PromotionCriteria, promotion_decision
from smearnet.registry.package import model_fingerprint, version_serving
from smearnet.registry.register import RegisterInputs, register_and_gate
from smearnet.registry.store import CHALLENGER, CHAMPION, FINGERPRINT_TAG, MODEL_NAME_TAG
from workspace import (POSITIVE, colour_split, make_register_workspace, patient_ids, random_model, scan_mlflow_for,
                       write_rule)

PSEUDONYM = re.compile(rb"pt-[0-9a-f]{16}")  # smearnet.pseudonyms: "pt-" + 16 hex digits

REPO_PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"


def metrics(accuracy: float, auc: float, sensitivity: float) -> dict[str, float]:
    return {"cell_accuracy": accuracy, "smear_auc": auc, "sensitivity": sensitivity}


# ------------------------------------------------------------------------------------------- pure gate


def test_first_model_becomes_champion():
    promoted, reasons = promotion_decision(metrics(0.1, 0.2, 0.0), None, PromotionCriteria())
    assert promoted and "first" in reasons[0]


def test_better_on_every_criterion_is_promoted():
    promoted, reasons = promotion_decision(metrics(0.92, 0.95, 1.0), metrics(0.90, 0.90, 1.0),
                                           {"min_cell_accuracy_gain": 0.01, "min_smear_auc_gain": 0.0,
                                            "max_sensitivity_drop": 0.0})
    assert promoted and len(reasons) == 3 and all(r.endswith("pass") for r in reasons)


def test_identical_models_pass_zero_gain_criteria():
    same = metrics(0.9, 0.8, 0.75)
    assert promotion_decision(same, dict(same), PromotionCriteria())[0]


@pytest.mark.parametrize("challenger, failing", [
    (metrics(0.905, 0.95, 1.0), "cell accuracy"),      # gain 0.005 < required 0.01
    (metrics(0.95, 0.89, 1.0), "smear AUC"),           # AUC dropped
    (metrics(0.95, 0.95, 0.80), "sensitivity"),        # drop 0.2 > allowed 0.1
    (metrics(0.95, float("nan"), 1.0), "smear AUC"),   # undefined: cannot be shown to hold
])
def test_each_failed_criterion_blocks_promotion(challenger, failing):
    criteria = PromotionCriteria(min_cell_accuracy_gain=0.01, min_smear_auc_gain=0.0, max_sensitivity_drop=0.1)
    promoted, reasons = promotion_decision(challenger, metrics(0.90, 0.90, 1.0), criteria)
    failed = [r for r in reasons if r.endswith("fail")]
    assert not promoted and len(failed) == 1 and failing in failed[0]


def test_sensitivity_drop_within_allowance_passes():
    criteria = PromotionCriteria(max_sensitivity_drop=0.25)
    assert promotion_decision(metrics(0.9, 0.9, 0.8), metrics(0.9, 0.9, 1.0), criteria)[0]


def test_unknown_criterion_is_an_error():
    with pytest.raises(SmearnetError, match="min_recall"):
        PromotionCriteria.from_config({"min_recall": 0.1})


def test_fingerprint_follows_content_and_serving(tmp_path):
    model = random_model(tmp_path / "a", seed=0)
    first = model_fingerprint(model, {"smear_threshold": 0.1})
    assert first == model_fingerprint(model, {"smear_threshold": 0.1})
    assert first != model_fingerprint(model, {"smear_threshold": 0.2})
    assert first != model_fingerprint(random_model(tmp_path / "b", seed=1), {"smear_threshold": 0.1})


def test_frozen_set_leaves_out_patients_a_model_was_trained_on(tmp_path):
    from smearnet.pseudonyms import pseudonym

    split = colour_split(tmp_path)
    trained_on = split.assign(split=split["split"].where(split["patient_id"] != "P0001", "train"))
    seen = training_patients(trained_on)
    assert seen == [pseudonym("P0001")]
    frozen = frozen_set(split, None, positive_class=POSITIVE, seed=0, exclude_patients=seen)
    assert frozen.excluded_test_cells == 6 and len(frozen.test) == 18 and "P0001" not in set(frozen.test["patient_id"])
    assert frozen.fingerprint != frozen_set(split, None, positive_class=POSITIVE, seed=0).fingerprint
    with pytest.raises(SmearnetError, match="No test cells"):
        frozen_set(split, None, positive_class=POSITIVE, seed=0, exclude_patients=[pseudonym(p) for p in split["patient_id"]])


def test_frozen_set_fingerprint_ignores_paths_but_not_cells(tmp_path):
    split = colour_split(tmp_path / "one")
    moved = split.assign(path=[p.replace("one", "two") for p in split["path"]])
    assert frozen_set(split, None, positive_class=POSITIVE, seed=0).fingerprint == frozen_set(moved, None, positive_class=POSITIVE, seed=0).fingerprint
    fewer = split.drop(index=split.index[split["split"] == "test"][0])
    assert frozen_set(fewer, None, positive_class=POSITIVE, seed=0).fingerprint != frozen_set(split, None, positive_class=POSITIVE, seed=0).fingerprint


# ------------------------------------------------------------------------------- register + gate in MLflow


def _inputs(root: Path, name: str, model_dir: Path, *, criteria: PromotionCriteria | None = None,
            threshold: float = 0.25) -> RegisterInputs:
    from smearnet.io import read_table

    rule_dir = write_rule(root / f"rules/{threshold}", threshold)
    return RegisterInputs(model_dir=model_dir, backbone="resnet18", model_name=name, experiment="registry-test",
                          rule_dir=rule_dir, criteria=criteria or PromotionCriteria(),
                          split_manifest=read_table(root / "data/split/manifest.csv"), n_resamples=50)


@pytest.fixture
def store(mlflow_uri):
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("registry-test")
    return mlflow.MlflowClient()


def _alias(client, name: str, alias: str) -> str:
    return str(client.get_model_version_by_alias(name, alias).version)


def test_register_gate_aliases_and_idempotent_rerun(tmp_path, store):
    name = f"reg-{uuid.uuid4().hex[:8]}"
    root = make_register_workspace(tmp_path / "ws", name)
    # The first model was trained on a split that had patient P0001 in train.
    inputs = _inputs(root, name, root / "models/resnet18")
    inputs.split_manifest = inputs.split_manifest.assign(
        split=inputs.split_manifest["split"].where(inputs.split_manifest["patient_id"] != "P0001", "train"))
    first = register_and_gate(inputs)
    assert first["promoted"] and first["version"] == "1" and first["champion"] is None
    assert _alias(store, name, CHAMPION) == "1"
    assert _alias(store, name, CHALLENGER) == "1"
    version = store.get_model_version(name, "1")
    assert version.tags["gate.promoted"] == "true" and version.tags["smear_threshold"] == "0.25"
    assert version.tags["classes"] == "red,green,blue" and version.tags["input_size"] == "32x32"

    again = register_and_gate(inputs)
    assert again["reused_version"] and again["reused_decision"] and again["version"] == "1"
    assert len(store.search_model_versions(f"name = '{name}'")) == 1

    # A second model that must gain 100 points of accuracy: evaluated against the champion, not promoted.
    other = random_model(tmp_path / "other" / "resnet18", seed=1)
    strict = PromotionCriteria(min_cell_accuracy_gain=1.0)
    second = register_and_gate(_inputs(root, name, other, criteria=strict))
    assert not second["promoted"] and second["version"] == "2" and second["champion_before"] == "1"
    assert second["champion"] is not None and second["champion"]["threshold"] == 0.25
    # Today's split has P0001 in test: its 6 cells are left out for both models (the champion trained on them).
    assert second["challenger"]["n_test_cells"] == second["champion"]["n_test_cells"] == 18
    assert second["evaluation_set"]["excluded_test_cells"] == 6
    assert second["evaluation_set"]["champion_training_patients"] == "excluded"
    assert any("cell accuracy" in r and r.endswith("fail") for r in second["reasons"])
    assert _alias(store, name, CHAMPION) == "1"
    assert _alias(store, name, CHALLENGER) == "2"
    assert store.get_model_version(name, "2").tags["gate.promoted"] == "false"

    # Same model, relaxed criteria: the version is reused, the decision re-made, champion moves.
    relaxed = PromotionCriteria(min_cell_accuracy_gain=-1.0, min_smear_auc_gain=-1.0, max_sensitivity_drop=1.0)
    third = register_and_gate(_inputs(root, name, other, criteria=relaxed))
    assert third["promoted"] and third["version"] == "2" and not third["reused_decision"]
    assert _alias(store, name, CHAMPION) == "2"
    assert len(store.search_model_versions(f"name = '{name}'")) == 2
    statuses = {r.info.status for r in store.search_runs(
        [store.get_experiment_by_name("registry-test").experiment_id], f"params.model_name = '{name}'")}
    assert statuses == {"FINISHED"}


def test_crash_after_registration_leaves_no_duplicate_and_no_running_run(tmp_path, store, monkeypatch):
    import mlflow

    name = f"crash-{uuid.uuid4().hex[:8]}"
    root = make_register_workspace(tmp_path / "ws", name)
    inputs = _inputs(root, name, root / "models/resnet18")
    experiment_id = store.get_experiment_by_name("registry-test").experiment_id

    # A run abandoned by a SIGKILLed attempt (still RUNNING, same model fingerprint).
    from smearnet.models.inference import load_trained
    from smearnet.smear import load_rule

    serving = version_serving(load_trained(inputs.model_dir).meta, load_rule(inputs.rule_dir)[0], inputs.rule_dir)
    fingerprint = model_fingerprint(inputs.model_dir, serving)
    tags = {"stage": "register", MODEL_NAME_TAG: name, FINGERPRINT_TAG: fingerprint}
    abandoned = store.create_run(experiment_id, tags=tags).info.run_id
    runs_of_this_model = f"tags.`{MODEL_NAME_TAG}` = '{name}'"

    # This attempt dies right after the version was created (before any alias is set).
    original = mlflow.MlflowClient.set_registered_model_alias

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", crash)
    with pytest.raises(KeyboardInterrupt):
        register_and_gate(inputs)
    assert store.get_run(abandoned).info.status == "KILLED"
    assert len(store.search_model_versions(f"name = '{name}'")) == 1
    assert "RUNNING" not in {r.info.status for r in store.search_runs([experiment_id], runs_of_this_model)}

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", original)
    decision = register_and_gate(inputs)
    assert decision["reused_version"] and decision["promoted"] and decision["version"] == "1"
    assert len(store.search_model_versions(f"name = '{name}'")) == 1
    runs = store.search_runs([experiment_id], runs_of_this_model)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "KILLED"]


def test_champion_with_other_classes_is_not_replaced_automatically(tmp_path, store):
    name = f"classes-{uuid.uuid4().hex[:8]}"
    root = make_register_workspace(tmp_path / "ws", name)
    assert register_and_gate(_inputs(root, name, root / "models/resnet18"))["promoted"]
    other = random_model(tmp_path / "other" / "resnet18", seed=2)
    meta = json.loads((other / "model.json").read_text())
    split = _inputs(root, name, other).split_manifest
    relabelled = split.assign(label=split["label"].replace({"red": "purple"}))
    meta["classes"] = ["purple", "green", "blue"]
    (other / "model.json").write_text(json.dumps(meta))
    inputs = _inputs(root, name, other)
    inputs.split_manifest = relabelled
    decision = register_and_gate(inputs)
    assert not decision["promoted"] and "cannot be compared" in decision["reasons"][0]
    assert _alias(store, name, CHAMPION) == "1"


@pytest.mark.parametrize("blind_ids, on_blind, on_evaluation, in_sample, words", [
    (["s1"], False, True, False, "blind smears of the smear stage (not used"),       # held_out
    (["s1"], True, True, True, "on which the shipped threshold was chosen"),        # same, cross_validated
    (None, False, True, True, "all smears (registry.sensitivity_smears: all; the shipped threshold was chosen on"),
    (None, False, False, False, "all smears (registry.sensitivity_smears: all; the shipped threshold was chosen on "
                                "other smears"),                                    # development
    (["gone"], False, True, True, "none of the smear stage's blind smears is in today's set"),
])
def test_gate_says_when_its_sensitivity_is_measured_on_the_smears_the_threshold_was_chosen_on(
        blind_ids, on_blind, on_evaluation, in_sample, words):
    import pandas as pd

    from smearnet.registry.frozen import FrozenSet
    from smearnet.registry.register import sensitivity_in_sample, sensitivity_on

    matched = [s for s in (blind_ids or ()) if s == "s1"] or None  # as frozen_set matches them to today's smears
    frozen = FrozenSet(test=pd.DataFrame(), smears=pd.DataFrame(), smears_from="", sensitivity_smears=matched,
                       fingerprint="")
    inputs = RegisterInputs(model_dir=Path("."), backbone="resnet18", model_name="m", experiment="e",
                            rule_dir=Path("."), criteria=PromotionCriteria(), split_manifest=pd.DataFrame(),
                            blind_smear_ids=blind_ids,
                            threshold_on_blind=on_blind, threshold_on_evaluation=on_evaluation)
    assert sensitivity_in_sample(frozen, inputs) is in_sample
    assert words in sensitivity_on(frozen, inputs)


def test_register_stage_writes_reports_and_leaks_no_patient_ids(tmp_path, store, monkeypatch):
    from smearnet.io import read_table

    name = f"stage-{uuid.uuid4().hex[:8]}"
    root = make_register_workspace(tmp_path / "ws", name, extra=("mlflow.experiment=registry-test",))
    monkeypatch.chdir(root)
    runpy.run_path(str(REPO_PIPELINE / "register.py"), run_name="__main__")

    decision = json.loads((root / "reports/register/decision.json").read_text())
    assert decision["promoted"] and decision["model_name"] == name
    assert "PROMOTED" in (root / "reports/register/decision.md").read_text()
    register_metrics = json.loads((root / "metrics/register.json").read_text())
    assert register_metrics["version"] == 1 and math.isfinite(register_metrics["challenger"]["cell_accuracy"])
    # Sensitivity was measured on the smear stage's blind smears only (4 of the 8), which no threshold was chosen on.
    assert decision["challenger"]["n_sensitivity_smears"] == 4 and decision["challenger"]["n_smears"] == 8
    assert not decision["evaluation_set"]["sensitivity_in_sample"]
    assert decision["evaluation_set"]["sensitivity_on"].startswith("blind smears of the smear stage")

    # The packaged serving.json carries the `serving` limits of params.yaml and the (here: no) engine files' sha256.
    import mlflow

    from smearnet.models.inference import read_serving
    from smearnet.registry.store import local_model_dir

    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/1", dst_path=str(tmp_path / "v1"))
    serving = read_serving(local_model_dir(Path(local)))
    assert serving["limits"] == {"max_rows": 512, "max_image_bytes": 8388608, "max_request_bytes": 67108864,
                                 "max_pixels": 4000000, "batch_size": 16}
    assert serving["engine_files"] == {}

    identifiers = patient_ids(read_table(root / "data/split/manifest.csv"))
    assert "P0001" in identifiers and len(identifiers) > 10
    assert scan_mlflow_for(identifiers, tmp_path / "download") == []
    # Nor by pseudonym in the run's files (README: an MLflow run keeps files naming smears by pseudonym out), the
    # page of explained blind smears included; only the version's training_patients.json carries pseudonyms.
    run = mlflow.search_runs(experiment_names=["registry-test"], filter_string=f"params.model_name = '{name}'",
                             output_format="list")[0]
    files = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "run")))
    assert [path.name for path in files.rglob("*") if path.is_file() and PSEUDONYM.search(path.read_bytes())] == []
    assert "blind smear 1" in (files / "register/explained_blind_smears.html").read_text()


def test_privacy_scan_finds_a_planted_patient_id(tmp_path, store):
    """The scan itself can fail: an id logged as a tag and in an artifact is found in both places."""
    import mlflow

    with mlflow.start_run(tags={"leak": "cells of P0777"}) as run:
        mlflow.log_text("smear S0777 of patient P0777", "leak.txt")
    try:
        hits = scan_mlflow_for({"P0777", "S0777"}, tmp_path / "download")
    finally:  # the store is shared by the session: leave no leak for other scans
        store.delete_run(run.info.run_id)
    assert any("tags" in h and "P0777" in h for h in hits) and any("leak.txt" in h for h in hits)


COMPOSE = {"enabled": True, "smears_per_class": 6, "cells_per_smear": [4, 6], "target_cells": [1, 2],
           "lookalike_smears": 0.3, "lookalike_cells": [1, 2], "lookalike_classes": ["green"]}


def test_gate_judges_both_models_on_the_composed_smears_each_with_its_own_rule(tmp_path, store):
    """Under smear.compose.enabled, challenger and champion are judged on the smears the smear stage composes
    from test cells (not on the test split's own smears), each with the rule packaged with it."""
    from smearnet.smear import evaluation_smears

    name = f"composed-{uuid.uuid4().hex[:8]}"
    root = make_register_workspace(tmp_path / "ws", name)
    first = _inputs(root, name, root / "models/resnet18", threshold=0.2)
    first.split_manifest = first.split_manifest[first.split_manifest["split"] == "test"]  # data without smears
    first.compose, first.blind_smear_ids = COMPOSE, None
    assert register_and_gate(first)["promoted"]

    relaxed = PromotionCriteria(min_cell_accuracy_gain=-1.0, min_smear_auc_gain=-1.0, max_sensitivity_drop=1.0)
    second = _inputs(root, name, random_model(tmp_path / "other" / "resnet18", seed=1), threshold=0.6,
                     criteria=relaxed)
    second.split_manifest, second.compose = first.split_manifest, COMPOSE
    decision = register_and_gate(second)

    composed, _ = evaluation_smears(first.split_manifest, COMPOSE, positive_class=POSITIVE, seed=0)
    assert decision["evaluation_set"]["smear_cells_from"].startswith("composed from test cells")
    assert decision["evaluation_set"]["smear_cells"] == len(composed)
    for role, threshold in (("challenger", 0.6), ("champion", 0.2)):  # each judged with its own packaged rule
        assert decision[role]["n_smears"] == composed["smear_id"].nunique() == 2 * 2 * 6
        assert decision[role]["threshold"] == threshold and decision[role]["smear_score"] == "share_predicted_positive"


# ------------------------------------------------------------------------------- what a version installs


def test_pip_requirements_are_pyprojects_dependencies_less_the_pipeline_only_ones():
    """A served version installs exactly what pyproject.toml pins (as installed), minus dvc and captum, which no
    serving module imports: the pins are written once."""
    import subprocess
    import sys
    import tomllib

    from packaging.requirements import Requirement

    from conftest import REPO_ROOT
    from smearnet.registry.package import NOT_SERVED, pip_requirements

    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {Requirement(r).name for r in declared}
    assert set(NOT_SERVED) <= names  # every exclusion is still a dependency
    assert pip_requirements() == [str(Requirement(r)) for r in declared if Requirement(r).name not in NOT_SERVED]
    assert "torch==2.14.1" in pip_requirements() and not any("pytest" in r for r in pip_requirements())
    imported = subprocess.run([sys.executable, "-c", "import sys, smearnet.serving.pyfunc; "
                               "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dvc', 'captum')))"],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stderr[-2000:]


def test_gate_refuses_a_champion_made_under_another_pseudonym_key():
    """Its training-patient pseudonyms could not match today's: refused loudly instead of matching nothing."""
    from smearnet.pseudonyms import key_fingerprint
    from smearnet.registry.package import ID_KEY_FIELD
    from smearnet.registry.register import check_same_pseudonym_key

    check_same_pseudonym_key({ID_KEY_FIELD: key_fingerprint()}, "m", "3")  # same key: fine
    check_same_pseudonym_key({}, "m", "3")  # registered before keys were recorded: the gate notes it elsewhere
    with pytest.raises(SmearnetError, match=r"version 3 of m\) was made under pseudonym key key-") as error:
        check_same_pseudonym_key({ID_KEY_FIELD: key_fingerprint(b"another key")}, "m", "3")
    assert "SMEARNET_ID_SALT" in str(error.value)


def test_a_quantised_engine_that_changes_the_calls_is_refused_at_registration(tmp_path):
    """inference.fidelity on the validation cells: an int8 engine whose calls stray from eager fp32 is refused with
    the measured figures; one that keeps them passes, also with test-time augmentation (judged against eager fp32
    with the same augmentation, not against single views); fp32 and bf16 engines are not checked."""
    from dataclasses import replace

    from conftest import colour_cells
    from smearnet.models.engines import Engine, EngineSpec, build_engine
    from smearnet.models.inference import load_trained, predict_probabilities
    from smearnet.registry.register import refuse_unfaithful_engine
    from workspace import CLASSES

    reference = load_trained(random_model(tmp_path / "model", seed=0))
    val = colour_cells(tmp_path / "val", CLASSES * 4, [f"p{i}" for i in range(12)], size=40)
    val["split"] = "val"
    inference = {"engine": "compile", "precision": "int8", "fidelity": {"min_agreement": 0.995,
                                                                        "max_accuracy_drop": 0.003}}
    int8 = EngineSpec(engine="compile", precision="int8", batch_size=8)
    faithful = replace(reference, engine=Engine(int8, lambda images: reference.net(images)))
    measured = refuse_unfaithful_engine(faithful, val, inference, batch_size=8)
    assert measured["agreement"] == 1.0 and measured["accuracy"] == measured["reference_accuracy"]
    # A network whose calls depend on the cell's orientation, so averaging the 8 views changes them: an int8
    # engine that computes exactly eager fp32's 8-view mean is faithful, though it disagrees with single views.
    oriented = replace(reference, net=_OrientedNet().eval())
    tta = build_engine(oriented.net, oriented.input_spec, EngineSpec(batch_size=8, tta=True))
    augmented = replace(oriented, engine=Engine(replace(int8, tta=True), tta))
    single = predict_probabilities(oriented, val, batch_size=8, progress=False).argmax(1)
    assert (predict_probabilities(augmented, val, batch_size=8, progress=False).argmax(1) != single).any()
    assert refuse_unfaithful_engine(augmented, val, inference, batch_size=8)["agreement"] == 1.0
    # An engine whose calls differ from eager fp32's on every cell (the largest logit becomes the smallest).
    broken = replace(reference, engine=Engine(int8, lambda images: -reference.net(images)))
    with pytest.raises(SmearnetError, match=r"Refusing to register with the compile-int8 engine: on the 12 "
                                            r"validation cells it agrees with eager fp32 on 0\.00%"):
        refuse_unfaithful_engine(broken, val, inference, batch_size=8)
    assert refuse_unfaithful_engine(reference, val, inference, batch_size=8) is None  # eager fp32
    bf16 = replace(reference, engine=Engine(EngineSpec(precision="bf16"), lambda images: -reference.net(images)))
    assert refuse_unfaithful_engine(bf16, val, inference, batch_size=8) is None  # only int8 is checked
    with pytest.raises(SmearnetError, match="No validation cells"):
        refuse_unfaithful_engine(broken, val.assign(split="test"), inference, batch_size=8)


class _OrientedNet(torch.nn.Module):
    """Three logits from where the cell is brighter: left vs right, top vs bottom, and a constant between them."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        half = images.shape[-1] // 2
        left_right = images[..., :half].mean((1, 2, 3)) - images[..., half:].mean((1, 2, 3))
        top_bottom = images[..., :half, :].mean((1, 2, 3)) - images[..., half:, :].mean((1, 2, 3))
        return torch.stack([100 * left_right, 100 * top_bottom, torch.full_like(left_right, 1e-3)], dim=1)
