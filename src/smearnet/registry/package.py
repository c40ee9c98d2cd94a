"""What a registered version is made of: its serving configuration, content fingerprint, packaged folder, engine
files, request limits, input example and pip requirements. No MLflow here (`smearnet.registry.store` logs it).

A packaged version is the model directory (weights as safetensors, `model.json`) plus `serving.json` (classes,
input spec, smear rule, inference engine, request limits and the sha256 of every engine file), the smear rule
measured for it (`smear_rule.json`, `mil/`), its engine files (`engines/`) and the pseudonyms of its training
patients (`training_patients.json`).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from packaging.requirements import Requirement
from PIL import Image

from smearnet.config import REPO_ROOT
from smearnet.errors import SmearnetError
from smearnet.io import file_sha256, write_json, write_text
from smearnet.pseudonyms import key_fingerprint
from smearnet.serving.requests import ServingLimits
from smearnet.models.engines import engine_artifact, engine_spec
from smearnet.models.inference import (ACCURACY_CONTROL_KEY, ENGINE_FILES_KEY, ENGINES_DIR, SERVING_FILE, TrainedModel,
                                      accuracy_control, engine_inputs)
from smearnet.smear import MIL_DIR, RULE_FILE, SmearRule

SERVING_CODE = Path(__file__).parents[1] / "serving" / "pyfunc.py"  # the models-from-code pyfunc
PACKAGE_DIR = Path(__file__).parents[1]  # shipped with every version (code_paths)
TRAINING_PATIENTS_FILE = "training_patients.json"
# smearnet's dependencies a served model never imports: the pipeline's tool and the Grad-CAM explanations of
# `smearnet predict --report`. Everything else pyproject.toml lists is installed where a version is served.
NOT_SERVED = ("dvc", "captum")


def pip_requirements() -> list[str]:
    """The pip requirements of a served version: smearnet's own dependencies with pyproject.toml's pins, as
    installed (`importlib.metadata`), or read from pyproject.toml when smearnet runs from a checkout without
    being installed; less `NOT_SERVED` and the optional extras. One list, so the pins cannot drift."""
    try:
        declared = importlib.metadata.requires("smearnet") or []
    except importlib.metadata.PackageNotFoundError:
        pyproject = REPO_ROOT / "pyproject.toml"
        if not pyproject.is_file():
            raise SmearnetError("smearnet is not installed and there is no pyproject.toml to read its dependencies "
                                "from, so a registered version would not know what to install.",
                                "install the project (`pip install -e .`) in the environment that registers models.")
        declared = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    requirements = [Requirement(text) for text in declared]
    return [str(r) for r in requirements
            if not (r.marker and "extra" in str(r.marker)) and r.name not in NOT_SERVED]


def serving_config(model_meta: Mapping[str, Any], rule: SmearRule, inference: Mapping[str, Any] | None = None,
                   limits: ServingLimits | None = None) -> dict[str, Any]:
    """What serving needs beside the weights: the class list, input spec, the smear rule (also packaged as
    `smear_rule.json`), the inference engine (`smearnet.models.engines`) predict and the served model run, and
    the request limits of the served model."""
    classes = list(model_meta["classes"])
    if rule.positive_class not in classes:
        raise SmearnetError(f"Positive class {rule.positive_class!r} is not one of the model's classes {classes}.",
                            "set data.positive_class to one of data.classes.")
    if not rule.is_complete:
        raise SmearnetError("The smear rule has no finite threshold.", "re-run the smear stage (reports/smear).")
    spec = model_meta["input_spec"]
    return {"positive_class": rule.positive_class, "smear_threshold": float(rule.threshold),
            "smear_score": rule.score, "smear_rule": rule.to_dict(), "classes": classes,
            "input_size": [int(v) for v in spec["input_size"]], "mean": [float(v) for v in spec["mean"]],
            "std": [float(v) for v in spec["std"]], "inference": served_inference(inference),
            "limits": asdict(limits or ServingLimits())}


def served_inference(inference: Mapping[str, Any] | None) -> dict[str, Any]:
    """serving.json's `inference`: the engine, and for OpenVINO int8 under accuracy control the loss its file was
    quantised under (the file is named by it)."""
    spec = engine_spec(inference)
    served: dict[str, Any] = asdict(spec)
    control = accuracy_control(None, inference)
    if control is not None and spec.engine == "openvino" and spec.precision.startswith("int8"):
        served[ACCURACY_CONTROL_KEY] = control.max_drop
    return served


#: serving.json's record of the pseudonym key (its fingerprint, never the key) the version was made under.
ID_KEY_FIELD = "pseudonym_key"


def version_serving(model_meta: Mapping[str, Any], rule: SmearRule, rule_dir: Path,
                    inference: Mapping[str, Any] | None = None, limits: ServingLimits | None = None) -> dict[str, Any]:
    """`serving_config` plus a digest of the rule's MIL aggregator files and the fingerprint of the pseudonym key
    its training patients are recorded under (`ID_KEY_FIELD`): what a version's fingerprint covers."""
    serving = serving_config(model_meta, rule, inference, limits)
    serving["smear_rule_files"] = _files_digest(Path(rule_dir) / MIL_DIR) if rule.uses_mil else ""
    serving[ID_KEY_FIELD] = key_fingerprint()
    return serving


def model_fingerprint(model_dir: Path, serving: Mapping[str, Any] | None = None) -> str:
    """Content hash of a model directory's files (plus a serving config): same files, same fingerprint."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.name != SERVING_FILE):
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps(dict(serving or {}), sort_keys=True).encode())
    return digest.hexdigest()[:24]


def export_engine_files(model: TrainedModel, inference: Mapping[str, Any] | None, split_manifest: pd.DataFrame,
                        *, seed: int = 0) -> list[Path]:
    """The file its inference engine runs from (ONNX model, OpenVINO IR, int8 PyTorch program), made into the engine
    cache if not there yet (int8 calibrated on the training cells of `split_manifest`, OpenVINO int8 under accuracy
    control on its validation cells); none for engines that run the weights as they are."""
    engine = engine_inputs(model, inference, split_manifest, seed=seed)  # cells decoded only if calibrating
    path = engine_artifact(model.net, model.input_spec, engine_spec(inference),
                           cache_dir=engine["cache_dir"] or Path(".cache/engines"), calibration=engine["calibration"],
                           accuracy_control=engine["accuracy_control"])
    return [path] if path is not None else []


def package_model(model_dir: Path, serving: Mapping[str, Any], dest: Path,
                  seen_patients: Sequence[str] = (), engine_files: Sequence[Path] = (),
                  rule_dir: Path | None = None) -> Path:
    """Copy `model_dir` to `dest/<name>` with `serving.json` beside the weights (the DVC output stays untouched),
    the smear rule measured for it (`smear_rule.json`, `mil/`), its engine files with their sha256 recorded in
    serving.json (checked before each is loaded) and the pseudonyms of its training patients (so a later gate can
    keep them out of its evaluation)."""
    target = Path(dest) / Path(model_dir).name
    shutil.copytree(model_dir, target)
    if rule_dir is not None:
        shutil.copy2(Path(rule_dir) / RULE_FILE, target / RULE_FILE)
        if (Path(rule_dir) / MIL_DIR).is_dir() and serving["smear_rule"]["score"] == "score_mil":
            shutil.copytree(Path(rule_dir) / MIL_DIR, target / MIL_DIR)
    hashes = {}
    if engine_files:  # exports travel with the version: int8 cannot be re-calibrated where it is served
        (target / ENGINES_DIR).mkdir()
        for path in engine_files:
            copy = Path(shutil.copy2(path, target / ENGINES_DIR / Path(path).name))
            hashes[copy.name] = file_sha256(copy)
    write_json({**serving, ENGINE_FILES_KEY: hashes}, target / SERVING_FILE)
    write_text(json.dumps(list(seen_patients)) + "\n", target / TRAINING_PATIENTS_FILE)
    return target


def example_request(size: int = 64) -> pd.DataFrame:
    """A neutral input example (a plain grey PNG, no patient data) in the request format."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 170, 190)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()], "smear_id": ["example-smear"]})


def _files_digest(folder: Path) -> str:
    """A content hash of every file below `folder` (the MIL aggregator of a rule)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


__all__ = ["ID_KEY_FIELD", "NOT_SERVED", "PACKAGE_DIR", "SERVING_CODE", "TRAINING_PATIENTS_FILE", "example_request",
           "export_engine_files", "model_fingerprint", "package_model", "pip_requirements", "serving_config",
           "version_serving"]
