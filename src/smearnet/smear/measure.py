"""The smear stage's measurement: a proposed rule's threshold chosen as configured, then the rule judged.

The aggregate stage proposes the rule (score, calibration, MIL aggregator, and a threshold chosen on
development smears).  ``measure_rule`` fixes the threshold (``development``: the proposed one, every
evaluation smear blind; ``held_out``/``cross_validated``/``same``: chosen on the evaluation smears as
``smear_evaluation`` describes) and classifies every smear through ``SmearRule.classify``, the call predict,
serving and the gate make, so the figures reported are those of the rule that ships.

Beside the overall figures: per site (``site_smear_metrics``) when the evaluation smears come from two or more
sites, and the positive class's cell calls on the evaluation cells (``positive_cell_metrics``) when the rule calls
cells at a threshold instead of the arg-max.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from smearnet.errors import SmearnetError
from smearnet.evaluation.metrics import binary_counts, binary_summary, per_site
from smearnet.smear.cell_threshold import positive_call_summary
from smearnet.smear.mil import MILAggregator
from smearnet.smear.roc import THRESHOLD_SELECTIONS, smear_evaluation
from smearnet.smear.rule import UNDETERMINED, SmearRule
from smearnet.smear.selection import score_aucs

SELECTIONS = ("development", *THRESHOLD_SELECTIONS)


@dataclass(frozen=True)
class RuleMeasurement:
    """The deployed rule, its evaluation (``smear_evaluation`` output) and every smear's call."""

    rule: SmearRule
    result: dict[str, Any]
    calls: pd.DataFrame
    blind_smear_ids: list[str]

    @property
    def threshold_on_blind(self) -> bool:
        """Whether the deployed threshold was chosen on the "blind" smears too (`same`, `cross_validated`)."""
        return self.result["threshold_selection"] in ("same", "cross_validated")

    @property
    def threshold_on_evaluation(self) -> bool:
        """Whether it was chosen on some of the evaluation smears (every selection but `development`)."""
        return self.result["threshold_selection"] != "development"


def probability_matrix(cells: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """The ``prob_<class>`` columns of a cell table, in the model's class order."""
    missing = [f"prob_{name}" for name in classes if f"prob_{name}" not in cells.columns]
    if missing:
        raise SmearnetError(f"The cell table lacks {missing}.", "write one prob_<class> column per model class.")
    return cells[[f"prob_{name}" for name in classes]].to_numpy(dtype=np.float64)


def measure_rule(proposed: SmearRule, cells: pd.DataFrame, classes: Sequence[str], *, selection: str,
                 embeddings: np.ndarray | None = None, aggregator: MILAggregator | None = None,
                 selection_fraction: float = 0.5, folds: int = 5, fixed: float = 0.02, seed: int = 0,
                 confidence: float = 0.95, n_resamples: int = 2000) -> RuleMeasurement:
    """Fix the threshold of ``proposed`` by ``selection`` and judge the rule on the smears of ``cells``.

    ``cells``: one row per cell with ``smear_id``, ``label``, ``prob_<class>`` (the engine's uncalibrated
    softmax) and, for composed smears, ``part`` (0 may choose a threshold, 1 is judged blind) and ``cell_index``
    (the same cell in several smears); with a ``site`` column, the result gains ``per_site`` (or
    ``per_site_note``) as ``site_smear_metrics`` says. With a cell threshold in the rule, it gains ``positive_cells``
    (``positive_cell_metrics``); with composed smears, ``composed_cell_reuse`` (``composed_cell_reuse``); and
    ``cell_count_auc``, the number of cells alone as a baseline (``cell_count_baseline``).
    """
    if selection not in SELECTIONS:
        raise SmearnetError(f"Unknown smear.threshold_selection {selection!r}.", f"use one of {', '.join(SELECTIONS)}.")
    probabilities = probability_matrix(cells, classes)
    table, _ = proposed.scores(cells["smear_id"], probabilities, classes, labels=cells["label"].to_numpy(),
                               embeddings=embeddings, aggregator=aggregator)
    if "part" in cells.columns:
        table["part"] = table["smear_id"].map(cells.groupby(cells["smear_id"].astype(str))["part"].first())
    common = {"seed": seed, "confidence": confidence, "n_resamples": n_resamples}
    if selection == "development":
        result = smear_evaluation(table, proposed.score, rule="fixed", fixed=proposed.threshold,
                                  threshold_selection="same", **common)
        result.pop("note", None)
        result.update(threshold_selection="development", rule=proposed.threshold_rule,
                      threshold=proposed.threshold)
        words, blind = proposed.threshold_from, table["smear_id"].tolist()
    else:
        result = smear_evaluation(table, proposed.score, rule=proposed.threshold_rule, fixed=fixed,
                                  threshold_selection=selection, selection_fraction=selection_fraction, folds=folds,
                                  **common)
        words = {"same": "chosen on every evaluation smear and judged on the same (optimistic)",
                 "held_out": f"{proposed.threshold_rule} on the selection half of the evaluation smears",
                 "cross_validated": f"{proposed.threshold_rule} on every evaluation smear (rates cross-validated)",
                 }[selection]
        blind = result.get("blind_smear_ids", table["smear_id"].tolist())
    rule = proposed.with_threshold(result["threshold"], words)
    calls, weights = rule.classify(cells["smear_id"], probabilities, classes, labels=cells["label"].to_numpy(),
                                   embeddings=embeddings, aggregator=aggregator)
    calls["blind"] = calls["smear_id"].isin(set(map(str, blind)))
    fold_calls = result.pop("fold_calls", None)
    if fold_calls is not None:  # cross_validated: a smear is judged blind by the threshold of the folds it was not in
        positive = calls["smear_id"].astype(str).map(fold_calls)
        calls["blind_call"] = np.where(positive.isna(), UNDETERMINED,
                                       np.where(positive.fillna(False).astype(bool), "positive", "negative"))
    if "part" in table.columns:
        calls["part"] = table["part"].to_numpy()
    result.pop("blind_smear_ids", None)
    result["deployed_rule"] = rule.to_dict()
    result.update(site_smear_metrics(calls, cells, confidence=confidence, n_resamples=n_resamples, seed=seed))
    result.update(positive_cell_metrics(rule, cells, classes, confidence=confidence))
    result.update(composed_cell_reuse(cells, calls))
    result.update(cell_count_baseline(table, proposed.score, **common))
    return RuleMeasurement(rule=rule, result=result, calls=calls, blind_smear_ids=[str(s) for s in blind])


def smear_sites(cells: pd.DataFrame) -> pd.Series:
    """Each smear's site (indexed by ``smear_id`` as text): its cells' site when they share one, None when they mix
    sites (a smear composed from test cells of several sites)."""
    return cells.groupby(cells["smear_id"].astype(str), sort=False)["site"].agg(
        lambda sites: sites.iloc[0] if sites.nunique() == 1 else None)


def site_smear_metrics(calls: pd.DataFrame, cells: pd.DataFrame, *, confidence: float = 0.95,
                       n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per site of the deployed rule's smears (``SmearRule.classify`` rows with ``truth_positive`` and ``blind``):
    ``{"per_site": {site: ...}}`` with the AUC of the rule's score over the site's non-empty smears (with its
    interval; NaN when the site lacks positive or negative smears, said in ``note``) and sensitivity and specificity
    of its calls on the site's blind smears, as the overall figures are taken (``blind_call``, each smear by the
    threshold of the folds it was not in, when the threshold was cross-validated).

    ``{}`` when ``cells`` has no ``site`` column or one site. When a smear mixes cells of several sites (composed
    smears), no smear has a site of its own to be judged in: ``{"per_site_note": ...}`` says so instead.
    """
    if "site" not in cells.columns or cells["site"].nunique() < 2:
        return {}
    site_of = calls["smear_id"].astype(str).map(smear_sites(cells))
    mixed = int(site_of.isna().sum())
    if mixed:
        return {"per_site_note": f"{mixed} of {len(calls)} evaluation smears mix cells of several sites (composed "
                                 f"from the test cells of {cells['site'].nunique()} sites): no per-site smear metrics."}

    def measure(rows: np.ndarray) -> dict[str, Any]:
        smears = calls[rows]
        auc = score_aucs(smears, ["score"], confidence=confidence, n_resamples=n_resamples, seed=seed)["score"]
        call = smears["blind_call"] if "blind_call" in smears else smears["call"]
        judged = smears["blind"].to_numpy(dtype=bool) & (call != UNDETERMINED).to_numpy()
        counts = binary_counts(smears.loc[judged, "truth_positive"].to_numpy(dtype=bool),
                               (call[judged] == "positive").to_numpy())
        summary = binary_summary(counts, confidence)
        entry: dict[str, Any] = {
            "n_smears": auc["n_positive"] + auc["n_negative"], "n_positive_smears": auc["n_positive"],
            "n_negative_smears": auc["n_negative"], "auc": {key: auc[key] for key in ("value", "low", "high")},
            "n_blind_smears": len(judged), "confusion": counts,
            "sensitivity": summary["sensitivity"], "specificity": summary["specificity"]}
        lacking = [kind for kind, n in (("positive", auc["n_positive"]), ("negative", auc["n_negative"])) if n == 0]
        if lacking:
            entry["note"] = (f"no {' and no '.join(lacking)} smears at this site: AUC undefined, "
                             + " and ".join({"positive": "sensitivity", "negative": "specificity"}[kind]
                                            for kind in lacking) + " undefined.")
        return entry

    return {"per_site": per_site(site_of.to_numpy(), measure)}


def cell_count_baseline(table: pd.DataFrame, score: str, *, confidence: float = 0.95, n_resamples: int = 2000,
                        seed: int = 0) -> dict[str, Any]:
    """``{"cell_count_auc": ...}``: the AUC, with its interval, of each smear's number of cells alone over the smears
    ``score`` is judged on (those it scores). Where positive smears hold more cells than negative ones (the paper's
    Table 5), a score that grows with the cells it sums (noisy-OR, expected positive count) gains from the count
    alone; the rule's AUC above this baseline is what its cell calls add. ``{}`` without ``n_cells`` or without
    smears of both classes."""
    if "n_cells" not in table.columns:
        return {}
    scored = table[np.isfinite(table[score].to_numpy(dtype=np.float64))]
    auc = score_aucs(scored, ["n_cells"], confidence=confidence, n_resamples=n_resamples, seed=seed)["n_cells"]
    if not np.isfinite(auc["value"]):
        return {}
    return {"cell_count_auc": {key: auc[key] for key in ("value", "low", "high", "n_positive", "n_negative")}}


def composed_cell_reuse(cells: pd.DataFrame, calls: pd.DataFrame) -> dict[str, Any]:
    """``{"composed_cell_reuse": ...}`` for smears composed from test cells (``cell_index`` names each drawn cell):
    how many distinct cells the blind smears drew on and how often each was drawn. Composed smears share cells, so
    one misread cell recurs in many smears and the blind counts are not independent smears: their Wilson intervals
    are too narrow. ``{}`` for real smears."""
    if "cell_index" not in cells.columns:
        return {}
    blind_ids = set(calls.loc[calls["blind"].to_numpy(dtype=bool), "smear_id"].astype(str))
    drawn = cells.loc[cells["smear_id"].astype(str).isin(blind_ids), "cell_index"]
    if drawn.empty:
        return {}
    draws = drawn.value_counts()
    return {"composed_cell_reuse": {
        "blind_smears": len(blind_ids), "distinct_cells": int(len(draws)), "cell_draws": int(draws.sum()),
        "mean_draws_per_cell": round(float(draws.mean()), 2), "max_draws_per_cell": int(draws.max()),
        "note": "composed smears share cells: a misread cell recurs in every smear that draws it, so the blind "
                "counts are not independent smears and their intervals are too narrow."}}


def positive_cell_metrics(rule: SmearRule, cells: pd.DataFrame, classes: Sequence[str], *,
                          confidence: float = 0.95) -> dict[str, Any]:
    """``{"positive_cells": ...}``: the positive class's cell calls on the evaluation cells (each cell once:
    composed smears reuse cells, named by ``cell_index``), at the rule's cell threshold and, to compare, arg-max:
    sensitivity and precision with intervals, F1 and counts (``positive_call_summary``).

    ``{}`` when the rule calls cells by arg-max (the overall smear figures already are), or when the cells carry no
    labels of the model's classes to judge the calls by.
    """
    if rule.cell_threshold is None or "label" not in cells.columns:
        return {}
    distinct = cells.drop_duplicates("cell_index") if "cell_index" in cells.columns else cells
    labels = distinct["label"].astype(str)
    if distinct.empty or not labels.isin(list(classes)).all():
        return {}
    probabilities = probability_matrix(distinct, classes)
    truth = (labels == rule.positive_class).to_numpy()
    at_threshold = rule.cell_calls(probabilities, classes) == rule.positive_class
    at_argmax = replace(rule, cell_threshold=None).cell_calls(probabilities, classes) == rule.positive_class
    return {"positive_cells": {"class": rule.positive_class, "cell_threshold": rule.cell_threshold,
                               "at_cell_threshold": positive_call_summary(at_threshold, truth, confidence),
                               "at_argmax": positive_call_summary(at_argmax, truth, confidence)}}
