"""Smear scores side by side, one chosen on development smears only (the aggregate stage).

The paper calls a smear positive when the share of its cells classified COVID-19 RL reaches
2%: a rule only as good as the cell classifier's false-positive rate.  This module compares
that share with the other pure scores of ``smearnet.smear`` (share of ``p >= 0.5``, mean
probability, top-3 mean, noisy-OR, expected positive count) and a gated-attention MIL
aggregator over frozen cell embeddings (``smearnet.smear.mil``), and chooses one.

**Development smears, composed.**  In the development cohort every patient has one class,
so a development smear is all-positive or all-negative and every score separates them: a
choice made there says nothing about smears that carry 1-3 positive cells among ~30.
``compose_bags`` therefore re-draws the development cells (validation and test splits)
into assessment-like smears: ``target_cells`` positive cells among ``cells_per_smear``
background cells, plus look-alike negatives (``lookalike_classes``, e.g. classic RL) in a
share of the smears of both classes.  Cells never leave their patient's fold: folds are
patient-grouped and stratified, and a fold's composed smears use only its patients' cells,
so the MIL aggregator of fold k never saw a cell of the smears it scores.

**Choice, by construction blind to the assessment.**  ``choose_score`` takes only the
development (out-of-fold) table; ``run_aggregation`` fixes the score, its threshold and
the final aggregator before the assessment cells are first read, by ``assess``.

**Simulation.**  ``simulate_smear_probabilities`` draws per-cell probabilities for such
smears from a stated cell-level confusion (sensitivity, false-positive rate of background
and of look-alike cells), to show where each score breaks (``benchmarks/smear_scores.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from smearnet.errors import SmearnetError
from smearnet.io import json_safe
from smearnet.evaluation.metrics import binary_counts, binary_summary
from smearnet.smear.mil import MILAggregator, MILConfig, train_mil
from smearnet.smear.compose import SmearDesign, compose_bags, design_from_config, plan_smear_mixes
from smearnet.smear.roc import auc_interval, classify, roc_points, select_threshold
from smearnet.smear.scores import MIL_SCORE, SCORE_DESCRIPTIONS, SCORES, smear_table

@dataclass(frozen=True)
class AggregateParams:
    """The ``aggregate`` section of the configuration."""

    design: SmearDesign = field(default_factory=SmearDesign)
    design_from: str = "smear.compose"  # where `design` comes from (`compose.design_fitted_to_smears`)
    smears_per_class: int = 100
    lookalike_classes: tuple[str, ...] = ("classic_rl",)
    mil: MILConfig = field(default_factory=MILConfig)
    folds: int = 5
    tie_tolerance: float = 0.01
    threshold_rule: str = "youden"
    fixed_threshold: float = 0.02
    bootstrap_resamples: int = 1000
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.smears_per_class < 2 or self.folds < 2 or self.bootstrap_resamples < 1:
            raise SmearnetError(
                f"aggregate needs smears_per_class >= 2, folds >= 2 and bootstrap_resamples >= 1; got "
                f"{self.smears_per_class}, {self.folds}, {self.bootstrap_resamples}.",
                "Use the defaults in conf/config.yaml.",
            )
        if not 0.0 <= self.tie_tolerance < 0.5:
            raise SmearnetError(f"aggregate.tie_tolerance must lie in [0, 0.5); got {self.tie_tolerance}.",
                                "Use e.g. 0.01 (AUCs this close count as tied).")

    @classmethod
    def from_config(cls, aggregate: Mapping[str, Any], compose: Mapping[str, Any], confidence: float,
                    threshold_rule: str = "youden", fixed_threshold: float = 0.02) -> AggregateParams:
        """From the `aggregate` section and the one composition model, `smear.compose`."""
        design, smears_per_class, lookalikes = design_from_config(compose)
        return cls(
            design=design, smears_per_class=smears_per_class, lookalike_classes=lookalikes,
            mil=MILConfig.from_mapping(aggregate["mil"]),
            folds=int(aggregate["folds"]),
            tie_tolerance=float(aggregate["tie_tolerance"]),
            threshold_rule=str(threshold_rule),
            fixed_threshold=float(fixed_threshold),
            bootstrap_resamples=int(aggregate["bootstrap_resamples"]),
            confidence=float(confidence),
        )


# --- smear mixes, simulation ------------------------------------------------------------------



# --- development and assessment cells ----------------------------------------------------------


@dataclass(frozen=True)
class CellSet:
    """Row-aligned cells and their embeddings.

    ``cells`` has ``smear_id``, ``patient_id``, ``label``, ``predicted`` and
    ``prob_<positive_class>`` (calibrated); ``embeddings`` is ``(n_cells, d)``.
    """

    cells: pd.DataFrame
    embeddings: np.ndarray

    def __post_init__(self) -> None:
        missing = {"smear_id", "patient_id", "label", "predicted"} - set(self.cells.columns)
        if missing:
            raise SmearnetError(f"The cell table lacks column(s) {sorted(missing)}.",
                                "Build it with smearnet.models.inference.predictions_table plus a patient_id column.")
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.cells):
            raise SmearnetError(
                f"Got {len(self.cells)} cells but embeddings of shape {self.embeddings.shape}.",
                "Pass one embedding row per cell, in the cell table's order.",
            )

    def subset(self, rows: np.ndarray) -> CellSet:
        """The cells at boolean mask or positions ``rows``."""
        positions = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        return CellSet(self.cells.iloc[positions].reset_index(drop=True), self.embeddings[positions])


def development_folds(cells: pd.DataFrame, positive_class: str, folds: int, seed: int) -> tuple[np.ndarray, str]:
    """Fold index per cell and the grouping unit.

    Patients (positive when any of their cells is) are split by a stratified K-fold with
    ``K = min(folds, positive patients, negative patients)``, so every held-out fold has a
    patient of each class.  With fewer than 2 patients of a class, cells are folded instead
    (unit ``"cell"``: leakier, reported as such).
    """
    is_positive_cell = (cells["label"] == positive_class).to_numpy()
    # In order of first appearance: patient ids are pseudonyms, and the folds must not depend on their key.
    patient_positive = pd.Series(is_positive_cell).groupby(cells["patient_id"].to_numpy(), sort=False).any()
    n_positive, n_negative = int(patient_positive.sum()), int((~patient_positive).sum())
    n_folds = min(folds, n_positive, n_negative)
    if n_folds >= 2:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        patients = patient_positive.index.to_numpy()
        fold_of_patient: dict[Any, int] = {}
        for fold, (_, held_out) in enumerate(splitter.split(patients.reshape(-1, 1), patient_positive.to_numpy())):
            fold_of_patient.update(dict.fromkeys(patients[held_out], fold))
        return cells["patient_id"].map(fold_of_patient).to_numpy(dtype=np.int64), "patient"
    n_folds = min(folds, int(is_positive_cell.sum()), int((~is_positive_cell).sum()))
    if n_folds < 2:
        raise SmearnetError(
            f"Cross-validating smear scores needs at least 2 positive and 2 negative development cells; got "
            f"{int(is_positive_cell.sum())} and {int((~is_positive_cell).sum())}.",
            "Use a larger development cohort (e.g. a larger data.synthetic.scale).",
        )
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of_cell = np.zeros(len(cells), dtype=np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros((len(cells), 1)), is_positive_cell)):
        fold_of_cell[held_out] = fold
    return fold_of_cell, "cell"


def natural_bags(cells: pd.DataFrame) -> tuple[list[Any], list[np.ndarray]]:
    """Smear ids (in order of first appearance, as ``smear_table`` orders them) and each smear's cell positions."""
    groups = cells.groupby("smear_id", sort=False).indices
    ids = list(groups)
    return ids, [np.asarray(groups[smear_id]) for smear_id in ids]


def score_smears(cell_set: CellSet, smear_ids: Sequence[Any], bags: Sequence[np.ndarray], positive_class: str,
                 aggregator: MILAggregator | None, *, cell_threshold: float | None = None) -> pd.DataFrame:
    """``smear_table`` of the smears made of ``bags`` (positions into ``cell_set``), plus ``score_mil``; a cell is
    called positive at ``cell_threshold`` (None: arg-max), as the proposed rule will call it."""
    parts = []
    for smear_id, bag in zip(smear_ids, bags, strict=True):
        part = cell_set.cells.iloc[bag][["label", "predicted", f"prob_{positive_class}"]].copy()
        part.insert(0, "smear_id", smear_id)
        parts.append(part)
    cells = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["smear_id", "label", "predicted", f"prob_{positive_class}"])
    table = smear_table(cells, positive_class, cell_threshold=cell_threshold,
                        all_smear_ids=list(smear_ids)).set_index("smear_id")
    if aggregator is not None:
        mil = aggregator.score([cell_set.embeddings[bag] for bag in bags])
        table[MIL_SCORE] = pd.Series(mil, index=list(smear_ids))
    return table.reset_index()


def _composed_smears(cell_set: CellSet, positive_class: str, params: AggregateParams, rng: np.random.Generator,
                     prefix: str) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    mixes = plan_smear_mixes(params.smears_per_class, params.smears_per_class, params.design, rng)
    bags = compose_bags(cell_set.cells["label"].to_numpy(), mixes, rng, positive_class=positive_class,
                        lookalike_classes=params.lookalike_classes)
    ids = [f"{prefix}{index:04d}" for index in range(len(bags))]
    return ids, bags, np.array([mix.positive for mix in mixes])


def train_composed_mil(cell_set: CellSet, positive_class: str, params: AggregateParams, seed: int) -> MILAggregator:
    """A MIL aggregator trained on smears composed from ``cell_set``."""
    _, bags, truth = _composed_smears(cell_set, positive_class, params, np.random.default_rng(seed), "train")
    return train_mil([cell_set.embeddings[bag] for bag in bags], truth, params.mil, seed=seed)


# --- scoring, choice ---------------------------------------------------------------------------


def score_aucs(table: pd.DataFrame, scores: Sequence[str], *, confidence: float, n_resamples: int,
               seed: int) -> dict[str, dict[str, Any]]:
    """Per score: AUC with a stratified bootstrap interval and ROC points over the non-empty smears.

    A score whose smears are all of one class gets NaN AUC and interval and no ROC.
    """
    truth = table["truth_positive"].to_numpy(dtype=bool)
    out: dict[str, dict[str, Any]] = {}
    for score in scores:
        values = table[score].to_numpy(dtype=np.float64)
        kept = ~np.isnan(values)
        n_positive, n_negative = int(truth[kept].sum()), int((~truth[kept]).sum())
        entry: dict[str, Any] = {"value": math.nan, "low": math.nan, "high": math.nan,
                                 "n_positive": n_positive, "n_negative": n_negative, "roc": None}
        if n_positive and n_negative:
            roc = roc_points(values[kept], truth[kept])
            low, high = auc_interval(values[kept], truth[kept], n_resamples=n_resamples, confidence=confidence,
                                     seed=seed)
            entry.update(value=roc["auc"], low=low, high=high, roc=roc)
        out[score] = entry
    return out


@dataclass(frozen=True)
class ScoreChoice:
    """The chosen score, every candidate's development AUC and the reason, in words."""

    chosen: str
    aucs: dict[str, dict[str, Any]]
    tied: list[str]
    reason: str


def choose_score(development: pd.DataFrame, *, scores: Sequence[str] = SCORES, tie_tolerance: float = 0.01,
                 confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0) -> ScoreChoice:
    """The score with the highest AUC over ``development`` smears; near-ties go to the earlier score.

    ``development`` is the out-of-fold development table (``truth_positive`` and one column
    per score) and the only data this function sees.  Scores within ``tie_tolerance`` of the
    best AUC count as tied; among them the first in ``scores`` (the preference order of
    ``SCORES``: simplest to deploy first) wins.
    """
    present = [score for score in scores if score in development.columns]
    if not present:
        raise SmearnetError(f"The development table has none of the score columns {list(scores)}.",
                            "Score the development smears with score_smears() first.")
    aucs = score_aucs(development, present, confidence=confidence, n_resamples=n_resamples, seed=seed)
    defined = {score: entry["value"] for score, entry in aucs.items() if math.isfinite(entry["value"])}
    if not defined:
        raise SmearnetError("No score has a defined AUC on the development smears (one class only).",
                            "Compose development smears of both classes.")
    best_score = max(defined, key=lambda score: defined[score])
    best = defined[best_score]
    tied = [score for score in present if score in defined and defined[score] >= best - tie_tolerance]
    chosen = tied[0]
    entry = aucs[chosen]
    reason = (f"{chosen} ({SCORE_DESCRIPTIONS.get(chosen, chosen)}) has cross-validated development AUC "
              f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]")
    if chosen == best_score:
        reason += ", the highest of all scores"
    else:
        reason += f", within {tie_tolerance:g} of the highest ({best_score}, {best:.3f})"
    if len(tied) > 1:
        reason += (f"; tied with {', '.join(s for s in tied if s != chosen)}, it comes first in the "
                   f"preference order (simplest to deploy first)")
    return ScoreChoice(chosen=chosen, aucs=aucs, tied=tied, reason=reason + ".")


# --- the whole comparison ----------------------------------------------------------------------


@dataclass(frozen=True)
class DevelopmentResult:
    """Out-of-fold composed and natural development smears, the folds and the final aggregator."""

    composed: pd.DataFrame
    natural: pd.DataFrame
    fold_unit: str
    n_folds: int
    aggregator: MILAggregator


def development_evaluation(development: CellSet, positive_class: str, params: AggregateParams,
                           seed: int, *, cell_threshold: float | None = None) -> DevelopmentResult:
    """Patient-grouped cross-validation of every score on composed (and natural) development smears.

    For each fold, an aggregator trained on smears composed from the other folds' cells
    scores smears composed from this fold's cells and this fold's own (natural) smears; the
    fixed scores need no training.  The final aggregator is trained on all development cells.  Share scores
    count the cells called positive at ``cell_threshold`` (None: arg-max).
    """
    fold_of_cell, unit = development_folds(development.cells, positive_class, params.folds, seed)
    n_folds = int(fold_of_cell.max()) + 1
    composed_parts, natural_parts = [], []
    for fold in range(n_folds):
        training, held_out = development.subset(fold_of_cell != fold), development.subset(fold_of_cell == fold)
        aggregator = train_composed_mil(training, positive_class, params, seed + 1 + fold)
        ids, bags, truth = _composed_smears(held_out, positive_class, params,
                                            np.random.default_rng([seed, fold]), f"fold{fold}-")
        table = score_smears(held_out, ids, bags, positive_class, aggregator, cell_threshold=cell_threshold)
        if not np.array_equal(table["truth_positive"].to_numpy(), truth):
            raise AssertionError("composed smear truth differs from the cells' labels")
        composed_parts.append(table.assign(fold=fold))
        if unit == "patient":  # a fold holds whole smears only when whole patients are held out
            smear_ids, smear_bags = natural_bags(held_out.cells)
            natural_parts.append(score_smears(held_out, smear_ids, smear_bags, positive_class, aggregator,
                                              cell_threshold=cell_threshold).assign(fold=fold))
    final = train_composed_mil(development, positive_class, params, seed)
    natural = pd.concat(natural_parts, ignore_index=True) if natural_parts else pd.DataFrame(
        columns=["smear_id", "truth_positive", *SCORES, "fold"])
    return DevelopmentResult(composed=pd.concat(composed_parts, ignore_index=True), natural=natural,
                             fold_unit=unit, n_folds=n_folds, aggregator=final)


@dataclass(frozen=True)
class AssessmentResult:
    """Every score on the assessment smears and the blind classification with the chosen one."""

    table: pd.DataFrame
    aucs: dict[str, dict[str, Any]]
    confusion: dict[str, int]
    summary: dict[str, dict[str, float]]
    n_empty_smears_excluded: int


def assess(assessment: CellSet, aggregator: MILAggregator, chosen: str, threshold: float, positive_class: str,
           params: AggregateParams, seed: int, *, cell_threshold: float | None = None) -> AssessmentResult:
    """Score the assessment smears once (cells called positive at ``cell_threshold``; None: arg-max); classify
    them blind with ``chosen >= threshold``."""
    smear_ids, bags = natural_bags(assessment.cells)
    table = score_smears(assessment, smear_ids, bags, positive_class, aggregator, cell_threshold=cell_threshold)
    aucs = score_aucs(table, SCORES, confidence=params.confidence, n_resamples=params.bootstrap_resamples,
                      seed=seed)
    kept = table[table["n_cells"] > 0]
    table["called_positive"] = False
    table.loc[kept.index, "called_positive"] = classify(kept[chosen].to_numpy(dtype=np.float64), threshold)
    counts = binary_counts(kept["truth_positive"].to_numpy(dtype=bool),
                           table.loc[kept.index, "called_positive"].to_numpy(dtype=bool))
    return AssessmentResult(table=table, aucs=aucs, confusion=counts,
                            summary=binary_summary(counts, params.confidence),
                            n_empty_smears_excluded=int(len(table) - len(kept)))


@dataclass(frozen=True)
class AggregationResult:
    """Everything the aggregate stage reports."""

    development: DevelopmentResult
    choice: ScoreChoice
    threshold: float
    natural_aucs: dict[str, dict[str, Any]]
    assessment: AssessmentResult | None
    params: AggregateParams
    cell_threshold: float | None = None

    def metrics(self) -> dict[str, Any]:
        """JSON-ready summary (no ROC points)."""

        def auc_only(aucs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
            return {score: {k: v for k, v in entry.items() if k != "roc"} for score, entry in aucs.items()}

        out: dict[str, Any] = {
            "chosen_score": self.choice.chosen,
            "reason": self.choice.reason,
            "tied": self.choice.tied,
            "threshold": self.threshold,
            "threshold_rule": self.params.threshold_rule,
            "fold_unit": self.development.fold_unit,
            "folds": self.development.n_folds,
            "confidence": self.params.confidence,
            "development_composed": {"n_smears": len(self.development.composed),
                                     "auc": auc_only(self.choice.aucs),
                                     "design": {**json_safe(asdict(self.params.design)),
                                                "from": self.params.design_from}},
            "development_natural": {"n_smears": len(self.development.natural),
                                    "auc": auc_only(self.natural_aucs)},
        }
        if self.assessment is not None:
            out["assessment"] = {
                "n_smears": len(self.assessment.table),
                "n_empty_smears_excluded": self.assessment.n_empty_smears_excluded,
                "auc": auc_only(self.assessment.aucs),
                "blind": {"score": self.choice.chosen, "threshold": self.threshold,
                          "confusion": self.assessment.confusion, "binary_summary": self.assessment.summary},
            }
        return out


def run_aggregation(development: CellSet, assessment: CellSet | None, positive_class: str, params: AggregateParams,
                    seed: int, *, score: str = "auto", cell_threshold: float | None = None) -> AggregationResult:
    """Choose a smear score on development smears (or take the one ``score`` names), then score the assessment.

    The order is the guarantee: score, threshold and aggregator are fixed from
    ``development`` alone before ``assess`` reads ``assessment``.  ``cell_threshold`` (None: arg-max) is the
    proposed rule's, fixed before (``smearnet.smear.cell_threshold``, on validation cells): share scores count the
    cells called positive at it, on development and assessment smears alike.
    """
    result = development_evaluation(development, positive_class, params, seed, cell_threshold=cell_threshold)
    choice = choose_score(result.composed, tie_tolerance=params.tie_tolerance, confidence=params.confidence,
                          n_resamples=params.bootstrap_resamples, seed=seed)
    if score != "auto":
        if score not in SCORES:
            raise SmearnetError(f"Unknown smear.score {score!r}.", f"use auto or one of {', '.join(SCORES)}.")
        entry = choice.aucs[score]
        choice = ScoreChoice(chosen=score, aucs=choice.aucs, tied=[score],
                             reason=f"{score} ({SCORE_DESCRIPTIONS[score]}) is named by smear.score; its "
                                    f"cross-validated development AUC is {entry['value']:.3f} (auto would choose "
                                    f"{choice.chosen}).")
    chosen_values = result.composed[choice.chosen].to_numpy(dtype=np.float64)
    kept = ~np.isnan(chosen_values)
    threshold = select_threshold(chosen_values[kept], result.composed["truth_positive"].to_numpy(dtype=bool)[kept],
                                 params.threshold_rule, fixed=params.fixed_threshold)
    natural_aucs = score_aucs(result.natural, SCORES, confidence=params.confidence,
                              n_resamples=params.bootstrap_resamples, seed=seed) if len(result.natural) else {}
    blind = None
    if assessment is not None and len(assessment.cells):
        blind = assess(assessment, result.aggregator, choice.chosen, threshold, positive_class, params, seed,
                       cell_threshold=cell_threshold)
    return AggregationResult(development=result, choice=choice, threshold=threshold, natural_aucs=natural_aucs,
                             assessment=blind, params=params, cell_threshold=cell_threshold)


