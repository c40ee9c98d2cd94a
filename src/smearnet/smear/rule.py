"""The smear rule: what turns one smear's cells into a call, decided once and applied everywhere.

A ``SmearRule`` holds the score (one of ``SCORES``), the positive class, the temperature that calibrates
the cell probabilities, the cell threshold (a cell is called positive when its calibrated positive-class
probability reaches it; None: the arg-max call, the paper's), the smear threshold, and words saying how each was
chosen.  The cell threshold decides the share scores' positive cells and the per-cell class predict and serving
return (``SmearRule.cell_calls``).  The aggregate stage chooses the score (on development smears only) and the cell
threshold (``smear.cell_threshold``, on validation cells), the smear stage chooses the threshold and measures the
rule, the register stage packages it (``smear_rule.json``, plus the MIL aggregator in ``mil/`` when the score is
MIL) with the model version, and ``SmearRule.classify`` is the one smear call of the smear stage, the promotion
gate, ``smearnet predict`` and the served model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smearnet.evaluation.calibration import calibrate_probabilities
from smearnet.errors import SmearnetError
from smearnet.smear.mil import MILAggregator, load_mil, save_mil
from smearnet.smear.roc import classify as calls_at
from smearnet.smear.scores import MIL_SCORE, SCORE_DESCRIPTIONS, SCORES, cell_calls, smear_table

RULE_FILE = "smear_rule.json"
MIL_DIR = "mil"
UNDETERMINED = "undetermined"


@dataclass(frozen=True)
class SmearRule:
    """Score, calibration, thresholds and how they were chosen: everything a smear call depends on."""

    score: str
    positive_class: str
    threshold: float = math.nan
    temperature: float = 1.0
    cell_threshold: float | None = None  # a cell is called positive when calibrated p >= this; None = arg-max (paper)
    threshold_rule: str = "youden"
    chosen_by: str = ""
    threshold_from: str = ""

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise SmearnetError(f"Unknown smear score {self.score!r}.",
                                f"set smear.score to auto or one of {', '.join(SCORES)}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SmearnetError(f"The smear rule's temperature must be a finite number > 0; got {self.temperature}.",
                                "re-run the aggregate stage.")
        cell_threshold = self.cell_threshold
        if cell_threshold is not None and not (math.isfinite(cell_threshold) and 0 < cell_threshold <= 1):
            raise SmearnetError(f"The smear rule's cell threshold must lie in (0, 1]; got {self.cell_threshold}.",
                                "set smear.cell_threshold to argmax, validation or a number in (0, 1).")

    @property
    def uses_mil(self) -> bool:
        """Whether the score needs cell embeddings and the MIL aggregator."""
        return self.score == MIL_SCORE

    @property
    def is_complete(self) -> bool:
        """Whether the smear threshold is set (the smear stage sets it)."""
        return math.isfinite(self.threshold)

    def with_threshold(self, threshold: float, threshold_from: str) -> SmearRule:
        return replace(self, threshold=float(threshold), threshold_from=threshold_from)

    def describe(self) -> str:
        """One line for reports: the score in words and the threshold."""
        return (f"{self.score} ({SCORE_DESCRIPTIONS[self.score]}) >= {self.threshold:.4g}"
                + (f", cells calibrated at T = {self.temperature:.3g}" if self.temperature != 1.0 else "")
                + (f", a cell positive at p >= {self.cell_threshold:.4g}" if self.cell_threshold is not None else ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SmearRule:
        known = {field.name for field in fields(cls)}
        missing = {"score", "positive_class"} - set(values)
        if missing:
            raise SmearnetError(f"The smear rule lacks {sorted(missing)}.", "re-run the smear stage.")
        rule = {key: value for key, value in values.items() if key in known}
        rule["threshold"] = float(rule.get("threshold", math.nan))
        rule["temperature"] = float(rule.get("temperature", 1.0))
        if rule.get("cell_threshold") is not None:
            rule["cell_threshold"] = float(rule["cell_threshold"])
        return cls(**rule)

    def calibrated(self, probabilities: np.ndarray) -> np.ndarray:
        """The engine's softmax rows calibrated with the rule's temperature (NaN rows, undecodable cells, stay NaN)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        valid = ~np.isnan(probabilities).any(axis=1)
        calibrated = np.full_like(probabilities, np.nan)
        if valid.any():
            calibrated[valid] = calibrate_probabilities(probabilities[valid], self.temperature)
        return calibrated

    def cell_calls(self, probabilities: np.ndarray, classes: Sequence[str]) -> np.ndarray:
        """Each cell's call (``smearnet.smear.scores.cell_calls`` of the calibrated probabilities at the rule's cell
        threshold): the class predict and serving report per cell; ``""`` for an undecodable cell."""
        probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(classes))
        return cell_calls(self.calibrated(probabilities), classes, self.positive_class, self.cell_threshold)

    def scores(self, smear_ids: Sequence[Any], probabilities: np.ndarray, classes: Sequence[str], *,
               labels: Sequence[str] | None = None, embeddings: np.ndarray | None = None,
               aggregator: MILAggregator | None = None) -> tuple[pd.DataFrame, np.ndarray]:
        """Every score of every smear (``smear_table`` columns plus ``score_mil``) and a weight per cell.

        ``probabilities`` are the engine's softmax rows (NaN rows: undecodable cells, left out); they are
        calibrated with the rule's temperature first, and each cell's call is ``cell_calls`` (the share scores
        count the cells called positive).  A cell's weight is its MIL attention when the score is
        MIL, else its share of the smear's calibrated positive probability; weights of a smear sum to 1.
        """
        ids = np.asarray([str(s) for s in smear_ids], dtype=object)
        probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(ids), len(classes))
        if self.positive_class not in classes:
            raise SmearnetError(f"The rule's positive class {self.positive_class!r} is not one of {list(classes)}.",
                                "use the rule registered with this model.")
        valid = ~np.isnan(probabilities).any(axis=1)
        calibrated = self.calibrated(probabilities)
        positive = calibrated[:, list(classes).index(self.positive_class)]
        called = cell_calls(calibrated, classes, self.positive_class, self.cell_threshold)
        cells = pd.DataFrame({"smear_id": ids[valid],
                              "label": np.asarray(labels, dtype=object)[valid] if labels is not None else "",
                              "predicted": called[valid],
                              f"prob_{self.positive_class}": positive[valid]})
        order = list(dict.fromkeys(ids))
        table = smear_table(cells, self.positive_class, cell_threshold=self.cell_threshold, all_smear_ids=order)
        weights = np.full(len(ids), np.nan)
        groups = {smear_id: np.flatnonzero(valid & (ids == smear_id)) for smear_id in order}
        if self.uses_mil:
            if aggregator is None or embeddings is None or len(embeddings) != len(ids):
                raise SmearnetError("The MIL smear score needs the cells' embeddings and the MIL aggregator.",
                                    f"load the rule with its {MIL_DIR}/ folder (load_rule) and pass embeddings.")
            bags = [np.asarray(embeddings)[groups[smear_id]] for smear_id in table["smear_id"]]
            nonempty = [len(bag) > 0 for bag in bags]
            mil = np.full(len(bags), np.nan)
            if any(nonempty):
                kept = [bag for bag, ok in zip(bags, nonempty, strict=True) if ok]
                mil[np.flatnonzero(nonempty)] = aggregator.score(kept)
                for smear_id, attention in zip([s for s, ok in zip(table["smear_id"], nonempty, strict=True) if ok],
                                               aggregator.attention(kept), strict=True):
                    weights[groups[smear_id]] = attention
            table[MIL_SCORE] = mil
        else:
            for members in groups.values():
                if len(members):
                    evidence = positive[members]
                    total = evidence.sum()
                    weights[members] = evidence / total if total > 0 else 1.0 / len(members)
        return table, weights

    def classify(self, smear_ids: Sequence[Any], probabilities: np.ndarray, classes: Sequence[str], *,
                 labels: Sequence[str] | None = None, embeddings: np.ndarray | None = None,
                 aggregator: MILAggregator | None = None) -> tuple[pd.DataFrame, np.ndarray]:
        """The smear call: per smear ``smear_id, n_cells, score, threshold, call`` (plus every score column and,
        given ``labels``, ``truth_positive``), and the weight of every cell.

        A smear is ``positive`` when its score >= the threshold (``smearnet.smear.roc.classify``), ``negative``
        below, ``undetermined`` when none of its cells could be classified.
        """
        if not self.is_complete:
            raise SmearnetError("This smear rule has no threshold yet.", "run the smear stage, which sets it.")
        table, weights = self.scores(smear_ids, probabilities, classes, labels=labels, embeddings=embeddings,
                                     aggregator=aggregator)
        values = table[self.score].to_numpy(dtype=np.float64)
        known = ~np.isnan(values)
        calls = np.full(len(table), UNDETERMINED, dtype=object)
        calls[known] = np.where(calls_at(values[known], self.threshold), "positive", "negative")
        table.insert(2, "score", values)
        table.insert(3, "threshold", self.threshold)
        table.insert(4, "call", calls)
        return table, weights


def save_rule(rule: SmearRule, folder: Path, aggregator: MILAggregator | None = None) -> Path:
    """``smear_rule.json`` in ``folder``, and the MIL aggregator in ``folder/mil`` when the rule needs it."""
    from smearnet.io import write_json

    folder = Path(folder)
    if rule.uses_mil:
        if aggregator is None:
            raise SmearnetError("A MIL smear rule needs its aggregator to be saved with it.",
                                "pass the aggregator trained by the aggregate stage.")
        save_mil(aggregator, folder / MIL_DIR)
    return write_json(rule.to_dict(), folder / RULE_FILE)


def load_rule(folder: Path) -> tuple[SmearRule, MILAggregator | None]:
    """The rule saved by ``save_rule`` and, for a MIL rule, its aggregator."""
    path = Path(folder) / RULE_FILE
    if not path.is_file():
        raise SmearnetError(f"No smear rule at {path}.",
                            "run the smear stage (workspace) or use a model registered with its smear rule.")
    try:
        rule = SmearRule.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise SmearnetError(f"{path} is not a smear rule ({error}).", "re-run the smear stage.") from None
    return rule, (load_mil(Path(folder) / MIL_DIR) if rule.uses_mil else None)
