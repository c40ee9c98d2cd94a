"""The register stage's work: log + register the challenger (or reuse its version), run the promotion gate on the
frozen evaluation set, move the aliases and return the decision.

Re-running after a crash is safe: versions carry a content fingerprint and an existing version with the same
fingerprint is reused (no duplicates); a recorded gate decision is reused while its champion, criteria and
evaluation set are unchanged; runs left RUNNING by a killed attempt are marked KILLED.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from smearnet.errors import SmearnetError
from smearnet.io import json_safe, read_json
from smearnet.pseudonyms import KEY_ENV, KEY_FILE, key_fingerprint
from smearnet.serving.requests import ServingLimits
from smearnet.models.engines import EngineSpec, engine_spec
from smearnet.models.inference import (TrainedModel, accuracy_control, load_trained, read_serving, serving_engine,
                                      with_engine)
from smearnet.registry.frozen import FrozenSet, evaluate_frozen, explained_smears_html, frozen_set, training_patients
from smearnet.registry.gate import (GATE_METRICS, PromotionCriteria, decision_from_record, decision_markdown,
                                    decision_record, gate_tags, promotion_decision)
from smearnet.registry.package import (ID_KEY_FIELD, TRAINING_PATIENTS_FILE, export_engine_files, model_fingerprint,
                                       package_model, version_serving)
from smearnet.registry.store import (CHALLENGER, CHAMPION, FINGERPRINT_TAG, GATE_TAG, MODEL_NAME_TAG, alias_version,
                                     close_abandoned_runs, download_model_dir, find_version, log_model_version)
from smearnet.smear import SmearRule, load_rule
from smearnet.smear.calls import served_rule
from smearnet.smear.mil import MILAggregator


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
    threshold_on_blind: bool = False  # the smear stage chose the shipped threshold on those smears too
    threshold_on_evaluation: bool = True  # ... on some of its evaluation smears (all but `development`)
    batch_size: int = 32
    confidence: float = 0.95
    n_resamples: int = 2000
    seed: int = 0
    extra_tags: Mapping[str, str] | None = None
    inference: Mapping[str, Any] | None = None  # the `inference` config section; None = eager fp32
    serving_limits: ServingLimits | None = None  # the `serving` config section; None = the defaults


def refuse_unfaithful_engine(model: TrainedModel, split_manifest: pd.DataFrame, inference: Mapping[str, Any] | None,
                             *, batch_size: int) -> dict[str, float] | None:
    """Refuse (SmearnetError) to register a model whose int8 engine strays from eager fp32 (with the same test-time
    augmentation: the engine is judged, not the augmentation) beyond `inference.fidelity` on the validation cells
    (disjoint from the training cells int8 calibrates on): a quantised engine that changes the calls is never
    shipped. Other engines (fp32, bf16: no calibration, and the benchmark table shows their agreement) and a
    configuration without `fidelity` pass unchecked. Returns the measured agreement and accuracies when checked."""
    from smearnet.evaluation.cells import class_indices
    from smearnet.models.engines import Fidelity
    from smearnet.models.inference import predict_probabilities

    spec = model.engine.spec if model.engine is not None else EngineSpec()
    if not inference or not inference.get("fidelity") or not spec.precision.startswith("int8"):
        return None
    reference = with_engine(replace(model, engine=None), EngineSpec(batch_size=batch_size, tta=spec.tta))
    fidelity = Fidelity.from_mapping(inference["fidelity"])
    val = split_manifest[split_manifest["split"] == "val"]
    if val.empty:
        raise SmearnetError(f"No validation cells to check the {spec.label} engine against eager fp32 on.",
                            "give split.val a share of the patients, or register with inference.engine=eager "
                            "and precision fp32.")
    truth = class_indices(val["label"], model.classes)
    served = predict_probabilities(model, val, batch_size=batch_size, progress=False).argmax(1)
    eager = predict_probabilities(reference, val, batch_size=batch_size, progress=False).argmax(1)
    measured = {"agreement": float((served == eager).mean()), "accuracy": float((served == truth).mean()),
                "reference_accuracy": float((eager == truth).mean())}
    if not fidelity.keeps(measured["agreement"], measured["accuracy"], measured["reference_accuracy"]):
        raise SmearnetError(
            f"Refusing to register with the {spec.label} engine: on the {len(val)} validation cells it agrees with "
            f"eager fp32 on {measured['agreement']:.2%} of cells and is {measured['accuracy']:.2%} accurate against "
            f"eager fp32's {measured['reference_accuracy']:.2%}; inference.fidelity asks for "
            f"{fidelity.describe(measured['reference_accuracy'], len(val))}.",
            "use inference.engine=auto (it picks only engines that keep this), or an engine whose row in "
            "reports/benchmark/table1.md does; relax inference.fidelity only knowingly: calls of uncertain cells "
            "would change.")
    return measured


def register_and_gate(inputs: RegisterInputs) -> dict[str, Any]:
    """Log + register the challenger (or reuse its version), run the gate, move aliases; return the decision.

    MLflow must already point at the tracking store and experiment (`smearnet.tracking.runs.setup_mlflow`).
    """
    client = mlflow.MlflowClient()
    model = load_trained(inputs.model_dir)
    rule, aggregator = load_rule(inputs.rule_dir)
    serving = version_serving(model.meta, rule, inputs.rule_dir, inputs.inference, inputs.serving_limits)
    fingerprint = model_fingerprint(inputs.model_dir, serving)
    exports = export_engine_files(model, inputs.inference, inputs.split_manifest, seed=inputs.seed)
    # Judged on the engine it is served with: the very file packaged with it (int8 is calibrated once, above).
    model = with_engine(model, engine_spec(inputs.inference), cache_dir=exports[0].parent if exports else None,
                        accuracy_control=accuracy_control(model, inputs.inference))
    refuse_unfaithful_engine(model, inputs.split_manifest, inputs.inference, batch_size=inputs.batch_size)
    frozen = frozen_set(inputs.split_manifest, inputs.compose, positive_class=rule.positive_class, seed=inputs.seed,
                        blind_smear_ids=inputs.blind_smear_ids)
    close_abandoned_runs(client, inputs.experiment, inputs.model_name, fingerprint)

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
                                         decision_record(decision))
            for key, value in gate_tags(decision).items():
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


def _decide(client: MlflowClient, inputs: RegisterInputs, version: ModelVersion,
            candidate: tuple[TrainedModel, SmearRule, MILAggregator | None], split_set: FrozenSet,
            tmp: Path) -> dict[str, Any]:
    """Evaluate challenger and champion on the same frozen set and apply the promotion criteria.

    The set is today's test split and smear cells without the patients the champion was trained or validated
    on (recorded with it at registration), so a reshuffled split cannot favour the champion.
    """
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
        check_same_pseudonym_key(read_serving(champion_dir), inputs.model_name, str(champion_version.version))
        seen = read_json(champion_dir / TRAINING_PATIENTS_FILE)
        patients = "excluded" if seen is not None else "unknown"
        if seen is None:
            notes.append("the champion was registered without its training patients, so some of today's test "
                         "patients may be ones it was trained on (its numbers may be optimistic)")
        try:
            frozen = frozen_set(inputs.split_manifest, inputs.compose, positive_class=rule.positive_class,
                                seed=inputs.seed, blind_smear_ids=inputs.blind_smear_ids, exclude_patients=seen or ())
            champion_serving = read_serving(champion_dir)
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
                           "sensitivity_on": sensitivity_on(frozen, inputs),
                           "sensitivity_in_sample": sensitivity_in_sample(frozen, inputs),
                           "rules": "each model with its own packaged smear rule (SmearRule.classify)"},
        "reused_decision": False,
    }


def sensitivity_in_sample(frozen: FrozenSet, inputs: RegisterInputs) -> bool:
    """Whether the smear stage chose the shipped threshold on (some of) the smears the gate's sensitivity and
    specificity are measured on: then those figures are optimistic."""
    return inputs.threshold_on_evaluation if frozen.sensitivity_smears is None else inputs.threshold_on_blind


def sensitivity_on(frozen: FrozenSet, inputs: RegisterInputs) -> str:
    """Which smears the gate's sensitivity and specificity are measured on, in words, saying when they are
    in-sample."""
    in_sample = sensitivity_in_sample(frozen, inputs)
    if frozen.sensitivity_smears is None:
        why = ("registry.sensitivity_smears: all" if inputs.blind_smear_ids is None
               else "none of the smear stage's blind smears is in today's set")
        return f"all smears ({why}" + ("; the shipped threshold was chosen on some of them: in-sample)"
                                       if in_sample else "; the shipped threshold was chosen on other smears)")
    if in_sample:
        return ("the smear stage's smears, on which the shipped threshold was chosen (smear.threshold_selection "
                "same or cross_validated: in-sample, optimistic)")
    return "blind smears of the smear stage (not used to choose the threshold)"


def check_same_pseudonym_key(champion_serving: Mapping[str, Any], model_name: str, champion: str) -> None:
    """Refuse to gate against a champion made under another pseudonym key: its recorded training patients could
    not be recognised (nothing would match, silently), so the comparison would not be on unseen patients."""
    theirs, ours = champion_serving.get(ID_KEY_FIELD), key_fingerprint()
    if theirs is not None and theirs != ours:
        raise SmearnetError(
            f"The champion (version {champion} of {model_name}) was made under pseudonym key {theirs}, this project "
            f"uses {ours}: the gate cannot tell which of today's patients the champion was trained on.",
            f"use the key the champion was made with (set {KEY_ENV}, or restore the project's {KEY_FILE}), or "
            f"register under another name (data.name / registry.model_name) and promote by hand.")


def _recorded_decision(client: MlflowClient, inputs: RegisterInputs, version: ModelVersion,
                       frozen: FrozenSet) -> dict[str, Any] | None:
    """The gate decision recorded on `version` by an earlier (possibly interrupted) attempt, if still valid."""
    recorded = client.get_model_version(inputs.model_name, str(version.version)).tags.get(GATE_TAG)
    if not recorded:
        return None
    decision = decision_from_record(recorded)
    champion = alias_version(client, inputs.model_name, CHAMPION)
    current = str(champion.version) if champion is not None else None
    same_champion = current in (decision.get("champion_before"), str(version.version))
    if (same_champion and decision.get("criteria") == asdict(inputs.criteria)
            and decision.get("evaluation_set", {}).get("split_fingerprint") == frozen.fingerprint):
        return {**decision, "reused_decision": True}
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


__all__ = ["RegisterInputs", "check_same_pseudonym_key", "register_and_gate", "sensitivity_in_sample",
           "sensitivity_on"]
