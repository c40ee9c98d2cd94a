"""Smear scores: each maps one smear's positive-class cell probabilities to a number.

Pure functions of probabilities; ``smear_table`` turns a per-cell table into one row per smear with every
score, the columns every other part of ``smearnet.smear`` (choice, ROC, the deployed rule) reads.

Truth: a smear is truly positive when at least one of its cells carries the positive label.  A smear without
cells has NaN scores (and ``truth_positive == False``); ``smear_evaluation`` excludes such smears and reports
how many, so nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from smearnet.errors import SmearnetError

NAN = float("nan")

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


def _probabilities(p: np.ndarray) -> np.ndarray:
    values = np.asarray(p, dtype=np.float64)
    if values.ndim != 1:
        raise SmearnetError(
            f"A smear score takes a 1-D array of cell probabilities; got shape {values.shape}.",
            "Pass the positive-class probability of each cell in one smear.",
        )
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0):
        raise SmearnetError(
            "Cell probabilities must be finite and within [0, 1].",
            "Pass softmax probabilities, not logits.",
        )
    return values


def share_of_calls(p: np.ndarray, cell_threshold: float = 0.5) -> float:
    """Share of cells with probability >= ``cell_threshold``; nan for an empty smear."""
    values = _probabilities(p)
    return float(np.mean(values >= cell_threshold)) if values.size else NAN


def mean_probability(p: np.ndarray) -> float:
    """Mean positive-class probability; nan for an empty smear."""
    values = _probabilities(p)
    return float(values.mean()) if values.size else NAN


def top_k_mean(p: np.ndarray, k: int = 3) -> float:
    """Mean of the ``k`` highest probabilities (of all cells if fewer); nan for an empty smear."""
    if k < 1:
        raise SmearnetError(f"top_k_mean needs k >= 1; got {k}.", "Use e.g. k=3.")
    values = _probabilities(p)
    return float(np.sort(values)[-k:].mean()) if values.size else NAN


def noisy_or(p: np.ndarray) -> float:
    """Probability that at least one cell is positive if cells were independent: 1 - prod(1 - p)."""
    values = _probabilities(p)
    if not values.size:
        return NAN
    with np.errstate(divide="ignore"):
        return float(-np.expm1(np.sum(np.log1p(-values))))


def expected_positive(p: np.ndarray) -> float:
    """Expected number of positive cells, sum(p); nan for an empty smear."""
    values = _probabilities(p)
    return float(values.sum()) if values.size else NAN


SMEAR_SCORES: dict[str, Callable[[np.ndarray], float]] = {
    "share": share_of_calls,
    "mean_prob": mean_probability,
    "top3_mean": top_k_mean,
    "noisy_or": noisy_or,
    "expected_positive": expected_positive,
}
"""Smear scores by name; ``smear_table`` adds each as column ``score_<name>``."""


# --- the cell call ---------------------------------------------------------------------------


def cell_calls(probabilities: np.ndarray, classes: Sequence[str], positive_class: str,
               cell_threshold: float | None = None) -> np.ndarray:
    """Each cell's called class from its row of class probabilities (a NaN row, an undecodable cell: ``""``).

    The arg-max (the paper); with ``cell_threshold``, the positive class exactly when its probability is
    ``>= cell_threshold``, else the arg-max of the other classes.  ``smear_table`` counts a cell as called
    positive by the same rule, so a smear's share of positive calls is the share of its cells called positive here.
    """
    values = np.asarray(probabilities, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(classes):
        raise SmearnetError(f"Cell probabilities must have shape (n_cells, {len(classes)}); got {values.shape}.",
                            "pass one row of class probabilities per cell, in the model's class order.")
    if positive_class not in classes:
        raise SmearnetError(f"The positive class {positive_class!r} is not one of {list(classes)}.",
                            "use the rule registered with this model (its classes).")
    names = np.asarray(list(classes), dtype=object)
    valid = ~np.isnan(values).any(axis=1)
    calls = np.full(len(values), "", dtype=object)
    if not valid.any():
        return calls
    calls[valid] = names[values[valid].argmax(axis=1)]
    if cell_threshold is not None:
        positive = list(classes).index(positive_class)
        others = values[valid].copy()
        others[:, positive] = -np.inf
        called = values[valid, positive] >= cell_threshold
        calls[valid] = np.where(called, positive_class, names[others.argmax(axis=1)])
    return calls


# --- per-smear table ------------------------------------------------------------------------


def smear_table(
    cells: pd.DataFrame,
    positive_class: str,
    *,
    cell_threshold: float | None = None,
    all_smear_ids: list[Any] | None = None,
) -> pd.DataFrame:
    """One row per smear from a per-cell table.

    ``cells`` needs columns ``smear_id``, ``label`` (true class name), ``predicted``
    (argmax class name) and ``prob_<positive_class>``.  Output columns: ``smear_id,
    n_cells, n_true_positive_cells, n_predicted_positive, share_predicted_positive,
    truth_positive`` and ``score_<name>`` for every entry of ``SMEAR_SCORES``.

    ``n_predicted_positive`` counts cells whose ``predicted`` label is the positive class
    (the paper's rule) when ``cell_threshold`` is None, else cells with
    ``prob_<positive_class> >= cell_threshold``; ``score_share`` uses the same cell
    threshold (0.5 when None).  ``all_smear_ids`` lists every smear that should appear:
    smears without cells get ``n_cells == 0``, NaN share and scores, ``truth_positive ==
    False``; cells of a smear not in the list raise.  Rows keep the order of ``all_smear_ids``, else the
    order in which smears first appear in ``cells``: never the order of the ids themselves, which are
    pseudonyms under a secret key, so nothing computed from the table's order depends on the key.
    """
    probability_column = f"prob_{positive_class}"
    required = ["smear_id", "label", "predicted", probability_column]
    missing = [column for column in required if column not in cells.columns]
    if missing:
        raise SmearnetError(
            f"The cell table lacks column(s) {missing}; it has {list(cells.columns)}.",
            f"Write predictions with smear_id, label, predicted and one prob_<class> column per class "
            f"(including {probability_column!r}).",
        )
    if cells["smear_id"].isna().any():
        raise SmearnetError("Some cells have no smear_id.", "Give every cell the id of its smear.")

    smear_ids = pd.unique(cells["smear_id"]).tolist()
    if all_smear_ids is not None:
        unknown = sorted(set(smear_ids) - set(all_smear_ids), key=str)
        if unknown:
            raise SmearnetError(
                f"Cells belong to smear(s) not in all_smear_ids: {unknown[:10]}.",
                "Pass the complete list of smear ids for this split, or drop cells of other splits.",
            )
        smear_ids = list(dict.fromkeys(all_smear_ids))

    score_threshold = 0.5 if cell_threshold is None else cell_threshold
    groups = {smear_id: group for smear_id, group in cells.groupby("smear_id", sort=False)}
    rows = []
    for smear_id in smear_ids:
        group = groups.get(smear_id, cells.iloc[0:0])
        probabilities = group[probability_column].to_numpy(dtype=np.float64)
        if cell_threshold is None:
            called_positive = (group["predicted"] == positive_class).to_numpy()
        else:
            called_positive = _probabilities(probabilities) >= cell_threshold
        n_cells = len(group)
        n_true_positive_cells = int((group["label"] == positive_class).sum())
        row: dict[str, Any] = {
            "smear_id": smear_id,
            "n_cells": n_cells,
            "n_true_positive_cells": n_true_positive_cells,
            "n_predicted_positive": int(called_positive.sum()),
            "share_predicted_positive": float(called_positive.mean()) if n_cells else NAN,
            "truth_positive": n_true_positive_cells > 0,
        }
        for name, score in SMEAR_SCORES.items():
            if name == "share":
                row[f"score_{name}"] = share_of_calls(probabilities, score_threshold)
            else:
                row[f"score_{name}"] = score(probabilities)
        rows.append(row)

    columns = [
        "smear_id", "n_cells", "n_true_positive_cells", "n_predicted_positive",
        "share_predicted_positive", "truth_positive", *(f"score_{name}" for name in SMEAR_SCORES),
    ]  # fmt: skip
    table = pd.DataFrame(rows, columns=columns)
    table = table.astype({"n_cells": int, "n_true_positive_cells": int, "n_predicted_positive": int})
    table["truth_positive"] = table["truth_positive"].astype(bool)
    return table

