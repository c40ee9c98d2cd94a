"""The frozen evaluation set of the gate and how one model scores on it.

Challenger and champion are measured on the same cells: the current split's test cells and the very smears the
smear stage judges, minus the patients the champion was trained or validated on (`frozen_set`), each model with
its own packaged smear rule (`evaluate_frozen`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from smearnet.errors import SmearnetError
from smearnet.evaluation.calibration import scaled_probabilities
from smearnet.evaluation.cells import class_indices
from smearnet.evaluation.metrics import binary_counts, binary_summary, cell_metrics
from smearnet.explain import explain_cells, smear_report_html
from smearnet.models.inference import TrainedModel, predict_probabilities
from smearnet.smear import SmearRule, auc_interval, evaluation_smears, roc_points, smear_keys
from smearnet.smear.mil import MILAggregator, cell_outputs
from smearnet.pseudonyms import pseudonym


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
    reports/smear/blind_smears.json) restricts the sensitivity to the smear stage's blind smears (no threshold was
    chosen on them under `held_out`; under `same` and `cross_validated` it was, which the gate reports).
    `exclude_patients` (pseudonymised) drops the cells of patients a model was trained or validated on: when
    new data reshuffles the split, some of the champion's training patients can land in today's test split,
    and evaluating it on them would favour it.
    """
    excluded = set(exclude_patients)
    test = split_manifest[split_manifest["split"] == "test"]
    smears, source = evaluation_smears(split_manifest, compose, positive_class=positive_class, seed=seed)
    smears = smears.assign(smear_key=smear_keys(smears))
    keep_test = ~test["patient_id"].map(pseudonym).isin(excluded)
    keep_smears = ~smears["patient_id"].map(pseudonym).isin(excluded)
    test, smears = test[keep_test].reset_index(drop=True), smears[keep_smears].reset_index(drop=True)
    if test.empty or smears.empty:
        raise SmearnetError(f"No test cells or no smear cells are left to evaluate on ({int((~keep_test).sum())} "
                            "test cells excluded as a model's training patients).",
                            "re-run the split stage; the gate needs test patients no compared model was trained on.")
    blind = sorted(set(smears["smear_key"]) & set(blind_smear_ids or ())) or None  # none match: every smear
    digest = hashlib.sha256()
    for role, frame, keys in (("test", test, test["smear_id"].map(pseudonym)), ("smear", smears,
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
    seen = split_manifest[split_manifest["split"].isin(["train", "val"])]["patient_id"]
    return sorted({pseudonym(p) for p in seen})


def evaluate_frozen(model: TrainedModel, rule: SmearRule, aggregator: MILAggregator | None, frozen: FrozenSet, *,
                    batch_size: int = 32, confidence: float = 0.95, n_resamples: int = 2000,
                    seed: int = 0) -> dict[str, Any]:
    """Cell accuracy on the test cells; smear AUC of the rule's score and sensitivity/specificity at the rule's
    own threshold, with the model's own rule (`SmearRule.classify`) on the evaluation smears.

    Raises SmearnetError when the model cannot classify this data (other classes).
    """
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


def explained_smears_html(model: TrainedModel, rule: SmearRule, aggregator: MILAggregator | None, frozen: FrozenSet,
                          title: str, n_per_class: int = 2) -> str:
    """An HTML page (`smearnet.explain`) of a few blind evaluation smears, positive and negative, as the model
    calls them: what the MLflow UI shows of what the model looks at. Smears are named by their place on the page
    ("blind smear 1", ...), cells by rank: no pseudonym and no file name, as an MLflow run keeps those out."""
    smears = frozen.smears
    keys = sorted(set(frozen.sensitivity_smears or smears["smear_key"]))
    truth = (smears["label"] == rule.positive_class).groupby(smears["smear_key"]).any()
    chosen = [key for value in (True, False) for key in [k for k in keys if bool(truth[k]) == value][:n_per_class]]
    names = {key: f"blind smear {place}" for place, key in enumerate(chosen, start=1)}
    cells = smears[smears["smear_key"].isin(chosen)]
    explained = explain_cells(model, rule, aggregator, cells[["path"]].assign(smear_id=cells["smear_key"].map(names)),
                              name_cells=False)
    return smear_report_html(explained, title=f"{title}: blind smears as this version calls them",
                             model=f"{model.name} ({rule.describe()})", positive_class=rule.positive_class)


__all__ = ["FrozenSet", "evaluate_frozen", "explained_smears_html", "frozen_set", "training_patients"]
