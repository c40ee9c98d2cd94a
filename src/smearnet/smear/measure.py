"""The smear stage's measurement: a proposed rule's threshold chosen as configured, then the rule judged.

The aggregate stage proposes the rule (score, calibration, MIL aggregator, and a threshold chosen on
development smears).  ``measure_rule`` fixes the threshold (``development``: the proposed one, every
evaluation smear blind; ``held_out``/``cross_validated``/``same``: chosen on the evaluation smears as
``smear_evaluation`` describes) and classifies every smear through ``SmearRule.classify``, the call predict,
serving and the gate make, so the figures reported are those of the rule that ships.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from smearnet.errors import SmearnetError
from smearnet.smear.mil import MILAggregator
from smearnet.smear.roc import THRESHOLD_SELECTIONS, smear_evaluation
from smearnet.smear.rule import SmearRule

SELECTIONS = ("development", *THRESHOLD_SELECTIONS)


@dataclass(frozen=True)
class RuleMeasurement:
    """The deployed rule, its evaluation (``smear_evaluation`` output) and every smear's call."""

    rule: SmearRule
    result: dict[str, Any]
    calls: pd.DataFrame
    blind_smear_ids: list[str]


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
    softmax) and, for composed smears, ``part`` (0 may choose a threshold, 1 is judged blind).
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
    if "part" in table.columns:
        calls["part"] = table["part"].to_numpy()
    result.pop("blind_smear_ids", None)
    result["deployed_rule"] = rule.to_dict()
    return RuleMeasurement(rule=rule, result=result, calls=calls, blind_smear_ids=[str(s) for s in blind])
