"""Helpers for the registry, predict and serving tests: tiny colour cohorts, models and pipeline workspaces."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from conftest import colour_cells

CLASSES = ["red", "green", "blue"]
POSITIVE = "blue"
OVERRIDES = ["model=resnet18", "model.resnet18.input_size=[32,32]", f"data.classes=[{','.join(CLASSES)}]",
             f"data.positive_class={POSITIVE}", "train.batch_size=8", "train.cycles=3",
             "train.stain_augment.enabled=false",  # colour is these cells' class: no colour jitter
             "smear.bootstrap_resamples=100", "evaluation.bootstrap_resamples=100",
             "inference.engine=auto", "benchmark.engines=[]"]  # the demo pins OpenVINO int8; these run as picked


def tiny_config(*extra: str):
    """The composed configuration for colour cells and a 32 px resnet18."""
    from smearnet.config import compose_config

    return compose_config([*OVERRIDES, *extra])


def random_model(model_dir: Path, seed: int, *, size: int = 32, name: str = "resnet18") -> Path:
    """A random-init resnet18 saved the way the train stage saves models (weights + model.json), as backbone `name`."""
    import torch

    from smearnet.config import model_config
    from smearnet.models.inference import save_trained
    from smearnet.models.factory import build_model, model_input_spec

    model_cfg = model_config(tiny_config(f"model.resnet18.input_size=[{size},{size}]"), "resnet18")
    torch.manual_seed(seed)
    net = build_model(model_cfg, num_classes=len(CLASSES))
    save_trained(net, model_dir, {"name": name, "model_cfg": dict(model_cfg), "classes": CLASSES,
                                  "input_spec": model_input_spec(model_cfg)})
    return model_dir


def colour_split(folder: Path) -> pd.DataFrame:
    """A split manifest: 24 test cells and 8 assessment smears (4 with blue cells) of 6 cells, ids P0001..."""
    test_labels = CLASSES * 8
    test = colour_cells(folder / "test", test_labels, [f"P{1 + i // 6:04d}" for i in range(24)], size=40, seed=3)
    test["split"] = "test"
    labels, patients = [], []
    for smear in range(8):
        mix = ["blue", "blue", "red", "green", "red", "green"] if smear < 4 else ["red", "green"] * 3
        labels += mix
        patients += [f"P{101 + smear:04d}"] * len(mix)
    smears = colour_cells(folder / "assessment", labels, patients, size=40, seed=4,
                          cohorts=["assessment"] * len(labels))
    smears["split"] = "assessment"
    return pd.concat([test, smears], ignore_index=True)


def patient_ids(manifest: pd.DataFrame) -> set[str]:
    """Every patient and smear id of a manifest (what must never reach MLflow)."""
    return set(manifest["patient_id"]) | set(manifest["smear_id"])


def make_register_workspace(root: Path, model_name: str, *, seed: int = 0, threshold: float = 0.25,
                            extra: tuple[str, ...] = ()) -> Path:
    """A folder holding exactly what the register stage reads: params, selection, smear metrics, model, split."""
    from smearnet.cli import compose_params
    from smearnet.io import write_json, write_manifest
    from smearnet.pseudonyms import pseudonym

    root.mkdir(parents=True, exist_ok=True)
    compose_params([*OVERRIDES, f"registry.model_name={model_name}", *extra], root / "params.yaml")
    split = colour_split(root / "cells")
    write_manifest(split, root / "data/split/manifest.csv")
    random_model(root / "models/resnet18", seed)
    write_json({"selected": "resnet18", "reason": "only model", "rule": "accuracy_then_time",  # as engine auto picks
                "inference": {"engine": "eager", "precision": "bf16", "channels_last": True}},
               root / "reports/benchmark/selection.json")
    blind = sorted({pseudonym(s) for s in split.loc[split["split"] == "assessment", "smear_id"]})[::2]
    write_rule(root / "reports/smear", threshold)
    write_json({"blind_smear_ids": blind, "threshold_on_blind": False,  # as the smear stage writes it (held_out)
                "threshold_on_evaluation": True}, root / "reports/smear/blind_smears.json")
    return root


def write_rule(folder: Path, threshold: float, score: str = "share_predicted_positive", temperature: float = 1.0) -> Path:
    """A measured smear rule as the smear stage writes it (reports/smear/smear_rule.json)."""
    from smearnet.smear import SmearRule, save_rule

    save_rule(SmearRule(score=score, positive_class=POSITIVE, threshold=threshold, threshold_from="test",
                        temperature=temperature), folder)
    return folder


def scan_mlflow_for(identifiers: set[str], download_dir: Path) -> list[str]:
    """Every place in the tracking store (params, tags, metric names, version tags, artifact text) where one
    of `identifiers` occurs as a whole token; the packaged smearnet source code is the project's, not data."""
    import mlflow

    client = mlflow.MlflowClient()
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(map(re.escape, sorted(identifiers))) + r")(?![A-Za-z0-9])")
    hits: list[str] = []

    def scan(where: str, text: str) -> None:
        hits.extend(f"{where}: {match.group(0)}" for match in pattern.finditer(text))

    experiments = client.search_experiments()
    for run in client.search_runs([e.experiment_id for e in experiments], max_results=5000):
        scan(f"run {run.info.run_id} params", json.dumps(run.data.params))
        scan(f"run {run.info.run_id} tags", json.dumps(run.data.tags))
        scan(f"run {run.info.run_id} metrics", json.dumps(sorted(run.data.metrics)))
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                    dst_path=str(download_dir / run.info.run_id))
        _scan_files(Path(local), f"run {run.info.run_id} artifact", scan)
    experiment_ids = [e.experiment_id for e in experiments]
    for model in mlflow.search_logged_models(experiment_ids=experiment_ids, output_format="list"):
        scan(f"logged model {model.model_id}", json.dumps({"params": model.params, "tags": model.tags}))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                         dst_path=str(download_dir / model.model_id)))
        _scan_files(local, f"logged model {model.model_id} artifact", scan)
    for registered in client.search_registered_models():
        scan(f"registered model {registered.name}", json.dumps(registered.tags))
        for version in client.search_model_versions(f"name = '{registered.name}'"):
            full = client.get_model_version(registered.name, version.version)
            scan(f"version {registered.name}/{version.version}", json.dumps(full.tags) + full.source)
    return hits


def _scan_files(folder: Path, where: str, scan) -> None:
    for path in folder.rglob("*"):
        if not path.is_file() or path.suffix == ".safetensors" or "code" in path.relative_to(folder).parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (PNG plots): no text to leak through
        scan(f"{where} {path.relative_to(folder)}", text)
