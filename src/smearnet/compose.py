"""Simulated smears for data that has none (e.g. PBC): regroup test cells into positive and negative smears.

A positive smear carries a few cells of a target class (one whose presence in peripheral blood is
abnormal, e.g. erythroblasts) among cells of the other classes; a negative smear carries none. The cell
counts follow the first paper's Table 5 by default (RL-positive smears: 1806 cells / 58 smears, of which
132 targets; RL-negative: 432 cells / 34 smears). This is a simulation: cells of different donors are
mixed into one "smear", and a cell may appear in several smears (never twice in one).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from smearnet.errors import SmearnetError

TABLE5 = {"positive_smears": 58, "negative_smears": 34, "positive_cells_per_smear": 1806 / 58,
          "targets_per_positive_smear": 132 / 58, "negative_cells_per_smear": 432 / 34}


def compose_smears(cells: pd.DataFrame, target_class: str, *, seed: int,
                   mix: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Rows of `cells` regrouped into simulated smears; adds `smear_id` (S-pos-001 / S-neg-001) and `cell_index`."""
    mix = {**TABLE5, **(mix or {})}
    targets = np.flatnonzero((cells["label"] == target_class).to_numpy())
    others = np.flatnonzero((cells["label"] != target_class).to_numpy())
    if len(targets) == 0:
        raise SmearnetError(f"No test cells of the target class `{target_class}` to compose positive smears from.",
                            "set `smear.compose.target_class` to a class present in the test split.")
    if len(others) < 2:
        raise SmearnetError("Fewer than two non-target test cells: cannot compose smears.",
                            "use a larger test split.")
    rng = np.random.default_rng(seed)
    pieces = []
    for kind in ("positive", "negative"):
        for number in range(int(mix[f"{kind}_smears"])):
            size = max(2, int(rng.poisson(mix[f"{kind}_cells_per_smear"])))
            n_targets = 0
            if kind == "positive":
                n_targets = min(len(targets), max(1, int(rng.poisson(mix["targets_per_positive_smear"] - 1)) + 1))
            chosen = np.concatenate([rng.choice(targets, n_targets, replace=False),
                                     rng.choice(others, min(len(others), size - n_targets), replace=False)])
            smear = cells.iloc[rng.permutation(chosen)].copy()
            smear["cell_index"] = smear.index
            smear["smear_id"] = f"S-{kind[:3]}-{number + 1:03d}"
            pieces.append(smear)
    return pd.concat(pieces, ignore_index=True)
