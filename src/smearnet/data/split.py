"""Patient-grouped, class-stratified split of development cells; assessment smears kept apart."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from smearnet.errors import SmearnetError

SPLITS = ("train", "val", "test")
ASSESSMENT = "assessment"


def split_by_patient(manifest: pd.DataFrame, fractions: Mapping[str, float], seed: int) -> pd.DataFrame:
    """Return `manifest` with a `split` column: train/val/test for development cells, assessment for the rest.

    Every patient lands in exactly one split. Patients are stratified by their majority label and,
    within each stratum, shuffled by `seed` and dealt to the split whose share of the stratum's cells is
    furthest below its target, so small classes still reach val and test.
    """
    targets = _normalised_fractions(fractions)
    out = manifest.copy()
    out["split"] = ASSESSMENT
    development = out[out["cohort"] != ASSESSMENT]
    if development.empty:
        raise SmearnetError("No development cells to split: every row has cohort=assessment.",
                            "mark the training cohort's rows `cohort=development` (or leave the column out).")
    rng = np.random.default_rng(seed)
    cells_per_patient = development.groupby("patient_id").size()
    majority_label = development.groupby("patient_id")["label"].agg(lambda labels: labels.value_counts().index[0])
    assignment: dict[str, str] = {}
    for label in sorted(majority_label.unique()):
        patients = np.array(sorted(majority_label.index[majority_label == label]))
        rng.shuffle(patients)
        placed = dict.fromkeys(targets, 0)
        total = 0
        for number, patient in enumerate(patients):
            # The first patients of a stratum seed each split (largest target first), then fill by deficit.
            if number < len(targets) and len(patients) >= len(targets):
                chosen = sorted(targets, key=lambda s: -targets[s])[number]
            else:
                chosen = max(targets, key=lambda s: targets[s] * (total + cells_per_patient[patient]) - placed[s])
            assignment[patient] = chosen
            placed[chosen] += int(cells_per_patient[patient])
            total += int(cells_per_patient[patient])
    is_development = out["cohort"] != ASSESSMENT
    out.loc[is_development, "split"] = out.loc[is_development, "patient_id"].map(assignment)
    assert_no_patient_leakage(out)
    return out


def assert_no_patient_leakage(split_manifest: pd.DataFrame) -> None:
    """Raise when any patient appears in more than one split."""
    splits_per_patient = split_manifest.groupby("patient_id")["split"].nunique()
    leaking = int((splits_per_patient > 1).sum())
    if leaking:
        raise SmearnetError(
            f"{leaking} patient(s) have cells in more than one split (train/val/test/assessment).",
            "a patient must belong to one cohort: check the manifest's `cohort` column for those patients.",
        )


def split_summary(split_manifest: pd.DataFrame) -> dict:
    """Cells and patients per split and class, for the metrics file (no patient ids)."""
    summary: dict = {}
    for split, rows in split_manifest.groupby("split"):
        summary[str(split)] = {
            "cells": int(len(rows)),
            "patients": int(rows["patient_id"].nunique()),
            "smears": int(rows["smear_id"].nunique()),
            "cells_per_class": {str(k): int(v) for k, v in rows["label"].value_counts().sort_index().items()},
        }
    return summary


def _normalised_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise SmearnetError(f"Unknown split name(s) {sorted(unknown)} in `split`.", f"use only {list(SPLITS)}.")
    values = {name: float(fractions.get(name, 0.0)) for name in SPLITS}
    if any(not np.isfinite(v) or v < 0 for v in values.values()) or sum(values.values()) <= 0:
        raise SmearnetError(f"`split` fractions {values} must be finite, >= 0 and not all zero.",
                            "e.g. split.train=0.7 split.val=0.15 split.test=0.15.")
    if values["train"] <= 0:
        raise SmearnetError("`split.train` is 0: nothing to train on.", "give the train split a positive share.")
    total = sum(values.values())
    return {name: value / total for name, value in values.items() if value > 0}
