"""Cell-level metrics: confidence intervals, binary summaries and multiclass scores.

Pure functions: arrays in, plain Python values out (ints, floats, lists, dicts), so every
result can be written with ``json.dump``.  Undefined quantities (a rate whose denominator
is zero) are ``float('nan')``; `smearnet.io.write_json` writes them as ``null`` (strict JSON).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_stat_scores,
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from smearnet.errors import SmearnetError

NAN = float("nan")
TORCHMETRICS_DECIMALS = 6
"""torchmetrics computes rates in float32; results are rounded to this many decimals to drop float32 noise."""


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise SmearnetError(
            f"The confidence level must lie strictly between 0 and 1; got {confidence}.",
            "Use e.g. 0.95 for a 95% interval.",
        )


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; ``(nan, nan)`` when ``total == 0``."""
    _check_confidence(confidence)
    if total < 0 or successes < 0 or successes > total:
        raise SmearnetError(
            f"A proportion needs 0 <= successes <= total; got {successes}/{total}.",
            "Pass counts, not rates.",
        )
    if total == 0:
        return (NAN, NAN)
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    proportion = successes / total
    z2_over_n = z * z / total
    centre = (proportion + z2_over_n / 2.0) / (1.0 + z2_over_n)
    half_width = (z / (1.0 + z2_over_n)) * math.sqrt(
        proportion * (1.0 - proportion) / total + z2_over_n / (4.0 * total)
    )
    return (max(0.0, centre - half_width), min(1.0, centre + half_width))


def accuracy_interval(accuracy: float, cells: int, confidence: float = 0.95) -> list[float] | None:
    """The Wilson interval of an accuracy measured on `cells` cells, to 4 decimals (None when there is none)."""
    if not cells or not math.isfinite(accuracy):
        return None
    return [round(bound, 4) for bound in wilson_interval(round(accuracy * cells), cells, confidence)]


def bootstrap_interval(
    statistic: Callable[..., float],
    arrays: tuple[np.ndarray, ...],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    stratify: np.ndarray | None = None,
    clusters: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)``.

    Rows are resampled jointly (the same indices for every array).  With ``stratify``,
    rows are resampled within each stratum, so every resample keeps the stratum sizes.
    With ``clusters`` (e.g. one patient id per cell), whole clusters are resampled with
    replacement instead of rows: cells of one patient are not independent, and an interval
    over them should be as wide as the number of patients makes it.
    Resamples where the statistic is nan (undefined) are skipped; if all are skipped the
    interval is ``(nan, nan)``.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise SmearnetError(f"n_resamples must be at least 1; got {n_resamples}.", "Use e.g. 2000.")
    if not arrays:
        raise SmearnetError("bootstrap_interval needs at least one array.", "Pass e.g. (y_true, y_pred).")
    columns = [np.asarray(array) for array in arrays]
    n_rows = len(columns[0])
    if any(len(column) != n_rows for column in columns):
        raise SmearnetError(
            f"Bootstrap arrays must have the same length; got {[len(c) for c in columns]}.",
            "Pass row-aligned arrays.",
        )
    if n_rows == 0:
        return (NAN, NAN)
    rng = np.random.default_rng(seed)
    if clusters is not None:
        clusters = np.asarray(clusters)
        if stratify is not None or len(clusters) != n_rows:
            raise SmearnetError(f"clusters needs one entry per row ({n_rows}) and no stratify; got {len(clusters)}.",
                                "Pass one cluster label (e.g. patient id) per row.")
        groups = [np.flatnonzero(clusters == value) for value in np.unique(clusters)]
        draws = rng.integers(0, len(groups), size=(n_resamples, len(groups)))
        resampled_rows = [np.concatenate([groups[g] for g in draw]) for draw in draws]
    else:
        strata = [np.arange(n_rows)]
        if stratify is not None:
            stratify = np.asarray(stratify)
            if len(stratify) != n_rows:
                raise SmearnetError(
                    f"stratify has {len(stratify)} entries but the arrays have {n_rows} rows.",
                    "Pass one stratum label per row.",
                )
            strata = [np.flatnonzero(stratify == value) for value in np.unique(stratify)]
        # one (n_resamples, n_rows) matrix of row indices, drawn within each stratum
        resampled_rows = np.concatenate(
            [stratum[rng.integers(0, len(stratum), size=(n_resamples, len(stratum)))] for stratum in strata], axis=1
        )
    values = np.array([statistic(*(column[rows] for column in columns)) for rows in resampled_rows], dtype=float)
    defined = values[np.isfinite(values)]
    if defined.size == 0:
        return (NAN, NAN)
    alpha = 1.0 - confidence
    low, high = np.quantile(defined, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(low), float(high))


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, *, clusters: np.ndarray | None = None,
                      confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Accuracy of b minus accuracy of a on the same cells (row-aligned 0/1 arrays of correct calls), with a
    percentile bootstrap interval that resamples the cells jointly, or whole `clusters` (e.g. patients): both arms
    are judged on every draw, so the interval is the difference's own. Where the arms err on the same cells it is
    much narrower than two separate intervals suggest; their overlap says nothing about the difference."""
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    low, high = bootstrap_interval(lambda x, y: float(np.mean(y) - np.mean(x)), (a, b), clusters=clusters,
                                   confidence=confidence, n_resamples=n_resamples, seed=seed)
    value = float(np.mean(b) - np.mean(a)) if len(a) else NAN
    return {"value": value, "low": low, "high": high}


def mix_accuracy(correct: Mapping[str, int], totals: Mapping[str, int], mix: Mapping[str, float], *,
                 confidence: float = 0.95, draws: int = 20000, seed: int = 0) -> dict[str, float]:
    """Accuracy at another class mix than the one tested: each class's recall (`correct` of `totals`) weighted by
    `mix` (counts or shares a class), with an interval from each recall's Jeffreys posterior, Beta(k + 1/2,
    n - k + 1/2), drawn independently. For a balanced test split judged at a clinic's (or a dataset's) class mix: a
    class recalled perfectly still carries the uncertainty of its few cells, where a bootstrap would give it none."""
    _check_confidence(confidence)
    if set(mix) != set(totals) or set(correct) != set(totals):
        raise SmearnetError(f"mix_accuracy needs the same classes in correct, totals and mix; got {sorted(correct)}, "
                            f"{sorted(totals)}, {sorted(mix)}.", "Give every tested class a weight (0 drops it).")
    names = sorted(totals)
    k, n = (np.array([int(counts[name]) for name in names]) for counts in (correct, totals))
    weights = np.array([float(mix[name]) for name in names])
    if (n <= 0).any() or (k < 0).any() or (k > n).any() or (weights < 0).any() or weights.sum() <= 0:
        raise SmearnetError("mix_accuracy needs 0 <= correct <= total, total > 0 and non-negative weights that do "
                            "not all vanish.", "Pass counts per class and a class mix.")
    weights = weights / weights.sum()
    samples = np.random.default_rng(seed).beta(k[:, None] + 0.5, n[:, None] - k[:, None] + 0.5,
                                                size=(len(names), draws))
    low, high = np.quantile(weights @ samples, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return {"value": float(weights @ (k / n)), "low": float(low), "high": float(high)}


def binary_counts(truth_positive: np.ndarray, predicted_positive: np.ndarray) -> dict[str, int]:
    """Confusion counts ``{"tp", "fp", "tn", "fn"}`` of two boolean arrays."""
    truth = np.asarray(truth_positive, dtype=bool)
    predicted = np.asarray(predicted_positive, dtype=bool)
    if truth.shape != predicted.shape or truth.ndim != 1:
        raise SmearnetError(
            f"Truth and prediction must be 1-D arrays of equal length; got shapes {truth.shape} and {predicted.shape}.",
            "Pass one boolean per item.",
        )
    if truth.size == 0:
        return {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    tp, fp, tn, fn, _support = binary_stat_scores(
        torch.from_numpy(predicted.astype(np.int64)), torch.from_numpy(truth.astype(np.int64))
    ).tolist()
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def _rate(successes: int, total: int, confidence: float) -> dict[str, float]:
    low, high = wilson_interval(successes, total, confidence)
    return {"value": successes / total if total else NAN, "low": low, "high": high}


def binary_summary(counts: dict[str, int], confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """Sensitivity, specificity, precision, NPV and accuracy, each with a Wilson interval.

    Each entry is ``{"value", "low", "high"}``; a rate with a zero denominator is nan.
    """
    missing = {"tp", "fp", "tn", "fn"} - set(counts)
    if missing:
        raise SmearnetError(f"Binary counts are missing {sorted(missing)}.", "Build them with binary_counts().")
    tp, fp, tn, fn = (int(counts[key]) for key in ("tp", "fp", "tn", "fn"))
    return {
        "sensitivity": _rate(tp, tp + fn, confidence),
        "specificity": _rate(tn, tn + fp, confidence),
        "precision": _rate(tp, tp + fp, confidence),
        "npv": _rate(tn, tn + fn, confidence),
        "accuracy": _rate(tp + tn, tp + fp + tn + fn, confidence),
    }


def _rounded(value: float) -> float:
    return round(float(value), TORCHMETRICS_DECIMALS)


def macro_f1_score(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Macro F1 over the classes that occur in truth or prediction (torchmetrics semantics)."""
    score = multiclass_f1_score(
        torch.from_numpy(y_pred),
        torch.from_numpy(y_true),
        num_classes=num_classes,
        average="macro",
        validate_args=False,
    )
    return _rounded(score)


def _floats(values: Sequence[float] | np.ndarray) -> list[float]:
    return [float(value) for value in values]


def per_cell_arrays(scores: Any, labels: Any, *, what: str, n_classes: int | None, empty: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`scores` as a float array of one row per cell and one column per class (`n_classes`, or at least 2 when
    None) and `labels` as one integer class index per cell; raises SmearnetError naming `what` otherwise
    (`empty` is the fix when there are no cells)."""
    values, targets = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    wrong_columns = values.shape[-1] != n_classes if n_classes else values.shape[-1] < 2
    if values.ndim != 2 or wrong_columns:
        raise SmearnetError(f"The {what} must have shape (n_cells, {n_classes or 'n_classes >= 2'}); got "
                            f"{values.shape}.", f"pass one row of class {what} per cell, in the model's class order.")
    if targets.ndim != 1 or len(targets) != len(values):
        raise SmearnetError(f"Got {len(values)} rows of {what} but labels of shape {targets.shape}.",
                            "pass one true class index per cell.")
    if len(values) == 0:
        raise SmearnetError(f"No cells: the {what} are empty.", empty)
    if not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0 or targets.max() >= values.shape[1]:
        raise SmearnetError(f"Labels must be integer class indices in [0, {values.shape[1] - 1}].",
                            "map class names to indices in the model's class order (class_names.index(name)).")
    return values, targets.astype(np.int64)


def cell_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    positive_class: str,
    confidence: float = 0.95,
    *,
    n_resamples: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Cell-level metrics of argmax predictions, JSON-serialisable.

    ``y_true`` holds class indices into ``class_names``; ``probabilities`` is ``(n, C)``.
    Per-class precision is nan for a class never predicted, recall nan for a class absent
    from the truth, F1 nan when both.  ``macro_f1`` averages F1 over the classes that occur
    in truth or prediction (torchmetrics' rule), with a percentile bootstrap interval.
    ``confusion_matrix`` holds counts (rows = truth, columns = predicted, in ``class_names``
    order); ``confusion_matrix_normalised`` divides each row by its total (nan rows for
    classes absent from the truth).  ``positive`` is the one-vs-rest summary for ``positive_class``, plus its counts.
    torchmetrics rates (float32) are rounded to ``TORCHMETRICS_DECIMALS`` decimals.
    """
    num_classes = len(class_names)
    probabilities, y_true = per_cell_arrays(probabilities, y_true, what="probabilities", n_classes=num_classes,
                                            empty="check that the evaluation split contains images and that "
                                                  "predictions were written.")
    if positive_class not in class_names:
        raise SmearnetError(
            f"Positive class {positive_class!r} is not one of {class_names}.",
            "Set positive_class to one of the configured class names.",
        )
    if not np.all(np.isfinite(probabilities)):
        raise SmearnetError("Probabilities contain NaN or infinite values.", "Check the model outputs.")

    y_true = y_true.astype(np.int64)
    y_pred = probabilities.argmax(axis=1).astype(np.int64)
    target, preds = torch.from_numpy(y_true), torch.from_numpy(y_pred)
    n_cells = len(y_true)

    counts = multiclass_confusion_matrix(preds, target, num_classes=num_classes).numpy()
    support = counts.sum(axis=1)
    predicted_count = counts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_normalised = np.where(support[:, None] > 0, counts / support[:, None], np.nan)

    per_class_kwargs = {"num_classes": num_classes, "average": None}
    precision = multiclass_precision(preds, target, **per_class_kwargs).double().numpy()
    recall = multiclass_recall(preds, target, **per_class_kwargs).double().numpy()
    f1 = multiclass_f1_score(preds, target, **per_class_kwargs).double().numpy()
    precision[predicted_count == 0] = np.nan
    recall[support == 0] = np.nan
    f1[(predicted_count == 0) & (support == 0)] = np.nan

    n_correct = int(np.trace(counts))
    accuracy = _rounded(multiclass_accuracy(preds, target, num_classes=num_classes, average="micro"))
    accuracy_low, accuracy_high = wilson_interval(n_correct, n_cells, confidence)
    macro_f1 = macro_f1_score(y_true, y_pred, num_classes)
    macro_low, macro_high = bootstrap_interval(
        lambda truth, predicted: macro_f1_score(truth, predicted, num_classes),
        (y_true, y_pred),
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
    )

    positive_index = class_names.index(positive_class)
    positive_counts = binary_counts(y_true == positive_index, y_pred == positive_index)
    return {
        "n_cells": n_cells,
        "class_names": list(class_names),
        "confidence": confidence,
        "accuracy": {"value": accuracy, "low": accuracy_low, "high": accuracy_high},
        "macro_f1": {"value": macro_f1, "low": _rounded(macro_low), "high": _rounded(macro_high)},
        "per_class": {
            name: {
                "precision": _rounded(precision[index]),
                "recall": _rounded(recall[index]),
                "f1": _rounded(f1[index]),
                "support": int(support[index]),
            }
            for index, name in enumerate(class_names)
        },
        "confusion_matrix": [[int(value) for value in row] for row in counts],
        "confusion_matrix_normalised": [_floats(row) for row in row_normalised],
        "positive": {
            "class": positive_class,
            "counts": positive_counts,
            **binary_summary(positive_counts, confidence),
        },
    }



def per_site(sites: Sequence[Any] | np.ndarray | None, measure: Callable[[np.ndarray], dict[str, Any]]
             ) -> dict[str, dict[str, Any]]:
    """``measure(rows)`` for the rows of each site (``rows`` a boolean mask over ``sites``), keyed by site name in
    sorted order; ``{}`` when ``sites`` is None or names fewer than two sites (the overall figures are then the
    site's own, and a one-site run reports nothing per site, so its metrics files do not change).

    The one place rows are grouped by site: callers pass the measurement (cell or smear metrics), never a copy
    of it restricted to a site.
    """
    if sites is None:
        return {}
    names = np.asarray([str(site) for site in sites], dtype=object)
    distinct = sorted(set(names))
    if len(distinct) < 2:
        return {}
    return {site: measure(names == site) for site in distinct}
