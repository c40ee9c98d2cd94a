"""Patient-grouped, class-stratified split of development cells that keeps every patient where it was first put.

Why sticky: when a hospital adds a site and retrains, a split dealt afresh can move earlier test patients into
training, and the new model would then be tested partly on patients it trained on. So the split remembers every
patient it has placed (the assignments: ``patient_id, split``; raw ids, so the table lives with the data under
``data/``, never in git or MLflow), keeps those placements, and deals only the patients it has not seen.

How new development patients are dealt: patients are stratified by their site and their majority label (a tie goes
to the first label by name), so a new site's patients reach val and test too and per-site figures exist. Given the
positive class, a patient holding any positive cell counts as of the positive class: where positive cells are rare
every patient's majority label is the negative one, and the few positive patients would otherwise fall into val and
test by chance (a validation split with no positive cell cannot choose a cell threshold). Within a stratum the new
patients are ordered by ``sha256(f"{seed}:{patient_id}")``, so a patient's place in the order depends on the seed
and its own id only: not on which other patients exist, the order of the manifest's rows or the pseudonym key
(`smearnet.pseudonyms`, a per-machine secret). Each goes to the split furthest below its target share of its class's
cells over every site, counting the cells of the patients already placed. While a split has no patient of the
stratum (or, failing that, of the class) and the stratum (the class) has at least one patient per split, the next
new patient goes to an empty split (largest target first), so small classes and new sites still reach val and test.

Assessment-cohort patients are recorded as ``assessment`` and never dealt. A patient who changes cohort, or an
assignment to a split the fractions no longer configure, is refused rather than silently moved. Patients remembered
but absent from the manifest stay remembered (a site may be re-ingested later).

Changing ``seed`` or the fractions therefore moves no earlier patient; it only changes how new patients are dealt.
Dealing every patient afresh means deleting the assignments, and earlier test patients may then land in training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smearnet.errors import SmearnetError

SPLITS = ("train", "val", "test")
ASSESSMENT = "assessment"
#: Columns of the assignments table: one row per patient ever placed, in the order they were first placed.
ASSIGNMENT_COLUMNS = ("patient_id", "split")
_REDEAL = ("or delete the split assignments (the split stage's data/split_assignments/) to deal every patient "
           "afresh, knowing that earlier test patients may then move into training")


def split_by_patient(manifest: pd.DataFrame, fractions: Mapping[str, float], seed: int,
                     positive_class: str | None = None) -> pd.DataFrame:
    """A fresh split, with no earlier assignments: `manifest` with a `split` column (see `sticky_split_by_patient`)."""
    split_manifest, _ = sticky_split_by_patient(manifest, fractions, seed, positive_class=positive_class)
    return split_manifest


def sticky_split_by_patient(manifest: pd.DataFrame, fractions: Mapping[str, float], seed: int,
                            earlier: pd.DataFrame | None = None,
                            positive_class: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split `manifest` by patient, keeping the splits `earlier` assigned; return (split manifest, assignments).

    The split manifest is `manifest` with a `split` column: train/val/test for development cells, assessment for
    the rest. The assignments are `earlier`'s rows, unchanged, followed by one row per patient of `manifest` it did
    not hold (sorted by id). `earlier=None` (a first run) deals every patient; the result depends on `seed` only.
    """
    targets = _normalised_fractions(fractions)
    earlier = _checked_assignments(earlier, targets)
    is_development = manifest["cohort"] != ASSESSMENT
    development = manifest[is_development]
    if development.empty:
        raise SmearnetError("No development cells to split: every row has cohort=assessment.",
                            "mark the training cohort's rows `cohort=development` (or leave the column out).")
    known = dict(zip(earlier["patient_id"], earlier["split"]))
    _refuse_cohort_changes(manifest, is_development, known)
    assignment = deal_new_patients(development, known, targets, seed, positive_class=positive_class)
    out = manifest.copy()
    out["split"] = ASSESSMENT
    out.loc[is_development, "split"] = out.loc[is_development, "patient_id"].map(assignment)
    assert_no_patient_leakage(out)
    new_rows = (out.loc[~out["patient_id"].isin(list(known)), list(ASSIGNMENT_COLUMNS)]
                .drop_duplicates("patient_id").sort_values("patient_id"))
    return out, pd.concat([earlier, new_rows], ignore_index=True)


def deal_new_patients(development: pd.DataFrame, known: Mapping[str, str], targets: Mapping[str, float],
                      seed: int, positive_class: str | None = None) -> dict[str, str]:
    """The split of every patient of `development`: `known`'s split when it has one, else dealt (module docstring)."""
    cells = development.groupby("patient_id").size()
    strata = patient_strata(development, positive_class)
    labels = strata.map(lambda stratum: stratum[1])
    assignment = {patient: known[patient] for patient in cells.index if patient in known}
    # Shares are kept per class over every site; empty splits are filled per site and class first, then per class.
    class_cells = {label: dict.fromkeys(targets, 0) for label in labels.unique()}
    class_patients = {label: dict.fromkeys(targets, 0) for label in labels.unique()}
    for patient, split in assignment.items():
        class_cells[labels[patient]][split] += int(cells[patient])
        class_patients[labels[patient]][split] += 1
    for stratum in sorted(strata.unique()):
        label = stratum[1]
        patients = strata.index[strata == stratum]
        stratum_patients = dict.fromkeys(targets, 0)
        for patient in patients:
            if patient in known:
                stratum_patients[known[patient]] += 1
        for patient in sorted((p for p in patients if p not in known), key=lambda p: dealing_key(seed, p)):
            chosen = (_empty_split(targets, stratum_patients, len(patients))
                      or _empty_split(targets, class_patients[label], int((labels == label).sum()))
                      or _furthest_below_target(targets, class_cells[label], int(cells[patient])))
            assignment[patient] = chosen
            stratum_patients[chosen] += 1
            class_patients[label][chosen] += 1
            class_cells[label][chosen] += int(cells[patient])
    return assignment


def dealing_key(seed: int, patient_id: str) -> tuple[str, str]:
    """Where a new patient comes in its stratum's dealing order: its own id and the seed, no secret key."""
    return hashlib.sha256(f"{seed}:{patient_id}".encode("utf-8")).hexdigest(), str(patient_id)


def patient_strata(development: pd.DataFrame, positive_class: str | None = None) -> pd.Series:
    """Each patient's stratum: (its site, first by name if it spans several; its class: `positive_class` when it
    holds any cell of it, else its majority label), by patient id."""
    labels = majority_labels(development)
    if positive_class is not None:
        holds_positive = development["label"].eq(positive_class).groupby(development["patient_id"]).any()
        labels = labels.where(~holds_positive[labels.index], positive_class)
    if "site" not in development.columns:
        return labels.map(lambda label: ("", label))
    sites = development.groupby("patient_id")["site"].agg(lambda values: sorted(values.astype(str).unique())[0])
    return pd.Series([(sites[p], labels[p]) for p in labels.index], index=labels.index)


def majority_labels(development: pd.DataFrame) -> pd.Series:
    """Each patient's most frequent label (a tie goes to the first label by name), indexed by patient id."""
    counts = development.groupby(["patient_id", "label"]).size().rename("cells").reset_index()
    counts = counts.sort_values(["patient_id", "cells", "label"], ascending=[True, False, True], kind="stable")
    return counts.drop_duplicates("patient_id").set_index("patient_id")["label"]


def read_assignments(path: Path) -> pd.DataFrame | None:
    """The assignments table at `path` (ids kept as text), or None when there is none yet (a first run)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise SmearnetError(f"The split assignments {path} are an empty file (not even a header).",
                            f"restore it from the DVC cache (`dvc checkout`), {_REDEAL}.") from None


def assignment_counts(split_manifest: pd.DataFrame, earlier: pd.DataFrame | None) -> dict[str, int]:
    """Patients of the split kept from `earlier`, new to it, and remembered but absent now (counts, no ids)."""
    now = set(split_manifest["patient_id"])
    before = set() if earlier is None else set(earlier["patient_id"])
    return {"kept": len(now & before), "new": len(now - before), "remembered_absent": len(before - now)}


def assert_no_patient_leakage(split_manifest: pd.DataFrame) -> None:
    """Raise when any patient appears in more than one split."""
    splits_per_patient = split_manifest.groupby("patient_id")["split"].nunique()
    leaking = int((splits_per_patient > 1).sum())
    if leaking:
        raise SmearnetError(
            f"{leaking} patient(s) have cells in more than one split (train/val/test/assessment).",
            "a patient must belong to one cohort: check the manifest's `cohort` column for those patients.",
        )


def split_summary(split_manifest: pd.DataFrame, positive_class: str | None = None) -> dict:
    """Cells and patients per split and class, for the metrics file (no patient ids); with `positive_class`, how
    many smears hold a cell of it (the smear figures' positive smears)."""
    summary: dict = {}
    for split, rows in split_manifest.groupby("split"):
        summary[str(split)] = {
            "cells": int(len(rows)),
            "patients": int(rows["patient_id"].nunique()),
            "smears": int(rows["smear_id"].nunique()),
            "cells_per_class": {str(k): int(v) for k, v in rows["label"].value_counts().sort_index().items()},
        }
        if positive_class is not None:
            summary[str(split)]["positive_smears"] = int(rows.loc[rows["label"] == positive_class, "smear_id"].nunique())
    return summary


# The smear stage's default threshold choice (held_out) picks the threshold on half the assessment smears and
# classifies the other half blind: each half needs a positive and a negative smear (cross_validated needs
# smear.folds of each, same one). The split does not read smear.*: it warns for the default.
_SMEARS_PER_CLASS_FOR_HELD_OUT = 2


def assessment_smear_warning(summary: Mapping[str, Any], positive_class: str | None) -> str | None:
    """Stops the split when the assessment cohort's smears are all of one class (no smear figure can be measured
    on them, and the smear stage would say so only after training); a warning when it holds fewer than two of a
    class, too few for the default held-out threshold choice. None when there is no assessment cohort (the
    evaluation smears are then composed or the test split's, which the split does not judge) or it is fine."""
    assessment = summary.get(ASSESSMENT)
    if assessment is None or positive_class is None:
        return None
    positive = assessment["positive_smears"]
    negative = assessment["smears"] - positive
    counts = (f"The assessment cohort has {positive} positive and {negative} negative smear(s) (a smear is positive "
              f"when it holds a {positive_class} cell)")
    if positive == 0 or negative == 0:
        raise SmearnetError(f"{counts}: a smear ROC needs both, so the smear stage would stop after training.",
                            "add assessment smears of the missing kind to the manifest (cohort=assessment), or "
                            "check data.positive_class.")
    if min(positive, negative) < _SMEARS_PER_CLASS_FOR_HELD_OUT:
        return (f"{counts}: too few for smear.threshold_selection=held_out (the default), which needs "
                f"{_SMEARS_PER_CLASS_FOR_HELD_OUT} of each, or cross_validated (smear.folds of each); under either "
                "the smear stage stops after training. Add assessment smears, or set smear.threshold_selection=same "
                "(the threshold is then chosen on the smears it is judged on).")
    return None


def _empty_split(targets: Mapping[str, float], placed_patients: Mapping[str, int], patients: int) -> str | None:
    """A split with no patient yet (largest target first), when the group has at least one patient per split."""
    empty = [split for split in targets if placed_patients[split] == 0]
    return max(empty, key=lambda split: targets[split]) if empty and patients >= len(targets) else None


def _furthest_below_target(targets: Mapping[str, float], placed_cells: Mapping[str, int], cells: int) -> str:
    total = sum(placed_cells.values()) + cells
    return max(targets, key=lambda split: targets[split] * total - placed_cells[split])


def _checked_assignments(earlier: pd.DataFrame | None, targets: Mapping[str, float]) -> pd.DataFrame:
    """`earlier` (an empty table for None) after refusing what would make a patient move. Messages hold no ids."""
    if earlier is None:
        return pd.DataFrame({column: pd.Series(dtype=str) for column in ASSIGNMENT_COLUMNS})
    if not set(ASSIGNMENT_COLUMNS) <= set(earlier.columns):
        raise SmearnetError(f"The split assignments lack a column among {list(ASSIGNMENT_COLUMNS)}.",
                            f"restore them from the DVC cache (`dvc checkout`), {_REDEAL}.")
    faults = {"an empty patient id": int((earlier["patient_id"].astype(str).str.strip() == "").sum()),
              "a patient listed twice": int(earlier["patient_id"].duplicated().sum()),
              f"a split other than {[*SPLITS, ASSESSMENT]}": int((~earlier["split"].isin([*SPLITS, ASSESSMENT])).sum())}
    faults = {fault: count for fault, count in faults.items() if count}
    if faults:
        found = "; ".join(f"{count} row(s) with {fault}" for fault, count in faults.items())
        raise SmearnetError(f"The split assignments are damaged: {found}.",
                            f"restore them from the DVC cache (`dvc checkout`), {_REDEAL}.")
    dropped = earlier["split"].isin([split for split in SPLITS if split not in targets])
    if dropped.any():
        names = sorted(set(earlier.loc[dropped, "split"]))
        raise SmearnetError(
            f"The split assignments place {int(dropped.sum())} patient(s) in {names}, which the `split` fractions "
            f"no longer configure, so those patients would have to move.",
            f"give {names} a positive share again (e.g. split.{names[0]}=0.15) to keep them where they are, "
            f"{_REDEAL}.")
    return earlier


def _refuse_cohort_changes(manifest: pd.DataFrame, is_development: pd.Series, known: Mapping[str, str]) -> None:
    """Raise when a remembered patient now appears in the other cohort (development vs assessment)."""
    remembered_assessment = {patient for patient, split in known.items() if split == ASSESSMENT}
    now_assessment = set(manifest.loc[~is_development, "patient_id"]) & (known.keys() - remembered_assessment)
    now_development = set(manifest.loc[is_development, "patient_id"]) & remembered_assessment
    if now_assessment or now_development:
        raise SmearnetError(
            f"{len(now_assessment)} patient(s) placed earlier in train/val/test now have assessment rows, and "
            f"{len(now_development)} patient(s) recorded earlier as assessment now have development rows: a patient "
            f"keeps one cohort, or its cells would cross between training and assessment.",
            f"correct the manifest's `cohort` column for those patients (compare it with the split assignments, "
            f"which list each patient's split), {_REDEAL}.")


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
