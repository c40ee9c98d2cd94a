"""Simulated smears under a stated cell-level confusion, to show where each smear score breaks.

``simulate_smear_probabilities`` draws per-cell probabilities for composed smears from a sensitivity and the
false-positive rates of background and look-alike cells (``benchmarks/smear_scores.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from smearnet.errors import SmearnetError
from smearnet.smear.compose import BACKGROUND, LOOKALIKE, TARGET, SmearDesign, plan_smear_mixes

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


