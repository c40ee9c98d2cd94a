"""MLflow tracking server and `mlflow models serve`; request limits (HTTP 400), batched decoding, engine hashes."""

from __future__ import annotations

import base64
import hashlib
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

    from smearnet.registry.store import log_model_version
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
    from smearnet.registry.gate import PromotionCriteria
    from smearnet.registry.register import RegisterInputs, register_and_gate
    from smearnet.registry.store import CHAMPION
    from smearnet.models.settings import TrainSettings
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
        metrics = train_backbone(TrainSettings.from_params(cfg, "resnet18"), train, val,
                                 tmp_path / "models/resnet18", tmp_path / "checkpoints/resnet18", progress=False)
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


# ------------------------------------------------------------------------------------- request limits (issue 16)


def noise_png(size: int, seed: int = 0) -> str:
    """A base64 PNG of random pixels (PNG cannot compress them: about 3 bytes a pixel)."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# 40 px noise is ~4.9 kB and 80 px ~19 kB: two small images fit, three break the request limit, one large breaks
# the image limit, five rows break the row limit.
SMALL_LIMITS = {"max_rows": 4, "max_image_bytes": 8_000, "max_request_bytes": 12_000, "batch_size": 2}
VIOLATIONS = [
    ([noise_png(40, seed) for seed in range(5)], "5 rows", "serving.max_rows"),
    ([noise_png(40), noise_png(80)], "Row 1's image is 19,", "serving.max_image_bytes"),
    ([noise_png(40, seed) for seed in range(3)], "bytes of images", "serving.max_request_bytes"),
]


def test_request_over_a_limit_is_refused_before_decoding_with_the_limit_named(monkeypatch):
    import pandas as pd

    from smearnet.errors import SmearnetError
    from smearnet.serving.requests import ServingLimits
    from smearnet.serving import requests

    limits = ServingLimits.from_config(SMALL_LIMITS)
    monkeypatch.setattr(requests, "decode_image_bytes", lambda *a, **k: pytest.fail("decoded a refused request"))
    for images, what, key in VIOLATIONS:
        with pytest.raises(SmearnetError, match=key) as refused:
            requests.check_request(pd.DataFrame({"image": images}), limits)
        assert what in refused.value.what and refused.value.fix
    with pytest.raises(SmearnetError, match="no `image` column"):
        requests.check_request(pd.DataFrame({"picture": ["x"]}), limits)
    requests.check_request(pd.DataFrame({"image": [noise_png(40), noise_png(40, 1)]}), limits)  # within limits
    assert requests.decoded_size(noise_png(40)) == len(base64.b64decode(noise_png(40)))


def test_serving_limits_are_checked_and_default():
    from dataclasses import asdict

    from smearnet.errors import SmearnetError
    from smearnet.serving.requests import ServingLimits

    assert asdict(ServingLimits.from_config(None)) == {"max_rows": 512, "max_image_bytes": 8 * 2**20,
                                                       "max_request_bytes": 64 * 2**20, "max_pixels": 4_000_000,
                                                       "batch_size": 16}
    from smearnet.config import compose_config

    assert ServingLimits.from_config(compose_config().serving) == ServingLimits()  # conf/ states the defaults
    with pytest.raises(SmearnetError, match="max_cells"):
        ServingLimits.from_config({"max_cells": 3})
    with pytest.raises(SmearnetError, match="at least 1"):
        ServingLimits.from_config({"max_rows": 0})


def test_rows_are_decoded_and_classified_a_batch_at_a_time(tmp_path, monkeypatch):
    """Never every row decoded before any is classified: with batch_size 2 decoding and classifying alternate,
    and the cells, errors and calls are those of one big batch."""
    import pandas as pd

    from smearnet.models.inference import load_trained
    from smearnet.serving.requests import ServingLimits
    from smearnet.serving import batches, requests
    from smearnet.smear import load_rule
    from workspace import random_model

    model = load_trained(random_model(tmp_path / "resnet18", seed=0))
    rule, aggregator = load_rule(write_rule(tmp_path / "rule", 0.25))
    request = pd.DataFrame({"image": [noise_png(40, s) for s in range(3)] + ["@@not base64@@", noise_png(40, 4)],
                            "smear_id": ["A", "A", "B", "B", "B"]})
    whole = requests.classify_request(model, rule, aggregator, request, ServingLimits(batch_size=100))

    events = []
    decode, classify = requests.decode_image_bytes, batches.cell_outputs_for_images
    monkeypatch.setattr(requests, "decode_image_bytes", lambda *a, **k: events.append("decode") or decode(*a, **k))
    monkeypatch.setattr(batches, "cell_outputs_for_images", lambda model, images, **k:
                        events.append(f"classify {len(images)}") or classify(model, images, **k))
    batched = requests.classify_request(model, rule, aggregator, request, ServingLimits(batch_size=2))
    assert events == ["decode", "decode", "classify 2", "decode", "classify 2", "decode", "classify 1"]
    pd.testing.assert_frame_equal(batched, whole, atol=1e-5)
    assert list(batched["error"] != "") == [False, False, False, True, False]


def test_embeddings_stay_in_order_when_a_batch_has_no_decodable_cell(tmp_path):
    import numpy as np

    from smearnet.data.decode import decode_image_bytes
    from smearnet.models.inference import load_trained
    from smearnet.serving.batches import classify_in_batches
    from workspace import random_model

    model = load_trained(random_model(tmp_path / "resnet18", seed=0))
    image = decode_image_bytes(base64.b64decode(noise_png(40)))
    probabilities, embeddings = classify_in_batches(model, [[image, None], [None, None], [image]], embeddings=True)
    assert probabilities.shape == (5, len(CLASSES)) and embeddings.shape[0] == 5
    assert list(np.isnan(embeddings).all(axis=1)) == [False, True, True, True, False]
    assert np.allclose(embeddings[0], embeddings[4], atol=1e-5)
    # No cell decoded at all: one zero-width row per cell (every bag empty), not None, so the MIL rule can say
    # `undetermined`; not asked: no embeddings.
    probabilities, embeddings = classify_in_batches(model, [[None, None], [None]], embeddings=True)
    assert probabilities.shape == (3, len(CLASSES)) and np.isnan(probabilities).all() and embeddings.shape == (3, 0)
    assert classify_in_batches(model, [[image]], embeddings=False)[1] is None


def small_limits_version(tmp_path: Path, name: str) -> str:
    """A random model packaged as the register stage packages it, with SMALL_LIMITS, logged and registered."""
    import mlflow

    from smearnet.models.inference import load_trained
    from smearnet.registry.package import package_model, serving_config
    from smearnet.serving.requests import ServingLimits
    from smearnet.registry.store import log_model_version
    from smearnet.smear import load_rule
    from workspace import random_model

    model_dir = random_model(tmp_path / "resnet18", seed=0)
    rule_dir = write_rule(tmp_path / "rule", 0.25)
    serving = serving_config(load_trained(model_dir).meta, load_rule(rule_dir)[0], None,
                             ServingLimits.from_config(SMALL_LIMITS))
    packaged = package_model(model_dir, serving, tmp_path / "package", rule_dir=rule_dir)
    mlflow.set_experiment("serving-test")
    with mlflow.start_run():
        version = log_model_version(packaged, name)
    return f"models:/{version.name}/{version.version}"


def body(images: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image", "smear_id"],
                                           "data": [[image, "S"] for image in images]}}).encode()


def test_scoring_server_answers_each_violation_with_400_and_its_message(tmp_path, mlflow_uri):
    """MLflow's scoring server code (what `mlflow models serve` runs per request), in-process: a request over a
    limit is an INVALID_PARAMETER_VALUE MlflowException, answered with HTTP 400 and the limit in the message."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pyfunc.load_model(small_limits_version(tmp_path, f"limits-{uuid.uuid4().hex[:8]}"))
    schema = model.metadata.get_input_schema()
    ok = scoring_server.invocations(body([noise_png(40), noise_png(40, 1)]), "application/json", model, schema)
    assert ok.status == 200 and len(json.loads(ok.response)["predictions"]) == 2
    for images, what, key in VIOLATIONS:
        with pytest.raises(MlflowException) as refused:
            scoring_server.invocations(body(images), "application/json", model, schema)
        assert refused.value.get_http_status_code() == 400 and refused.value.error_code == "INVALID_PARAMETER_VALUE"
        assert key in refused.value.message and what in refused.value.message and "Fix:" in refused.value.message


@pytest.mark.slow
def test_served_model_answers_violations_with_http_400_over_http(tmp_path, mlflow_uri):
    """`mlflow models serve` of a version with small limits: each violation gets HTTP 400 and a JSON body naming
    the limit; a request within the limits is answered."""
    import urllib.error

    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    uri = small_limits_version(tmp_path, f"http-limits-{uuid.uuid4().hex[:8]}")
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri, HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]

    def post(images: list[str]) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body(images),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    with server(serve, f"http://127.0.0.1:{port}/ping", tmp_path / "serving.log", env):
        status, answer = post([noise_png(40), noise_png(40, 1)])
        assert status == 200 and len(answer["predictions"]) == 2
        for images, what, key in VIOLATIONS:
            status, answer = post(images)
            assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
            assert key in answer["message"] and what in answer["message"]


def test_a_served_version_whose_engine_file_was_altered_does_not_load(tmp_path, mlflow_uri):
    """serving.json records each packaged engine file's sha256; the pyfunc refuses a file that no longer matches
    (before ONNX Runtime or torch.export.load reads it) instead of serving whatever it now holds."""
    import mlflow
    import pandas as pd

    from smearnet.errors import SmearnetError
    from smearnet.models.engines import EngineSpec, engine_artifact
    from smearnet.models.inference import load_trained, read_serving
    from smearnet.registry.package import package_model, serving_config
    from smearnet.registry.store import local_model_dir, log_model_version
    from smearnet.smear import load_rule
    from workspace import random_model

    model_dir = random_model(tmp_path / "resnet18", seed=0)
    rule_dir = write_rule(tmp_path / "rule", 0.25)
    model = load_trained(model_dir)
    inference = {"engine": "onnxruntime", "precision": "fp32"}
    export = engine_artifact(model.net, model.input_spec, EngineSpec(engine="onnxruntime"),
                             cache_dir=tmp_path / "cache", calibration=None)
    packaged = package_model(model_dir, serving_config(model.meta, load_rule(rule_dir)[0], inference),
                             tmp_path / "package", engine_files=[export], rule_dir=rule_dir)
    assert read_serving(packaged)["engine_files"] == {export.name: hashlib.sha256(export.read_bytes()).hexdigest()}
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("serving-test")
    with mlflow.start_run():
        version = log_model_version(packaged, f"tamper-{uuid.uuid4().hex[:8]}")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                                     dst_path=str(tmp_path / "download")))
    served = mlflow.pyfunc.load_model(str(local)).predict(pd.DataFrame({"image": [noise_png(40)]}))
    assert served["error"][0] == ""
    engine_file = local_model_dir(local) / "engines" / export.name
    engine_file.write_bytes(engine_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(SmearnetError, match="sha256 .* serving.json records, so it was altered"):
        mlflow.pyfunc.load_model(str(local))


@pytest.mark.slow  # NNCF's accuracy control validates the int8 network on the validation cells
def test_an_accuracy_controlled_openvino_version_is_served_from_the_file_named_by_its_loss(tmp_path):
    """Register's path for OpenVINO int8: quantised under the loss `inference.fidelity` allows, on validation
    cells; serving.json records that loss, so the served version finds (and checks) the very file it was packaged
    with, and runs it as register measured it."""
    import torch

    from smearnet.models.engines import engine_spec
    from smearnet.models.inference import (ACCURACY_CONTROL_KEY, load_trained, read_serving, serving_engine,
                                           with_engine, accuracy_control)
    from smearnet.registry.package import export_engine_files, package_model, serving_config
    from smearnet.smear import load_rule
    from workspace import random_model

    model_dir = random_model(tmp_path / "resnet18", seed=0)
    rule_dir = write_rule(tmp_path / "rule", 0.25)
    cells = colour_cells(tmp_path / "cells", CLASSES * 6, [f"p{i}" for i in range(len(CLASSES) * 6)], size=40)
    cells["split"] = (["train"] * 2 + ["val"]) * (len(cells) // 3)
    inference = {"engine": "openvino", "precision": "int8", "batch_size": 4, "calibration_images": 8,
                 "accuracy_control_images": 8, "cache_dir": str(tmp_path / "cache"),
                 "fidelity": {"min_agreement": 0.995, "max_accuracy_drop": 0.003}}
    model = load_trained(model_dir)
    [export] = export_engine_files(model, inference, cells)
    assert export.name.endswith("-int8-ac0.003.ovz")
    serving = serving_config(model.meta, load_rule(rule_dir)[0], inference)
    assert serving["inference"][ACCURACY_CONTROL_KEY] == pytest.approx(0.003)
    assert ACCURACY_CONTROL_KEY not in serving_config(model.meta, load_rule(rule_dir)[0],
                                                      {**inference, "precision": "bf16"})["inference"]
    packaged = package_model(model_dir, serving, tmp_path / "package", engine_files=[export], rule_dir=rule_dir)
    served = serving_engine(load_trained(packaged), read_serving(packaged), packaged)
    measured = with_engine(model, engine_spec(inference), cache_dir=export.parent,
                           accuracy_control=accuracy_control(model, inference))
    images = torch.rand(6, 3, *model.input_spec["input_size"])
    assert served.engine.spec.precision == "int8"
    assert torch.equal(served.logits(images), measured.logits(images))
