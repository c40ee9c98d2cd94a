"""A real MLflow tracking server, training and registering over HTTP, and `mlflow models serve` of the champion."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from conftest import colour_cells
from workspace import CLASSES, POSITIVE, colour_split, tiny_config, write_rule


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(cmd: list[str], url: str, log: Path, env: dict, timeout: float = 240) -> Iterator[subprocess.Popen]:
    """Start `cmd` in its own process group, wait until `url` answers 200, and always stop it (TERM, wait, KILL)."""
    with open(log, "w") as output:
        process = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"{cmd[:5]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and the workers it forked (its own process group, created above)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    try:  # workers outliving their parent
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def encode(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def test_pyfunc_reports_bad_rows_and_leaves_an_unreadable_smear_undetermined(tmp_path, mlflow_uri):
    """The logged pyfunc, loaded in-process: bad rows are reported, never fatal, and never call a smear."""
    import json as json_module

    import mlflow
    import pandas as pd

    from smearnet.registry.gate import log_model_version
    from workspace import random_model

    model_dir = random_model(tmp_path / "resnet18", seed=0)
    (model_dir / "serving.json").write_text(json_module.dumps({"positive_class": POSITIVE, "smear_threshold": 0.0}))
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("serving-test")
    with mlflow.start_run():
        version = log_model_version(model_dir, f"pyfunc-{uuid.uuid4().hex[:8]}")
    model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    cells = colour_cells(tmp_path / "cells", CLASSES, ["x"] * 3, size=40, seed=1)
    images = [encode(p) for p in cells["path"]] + ["@@not base64@@", base64.b64encode(b"GIF89a?").decode()]
    answer = model.predict(pd.DataFrame({"image": images, "smear_id": ["A"] * 4 + ["B"]}))
    assert list(answer["error"] == "") == [True, True, True, False, False]
    assert "base64" in answer["error"][3] and answer["predicted"][4] == ""
    assert list(answer["smear_call"]) == ["positive"] * 4 + ["undetermined"]
    without_ids = model.predict(pd.DataFrame({"image": images[:2]}))
    assert set(without_ids["smear_id"]) == {"smear"} and set(without_ids["smear_call"]) == {"positive"}


@pytest.mark.slow
def test_train_register_promote_and_serve_champion_over_http(tmp_path, monkeypatch):
    from smearnet.io import read_table, write_manifest
    from smearnet.registry.gate import CHAMPION, PromotionCriteria, RegisterInputs, register_and_gate
    from smearnet.models.training import train_backbone

    tracking_port, serving_port = free_port(), free_port()
    tracking = f"http://127.0.0.1:{tracking_port}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking, HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    store = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(tracking_port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'db.sqlite'}",
             "--artifacts-destination", str(tmp_path / "artifacts")]
    with server(store, f"{tracking}/health", tmp_path / "tracking.log", env):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
        name = f"serve-{uuid.uuid4().hex[:8]}"
        cfg = tiny_config(f"registry.model_name={name}", "mlflow.experiment=serving-test")
        labels = CLASSES * 16
        train = colour_cells(tmp_path / "train", labels, [f"t{i}" for i in range(48)], size=32, seed=1)
        val = colour_cells(tmp_path / "val", labels[:12], [f"v{i}" for i in range(12)], size=32, seed=2)
        metrics = train_backbone(cfg, "resnet18", train, val, tmp_path / "models/resnet18",
                                 tmp_path / "checkpoints/resnet18", progress=False)
        assert metrics["val_accuracy"] >= 0.9

        write_manifest(colour_split(tmp_path / "eval"), tmp_path / "split.csv")
        decision = register_and_gate(RegisterInputs(
            model_dir=tmp_path / "models/resnet18", backbone="resnet18", model_name=name, experiment="serving-test",
            rule_dir=write_rule(tmp_path / "rule", 0.3), criteria=PromotionCriteria(),
            split_manifest=read_table(tmp_path / "split.csv"), n_resamples=50))
        assert decision["promoted"] and decision["challenger"]["cell_accuracy"] >= 0.9
        import mlflow

        assert str(mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version) == decision["version"]
        artifact_files = [p for p in (tmp_path / "artifacts").rglob("weights.safetensors")]
        assert artifact_files, "artifacts went through the server to --artifacts-destination"

        serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@{CHAMPION}",
                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(serving_port), "--workers", "1"]
        with server(serve, f"http://127.0.0.1:{serving_port}/ping", tmp_path / "serving.log", env):
            cells = colour_cells(tmp_path / "request", ["blue"] * 6 + ["red"] * 2 + ["red", "green"] * 4,
                                 ["x"] * 16, size=48, seed=9)
            smears = ["smear-pos"] * 8 + ["smear-neg"] * 8
            rows = [[encode(p), s] for p, s in zip(cells["path"], smears, strict=True)]
            rows.append([base64.b64encode(b"definitely not an image").decode(), "smear-neg"])
            body = json.dumps({"dataframe_split": {"columns": ["image", "smear_id"], "data": rows}}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{serving_port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            answer = json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"]

    assert len(answer) == 17
    good, bad = answer[:16], answer[16]
    correct = sum(row["predicted"] == label for row, label in zip(good, cells["label"], strict=True))
    assert correct >= 14, [row["predicted"] for row in good]
    for row in good:
        assert row["error"] == "" and math.isclose(sum(row[f"prob_{c}"] for c in CLASSES), 1.0, abs_tol=1e-4)
        assert row[f"prob_{row['predicted']}"] == max(row[f"prob_{c}"] for c in CLASSES)
    assert bad["error"] and bad["predicted"] == "" and bad["smear_id"] == "smear-neg"
    calls = {row["smear_id"]: (row["smear_call"], row["smear_score"]) for row in good}
    assert {row["smear_threshold"] for row in good} == {0.3}
    for smear in ("smear-pos", "smear-neg"):  # a cell's weight is its share of its smear's positive evidence
        assert math.isclose(sum(row["cell_weight"] for row in good if row["smear_id"] == smear), 1.0, abs_tol=1e-4)
    assert calls["smear-pos"][0] == "positive" and calls["smear-pos"][1] >= 0.5
    assert calls["smear-neg"][0] == "negative" and calls["smear-neg"][1] < 0.3
    # The image bytes sent were decoded exactly as the pipeline decodes files.
    assert Image.open(io.BytesIO(base64.b64decode(rows[0][0]))).size == (48, 48)
