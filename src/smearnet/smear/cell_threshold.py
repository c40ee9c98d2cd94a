"""The cell threshold: when one cell counts as a positive call, fixed once on validation cells.

``smear.cell_threshold`` (read by the aggregate stage, the one place it is resolved into ``SmearRule.cell_threshold``):

* ``argmax`` (default, the paper's rule): a cell is positive when the positive class is its arg-max.
* ``validation``: the positive class's calibrated probability over the *validation* cells only decides. The
  threshold is the observed validation probability that maximises the positive-class F1 (2TP / (2TP + FP + FN));
  among thresholds with the same F1 the higher wins (fewer positive calls for the same F1). A cell is then positive
  when its calibrated probability is ``>=`` the threshold (``smearnet.smear.scores.cell_calls``).
* a number in (0, 1): that threshold.

Why F1 and not accuracy or Youden: the positive class is a few percent of hospital cells, so accuracy barely moves
when positive cells are missed, and the false-positive rate is diluted by the many negatives; F1 weighs missed
positive cells against false positive calls, the two errors a smear's share of positive cells is made of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from smearnet.errors import SmearnetError
from smearnet.evaluation.metrics import binary_counts, binary_summary

CELL_THRESHOLD_SETTINGS = ("argmax", "validation")
CRITERION = ("maximal positive-class F1 over the validation cells' calibrated probabilities "
             "(ties: the higher threshold)")


def check_cell_threshold_setting(value: Any) -> str | float:
    """``smear.cell_threshold`` as ``"argmax"``, ``"validation"`` or a float in (0, 1); raises SmearnetError else."""
    if isinstance(value, str) and value in CELL_THRESHOLD_SETTINGS:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 1:
        return float(value)
    raise SmearnetError(f"smear.cell_threshold must be argmax, validation or a number in (0, 1); got {value!r}.",
                        "set smear.cell_threshold: argmax (the paper), validation (chosen on validation cells) "
                        "or e.g. 0.2.")


def _positive_cells(probability: Any, truth_positive: Any) -> tuple[np.ndarray, np.ndarray]:
    values, truth = np.asarray(probability, dtype=np.float64), np.asarray(truth_positive, dtype=bool)
    if values.ndim != 1 or values.shape != truth.shape:
        raise SmearnetError(f"Cell probabilities and truth must be 1-D and of equal length; got {values.shape} and "
                            f"{truth.shape}.", "pass one positive-class probability and one truth value per cell.")
    if not np.all(np.isfinite(values)):
        raise SmearnetError("Cell probabilities contain NaN or infinite values.", "pass calibrated probabilities.")
    return values, truth


def positive_call_summary(called_positive: Any, truth_positive: Any, confidence: float = 0.95) -> dict[str, Any]:
    """The positive class's cell calls judged against the truth: cells, positive cells, counts, F1 and sensitivity
    and precision with Wilson intervals (``smearnet.evaluation.metrics.binary_summary``)."""
    counts = binary_counts(truth_positive, called_positive)
    summary = binary_summary(counts, confidence)
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return {"n_cells": sum(counts.values()), "n_positive_cells": tp + fn, "counts": counts,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
            "sensitivity": summary["sensitivity"], "precision": summary["precision"]}


def f1_cell_threshold(probability: Any, truth_positive: Any) -> float:
    """The observed positive probability whose calls (``p >= threshold``) have the highest positive-class F1;
    among equal F1 the highest such threshold. Needs at least one positive cell with a probability above 0."""
    values, truth = _positive_cells(probability, truth_positive)
    if not (truth & (values > 0)).any():
        raise SmearnetError(f"Choosing a cell threshold needs positive validation cells; got {int(truth.sum())} "
                            f"(with a positive probability: {int((truth & (values > 0)).sum())}).",
                            "give split.val positive patients, or set smear.cell_threshold: argmax or a number.")
    candidates = np.unique(values[values > 0])  # ascending
    n_called = len(values) - np.searchsorted(np.sort(values), candidates, side="left")
    n_true_calls = int(truth.sum()) - np.searchsorted(np.sort(values[truth]), candidates, side="left")
    f1 = 2 * n_true_calls / (n_called + truth.sum())
    best = int(np.flatnonzero(np.isclose(f1, f1.max(), rtol=0.0, atol=1e-12)).max())  # ties: the higher threshold
    return float(candidates[best])


@dataclass(frozen=True)
class CellThreshold:
    """The resolved ``smear.cell_threshold``: the rule's threshold (None: arg-max) and how it does on validation."""

    setting: str | float
    threshold: float | None
    validation: dict[str, Any] | None = None

    def metrics(self) -> dict[str, Any]:
        """``{"cell_threshold": ...}`` for metrics/aggregate.json; ``{}`` for arg-max, so its metrics do not change."""
        if self.threshold is None:
            return {}
        return {"cell_threshold": {
            "setting": self.setting, "value": self.threshold,
            "criterion": CRITERION if self.setting == "validation" else "set in smear.cell_threshold",
            "validation_cells": self.validation}}


def resolve_cell_threshold(setting: Any, positive_probability: Any, truth_positive: Any, *, validation: Any,
                           confidence: float = 0.95) -> CellThreshold:
    """The rule's cell threshold for ``smear.cell_threshold`` (``setting``), chosen (``validation``) and judged on
    the validation cells only.

    ``positive_probability`` is each cell's calibrated positive-class probability, ``truth_positive`` whether it is
    labelled positive and ``validation`` whether it is a validation cell; no other cell is read.
    """
    setting = check_cell_threshold_setting(setting)
    if setting == "argmax":
        return CellThreshold(setting=setting, threshold=None)
    values, truth = np.asarray(positive_probability), np.asarray(truth_positive)
    is_validation = np.asarray(validation, dtype=bool)
    if is_validation.ndim != 1 or len(is_validation) != len(values) or not is_validation.any():
        raise SmearnetError(f"The cell threshold needs validation cells; got a mask of shape {is_validation.shape} "
                            f"over {len(values)} cells with {int(is_validation.sum())} set.",
                            "give split.val a positive share.")
    values, truth = _positive_cells(values[is_validation], truth[is_validation])
    threshold = f1_cell_threshold(values, truth) if setting == "validation" else float(setting)
    return CellThreshold(setting=setting, threshold=threshold,
                         validation=positive_call_summary(values >= threshold, truth, confidence))
