"""Cell-level evaluation of the selected model on the test split."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smearnet.io import write_text
from smearnet.models.inference import TrainedModel, predict_probabilities, predictions_table
from smearnet.errors import SmearnetError
from smearnet.evaluation.metrics import bootstrap_interval, cell_metrics, macro_f1_score, mix_accuracy, per_site
from smearnet.evaluation.report import interval_text
from smearnet.evaluation.plots import confusion_matrix_png

SITES_REPORT = "per_site.md"
"""The evaluate stage's per-site table, written beside the confusion matrices when the test cells span sites."""


def evaluate_cells(model: TrainedModel, cells: pd.DataFrame, positive_class: str, *, batch_size: int,
                   confidence: float, n_resamples: int, out_dir: Path,
                   class_mix: Mapping[str, float] | None = None) -> tuple[dict, pd.DataFrame]:
    """Predict every cell, compute the cell metrics (`cell_evaluation`; `n_resamples` bootstrap resamples for the
    macro-F1 interval) and draw the confusion matrices into `out_dir`, plus `per_site.md` when the cells come from
    two or more sites."""
    check_class_mix(class_mix, model.classes)  # a bad mix stops before any cell is predicted
    probabilities = predict_probabilities(model, cells, batch_size=batch_size, desc="evaluate")
    table = predictions_table(cells, probabilities, model.classes)
    metrics = cell_evaluation(cells, probabilities, model.classes, positive_class, confidence=confidence,
                              n_resamples=n_resamples, class_mix=class_mix)
    matrix = metrics["confusion_matrix"]
    confusion_matrix_png(matrix, model.classes, out_dir / "confusion.png", title=f"{model.name}: test cells")
    confusion_matrix_png(matrix, model.classes, out_dir / "confusion_normalised.png", normalise=True,
                         title=f"{model.name}: test cells, row-normalised")
    if "per_site" in metrics:
        write_text(per_site_markdown(metrics["per_site"], positive_class, confidence), out_dir / SITES_REPORT)
    return metrics, table


def cell_evaluation(cells: pd.DataFrame, probabilities: np.ndarray, classes: Sequence[str], positive_class: str, *,
                    confidence: float, n_resamples: int, class_mix: Mapping[str, float] | None = None
                    ) -> dict[str, Any]:
    """`cell_metrics` of every cell (`cells` row-aligned with `probabilities`); when the cells carry `patient_id`,
    `accuracy_by_patient` and `macro_f1_by_patient` (`patient_interval`: their intervals resample whole patients);
    when the cells' `site` column names two or more sites, `per_site` (`site_cell_metrics`); and with a
    `class_mix`, `accuracy_at_class_mix` (`class_mix_accuracy`)."""
    y_true = class_indices(cells["label"], classes)
    y_pred = np.asarray(probabilities).argmax(1)
    metrics = cell_metrics(y_true, probabilities, list(classes), positive_class, confidence, n_resamples=n_resamples)
    if class_mix:
        metrics["accuracy_at_class_mix"] = class_mix_accuracy(y_true, y_pred, classes, class_mix,
                                                              confidence=confidence)
    if "patient_id" in cells.columns:
        metrics.update(patient_intervals(y_true, y_pred, cells["patient_id"].to_numpy(), len(classes),
                                         confidence=confidence, n_resamples=n_resamples))
    sites = site_cell_metrics(cells, y_true, probabilities, classes, positive_class, confidence=confidence,
                              n_resamples=n_resamples)
    return {**metrics, "per_site": sites} if sites else metrics


def check_class_mix(class_mix: Mapping[str, float] | None, classes: Sequence[str]) -> None:
    """`evaluation.class_mix` names only the model's classes, with non-negative weights that do not all vanish."""
    if not class_mix:
        return
    unknown = sorted(set(class_mix) - set(classes))
    weights = [float(weight) for weight in class_mix.values()]
    if unknown or min(weights) < 0 or sum(weights) <= 0:
        raise SmearnetError(f"evaluation.class_mix must weigh the model's classes {list(classes)} with non-negative "
                            f"numbers, not all zero; got {dict(class_mix)}"
                            + (f" (not classes of the model: {unknown})" if unknown else "") + ".",
                            "e.g. -S 'evaluation.class_mix={ig: 1895, neutrophil: 2329}' (counts or shares; a class "
                            "left out weighs 0), or null for none.")


def class_mix_accuracy(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], class_mix: Mapping[str, float],
                       *, confidence: float) -> dict[str, Any]:
    """Accuracy if the cells came in `class_mix` (counts or shares a class; unnamed classes weigh 0) and each class
    were recalled as on these cells (`metrics.mix_accuracy`, Jeffreys interval a class). A balanced test split
    says little about a clinic whose cells are mostly one or two classes: this weighs its weak classes as they
    would weigh there."""
    check_class_mix(class_mix, classes)
    weighed = [name for name in classes if float(class_mix.get(name, 0.0)) > 0]
    totals = {name: int((y_true == classes.index(name)).sum()) for name in weighed}
    untested = [name for name, total in totals.items() if total == 0]
    if untested:
        raise SmearnetError(f"evaluation.class_mix weighs {untested}, which have no test cells: their recall is "
                            "unknown.", "Give them weight 0, or test cells.")
    correct = {name: int(((y_true == classes.index(name)) & (y_pred == classes.index(name))).sum()) for name in weighed}
    result = mix_accuracy(correct, totals, {name: float(class_mix[name]) for name in weighed}, confidence=confidence)
    return {**result, "mix": {name: float(class_mix[name]) for name in weighed},
            "method": "recall a class weighted by the mix; Jeffreys interval a class"}


def patient_interval(statistic: Callable[[np.ndarray, np.ndarray], float], y_true: np.ndarray, y_pred: np.ndarray,
                     patients: np.ndarray, *, confidence: float, n_resamples: int) -> dict[str, Any]:
    """`statistic(y_true, y_pred)` with a percentile bootstrap interval that resamples whole patients: a patient's
    cells are not independent, so with few patients an interval over cells is too narrow."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    low, high = bootstrap_interval(statistic, (y_true, y_pred), clusters=patients, n_resamples=n_resamples,
                                   confidence=confidence)
    return {"value": float(statistic(y_true, y_pred)) if len(y_true) else float("nan"), "low": low, "high": high,
            "patients": int(len(np.unique(patients))), "method": "percentile bootstrap over patients"}


def patient_accuracy_interval(y_true: np.ndarray, y_pred: np.ndarray, patients: np.ndarray, *, confidence: float,
                              n_resamples: int) -> dict[str, Any]:
    """Accuracy with `patient_interval`'s interval over whole patients."""
    return patient_interval(_accuracy, y_true, y_pred, patients, confidence=confidence, n_resamples=n_resamples)


def patient_intervals(y_true: np.ndarray, y_pred: np.ndarray, patients: np.ndarray, num_classes: int, *,
                      confidence: float, n_resamples: int) -> dict[str, dict[str, Any]]:
    """`accuracy_by_patient` and `macro_f1_by_patient` of class indices: each with `patient_interval`'s interval
    over whole patients."""
    return {"accuracy_by_patient": patient_accuracy_interval(y_true, y_pred, patients, confidence=confidence,
                                                             n_resamples=n_resamples),
            "macro_f1_by_patient": patient_interval(partial(macro_f1_score, num_classes=num_classes), y_true, y_pred,
                                                    patients, confidence=confidence, n_resamples=n_resamples)}


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def site_cell_metrics(cells: pd.DataFrame, y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str],
                      positive_class: str, *, confidence: float, n_resamples: int) -> dict[str, dict[str, Any]]:
    """Per site (`smearnet.evaluation.metrics.per_site` over the `site` column): its cells and patients (counts
    only), accuracy and macro-F1 with their intervals and the positive class's sensitivity and precision, each
    taken from `cell_metrics` of the site's cells. `{}` with fewer than two sites."""
    patients = cells["patient_id"].to_numpy() if "patient_id" in cells.columns else None
    y_true, probabilities = np.asarray(y_true), np.asarray(probabilities)

    def measure(rows: np.ndarray) -> dict[str, Any]:
        site = cell_metrics(y_true[rows], probabilities[rows], list(classes), positive_class, confidence,
                            n_resamples=n_resamples)
        positive = site["positive"]
        return {"n_cells": site["n_cells"],
                **({"n_patients": len(set(patients[rows]))} if patients is not None else {}),
                "accuracy": site["accuracy"], "macro_f1": site["macro_f1"],
                "positive": {"class": positive["class"], "counts": positive["counts"],
                             "sensitivity": positive["sensitivity"], "precision": positive["precision"]}}

    return per_site(cells["site"].to_numpy() if "site" in cells.columns else None, measure)


def per_site_markdown(sites: Mapping[str, Mapping[str, Any]], positive_class: str, confidence: float) -> str:
    """The per-site cell metrics (`site_cell_metrics`) as a Markdown table."""
    lines = [
        "# Test cells by site",
        "",
        f"Intervals at {confidence:.0%}; sensitivity and precision of **{positive_class}** against the other classes "
        "(arg-max calls).",
        "",
        "| site | cells | patients | accuracy | macro-F1 | sensitivity | precision |",
        "|---|---|---|---|---|---|---|",
    ]
    for site, entry in sites.items():
        positive = entry["positive"]
        lines.append(f"| {site} | {entry['n_cells']} | {entry.get('n_patients', 'n/a')} | "
                     f"{interval_text(entry['accuracy'])} | {interval_text(entry['macro_f1'])} | "
                     f"{interval_text(positive['sensitivity'])} | {interval_text(positive['precision'])} |")
    return "\n".join(lines) + "\n"


def class_indices(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Class names to indices into `classes`."""
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[label] for label in labels], dtype=int)
