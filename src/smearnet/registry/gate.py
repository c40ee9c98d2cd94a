"""MLflow model registry: pyfunc model versions, aliases, and the champion/challenger promotion gate.

A registered version is the selected backbone's model directory plus a `serving.json` (positive class and
smear threshold), logged as a models-from-code pyfunc (`smearnet/serving.py`, weights as safetensors, no
pickle). The gate re-evaluates the current `champion` and the new `challenger` on the same frozen evaluation
set (the current test-split cells and smear cells, minus any patient the champion was trained or validated on)
and moves `champion` only when `registry.promote_if` holds.

Re-running after a crash is safe: versions carry a content fingerprint and an existing version with the same
fingerprint is reused (no duplicates); a recorded gate decision is reused while its champion, criteria and
evaluation set are unchanged; runs left RUNNING by a killed attempt are marked KILLED.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd

from smearnet.errors import SmearnetError
from smearnet.io import json_safe

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from smearnet.models.inference import TrainedModel
    from smearnet.smear.mil import MILAggregator
    from smearnet.smear import SmearRule

SERVING_CODE = Path(__file__).parents[1] / "serving" / "pyfunc.py"
PACKAGE_DIR = Path(__file__).parents[1]
PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31", "lightning==2.6.6",
                    "torchmetrics==1.9.0", "mlflow==3.17.2", "safetensors", "pandas", "pillow", "scikit-learn",
                    "matplotlib", "tqdm", "psutil", "albumentations==2.0.8", "hydra-core==1.3.8", "onnx==1.23.2",
                    "onnxruntime==1.32.0", "torchao==0.18.0"]

CHAMPION = "champion"
CHALLENGER = "challenger"
SERVING_FILE = "serving.json"
ENGINES_DIR = "engines"  # the ONNX model / int8 program a version's inference engine runs from, packaged with it
TRAINING_PATIENTS_FILE = "training_patients.json"
MODEL_DIR_ARTIFACT = "model_dir"
FINGERPRINT_TAG = "smearnet.model_fingerprint"
MODEL_NAME_TAG = "smearnet.registered_model"
GATE_TAG = "smearnet.gate"
GATE_METRICS = ("cell_accuracy", "smear_auc", "sensitivity")
_TOLERANCE = 1e-9


# --------------------------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class PromotionCriteria:
    """`registry.promote_if`: the challenger must gain at least / lose at most this much over the champion."""

    min_cell_accuracy_gain: float = 0.0
    min_smear_auc_gain: float = 0.0
    max_sensitivity_drop: float = 0.0

    @classmethod
    def from_config(cls, promote_if: Mapping[str, Any]) -> PromotionCriteria:
        """Criteria from the `registry.promote_if` mapping; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = set(promote_if) - known
        if unknown:
            raise SmearnetError(f"Unknown promotion criteria {sorted(unknown)} under registry.promote_if.",
                                f"use only {sorted(known)}.")
        return cls(**{key: float(value) for key, value in promote_if.items()})


def promotion_decision(challenger: Mapping[str, float], champion: Mapping[str, float] | None,
                       criteria: PromotionCriteria | Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether the challenger replaces the champion, and one reason per criterion checked.

    Both mappings hold `cell_accuracy`, `smear_auc` and `sensitivity` measured on the same evaluation set.
    Without a champion the challenger is promoted. A NaN on either side fails its criterion (it cannot be
    shown to hold). Gains are compared with a 1e-9 tolerance, so identical models pass zero-gain criteria.
    """
    if not isinstance(criteria, PromotionCriteria):
        criteria = PromotionCriteria.from_config(criteria)
    if champion is None:
        return True, ["no champion yet: the first registered model becomes the champion"]
    checks = (
        ("cell accuracy", "cell_accuracy", "gain", criteria.min_cell_accuracy_gain),
        ("smear AUC", "smear_auc", "gain", criteria.min_smear_auc_gain),
        ("smear sensitivity at each model's threshold", "sensitivity", "drop", criteria.max_sensitivity_drop),
    )
    promoted, reasons = True, []
    for label, key, kind, limit in checks:
        new, old = float(challenger[key]), float(champion[key])
        if math.isnan(new) or math.isnan(old):
            promoted = False
            reasons.append(f"{label}: challenger {new:.4f} vs champion {old:.4f} is undefined: fail")
            continue
        if kind == "gain":
            delta, ok = new - old, new - old >= limit - _TOLERANCE
            rule = f"gain {delta:+.4f}, required >= {limit:+.4f}"
        else:
            delta, ok = old - new, old - new <= limit + _TOLERANCE
            rule = f"drop {delta:+.4f}, allowed <= {limit:.4f}"
        promoted = promoted and ok
        reasons.append(f"{label}: challenger {new:.4f} vs champion {old:.4f} ({rule}): {'pass' if ok else 'fail'}")
    return promoted, reasons


# --------------------------------------------------------------------------------- the frozen evaluation set


@dataclass
class FrozenSet:
    """The cells both models are evaluated on: test-split cells and the evaluation smears' cells."""

    test: pd.DataFrame
    smears: pd.DataFrame  # one row per cell of an evaluation smear; `smear_key` names its smear
    smears_from: str
    sensitivity_smears: list[str] | None  # smear keys; None = every smear
    fingerprint: str
    excluded_test_cells: int = 0
    excluded_smear_cells: int = 0


def frozen_set(split_manifest: pd.DataFrame, compose: Mapping[str, Any] | None, *, positive_class: str, seed: int,
               blind_smear_ids: Sequence[str] | None = None, exclude_patients: Collection[str] = ()) -> FrozenSet:
    """The evaluation set of the current split: its test cells and the very smears the smear stage judges.

    The smears come from `smearnet.smear.evaluation_smears` with the `smear.compose` settings the smear
    stage used (composed from test cells when configured). `blind_smear_ids` (from
    reports/smear/blind_smears.json) restricts the sensitivity to smears no threshold was chosen on.
    `exclude_patients` (pseudonymised) drops the cells of patients a model was trained or validated on: when
    new data reshuffles the split, some of the champion's training patients can land in today's test split,
    and evaluating it on them would favour it.
    """
    from smearnet.smear import evaluation_smears, smear_keys
    from smearnet.tracking.runs import hash_patient_id

    excluded = set(exclude_patients)
    test = split_manifest[split_manifest["split"] == "test"]
    smears, source = evaluation_smears(split_manifest, compose, positive_class=positive_class, seed=seed)
    smears = smears.assign(smear_key=smear_keys(smears))
    keep_test = ~test["patient_id"].map(hash_patient_id).isin(excluded)
    keep_smears = ~smears["patient_id"].map(hash_patient_id).isin(excluded)
    test, smears = test[keep_test].reset_index(drop=True), smears[keep_smears].reset_index(drop=True)
    if test.empty or smears.empty:
        raise SmearnetError(f"No test cells or no smear cells are left to evaluate on ({int((~keep_test).sum())} "
                            "test cells excluded as a model's training patients).",
                            "re-run the split stage; the gate needs test patients no compared model was trained on.")
    blind = sorted(set(smears["smear_key"]) & set(blind_smear_ids or ())) or None  # none match: every smear
    digest = hashlib.sha256()
    for role, frame, keys in (("test", test, test["smear_id"].map(hash_patient_id)), ("smear", smears,
                                                                                       smears["smear_key"])):
        content = frame["sha256"] if "sha256" in frame else frame["path"].map(lambda p: Path(p).name)
        lines = sorted(f"{role}\t{c}\t{label}\t{key}"
                       for c, label, key in zip(content, frame["label"], keys, strict=True))
        digest.update("\n".join(lines).encode())
    return FrozenSet(test=test, smears=smears, smears_from=source, sensitivity_smears=blind,
                     fingerprint=digest.hexdigest()[:16], excluded_test_cells=int((~keep_test).sum()),
                     excluded_smear_cells=int((~keep_smears).sum()))


def training_patients(split_manifest: pd.DataFrame) -> list[str]:
    """Pseudonyms (salted hashes) of the patients a model trained on this split saw: train and val."""
    from smearnet.tracking.runs import hash_patient_id

    seen = split_manifest[split_manifest["split"].isin(["train", "val"])]["patient_id"]
    return sorted({hash_patient_id(p) for p in seen})


def evaluate_frozen(model: TrainedModel, rule: SmearRule, aggregator: MILAggregator | None, frozen: FrozenSet, *,
                    batch_size: int = 32, confidence: float = 0.95, n_resamples: int = 2000,
                    seed: int = 0) -> dict[str, Any]:
    """Cell accuracy on the test cells; smear AUC of the rule's score and sensitivity/specificity at the rule's
    own threshold, with the model's own rule (`SmearRule.classify`) on the evaluation smears.

    Raises SmearnetError when the model cannot classify this data (other classes).
    """
    from smearnet.evaluation.calibration import scaled_probabilities
    from smearnet.evaluation.cells import class_indices
    from smearnet.models.inference import predict_probabilities
    from smearnet.evaluation.metrics import binary_counts, binary_summary, cell_metrics
    from smearnet.smear.mil import cell_outputs
    from smearnet.smear import auc_interval, roc_points

    labels = set(frozen.test["label"]) | set(frozen.smears["label"]) | {rule.positive_class}
    if not labels <= set(model.classes):
        raise SmearnetError(f"Model {model.name} knows classes {model.classes}, but the evaluation set has "
                            f"{sorted(labels - set(model.classes))} too.",
                            "compare models trained on the same class list (data.classes).")
    probabilities = predict_probabilities(model, frozen.test, batch_size=batch_size, progress=False)
    cells = cell_metrics(class_indices(frozen.test["label"], model.classes), probabilities, model.classes,
                         rule.positive_class, confidence, seed=seed)
    unique = frozen.smears.drop_duplicates("path")
    outputs = cell_outputs(model, unique, batch_size=batch_size, embeddings=rule.uses_mil)
    rows = unique.reset_index(drop=True).reset_index().set_index("path")["index"]
    positions = frozen.smears["path"].map(rows).to_numpy()
    smear_probabilities = scaled_probabilities(outputs.logits, 1.0)[positions]  # the engine's softmax
    calls, _ = rule.classify(frozen.smears["smear_key"], smear_probabilities, model.classes,
                             labels=frozen.smears["label"].to_numpy(),
                             embeddings=outputs.embeddings[positions] if rule.uses_mil else None,
                             aggregator=aggregator)
    calls = calls[calls["call"] != "undetermined"]
    scores, truth = calls["score"].to_numpy(dtype=float), calls["truth_positive"].to_numpy(dtype=bool)
    auc = roc_points(scores, truth)["auc"]
    low, high = auc_interval(scores, truth, n_resamples=n_resamples, confidence=confidence, seed=seed)
    judged = calls if frozen.sensitivity_smears is None else calls[calls["smear_id"].isin(frozen.sensitivity_smears)]
    counts = binary_counts(judged["truth_positive"].to_numpy(dtype=bool), (judged["call"] == "positive").to_numpy())
    summary = binary_summary(counts, confidence)
    return {
        "cell_accuracy": float(cells["accuracy"]["value"]),
        "cell_accuracy_ci": [float(cells["accuracy"]["low"]), float(cells["accuracy"]["high"])],
        "cell_macro_f1": float(cells["macro_f1"]["value"]),
        "n_test_cells": int(cells["n_cells"]),
        "smear_score": rule.score,
        "smear_auc": float(auc),
        "smear_auc_ci": [float(low), float(high)],
        "threshold": float(rule.threshold),
        "sensitivity": float(summary["sensitivity"]["value"]),
        "sensitivity_ci": [float(summary["sensitivity"]["low"]), float(summary["sensitivity"]["high"])],
        "specificity": float(summary["specificity"]["value"]),
        "n_smears": int(len(calls)),
        "n_sensitivity_smears": int(len(judged)),
    }


# ------------------------------------------------------------------------------------- logging a version


def serving_config(model_meta: Mapping[str, Any], rule: SmearRule,
                   inference: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What serving needs beside the weights: the class list, input spec, the smear rule (also packaged as
    `smear_rule.json`) and the inference engine (`smearnet.models.engines`) predict and the served model run."""
    from smearnet.models.engines import engine_spec
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
            "std": [float(v) for v in spec["std"]], "inference": asdict(engine_spec(inference))}


def version_serving(model_meta: Mapping[str, Any], rule: SmearRule, rule_dir: Path,
                    inference: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`serving_config` plus a digest of the rule's MIL aggregator files: what a version's fingerprint covers."""
    serving = serving_config(model_meta, rule, inference)
    serving["smear_rule_files"] = _files_digest(Path(rule_dir) / "mil") if rule.uses_mil else ""
    return serving


def _files_digest(folder: Path) -> str:
    """A content hash of every file below `folder` (the MIL aggregator of a rule)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


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


def package_model(model_dir: Path, serving: Mapping[str, Any], dest: Path,
                  seen_patients: Sequence[str] = (), engine_files: Sequence[Path] = (),
                  rule_dir: Path | None = None) -> Path:
    """Copy `model_dir` to `dest/<name>` with `serving.json` beside the weights (the DVC output stays untouched),
    the smear rule measured for it (`smear_rule.json`, `mil/`) and the pseudonyms of its training patients
    (so a later gate can keep them out of its evaluation)."""
    from smearnet.smear import MIL_DIR, RULE_FILE

    target = Path(dest) / Path(model_dir).name
    shutil.copytree(model_dir, target)
    if rule_dir is not None:
        shutil.copy2(Path(rule_dir) / RULE_FILE, target / RULE_FILE)
        if (Path(rule_dir) / MIL_DIR).is_dir() and serving["smear_rule"]["score"] == "score_mil":
            shutil.copytree(Path(rule_dir) / MIL_DIR, target / MIL_DIR)
    if engine_files:  # ONNX exports travel with the version: int8 cannot be re-calibrated where it is served
        (target / ENGINES_DIR).mkdir()
        for path in engine_files:
            shutil.copy2(path, target / ENGINES_DIR / Path(path).name)
    (target / SERVING_FILE).write_text(json.dumps(dict(serving), indent=2, sort_keys=True) + "\n")
    (target / TRAINING_PATIENTS_FILE).write_text(json.dumps(list(seen_patients)) + "\n")
    return target


def example_request(size: int = 64) -> pd.DataFrame:
    """A neutral input example (a plain grey PNG, no patient data) in the request format."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 170, 190)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()], "smear_id": ["example-smear"]})


def log_model_version(model_dir: Path, registered_name: str, *, tags: Mapping[str, str] | None = None,
                      metadata: Mapping[str, Any] | None = None) -> ModelVersion:
    """Log `model_dir` as a pyfunc model (models-from-code, weights as safetensors) in the active run,
    register it under `registered_name` with `tags` set at creation, and return the new ModelVersion.

    The output schema comes from running the model on the input example (a plain grey image)."""
    import base64

    from mlflow.models import ModelSignature
    from mlflow.models.signature import infer_signature
    from mlflow.types.schema import ColSpec, Schema

    from smearnet.data.decode import decode_image_bytes
    from smearnet.models.inference import load_trained
    from smearnet.smear.calls import call_cells, cell_outputs_for_images, served_rule

    example = example_request()
    serving_file = Path(model_dir) / SERVING_FILE
    serving = json.loads(serving_file.read_text()) if serving_file.is_file() else {}
    rule, aggregator = served_rule(Path(model_dir), serving)
    model = load_trained(Path(model_dir))
    probabilities, embeddings = cell_outputs_for_images(
        model, [decode_image_bytes(base64.b64decode(example["image"][0]))], embeddings=rule.uses_mil)
    output, _ = call_cells(rule, aggregator, model.classes, list(example["smear_id"]), probabilities,
                           embeddings=embeddings, errors=[""])
    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "smear_id", required=False)])
    signature = ModelSignature(inputs=inputs, outputs=infer_signature(example, output).outputs)
    info = mlflow.pyfunc.log_model(name="model", python_model=str(SERVING_CODE),
                                   artifacts={MODEL_DIR_ARTIFACT: str(model_dir)}, code_paths=[str(PACKAGE_DIR)],
                                   pip_requirements=PIP_REQUIREMENTS, signature=signature, input_example=example,
                                   metadata=dict(metadata) if metadata else None)
    return mlflow.register_model(info.model_uri, registered_name,
                                 tags={key: str(value) for key, value in (tags or {}).items()})


def find_version(client: MlflowClient, name: str, fingerprint: str) -> ModelVersion | None:
    """The registered version of `name` tagged with `fingerprint` (the newest if several), else None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
    except MlflowException:  # a store without tag search: filter here
        found = client.search_model_versions(f"name = '{name}'")
    # Some stores return versions without tags from search: read each one back.
    versions = [client.get_model_version(name, v.version) for v in found]
    matching = [v for v in versions if v.tags.get(FINGERPRINT_TAG) == fingerprint]
    return max(matching, key=lambda v: int(v.version)) if matching else None


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at, or None (no such alias or registered model)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download_model_dir(model_uri: str, dst: Path) -> Path:
    """Download a logged smearnet pyfunc model and return its model directory (weights + serving.json)."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    return local_model_dir(local)


def local_model_dir(local_model: Path) -> Path:
    """The `model_dir` artifact inside a downloaded pyfunc model folder (the one holding MLmodel)."""
    from mlflow.models import Model

    flavor = Model.load(str(local_model)).flavors.get("python_function", {})
    artifact = flavor.get("artifacts", {}).get(MODEL_DIR_ARTIFACT)
    if not artifact:
        raise SmearnetError(f"{local_model} is not a smearnet pyfunc model (no `{MODEL_DIR_ARTIFACT}` artifact).",
                            "register models with smearnet (the register stage).")
    return Path(local_model) / artifact["path"]


def dvc_revision_tags(lock_path: Path, backbone: str) -> dict[str, str]:
    """The DVC revision of what is registered: dvc.lock's hash and the md5s of the model and split outputs."""
    import yaml

    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {}
    tags = {"dvc.lock_sha": hashlib.sha256(lock_path.read_bytes()).hexdigest()[:12]}
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == f"models/{backbone}":
                tags["dvc.model_md5"] = str(out.get("md5"))
            elif out.get("path") == "data/split":
                tags["dvc.split_md5"] = str(out.get("md5"))
    return tags


# ------------------------------------------------------------------------------------- register + gate


@dataclass
class RegisterInputs:
    """Everything the register stage hands to `register_and_gate`."""

    model_dir: Path
    backbone: str
    model_name: str
    experiment: str
    rule_dir: Path  # the smear stage's measured rule: smear_rule.json (+ mil/)
    criteria: PromotionCriteria
    split_manifest: pd.DataFrame
    compose: Mapping[str, Any] | None = None  # smear.compose: the evaluation smears are the smear stage's
    blind_smear_ids: list[str] | None = None
    batch_size: int = 32
    confidence: float = 0.95
    n_resamples: int = 2000
    seed: int = 0
    extra_tags: Mapping[str, str] | None = None
    inference: Mapping[str, Any] | None = None  # the `inference` config section; None = eager fp32


def engine_files(model, inference: Mapping[str, Any], inputs: RegisterInputs) -> list[Path]:
    """The file its inference engine runs from (ONNX model, or int8 PyTorch program), exported and int8-calibrated
    on training cells into the engine cache if not there yet; none for engines that run the weights as they are."""
    from smearnet.models.engines import engine_artifact, engine_spec
    from smearnet.models.inference import engine_inputs

    train = inputs.split_manifest[inputs.split_manifest["split"] == "train"]
    engine = engine_inputs(model, inputs.inference, train, seed=inputs.seed)  # cells decoded only if calibrating
    path = engine_artifact(model.net, model.input_spec, engine_spec(inference),
                           cache_dir=engine["cache_dir"] or Path(".cache/engines"), calibration=engine["calibration"])
    return [path] if path is not None else []


def register_and_gate(inputs: RegisterInputs) -> dict[str, Any]:
    """Log + register the challenger (or reuse its version), run the gate, move aliases; return the decision.

    MLflow must already point at the tracking store and experiment (`smearnet.tracking.runs.setup_mlflow`).
    """
    from smearnet.models.inference import load_trained, serving_engine
    from smearnet.smear import load_rule

    client = mlflow.MlflowClient()
    model = load_trained(inputs.model_dir)
    rule, aggregator = load_rule(inputs.rule_dir)
    serving = version_serving(model.meta, rule, inputs.rule_dir, inputs.inference)
    fingerprint = model_fingerprint(inputs.model_dir, serving)
    exports = engine_files(model, serving["inference"], inputs)
    model = serving_engine(model, serving, inputs.model_dir)  # judged on the engine it is served with
    frozen = frozen_set(inputs.split_manifest, inputs.compose, positive_class=rule.positive_class, seed=inputs.seed,
                        blind_smear_ids=inputs.blind_smear_ids)
    _close_abandoned_runs(client, inputs.experiment, inputs.model_name, fingerprint)

    run_tags = {**(inputs.extra_tags or {}), "stage": "register", "backbone": inputs.backbone,
                MODEL_NAME_TAG: inputs.model_name, FINGERPRINT_TAG: fingerprint}
    with mlflow.start_run(run_name=f"register-{inputs.backbone}", tags=run_tags), \
            tempfile.TemporaryDirectory(prefix="smearnet-register-") as tmp:
        version = find_version(client, inputs.model_name, fingerprint)
        reused_version = version is not None
        if version is None:
            packaged = package_model(inputs.model_dir, serving, Path(tmp) / "package",
                                     training_patients(inputs.split_manifest), exports, inputs.rule_dir)
            version_tags = {**(inputs.extra_tags or {}), FINGERPRINT_TAG: fingerprint, "backbone": inputs.backbone,
                            "classes": ",".join(serving["classes"]), "positive_class": rule.positive_class,
                            "smear_score": rule.score, "smear_threshold": f"{rule.threshold:.6g}",
                            "input_size": "x".join(map(str, serving["input_size"])),
                            "normalise_mean": ",".join(f"{v:.4f}" for v in serving["mean"]),
                            "normalise_std": ",".join(f"{v:.4f}" for v in serving["std"])}
            version = log_model_version(packaged, inputs.model_name, tags=version_tags,
                                        metadata={"smearnet": serving})
        client.set_registered_model_alias(inputs.model_name, CHALLENGER, str(version.version))

        decision = _recorded_decision(client, inputs, version, frozen)
        if decision is None:
            decision = _decide(client, inputs, version, (model, rule, aggregator), frozen, Path(tmp))
            # Record before moving the alias: a crash in between re-applies this decision on the re-run.
            client.set_model_version_tag(inputs.model_name, str(version.version), GATE_TAG,
                                         json.dumps(json_safe(decision), sort_keys=True))
            for key, value in _flat_gate_tags(decision).items():
                client.set_model_version_tag(inputs.model_name, str(version.version), key, value)
        if decision["promoted"]:
            client.set_registered_model_alias(inputs.model_name, CHAMPION, str(version.version))
        decision = {**decision, "reused_version": reused_version,
                    "champion_after": str((alias_version(client, inputs.model_name, CHAMPION) or version).version)}

        mlflow.log_params({"model_name": inputs.model_name, "version": str(version.version),
                           "positive_class": rule.positive_class, "smear_score": rule.score,
                           "smear_threshold": rule.threshold,
                           **{f"promote_if.{k}": v for k, v in asdict(inputs.criteria).items()}})
        mlflow.log_metrics({f"gate/{role}/{key}": float(decision[role][key])
                            for role in ("challenger", "champion") if decision.get(role)
                            for key in GATE_METRICS if _finite(decision[role][key])})
        mlflow.log_metric("gate/promoted", float(decision["promoted"]))
        mlflow.log_dict(json_safe(decision), "register/decision.json")
        mlflow.log_text(explained_smears_html(model, rule, aggregator, frozen, inputs.model_name),
                        "register/explained_blind_smears.html")
        mlflow.log_text(decision_markdown(decision), "register/decision.md")
    return decision


def explained_smears_html(model: TrainedModel, rule: SmearRule, aggregator: MILAggregator | None, frozen: FrozenSet,
                          title: str, n_per_class: int = 2) -> str:
    """An HTML page (`smearnet.explain`) of a few blind evaluation smears, positive and negative, as the model
    calls them: what the MLflow UI shows of what the model looks at. Cells are named by rank, not file name."""
    from smearnet.explain import explain_cells, smear_report_html

    smears = frozen.smears
    keys = sorted(set(frozen.sensitivity_smears or smears["smear_key"]))
    truth = (smears["label"] == rule.positive_class).groupby(smears["smear_key"]).any()
    chosen = [key for value in (True, False) for key in [k for k in keys if bool(truth[k]) == value][:n_per_class]]
    cells = smears[smears["smear_key"].isin(chosen)]
    explained = explain_cells(model, rule, aggregator, cells[["path"]].assign(smear_id=cells["smear_key"]),
                              name_cells=False)
    return smear_report_html(explained, title=f"{title}: blind smears as this version calls them",
                             model=f"{model.name} ({rule.describe()})", positive_class=rule.positive_class)


def _decide(client: MlflowClient, inputs: RegisterInputs, version: ModelVersion,
            candidate: tuple[TrainedModel, SmearRule, MILAggregator | None], split_set: FrozenSet,
            tmp: Path) -> dict[str, Any]:
    """Evaluate challenger and champion on the same frozen set and apply the promotion criteria.

    The set is today's test split and smear cells without the patients the champion was trained or validated
    on (recorded with it at registration), so a reshuffled split cannot favour the champion.
    """
    from smearnet.models.inference import load_trained, serving_engine
    from smearnet.smear.calls import served_rule

    def evaluate(judged: tuple[TrainedModel, SmearRule, MILAggregator | None], frozen: FrozenSet) -> dict[str, Any]:
        return evaluate_frozen(*judged, frozen, batch_size=inputs.batch_size, confidence=inputs.confidence,
                               n_resamples=inputs.n_resamples, seed=inputs.seed)

    rule = candidate[1]

    champion_version = alias_version(client, inputs.model_name, CHAMPION)
    champion: dict[str, Any] | None = None
    frozen, patients = split_set, "not applicable"
    notes: list[str] = []
    if champion_version is None:
        challenger = evaluate(candidate, frozen)
        promoted, reasons = promotion_decision(challenger, None, inputs.criteria)
    elif str(champion_version.version) == str(version.version):
        challenger = evaluate(candidate, frozen)
        champion = challenger
        promoted, reasons = True, [f"version {version.version} is already the champion"]
    else:
        champion_uri = f"models:/{inputs.model_name}/{champion_version.version}"
        champion_dir = download_model_dir(champion_uri, tmp / "champion")
        seen_file = champion_dir / TRAINING_PATIENTS_FILE
        seen = json.loads(seen_file.read_text()) if seen_file.is_file() else None
        patients = "excluded" if seen is not None else "unknown"
        if seen is None:
            notes.append("the champion was registered without its training patients, so some of today's test "
                         "patients may be ones it was trained on (its numbers may be optimistic)")
        try:
            frozen = frozen_set(inputs.split_manifest, inputs.compose, positive_class=rule.positive_class,
                                seed=inputs.seed, blind_smear_ids=inputs.blind_smear_ids, exclude_patients=seen or ())
            champion_serving = json.loads((champion_dir / SERVING_FILE).read_text())
            champion_model = serving_engine(load_trained(champion_dir), champion_serving, champion_dir)
            challenger = evaluate(candidate, frozen)
            champion = evaluate((champion_model, *served_rule(champion_dir, champion_serving)), frozen)
        except SmearnetError as err:
            frozen, champion = split_set, None
            challenger = evaluate(candidate, frozen)
            promoted, reasons = False, [f"the champion cannot be compared on this data ({err.what.rstrip('.')}); "
                                        f"models for other classes belong under another name: set data.name (or "
                                        f"registry.model_name) for this task, or promote by hand"]
        else:
            promoted, reasons = promotion_decision(challenger, champion, inputs.criteria)
    return {
        "model_name": inputs.model_name, "version": str(version.version), "backbone": inputs.backbone,
        "model_uri": f"models:/{inputs.model_name}/{version.version}",
        "fingerprint": version.tags.get(FINGERPRINT_TAG, ""), "promoted": bool(promoted), "reasons": reasons,
        "notes": notes, "criteria": asdict(inputs.criteria),
        "champion_before": str(champion_version.version) if champion_version is not None else None,
        "challenger": challenger, "champion": champion,
        "evaluation_set": {"fingerprint": frozen.fingerprint, "split_fingerprint": split_set.fingerprint,
                           "test_cells": len(frozen.test), "smear_cells": len(frozen.smears),
                           "excluded_test_cells": frozen.excluded_test_cells,
                           "excluded_smear_cells": frozen.excluded_smear_cells,
                           "champion_training_patients": patients, "smear_cells_from": frozen.smears_from,
                           "sensitivity_on": "blind smears of the smear stage" if frozen.sensitivity_smears
                           else "all smears",
                           "rules": "each model with its own packaged smear rule (SmearRule.classify)"},
        "reused_decision": False,
    }


def _recorded_decision(client: MlflowClient, inputs: RegisterInputs, version: ModelVersion,
                       frozen: FrozenSet) -> dict[str, Any] | None:
    """The gate decision recorded on `version` by an earlier (possibly interrupted) attempt, if still valid."""
    recorded = client.get_model_version(inputs.model_name, str(version.version)).tags.get(GATE_TAG)
    if not recorded:
        return None
    decision = json.loads(recorded)
    champion = alias_version(client, inputs.model_name, CHAMPION)
    current = str(champion.version) if champion is not None else None
    same_champion = current in (decision.get("champion_before"), str(version.version))
    if (same_champion and decision.get("criteria") == asdict(inputs.criteria)
            and decision.get("evaluation_set", {}).get("split_fingerprint") == frozen.fingerprint):
        return {**_nan_restored(decision), "reused_decision": True}
    return None


def _close_abandoned_runs(client: MlflowClient, experiment: str, model_name: str, fingerprint: str) -> None:
    """Mark register runs of this model left RUNNING by a killed attempt as KILLED."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return
    query = (f"attributes.status = 'RUNNING' and tags.`{MODEL_NAME_TAG}` = '{model_name}' "
             f"and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
    stale = client.search_runs([found.experiment_id], query)
    for run in stale:
        client.set_terminated(run.info.run_id, status="KILLED")


def _flat_gate_tags(decision: Mapping[str, Any]) -> dict[str, str]:
    tags = {"gate.promoted": str(decision["promoted"]).lower(),
            "gate.evaluation_set": decision["evaluation_set"]["fingerprint"],
            "gate.champion_before": str(decision["champion_before"] or "none")}
    for role in ("challenger", "champion"):
        for key in (*GATE_METRICS, "threshold"):
            if decision.get(role):
                tags[f"gate.{role}.{key}"] = f"{float(decision[role][key]):.4f}"
    return tags


def decision_markdown(decision: Mapping[str, Any]) -> str:
    """The gate decision as a short Markdown report."""
    verdict = "PROMOTED to champion" if decision["promoted"] else "not promoted (champion unchanged)"
    lines = [f"# Registry gate: {decision['model_name']} version {decision['version']}", "",
             f"**{verdict}**; champion is now version {decision.get('champion_after', '?')}.", "",
             f"- Backbone: {decision['backbone']}; model `{decision['model_uri']}`",
             f"- Previous champion: {decision['champion_before'] or 'none'}",
             f"- Evaluation set `{decision['evaluation_set']['fingerprint']}`: "
             f"{decision['evaluation_set']['test_cells']} test cells, {decision['evaluation_set']['smear_cells']} "
             f"smear cells ({decision['evaluation_set']['smear_cells_from']}); sensitivity on "
             f"{decision['evaluation_set']['sensitivity_on']}; {decision['evaluation_set']['excluded_test_cells']} "
             f"test cells of the champion's training patients left out "
             f"(champion's training patients: {decision['evaluation_set']['champion_training_patients']})",
             f"- Criteria: {', '.join(f'{k}={v}' for k, v in decision['criteria'].items())}", "",
             "| metric | challenger | champion |", "|---|---|---|"]
    for key in (*GATE_METRICS, "threshold", "specificity", "n_test_cells", "n_smears"):
        values = [decision[role][key] if decision.get(role) else None for role in ("challenger", "champion")]
        lines.append(f"| {key} | " + " | ".join("-" if v is None else f"{v:.4f}" if isinstance(v, float)
                                                else str(v) for v in values) + " |")
    lines += ["", "Reasons:", "", *(f"- {reason}" for reason in decision["reasons"])]
    lines += [*(f"- Note: {note}" for note in decision.get("notes", [])), ""]
    return "\n".join(lines)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))



def _nan_restored(value: Any) -> Any:
    """None -> NaN for the metric fields of a decision read back from JSON."""
    if isinstance(value, dict):
        return {k: (float("nan") if v is None and k in (*GATE_METRICS, "specificity") else _nan_restored(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_restored(v) for v in value]
    return value


__all__ = ["CHALLENGER", "CHAMPION", "FrozenSet", "PromotionCriteria", "RegisterInputs", "decision_markdown",
           "download_model_dir", "evaluate_frozen", "find_version", "frozen_set", "log_model_version",
           "model_fingerprint", "promotion_decision", "register_and_gate", "serving_config"]
