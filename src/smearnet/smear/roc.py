"""Smear-level ROC, thresholds and the evaluation of a score over a set of smears.

Conventions (stated once, used everywhere):

* ``classify`` calls a smear positive when ``score >= threshold``.  The paper says "above" 2%; we use ``>=``
  so that a smear with exactly 2% positive cells is positive under a 2% threshold, matching the ROC
  convention (point i calls positive every score >= thresholds[i]).
* Youden threshold: among observed scores with the same (maximal) TPR - FPR the *lowest* is chosen (the most
  sensitive; missing a positive smear is the costlier error in screening), and the threshold returned is
  halfway between it and the next lower observed score, so perfectly separated classes get a threshold
  strictly between them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve
from sklearn.model_selection import StratifiedKFold

from smearnet.errors import SmearnetError
from smearnet.evaluation.metrics import binary_counts, binary_summary, bootstrap_interval
from smearnet.io import json_safe

NAN = float("nan")
THRESHOLD_RULES = ("youden", "fixed")
THRESHOLD_SELECTIONS = ("same", "held_out", "cross_validated")
SAME_NOTE = (
    "Threshold chosen on all smears and scored on the same smears (the paper's procedure): "
    "the confusion and its rates are optimistic; use held_out or cross_validated for a blind estimate."
)

# --- ROC, threshold, classification ---------------------------------------------------------


def _scores_and_truth(scores: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    score_values = np.asarray(scores, dtype=np.float64)
    truth_values = np.asarray(truth, dtype=bool)
    if score_values.ndim != 1 or score_values.shape != truth_values.shape:
        raise SmearnetError(
            f"Scores and truth must be 1-D and of equal length; got {score_values.shape} and {truth_values.shape}.",
            "Pass one score and one truth value per smear.",
        )
    if not np.all(np.isfinite(score_values)):
        raise SmearnetError(
            "Smear scores contain NaN or infinite values (NaN marks a smear without cells).",
            "Drop empty smears (n_cells == 0) before computing ROC or thresholds; smear_evaluation does this.",
        )
    return score_values, truth_values


def _require_both_classes(truth: np.ndarray, minimum: int, purpose: str) -> None:
    n_positive, n_negative = int(truth.sum()), int((~truth).sum())
    if n_positive < minimum or n_negative < minimum:
        raise SmearnetError(
            f"{purpose} needs at least {minimum} positive and {minimum} negative smear(s); "
            f"got {n_positive} positive and {n_negative} negative.",
            "Evaluate on more smears, or choose a threshold_selection mode that needs fewer "
            "(same < held_out < cross_validated with fewer folds).",
        )


def _rank_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """AUC as the Mann-Whitney statistic: P(positive score > negative score) + P(tie) / 2.

    Equals sklearn's ``roc_auc_score`` (tested) at a small fraction of its cost, which
    matters inside the bootstrap.
    """
    positive_scores, negative_scores = scores[truth], np.sort(scores[~truth])
    if positive_scores.size == 0 or negative_scores.size == 0:
        return NAN
    below = np.searchsorted(negative_scores, positive_scores, side="left")
    below_or_tied = np.searchsorted(negative_scores, positive_scores, side="right")
    return float((below.sum() + below_or_tied.sum()) / (2.0 * positive_scores.size * negative_scores.size))


def roc_points(scores: Any, truth: Any) -> dict[str, Any]:
    """ROC curve ``{"fpr", "tpr", "thresholds", "auc"}`` (lists and a float).

    Point i is obtained by calling positive every score >= thresholds[i]; thresholds are
    decreasing, the first is ``inf`` (nothing positive, sklearn's convention).
    """
    score_values, truth_values = _scores_and_truth(scores, truth)
    _require_both_classes(truth_values, 1, "A ROC curve")
    fpr, tpr, thresholds = roc_curve(truth_values, score_values, drop_intermediate=False)
    return {
        "fpr": [float(value) for value in fpr],
        "tpr": [float(value) for value in tpr],
        "thresholds": [float(value) for value in thresholds],
        "auc": _rank_auc(score_values, truth_values),
    }


def auc_interval(
    scores: Any,
    truth: Any,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, resampling positives and negatives separately."""
    score_values, truth_values = _scores_and_truth(scores, truth)
    _require_both_classes(truth_values, 1, "An AUC interval")
    return bootstrap_interval(
        _rank_auc,
        (score_values, truth_values),
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
        stratify=truth_values,
    )


def _check_rule(rule: str) -> None:
    if rule not in THRESHOLD_RULES:
        raise SmearnetError(
            f"Unknown threshold rule {rule!r}; allowed rules are {list(THRESHOLD_RULES)}.",
            "Set rule to 'youden' (chosen on the ROC curve) or 'fixed' (with fixed=0.02 as in the paper).",
        )


def select_threshold(scores: Any, truth: Any, rule: str = "youden", *, fixed: float = 0.02) -> float:
    """Smear threshold by ``rule``.

    ``"youden"``: maximise TPR - FPR over the observed scores (ties: the lowest such score,
    i.e. the most sensitive), then return the midpoint between that score and the next
    lower observed score (the score itself if none is lower).  The midpoint classifies the
    selection smears exactly as the optimal observed score does, but does not sit on a
    positive smear's score, so blind smears slightly below it are not missed by construction.
    ``"fixed"``: returns ``fixed`` (the paper's 2%).
    """
    _check_rule(rule)
    if rule == "fixed":
        return float(fixed)
    score_values, truth_values = _scores_and_truth(scores, truth)
    _require_both_classes(truth_values, 1, "Choosing a Youden threshold")
    fpr, tpr, thresholds = roc_curve(truth_values, score_values, drop_intermediate=False)
    youden = tpr - fpr
    best = int(np.flatnonzero(np.isclose(youden, youden.max(), rtol=0.0, atol=1e-12)).max())  # lowest threshold
    if best + 1 < len(thresholds):
        return float((thresholds[best] + thresholds[best + 1]) / 2.0)
    return float(thresholds[best])


def classify(scores: Any, threshold: float) -> np.ndarray:
    """Boolean calls: positive when ``score >= threshold`` (see the module docstring)."""
    score_values = np.asarray(scores, dtype=np.float64)
    if np.any(np.isnan(score_values)):
        raise SmearnetError(
            "Cannot classify NaN smear scores (NaN marks a smear without cells).",
            "Drop empty smears (n_cells == 0) first.",
        )
    return score_values >= threshold


# --- evaluation -----------------------------------------------------------------------------


def _stratified_selection_mask(truth: np.ndarray, selection_fraction: float, seed: int) -> np.ndarray:
    """True for smears in the threshold-selection part; each part gets >= 1 smear of each class."""
    rng = np.random.default_rng(seed)
    in_selection = np.zeros(len(truth), dtype=bool)
    for value in (True, False):
        members = rng.permutation(np.flatnonzero(truth == value))
        n_selected = min(max(int(round(selection_fraction * len(members))), 1), len(members) - 1)
        in_selection[members[:n_selected]] = True
    return in_selection


def smear_evaluation(
    table: pd.DataFrame,
    score: str = "share_predicted_positive",
    *,
    rule: str = "youden",
    fixed: float = 0.02,
    threshold_selection: str = "held_out",
    selection_fraction: float = 0.5,
    folds: int = 5,
    seed: int = 0,
    confidence: float = 0.95,
    n_resamples: int = 2000,
) -> dict[str, Any]:
    """Smear-level ROC, threshold and blind classification; JSON-serialisable.

    ``threshold_selection``:

    * ``"same"``: threshold chosen on all smears, scored on the same (the paper's way;
      optimistic, the result carries a ``note``).  Needs >= 1 positive and >= 1 negative.
    * ``"held_out"``: stratified random split; the threshold is chosen on a
      ``selection_fraction`` part and the other part is classified blind.  Needs >= 2 of each.
      A ``part`` column (composed smears, ``smearnet.smear.compose.compose_smears``) decides instead:
      part 0 chooses, part 1 is blind; its parts never share a cell.
    * ``"cross_validated"``: stratified ``folds``-fold; each fold is classified with a
      threshold chosen on the other folds; confusion pooled.  Needs >= ``folds`` of each.
      ``threshold`` is then the one chosen on all smears (what one would deploy) and
      ``fold_thresholds`` lists those actually used.

    AUC (with a stratified bootstrap interval) and ROC points use all non-empty smears.
    Smears with NaN score (no cells) are excluded and counted.
    """
    if threshold_selection not in THRESHOLD_SELECTIONS:
        raise SmearnetError(
            f"Unknown threshold_selection {threshold_selection!r}; allowed are {list(THRESHOLD_SELECTIONS)}.",
            "Use 'held_out' or 'cross_validated' for a blind estimate, 'same' to reproduce the paper.",
        )
    _check_rule(rule)
    for column in (score, "truth_positive", "smear_id"):
        if column not in table.columns:
            raise SmearnetError(
                f"The smear table lacks column {column!r}; it has {list(table.columns)}.",
                "Build it with smear_table() and pass one of its score columns "
                "(share_predicted_positive or score_<name>).",
            )

    score_values = table[score].to_numpy(dtype=np.float64)
    empty = np.isnan(score_values)
    if "n_cells" in table.columns and np.any(empty & (table["n_cells"].to_numpy() > 0)):
        raise SmearnetError(
            f"Score {score!r} is NaN for smears that have cells.",
            "Recompute the smear table; only smears without cells may have NaN scores.",
        )
    excluded_ids = table.loc[empty, "smear_id"].tolist()
    kept = table.loc[~empty]
    scores = kept[score].to_numpy(dtype=np.float64)
    truth = kept["truth_positive"].to_numpy(dtype=bool)

    minimum = {"same": 1, "held_out": 2, "cross_validated": max(folds, 2)}[threshold_selection]
    _require_both_classes(truth, minimum, f"threshold_selection={threshold_selection!r}")

    result: dict[str, Any] = {
        "score": score,
        "rule": rule,
        "threshold_selection": threshold_selection,
        "n_smears": int(len(kept)),
        "n_positive_smears": int(truth.sum()),
        "n_negative_smears": int((~truth).sum()),
        "n_empty_smears_excluded": len(excluded_ids),
        "excluded_smear_ids": json_safe(list(excluded_ids)),
    }

    if threshold_selection == "same":
        threshold = select_threshold(scores, truth, rule, fixed=fixed)
        counts = binary_counts(truth, classify(scores, threshold))
        result.update(threshold=threshold, n_blind_smears=int(len(kept)), note=SAME_NOTE)
    elif threshold_selection == "held_out":
        if not 0.0 < selection_fraction < 1.0:
            raise SmearnetError(
                f"selection_fraction must lie strictly between 0 and 1; got {selection_fraction}.",
                "Use e.g. 0.5: half the smears choose the threshold, half are classified blind.",
            )
        if "part" in kept.columns:  # composed smears: parts are made of disjoint patients (compose_smears)
            in_selection = kept["part"].to_numpy() == 0
            _require_both_classes(truth[in_selection], 1, "The threshold-selection part")
            _require_both_classes(truth[~in_selection], 1, "The blind part")
        else:
            in_selection = _stratified_selection_mask(truth, selection_fraction, seed)
        threshold = select_threshold(scores[in_selection], truth[in_selection], rule, fixed=fixed)
        blind = ~in_selection
        counts = binary_counts(truth[blind], classify(scores[blind], threshold))
        result.update(
            threshold=threshold,
            selection_fraction=selection_fraction,
            n_selection_smears=int(in_selection.sum()),
            n_blind_smears=int(blind.sum()),
            blind_smear_ids=json_safe(list(kept.loc[blind, "smear_id"])),
        )
    else:
        if folds < 2:
            raise SmearnetError(f"cross_validated needs folds >= 2; got {folds}.", "Use e.g. folds=5.")
        predicted = np.zeros(len(truth), dtype=bool)
        fold_thresholds = []
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for selection_index, blind_index in splitter.split(scores.reshape(-1, 1), truth):
            fold_threshold = select_threshold(scores[selection_index], truth[selection_index], rule, fixed=fixed)
            predicted[blind_index] = classify(scores[blind_index], fold_threshold)
            fold_thresholds.append(fold_threshold)
        counts = binary_counts(truth, predicted)
        result.update(
            threshold=select_threshold(scores, truth, rule, fixed=fixed),
            fold_thresholds=fold_thresholds,
            folds=folds,
            n_blind_smears=int(len(kept)),
            fold_calls=dict(zip(map(str, kept["smear_id"]), map(bool, predicted))),  # each by its fold's threshold
        )

    roc = roc_points(scores, truth)
    auc_low, auc_high = auc_interval(scores, truth, n_resamples=n_resamples, confidence=confidence, seed=seed)
    result.update(
        auc={"value": roc["auc"], "low": auc_low, "high": auc_high},
        confusion=counts,
        binary_summary=binary_summary(counts, confidence),
        confidence=confidence,
        roc=roc,
    )
    return result

