"""`smearnet predict`: folders and manifests, bad images, JSON + Markdown outputs, registry URIs, speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import colour_cells
from smearnet.cli import main as smearnet
from smearnet.errors import SmearnetError
from smearnet.models.engines import EngineSpec
from smearnet.serving.predict import collect_cells, load_model, predict_cells
from workspace import CLASSES, POSITIVE, random_model, write_rule


def serving_model(folder: Path, threshold: float = 0.25, size: int = 32, temperature: float = 1.0) -> Path:
    """A random resnet18 with a serving.json and its smear rule, as the register stage packages it."""
    model_dir = random_model(folder, seed=0, size=size)
    (model_dir / "serving.json").write_text(json.dumps({"positive_class": POSITIVE, "smear_threshold": threshold}))
    write_rule(model_dir, threshold, temperature=temperature)
    return model_dir


@pytest.fixture
def smear_folder(tmp_path) -> Path:
    """One smear: 12 cells, a corrupt JPEG and a text file."""
    folder = tmp_path / "S-17"
    colour_cells(folder, (CLASSES * 4), ["p"] * 12, size=40, seed=5)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("slide scanned twice")
    return folder


def test_folder_is_one_smear_with_bad_image_reported(tmp_path, smear_folder, capsys):
    model = serving_model(tmp_path / "model", temperature=2.0)  # calibrated: prob_* and max_probability alike
    out_json, out_md = tmp_path / "out.json", tmp_path / "out.md"
    smearnet(["predict", str(smear_folder), "--model", str(model), "--json", str(out_json), "--report", str(out_md)])
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert len(result["cells"]) == 13 and result["errors"] == 1 and result["skipped_files"][0].endswith("notes.txt")
    assert sum(result["cells_per_class"].values()) == 12 and set(result["cells_per_class"]) == set(CLASSES)
    broken = [c for c in result["cells"] if c["error"]]
    assert broken[0]["path"].endswith("broken.jpg") and broken[0]["predicted"] == ""
    assert broken[0]["prob_blue"] is None and "corrupt" in broken[0]["error"]
    [smear] = result["smears"]
    share = result["cells_per_class"][POSITIVE] / 12
    assert smear["smear_id"] == "S-17" and smear["cells"] == 12 and smear["errors"] == 1
    assert smear["score"] == pytest.approx(share) and smear["threshold"] == 0.25  # the rule: share of arg-max calls
    assert smear["call"] == ("positive" if share >= 0.25 else "negative")
    for cell in result["cells"]:
        if not cell["error"]:
            assert sum(cell[f"prob_{c}"] for c in CLASSES) == pytest.approx(1.0, abs=1e-5)
            assert cell["max_probability"] == pytest.approx(max(cell[f"prob_{c}"] for c in CLASSES))
    report = out_md.read_text()
    for needle in ("## Smears", "## Cells per class", "## Least certain images", "broken.jpg", ">= 0.25"):
        assert needle in report
    assert f"smear S-17: {smear['call'].upper()}" in printed


def test_least_certain_images_are_the_lowest_max_probability(tmp_path, smear_folder):
    from smearnet.serving.predict import least_sure

    loaded = load_model(str(serving_model(tmp_path / "model")))
    cells, skipped = collect_cells(smear_folder)
    prediction = predict_cells(loaded, cells, progress=False, skipped_files=skipped)
    listed = least_sure(prediction, 3)["max_probability"].tolist()
    others = prediction.cells.loc[prediction.cells["error"] == "", "max_probability"]
    assert listed == sorted(listed) and listed[-1] <= others.nsmallest(4).iloc[-1]


def test_manifest_is_many_smears_and_threshold_decides(tmp_path):
    cells = colour_cells(tmp_path / "cells", CLASSES * 4, ["x"] * 12, size=40, seed=6)
    manifest = pd.DataFrame({"path": [os.path.relpath(p, tmp_path) for p in cells["path"]],
                             "smear_id": ["A"] * 6 + ["B"] * 6})
    manifest.to_csv(tmp_path / "batch.csv", index=False)
    model = str(serving_model(tmp_path / "model"))
    for threshold, call in ((0.0, "positive"), (1.01, "negative")):
        loaded = load_model(model, threshold=threshold)
        frame, _ = collect_cells(tmp_path / "batch.csv")
        result = predict_cells(loaded, frame, progress=False)
        assert list(result.smears["smear_id"]) == ["A", "B"] and set(result.smears["call"]) == {call}
        assert loaded.rule.threshold_from == "--threshold" and loaded.rule.threshold == threshold


def test_a_csv_is_read_as_the_pipeline_reads_a_manifest(tmp_path):
    (tmp_path / "batch.csv").write_text("Path,Patient ID,Smear ID\na.jpg,p1,s1\nb.jpg,p1 ,s1 \nc.jpg,p2,s2\n")
    frame, _ = collect_cells(tmp_path / "batch.csv")
    assert frame["smear_id"].tolist() == ["s1", "s1", "s2"]  # loose column names, stripped ids
    assert frame["path"].tolist() == [str(tmp_path.resolve() / name) for name in ("a.jpg", "b.jpg", "c.jpg")]
    # Smear "1" of p1 and of p2 are two smears: predict prints smear ids, so it refuses rather than merging them
    # or naming them after the patient; two spellings of one column are refused as ingest refuses them.
    (tmp_path / "shared.csv").write_text("path,patient_id,smear_id\na.jpg,MRN123,1\nb.jpg,MRN456,1\n")
    with pytest.raises(SmearnetError, match="1 smear_id") as refused:
        collect_cells(tmp_path / "shared.csv")
    assert "MRN" not in str(refused.value)
    (tmp_path / "twice.csv").write_text("path,smear_id,Smear ID\na.jpg,1,2\n")
    with pytest.raises(SmearnetError, match="more than once"):
        collect_cells(tmp_path / "twice.csv")


def test_train_stage_folder_takes_the_workspace_measured_rule(tmp_path, monkeypatch):
    model = random_model(tmp_path / "models" / "resnet18", seed=0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SmearnetError, match="smear_rule.json"):
        load_model(str(model))
    write_rule(tmp_path / "reports" / "smear", 0.125, score="score_top3_mean")
    loaded = load_model(str(model))
    assert loaded.rule.threshold == 0.125 and loaded.rule.score == "score_top3_mean"
    assert loaded.rule_source == "reports/smear/smear_rule.json"


def test_registry_uri_gives_the_same_calls_as_the_local_folder(tmp_path, smear_folder, mlflow_uri):
    import mlflow

    from smearnet.registry.store import log_model_version

    name = f"predict-{uuid.uuid4().hex[:8]}"
    model = serving_model(tmp_path / "model", threshold=0.3)
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("predict-test")
    with mlflow.start_run():
        version = log_model_version(model, name)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", str(version.version))

    cells, _ = collect_cells(smear_folder)
    remote = predict_cells(load_model(f"models:/{name}@champion"), cells, progress=False)
    local = predict_cells(load_model(str(model)), cells, progress=False)
    assert remote.loaded.rule.threshold == 0.3 and remote.loaded.rule_source == "registered with the model"
    pd.testing.assert_frame_equal(remote.cells, local.cells)
    with pytest.raises(SmearnetError, match="Could not fetch"):
        load_model(f"models:/{name}@no_such_alias")


def test_cli_prints_the_call_within_30_seconds_for_30_cells(tmp_path):
    """The demo model's architecture and size (resnet18 @ 64 px) on a folder of 30 cells, as a user runs it."""
    folder = tmp_path / "smear"
    colour_cells(folder, CLASSES * 10, ["p"] * 30, size=363, seed=7)
    model = serving_model(tmp_path / "model", size=64)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "smearnet.cli", "predict", str(folder), "--model", str(model)],
                            capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert "smear smear: " in result.stdout and "classify cells" in result.stderr  # the call, a progress bar
    assert elapsed < 30, f"predict took {elapsed:.1f} s"


def test_predict_runs_the_engine_serving_json_names_and_agrees_with_eager(tmp_path, smear_folder):
    """bf16 from serving.json; an int8 ONNX export packaged with the version is used without recalibrating."""
    from smearnet.models.engines import EngineSpec, engine_artifact
    from smearnet.models.inference import load_trained
    from smearnet.registry.package import package_model

    model_dir = serving_model(tmp_path / "model")
    cells, _ = collect_cells(smear_folder)
    eager = predict_cells(load_model(str(model_dir)), cells, progress=False).cells
    assert load_model(str(model_dir)).model.engine.spec == EngineSpec()  # no inference section: eager fp32

    serving = {"positive_class": POSITIVE, "smear_threshold": 0.25,
               "inference": {"engine": "eager", "precision": "bf16", "channels_last": True, "batch_size": 4}}
    (model_dir / "serving.json").write_text(json.dumps(serving))
    loaded = load_model(str(model_dir))
    assert loaded.model.engine.spec.label == "eager-bf16-cl"
    bf16 = predict_cells(loaded, cells, progress=False).cells
    probability = [f"prob_{c}" for c in CLASSES]
    valid = bf16["error"] == ""
    assert (bf16.loc[valid, probability] - eager.loc[valid, probability]).abs().max().max() < 0.05

    model = load_trained(model_dir)
    calibration = [torch.stack([model.net.conv1.weight.new_zeros(3, 32, 32).normal_() for _ in range(8)])]
    int8_spec = EngineSpec(engine="onnxruntime", precision="int8")
    export = engine_artifact(model.net, model.input_spec, int8_spec, cache_dir=tmp_path / "cache",
                             calibration=lambda: calibration)
    serving["inference"] = {"engine": "onnxruntime", "precision": "int8"}
    packaged = package_model(model_dir, serving, tmp_path / "package", engine_files=[export])
    loaded = load_model(str(packaged))  # would need calibration cells, and fail, without the packaged export
    assert loaded.model.engine.spec.label == "onnxruntime-int8"
    int8 = predict_cells(loaded, cells, progress=False).cells
    assert (int8.loc[valid, probability] - eager.loc[valid, probability]).abs().max().max() < 0.1
    assert (int8.loc[valid, "predicted"] == eager.loc[valid, "predicted"]).mean() >= 0.75


@pytest.mark.slow
def test_packaged_int8_program_is_served_in_a_fresh_process_without_calibration(tmp_path, smear_folder):
    """compile int8 (PT2E): the quantised program made at registration is what `smearnet predict` runs."""
    from smearnet.models.engines import EngineSpec, engine_artifact
    from smearnet.models.inference import load_trained
    from smearnet.registry.package import package_model

    model_dir = serving_model(tmp_path / "model")
    model = load_trained(model_dir)
    torch.manual_seed(0)
    calibration = [torch.randn(8, 3, 32, 32)]
    spec = EngineSpec(engine="compile", precision="int8", channels_last=True, batch_size=4)
    program = engine_artifact(model.net, model.input_spec, spec, cache_dir=tmp_path / "cache",
                              calibration=lambda: calibration)
    serving = {"positive_class": POSITIVE, "smear_threshold": 0.25,
               "inference": {"engine": "compile", "precision": "int8", "channels_last": True, "batch_size": 4}}
    packaged = package_model(model_dir, serving, tmp_path / "package", engine_files=[program])
    assert (packaged / "engines" / program.name).is_file()
    out = tmp_path / "int8.json"
    result = subprocess.run([sys.executable, "-m", "smearnet.cli", "predict", str(smear_folder), "--model",
                             str(packaged), "--json", str(out)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    eager = predict_cells(load_model(str(model_dir)), collect_cells(smear_folder)[0], progress=False).cells
    int8 = pd.DataFrame(json.loads(out.read_text())["cells"]).set_index("path").loc[eager["path"]]
    valid = (eager["error"] == "").to_numpy()
    assert (int8["predicted"].to_numpy()[valid] == eager["predicted"].to_numpy()[valid]).mean() >= 0.75
    assert not any(p.suffix == ".partial" for p in (packaged / "engines").iterdir())


def test_html_report_explains_each_smear_with_its_heaviest_cells(tmp_path):
    """`--report x.html`: per smear one gallery of the cells that weighed most, images inline, score and call."""
    from html.parser import HTMLParser

    cells = colour_cells(tmp_path / "cells", CLASSES * 4, ["x"] * 12, size=40, seed=6)
    manifest = pd.DataFrame({"path": cells["path"], "smear_id": ["A"] * 7 + ["B"] * 5})
    manifest.to_csv(tmp_path / "batch.csv", index=False)
    out = tmp_path / "why.html"
    smearnet(["predict", str(tmp_path / "batch.csv"), "--model", str(serving_model(tmp_path / "model")),
              "--report", str(out), "--report-cells", "4"])

    class Galleries(HTMLParser):
        def __init__(self):
            super().__init__()
            self.smears, self.figures, self.images = [], {}, []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "section" and "smear" in (attrs.get("class") or "").split():
                self.smears.append(attrs["data-smear-id"])
                self.figures[self.smears[-1]] = 0
            elif tag == "figure" and self.smears:
                self.figures[self.smears[-1]] += 1
            elif tag == "img":
                self.images.append(attrs["src"])

    page = Galleries()
    page.feed(out.read_text())
    assert page.smears == ["A", "B"] and page.figures == {"A": 4, "B": 4}
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)


def test_predict_refuses_a_packaged_engine_file_that_was_altered(tmp_path, smear_folder, capsys):
    """`smearnet predict` on a version whose ONNX file no longer matches serving.json: one clear error, exit 2."""
    from smearnet.models.engines import EngineSpec, engine_artifact
    from smearnet.models.inference import load_trained
    from smearnet.registry.package import package_model

    model_dir = serving_model(tmp_path / "model")
    model = load_trained(model_dir)
    export = engine_artifact(model.net, model.input_spec, EngineSpec(engine="onnxruntime"),
                             cache_dir=tmp_path / "cache", calibration=None)
    serving = {"positive_class": POSITIVE, "smear_threshold": 0.25, "inference": {"engine": "onnxruntime"}}
    packaged = package_model(model_dir, serving, tmp_path / "package", engine_files=[export])
    assert load_model(str(packaged)).model.engine.spec.label == "onnxruntime-fp32"
    (packaged / "engines" / export.name).write_bytes(b"an ONNX file someone replaced")
    with pytest.raises(SystemExit) as exit_code:
        smearnet(["predict", str(smear_folder), "--model", str(packaged)])
    assert exit_code.value.code == 2
    assert "Refusing to load engine file" in capsys.readouterr().err


def _workspace(root: Path, params_yaml: str, monkeypatch) -> Path:
    """A pipeline workspace with a train-stage model, its measured rule and `params_yaml`; the working directory."""
    model = random_model(root / "models" / "resnet18", seed=0)
    write_rule(root / "reports" / "smear", 0.125)
    (root / "params.yaml").write_text(params_yaml)
    monkeypatch.chdir(root)
    return model


def test_a_workspace_params_yaml_is_read_once_and_names_the_engine(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from smearnet.serving import predict

    model = _workspace(tmp_path, "mlflow: {tracking_uri: 'sqlite:///elsewhere.db'}\n"
                                 "inference: {engine: eager, precision: bf16, batch_size: 4}\n", monkeypatch)
    loads = []
    monkeypatch.setattr(predict.OmegaConf, "load", lambda *a, **k: loads.append(a) or OmegaConf.create(
        (tmp_path / "params.yaml").read_text()))
    loaded = load_model(str(model))
    assert loaded.model.engine.spec.label == "eager-bf16" and loaded.rule.threshold == 0.125
    assert len(loads) == 1
    assert predict.read_workspace().tracking_uri == "sqlite:///elsewhere.db"


def test_a_workspace_with_engine_auto_runs_its_models_by_the_engine_the_benchmark_picked(tmp_path, monkeypatch):
    model = _workspace(tmp_path, "inference: {engine: auto, precision: fp32, batch_size: 4, "
                                 "auto: {candidates: [eager-bf16], time_tolerance: 0.1}}\n", monkeypatch)
    with pytest.raises(SmearnetError, match="names no engine"):  # no benchmark stage has run: nothing to guess
        load_model(str(model))
    (tmp_path / "reports" / "benchmark").mkdir(parents=True)
    (tmp_path / "reports" / "benchmark" / "selection.json").write_text(json.dumps(
        {"selected": "resnet18", "inference": {"engine": "eager", "precision": "bf16", "channels_last": True,
                                               "batch_size": 16, "tta": False}}))
    assert load_model(str(model)).model.engine.spec == EngineSpec(precision="bf16", channels_last=True, batch_size=16)
    # Another backbone's folder does not borrow the selected one's rule and engine.
    other = random_model(tmp_path / "models" / "resnet18_wide", seed=1, name="resnet18_wide")
    with pytest.raises(SmearnetError, match="measured on 'resnet18'.*not on 'resnet18_wide'"):
        load_model(str(other))
