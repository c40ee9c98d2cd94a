"""Smear scores side by side, chosen on development smears, applied once to the assessment smears.

The paper calls a smear positive when the share of its cells classified COVID-19 RL reaches
2%: a rule only as good as the cell classifier's false-positive rate.  This module compares
that share with the other pure scores of ``smearnet.smear`` (share of ``p >= 0.5``, mean
probability, top-3 mean, noisy-OR, expected positive count) and a gated-attention MIL
aggregator over frozen cell embeddings (``smearnet.mil``), and chooses one.

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
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from smearnet.errors import SmearnetError
from smearnet.metrics import binary_counts, binary_summary
from smearnet.mil import MILAggregator, MILConfig, train_mil
from smearnet.smear import auc_interval, classify, roc_points, select_threshold, smear_table

MIL_SCORE = "score_mil"
FIXED_SCORES: tuple[str, ...] = (
    "share_predicted_positive", "score_share", "score_top3_mean", "score_mean_prob",
    "score_expected_positive", "score_noisy_or",
)  # fmt: skip
SCORES: tuple[str, ...] = (*FIXED_SCORES, MIL_SCORE)
"""Every score, in tie-break preference order: the paper's rule (what serving computes
today), then the probability-only scores, then the MIL aggregator (needs embeddings and a
second model at serving time)."""

SCORE_DESCRIPTIONS: dict[str, str] = {
    "share_predicted_positive": "share of cells whose argmax is the positive class (the paper)",
    "score_share": "share of cells with p >= 0.5",
    "score_top3_mean": "mean of the 3 highest p",
    "score_mean_prob": "mean p",
    "score_expected_positive": "expected positive cells, sum p",
    "score_noisy_or": "noisy-OR, 1 - prod(1 - p)",
    MIL_SCORE: "gated-attention MIL over cell embeddings",
}

BACKGROUND, LOOKALIKE, TARGET = 0, 1, 2
"""Cell kinds in simulated and composed smears."""


# --- parameters ------------------------------------------------------------------------------


def _int_range(name: str, value: Any, minimum: int) -> tuple[int, int]:
    """An ``int`` or ``[low, high]`` as an inclusive range with ``minimum <= low <= high``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        low = high = int(value)
    else:
        try:
            low, high = (int(v) for v in value)
        except (TypeError, ValueError):
            raise SmearnetError(f"`{name}` must be an integer or [low, high]; got {value!r}.",
                                f"e.g. {name}=[1, 3].") from None
    if not minimum <= low <= high:
        raise SmearnetError(f"`{name}` must satisfy {minimum} <= low <= high; got {value!r}.",
                            f"e.g. {name}=[{max(minimum, 1)}, {max(minimum, 1) + 2}].")
    return low, high


def _fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise SmearnetError(f"`{name}` must lie in [0, 1]; got {value}.", f"e.g. {name}=0.3.")
    return value


@dataclass(frozen=True)
class SmearDesign:
    """How many cells of each kind a simulated or composed smear carries."""

    cells_per_smear: tuple[int, int] = (20, 40)
    target_cells: tuple[int, int] = (1, 3)
    lookalike_smears: float = 0.3
    lookalike_cells: tuple[int, int] = (1, 4)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cells_per_smear", _int_range("cells_per_smear", self.cells_per_smear, 1))
        object.__setattr__(self, "target_cells", _int_range("target_cells", self.target_cells, 1))
        object.__setattr__(self, "lookalike_cells", _int_range("lookalike_cells", self.lookalike_cells, 0))
        object.__setattr__(self, "lookalike_smears", _fraction("lookalike_smears", self.lookalike_smears))


@dataclass(frozen=True)
class AggregateParams:
    """The ``aggregate`` section of the configuration."""

    design: SmearDesign = field(default_factory=SmearDesign)
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
    def from_config(cls, aggregate: Mapping[str, Any], confidence: float) -> AggregateParams:
        composed = aggregate["composed"]
        return cls(
            design=SmearDesign(cells_per_smear=composed["cells_per_smear"], target_cells=composed["target_cells"],
                               lookalike_smears=float(composed["lookalike_smears"]),
                               lookalike_cells=composed["lookalike_cells"]),
            smears_per_class=int(composed["smears_per_class"]),
            lookalike_classes=tuple(str(name) for name in composed["lookalike_classes"]),
            mil=MILConfig.from_mapping(aggregate["mil"]),
            folds=int(aggregate["folds"]),
            tie_tolerance=float(aggregate["tie_tolerance"]),
            threshold_rule=str(aggregate["threshold_rule"]),
            fixed_threshold=float(aggregate["fixed_threshold"]),
            bootstrap_resamples=int(aggregate["bootstrap_resamples"]),
            confidence=float(confidence),
        )


# --- smear mixes, simulation ------------------------------------------------------------------


@dataclass(frozen=True)
class SmearMix:
    """Cell counts of one smear by kind."""

    positive: bool
    n_target: int
    n_lookalike: int
    n_background: int


def plan_smear_mixes(n_positive: int, n_negative: int, design: SmearDesign,
                     rng: np.random.Generator) -> list[SmearMix]:
    """``n_positive`` smears with ``target_cells`` targets, then ``n_negative`` without.

    Every smear draws its size from ``cells_per_smear`` and, with probability
    ``lookalike_smears`` (the same for both classes, so look-alikes carry no information),
    ``lookalike_cells`` look-alike negatives; the rest is background.  A smear grows when
    its targets and look-alikes outnumber the drawn size.
    """
    mixes = []
    for positive in [True] * int(n_positive) + [False] * int(n_negative):
        size = int(rng.integers(design.cells_per_smear[0], design.cells_per_smear[1] + 1))
        n_target = int(rng.integers(design.target_cells[0], design.target_cells[1] + 1)) if positive else 0
        with_lookalikes = rng.random() < design.lookalike_smears
        n_lookalike = int(rng.integers(design.lookalike_cells[0], design.lookalike_cells[1] + 1)) \
            if with_lookalikes else 0
        n_background = max(size - n_target - n_lookalike, 0)
        mixes.append(SmearMix(positive, n_target, n_lookalike, n_background))
    return mixes


@dataclass(frozen=True)
class SimulatedSmears:
    """Per-smear cell probabilities and cell kinds (``BACKGROUND``, ``LOOKALIKE``, ``TARGET``)."""

    probabilities: list[np.ndarray]
    kinds: list[np.ndarray]
    truth: np.ndarray

    def cells(self, positive_class: str = "covid_rl", lookalike_class: str = "classic_rl",
              background_class: str = "normal") -> pd.DataFrame:
        """A per-cell table for ``smearnet.smear.smear_table``.

        A cell is predicted ``positive_class`` when p >= 0.5, else its own class, or
        ``background_class`` for a missed target cell (so the argmax share equals the share of
        p >= 0.5 and never reads the truth).
        """
        names = np.array([background_class, lookalike_class, positive_class])
        missed_names = np.array([background_class, lookalike_class, background_class])
        frames = []
        for index, (p, kinds) in enumerate(zip(self.probabilities, self.kinds, strict=True)):
            frames.append(pd.DataFrame({
                "smear_id": f"sim{index:05d}", "label": names[kinds],
                "predicted": np.where(p >= 0.5, positive_class, missed_names[kinds]), f"prob_{positive_class}": p,
            }))
        return pd.concat(frames, ignore_index=True)


def _logit_location(rate: float, spread: float, name: str) -> float:
    if not 0.0 < rate < 1.0:
        raise SmearnetError(f"`{name}` must lie strictly between 0 and 1; got {rate}.", f"e.g. {name}=0.01.")
    return spread * NormalDist().inv_cdf(rate)


def implied_cell_auc(rate_high: float, rate_low: float) -> float:
    """Cell-level AUC between two cell kinds whose ``p >= 0.5`` rates are ``rate_high`` and ``rate_low``.

    Both kinds have ``logit(p) ~ N(spread * Phi^-1(rate), spread^2)``, so the AUC does not
    depend on ``spread``: ``Phi((Phi^-1(high) - Phi^-1(low)) / sqrt(2))``.
    """
    normal = NormalDist()
    return normal.cdf((normal.inv_cdf(rate_high) - normal.inv_cdf(rate_low)) / math.sqrt(2.0))


def simulate_smear_probabilities(
    n_pos_smears: int,
    n_neg_smears: int,
    cells_per_smear: int | Sequence[int] = (20, 40),
    target_cells: int | Sequence[int] = (1, 3),
    *,
    sensitivity: float = 0.8,
    false_positive_rate: float = 0.01,
    lookalike_false_positive_rate: float = 0.3,
    lookalike_smears: float = 0.3,
    lookalike_cells: int | Sequence[int] = (1, 4),
    spread: float = 2.0,
    seed: int = 0,
) -> SimulatedSmears:
    """Cell probabilities of simulated smears under a stated cell-classifier confusion.

    Positive smears carry ``target_cells`` positive cells among ``cells_per_smear``;
    negative smears none.  A share ``lookalike_smears`` of smears of both classes carry
    ``lookalike_cells`` look-alike negatives (classic RL next to COVID-19 RL).  Each cell kind
    has ``logit(p) ~ N(spread * Phi^-1(rate), spread^2)`` where ``rate`` is the chance the
    cell is called positive at ``p >= 0.5``: ``sensitivity`` for target cells,
    ``false_positive_rate`` for background cells and ``lookalike_false_positive_rate`` for
    look-alikes.  ``spread`` sets how confident the classifier is (larger: p nearer 0 or 1).
    """
    if spread <= 0 or not math.isfinite(spread):
        raise SmearnetError(f"`spread` must be a finite number > 0; got {spread}.", "e.g. spread=2.0.")
    design = SmearDesign(cells_per_smear=cells_per_smear, target_cells=target_cells,  # type: ignore[arg-type]
                         lookalike_smears=lookalike_smears, lookalike_cells=lookalike_cells)  # type: ignore[arg-type]
    locations = np.array([
        _logit_location(false_positive_rate, spread, "false_positive_rate"),
        _logit_location(lookalike_false_positive_rate, spread, "lookalike_false_positive_rate"),
        _logit_location(sensitivity, spread, "sensitivity"),
    ])  # fmt: skip
    rng = np.random.default_rng(seed)
    probabilities, kinds = [], []
    for mix in plan_smear_mixes(n_pos_smears, n_neg_smears, design, rng):
        cell_kinds = np.repeat(np.array([TARGET, LOOKALIKE, BACKGROUND], dtype=np.int8),
                               [mix.n_target, mix.n_lookalike, mix.n_background])
        cell_kinds = cell_kinds[rng.permutation(len(cell_kinds))]
        logits = rng.normal(locations[cell_kinds], spread)
        probabilities.append(1.0 / (1.0 + np.exp(-logits)))
        kinds.append(cell_kinds)
    truth = np.array([True] * int(n_pos_smears) + [False] * int(n_neg_smears))
    return SimulatedSmears(probabilities=probabilities, kinds=kinds, truth=truth)


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
                                "Build it with smearnet.inference.predictions_table plus a patient_id column.")
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.cells):
            raise SmearnetError(
                f"Got {len(self.cells)} cells but embeddings of shape {self.embeddings.shape}.",
                "Pass one embedding row per cell, in the cell table's order.",
            )

    def subset(self, rows: np.ndarray) -> CellSet:
        """The cells at boolean mask or positions ``rows``."""
        positions = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        return CellSet(self.cells.iloc[positions].reset_index(drop=True), self.embeddings[positions])


def _draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct members of ``pool`` when it is large enough, else with replacement."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(pool, size=n, replace=n > len(pool))


def compose_bags(labels: Sequence[str] | np.ndarray, mixes: Sequence[SmearMix], rng: np.random.Generator, *,
                   positive_class: str, lookalike_classes: Sequence[str]) -> list[np.ndarray]:
    """Positions into ``labels`` making up each smear of ``mixes``.

    Target cells are cells labelled ``positive_class``, look-alikes those labelled one of
    ``lookalike_classes`` and background the rest.  Unlike ``smearnet.compose`` (Table 5 sizes
    for data without smears, every non-target cell equally likely), look-alikes are drawn to
    their own count: among development cells they are far commoner (~27% of negatives in the
    synthetic cohort) than in assessment smears (~4%, Table 5).  Within a smear, cells are distinct
    unless the pool is smaller than the count; across smears, cells repeat.  Without
    look-alike cells in ``labels``, look-alike counts become background.
    """
    names = np.asarray(labels, dtype=object)
    target = np.flatnonzero(names == positive_class)
    lookalike = np.flatnonzero(np.isin(names, list(lookalike_classes)) & (names != positive_class))
    background = np.flatnonzero(~np.isin(names, [positive_class, *lookalike_classes]))
    if not len(background) and not len(lookalike):
        raise SmearnetError("No negative cells to compose smears from.",
                            "The development cells must include cells of a negative class.")
    if not len(target) and any(mix.n_target for mix in mixes):
        raise SmearnetError(f"No {positive_class!r} cells to compose positive smears from.",
                            "The development cells must include positive cells.")
    bags = []
    for mix in mixes:
        n_lookalike = mix.n_lookalike if len(lookalike) else 0
        n_background = mix.n_background + mix.n_lookalike - n_lookalike
        negatives_pool = background if len(background) else lookalike
        bag = np.concatenate([_draw(target, mix.n_target, rng), _draw(lookalike, n_lookalike, rng),
                              _draw(negatives_pool, n_background, rng)])
        bags.append(bag[rng.permutation(len(bag))])
    return bags


def development_folds(cells: pd.DataFrame, positive_class: str, folds: int, seed: int) -> tuple[np.ndarray, str]:
    """Fold index per cell and the grouping unit.

    Patients (positive when any of their cells is) are split by a stratified K-fold with
    ``K = min(folds, positive patients, negative patients)``, so every held-out fold has a
    patient of each class.  With fewer than 2 patients of a class, cells are folded instead
    (unit ``"cell"``: leakier, reported as such).
    """
    is_positive_cell = (cells["label"] == positive_class).to_numpy()
    patient_positive = pd.Series(is_positive_cell).groupby(cells["patient_id"].to_numpy()).any()
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
    """Smear ids (sorted as ``smear_table`` sorts them) and each smear's cell positions."""
    groups = cells.groupby("smear_id", sort=True).indices
    ids = list(groups)
    return ids, [np.asarray(groups[smear_id]) for smear_id in ids]


def score_smears(cell_set: CellSet, smear_ids: Sequence[Any], bags: Sequence[np.ndarray], positive_class: str,
                 aggregator: MILAggregator | None) -> pd.DataFrame:
    """``smear_table`` of the smears made of ``bags`` (positions into ``cell_set``), plus ``score_mil``."""
    parts = []
    for smear_id, bag in zip(smear_ids, bags, strict=True):
        part = cell_set.cells.iloc[bag][["label", "predicted", f"prob_{positive_class}"]].copy()
        part.insert(0, "smear_id", smear_id)
        parts.append(part)
    cells = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["smear_id", "label", "predicted", f"prob_{positive_class}"])
    table = smear_table(cells, positive_class, all_smear_ids=list(smear_ids)).set_index("smear_id")
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
                           seed: int) -> DevelopmentResult:
    """Patient-grouped cross-validation of every score on composed (and natural) development smears.

    For each fold, an aggregator trained on smears composed from the other folds' cells
    scores smears composed from this fold's cells and this fold's own (natural) smears; the
    fixed scores need no training.  The final aggregator is trained on all development cells.
    """
    fold_of_cell, unit = development_folds(development.cells, positive_class, params.folds, seed)
    n_folds = int(fold_of_cell.max()) + 1
    composed_parts, natural_parts = [], []
    for fold in range(n_folds):
        training, held_out = development.subset(fold_of_cell != fold), development.subset(fold_of_cell == fold)
        aggregator = train_composed_mil(training, positive_class, params, seed + 1 + fold)
        ids, bags, truth = _composed_smears(held_out, positive_class, params,
                                            np.random.default_rng([seed, fold]), f"fold{fold}-")
        table = score_smears(held_out, ids, bags, positive_class, aggregator)
        if not np.array_equal(table["truth_positive"].to_numpy(), truth):
            raise AssertionError("composed smear truth differs from the cells' labels")
        composed_parts.append(table.assign(fold=fold))
        if unit == "patient":  # a fold holds whole smears only when whole patients are held out
            smear_ids, smear_bags = natural_bags(held_out.cells)
            natural_parts.append(score_smears(held_out, smear_ids, smear_bags, positive_class, aggregator)
                                 .assign(fold=fold))
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
           params: AggregateParams, seed: int) -> AssessmentResult:
    """Score the assessment smears once; classify them blind with ``chosen >= threshold``."""
    smear_ids, bags = natural_bags(assessment.cells)
    table = score_smears(assessment, smear_ids, bags, positive_class, aggregator)
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
                                     "auc": auc_only(self.choice.aucs)},
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
                    seed: int) -> AggregationResult:
    """Choose a smear score on development smears, then classify the assessment smears once.

    The order is the guarantee: score, threshold and aggregator are fixed from
    ``development`` alone before ``assess`` reads ``assessment``.
    """
    result = development_evaluation(development, positive_class, params, seed)
    choice = choose_score(result.composed, tie_tolerance=params.tie_tolerance, confidence=params.confidence,
                          n_resamples=params.bootstrap_resamples, seed=seed)
    chosen_values = result.composed[choice.chosen].to_numpy(dtype=np.float64)
    kept = ~np.isnan(chosen_values)
    threshold = select_threshold(chosen_values[kept], result.composed["truth_positive"].to_numpy(dtype=bool)[kept],
                                 params.threshold_rule, fixed=params.fixed_threshold)
    natural_aucs = score_aucs(result.natural, SCORES, confidence=params.confidence,
                              n_resamples=params.bootstrap_resamples, seed=seed) if len(result.natural) else {}
    blind = None
    if assessment is not None and len(assessment.cells):
        blind = assess(assessment, result.aggregator, choice.chosen, threshold, positive_class, params, seed)
    return AggregationResult(development=result, choice=choice, threshold=threshold, natural_aucs=natural_aucs,
                             assessment=blind, params=params)


# --- report ------------------------------------------------------------------------------------


def _auc_text(entry: Mapping[str, Any] | None) -> str:
    if not entry or not math.isfinite(entry["value"]):
        return "n/a (one class)"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _sizes_text(table: pd.DataFrame) -> str:
    """Mean (min-max) cells per smear of each class, in words."""
    parts = []
    for truth, name in ((True, "positive"), (False, "negative")):
        sizes = table.loc[table["truth_positive"] == truth, "n_cells"]
        if len(sizes):
            parts.append(f"{name} smears hold {sizes.mean():.1f} cells on average ({sizes.min()}-{sizes.max()})")
    return "; ".join(parts) if parts else "no smears"


def roc_curves(aucs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{score: {"fpr", "tpr", "auc"}}`` for ``smearnet.plots.roc_png`` (scores without a ROC left out)."""
    return {score: {"fpr": entry["roc"]["fpr"], "tpr": entry["roc"]["tpr"], "auc": entry["value"]}
            for score, entry in aucs.items() if entry.get("roc")}


def scores_markdown(result: AggregationResult, *, model_name: str, positive_class: str,
                    calibration: Mapping[str, Any] | None = None) -> str:
    """The Markdown report: every score's AUC with its interval, the choice and why, the blind result."""
    params, development = result.params, result.development
    level = f"{params.confidence:.0%}"
    lines = [
        "# Smear scores side by side",
        "",
        f"Model **{model_name}**, positive class `{positive_class}`.",
    ]
    if calibration is not None:
        bound = " (at a search bound)" if calibration.get("at_bound") else ""
        lines.append(
            f"Cell probabilities are temperature-scaled: T = {calibration['temperature']:.3f}{bound}, "
            f"validation NLL {calibration['val_nll_before']:.4f} -> {calibration['val_nll_after']:.4f} nats/cell "
            f"over {calibration['n_cells']} validation cells."
        )
    lines += [
        "",
        "## Choice (development smears only)",
        "",
        f"Chosen: **{result.choice.chosen}** ({SCORE_DESCRIPTIONS.get(result.choice.chosen, '')}), smear positive "
        f"when the score >= **{result.threshold:.4g}** ({params.threshold_rule} on the development smears).",
        "",
        f"Why: {result.choice.reason}",
        "",
        "## Every score",
        "",
        f"AUC [{level} stratified bootstrap interval].",
        "",
        "| score | what it is | development, composed (out-of-fold; chooses) | development, natural smears "
        "| assessment, blind (reported only) |",
        "|---|---|---|---|---|",
    ]
    for score in SCORES:
        assessment_auc = result.assessment.aucs.get(score) if result.assessment else None
        marker = " **(chosen)**" if score == result.choice.chosen else ""
        lines.append(f"| `{score}`{marker} | {SCORE_DESCRIPTIONS[score]} | {_auc_text(result.choice.aucs.get(score))} "
                     f"| {_auc_text(result.natural_aucs.get(score))} | "
                     f"{_auc_text(assessment_auc) if result.assessment else 'no assessment cohort'} |")
    composed = development.composed
    lines += [
        "",
        f"Development, composed: {len(composed)} smears ({int(composed['truth_positive'].sum())} positive) re-drawn "
        f"from the validation and test cells of development patients, {development.n_folds} folds grouped by "
        f"{development.fold_unit}: each smear holds {params.design.cells_per_smear[0]}-"
        f"{params.design.cells_per_smear[1]} cells, positive smears {params.design.target_cells[0]}-"
        f"{params.design.target_cells[1]} `{positive_class}` cells, and {params.design.lookalike_smears:.0%} of "
        f"smears of both classes {params.design.lookalike_cells[0]}-{params.design.lookalike_cells[1]} look-alike "
        f"cells ({', '.join(params.lookalike_classes)}). The MIL aggregator scoring a fold was trained on smears "
        "composed from the other folds' cells only. Both classes draw their size from the same range, so no score "
        "can win by tracking smear size.",
        "",
        f"Development, natural: the {len(development.natural)} validation and test smears themselves, each "
        "all-positive or all-negative (one class per development patient); "
        + (_sizes_text(development.natural) if len(development.natural) else "none (cells were folded, not patients)")
        + ". Too few and too unlike assessment smears to choose by; shown for completeness.",
    ]
    if result.assessment is not None:
        blind = result.assessment
        counts = blind.confusion
        lines += [
            "",
            "## Blind classification of the assessment smears",
            "",
            f"`{result.choice.chosen}` >= {result.threshold:.4g}, fixed before the assessment cells were read: "
            f"TP {counts['tp']}, FP {counts['fp']}, TN {counts['tn']}, FN {counts['fn']}"
            + (f" ({blind.n_empty_smears_excluded} smears without cells excluded)."
               if blind.n_empty_smears_excluded else "."),
            "",
            f"Assessment: {_sizes_text(blind.table[blind.table['n_cells'] > 0])}. Scores that grow with a smear's "
            "size (sum p, noisy-OR) gain from any size difference between the classes there, which says nothing "
            "about the cell evidence.",
            "",
            f"| rate | value [{level} Wilson interval] |",
            "|---|---|",
        ]
        for name, rate in blind.summary.items():
            value = "n/a" if not math.isfinite(rate["value"]) else \
                f"{rate['value']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}]"
            lines.append(f"| {name} | {value} |")
    lines += [
        "",
        "## Caveats",
        "",
        "- Composed smears reuse development cells (few positive patients), so their bootstrap intervals, which "
        "resample smears, are narrower than the patient-level uncertainty.",
        "- The temperature is fitted on the validation cells, which also feed the development smears; it cannot "
        "change argmax-based shares and changes the other scores only mildly.",
        "- The threshold of the MIL score comes from the fold aggregators' out-of-fold scores; the assessment is "
        "scored by the aggregator trained on all development cells.",
        "- Assessment AUCs of the scores not chosen are reported for comparison only; choosing among them after "
        "seeing them would no longer be blind.",
    ]
    return "\n".join(lines) + "\n"
