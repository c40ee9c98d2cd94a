"""One composition model for smears simulated from cells: how many target, look-alike and background cells.

Used wherever smears are re-drawn from cells (``plan_smear_mixes`` + ``compose_bags``): the aggregate stage
composes development smears from validation cells to choose a score, and ``compose_smears`` composes the
evaluation smears of data without smears of its own (e.g. PBC) from test cells.  Look-alike negatives
(e.g. classic RL next to COVID-19 RL) are drawn to their own count in a share of the smears of *both*
classes, so they carry no information about the call; both classes draw their size from the same range, so
no score can win by tracking smear size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from smearnet.errors import SmearnetError

BACKGROUND, LOOKALIKE, TARGET = 0, 1, 2
"""Cell kinds in simulated and composed smears."""


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




def patient_parts(cells: pd.DataFrame, positive_class: str, seed: int) -> np.ndarray:
    """Part 0 or 1 for every cell: patients (positive when any cell is) dealt into two stratified halves.

    Composed smears repeat cells across smears, so the smears that choose a threshold and the smears that
    judge it are composed from these disjoint halves: no cell (and no patient) sits on both sides.
    """
    positive = (cells["label"] == positive_class).groupby(cells["patient_id"].to_numpy()).any()
    rng = np.random.default_rng(seed)
    part_of = {}
    for value in (True, False):
        members = positive.index.to_numpy()[(positive == value).to_numpy()]
        members = members[rng.permutation(len(members))]
        part_of.update({patient: index % 2 for index, patient in enumerate(members)})
    return cells["patient_id"].map(part_of).to_numpy(dtype=np.int64)


def compose_smears(cells: pd.DataFrame, design: SmearDesign, *, positive_class: str,
                   lookalike_classes: Sequence[str], smears_per_class: int, seed: int) -> pd.DataFrame:
    """Rows of ``cells`` regrouped into simulated smears, for data without smears of its own (e.g. PBC).

    ``smears_per_class`` positive and as many negative smears are composed in each of two parts made of
    disjoint patients (``patient_parts``); returns the cells' rows with ``smear_id`` (``C<part>-pos-001``),
    ``part`` (0: may choose a threshold, 1: judged blind) and ``cell_index`` (the row label in ``cells``).
    This is a simulation: cells of different donors are mixed into one smear, and a cell may appear in
    several smears (never twice in one unless its pool is smaller than the count).
    """
    if not (cells["label"] == positive_class).any():
        raise SmearnetError(f"No cells of the positive class `{positive_class}` to compose positive smears from.",
                            "check data.positive_class against the classes of the test split.")
    parts = patient_parts(cells, positive_class, seed)
    rng = np.random.default_rng([seed, 7])
    pieces = []
    for part in (0, 1):
        pool = cells[parts == part]
        if not (pool["label"] == positive_class).any() or (pool["label"] == positive_class).all():
            raise SmearnetError(f"Too few test patients to compose smears from two disjoint halves (half {part} "
                                f"has {len(pool)} cells, {int((pool['label'] == positive_class).sum())} positive).",
                                "use a larger test split (split.test) or more data.")
        mixes = plan_smear_mixes(smears_per_class, smears_per_class, design, rng)
        bags = compose_bags(pool["label"].to_numpy(), mixes, rng, positive_class=positive_class,
                            lookalike_classes=lookalike_classes)
        for number, (mix, bag) in enumerate(zip(mixes, bags, strict=True)):
            smear = pool.iloc[bag].copy()
            smear["cell_index"] = smear.index
            smear["smear_id"] = f"C{part}-{'pos' if mix.positive else 'neg'}-{number + 1:03d}"
            smear["part"] = part
            pieces.append(smear)
    return pd.concat(pieces, ignore_index=True)


def design_fitted_to_smears(cells: pd.DataFrame, positive_class: str, design: SmearDesign, *,
                            min_mixed_smears: int) -> tuple[SmearDesign, str]:
    """``design`` with its smear sizes and positive-cell counts read off real smears, where the data has them.

    When at least ``min_mixed_smears`` (>= 1) positive smears of ``cells`` (rows with ``smear_id`` and ``label``; only
    labels are read) also hold negative cells, as a hospital's smears do, ``cells_per_smear`` becomes the 10th-90th
    percentile range of all smears' sizes and ``target_cells`` that of the positive smears' positive-cell counts,
    so that smears composed to choose a score look like the smears it will be judged on. Look-alike
    settings stay as configured. Otherwise (every smear one class, as in the synthetic development cohort, or one
    cell a smear, as in PBC) ``design`` is returned unchanged. Returns the design and where it comes from.
    """
    if min_mixed_smears < 1:
        raise SmearnetError(f"min_mixed_smears must be >= 1; got {min_mixed_smears}.",
                            "set smear.compose.fit_to_development to e.g. 5, or 0 to keep the configured design.")
    sizes = cells.groupby("smear_id").size()
    positives = (cells["label"] == positive_class).groupby(cells["smear_id"]).sum()
    positive_smears = positives[positives > 0]
    mixed = positive_smears[positive_smears < sizes[positive_smears.index]]
    if len(mixed) < min_mixed_smears:
        return design, (f"smear.compose ({len(mixed)} development smears hold positive and negative cells; "
                        f"{min_mixed_smears} needed to read the design off them)")
    def spread(counts: pd.Series) -> tuple[int, int]:  # counts >= 1, so the rounded-out range starts at 1 or more
        low, high = np.quantile(counts.to_numpy(), [0.1, 0.9])
        return int(np.floor(low)), int(np.ceil(high))

    fitted = SmearDesign(cells_per_smear=spread(sizes), target_cells=spread(positive_smears),
                         lookalike_smears=design.lookalike_smears, lookalike_cells=design.lookalike_cells)
    return fitted, (f"the development cohort's {len(sizes)} smears ({len(positive_smears)} positive, {len(mixed)} of "
                    "them mixed): 10th-90th percentiles of smear size and of positive cells per positive smear")


def design_from_config(compose: Any) -> tuple[SmearDesign, int, tuple[str, ...]]:
    """The composition model of the ``smear.compose`` config section: design, smears per class, look-alikes."""
    design = SmearDesign(cells_per_smear=compose["cells_per_smear"], target_cells=compose["target_cells"],
                         lookalike_smears=float(compose["lookalike_smears"]),
                         lookalike_cells=compose["lookalike_cells"])
    smears_per_class = int(compose["smears_per_class"])
    if smears_per_class < 2:
        raise SmearnetError(f"smear.compose.smears_per_class must be >= 2; got {smears_per_class}.",
                            "use e.g. 100.")
    return design, smears_per_class, tuple(str(name) for name in compose["lookalike_classes"])


def evaluation_smears(split_manifest: pd.DataFrame, compose: Any, *, positive_class: str,
                      seed: int) -> tuple[pd.DataFrame, str]:
    """The smears every model is judged on (smear stage, promotion gate), and where they come from.

    The assessment cohort when the data has one; else, with ``smear.compose.enabled``, smears composed from
    the test split in two disjoint halves (``compose_smears``); else the test split's own smears.
    """
    assessment = split_manifest[split_manifest["split"] == "assessment"]
    if not assessment.empty:
        return assessment, "assessment cohort"
    test = split_manifest[split_manifest["split"] == "test"]
    if compose is not None and compose.get("enabled"):
        design, per_class, lookalikes = design_from_config(compose)
        smears = compose_smears(test, design, positive_class=positive_class, lookalike_classes=lookalikes,
                                smears_per_class=per_class, seed=seed)
        return smears, "composed from test cells (two halves of disjoint patients)"
    return test, "test split's own smears"


def smear_keys(smears: pd.DataFrame) -> list[str]:
    """The ids of ``evaluation_smears`` as the smear stage writes them: pseudonyms of real smears, composed ids
    (which name no patient) as they are."""
    from smearnet.pseudonyms import pseudonym

    if "part" in smears.columns:
        return [str(s) for s in smears["smear_id"]]
    return [pseudonym(s) for s in smears["smear_id"]]
