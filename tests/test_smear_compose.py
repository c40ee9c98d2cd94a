"""The one composition model: smears re-drawn from cells, for choosing (development) and judging (test)."""

import pandas as pd
import pytest

from smearnet.errors import SmearnetError
from smearnet.smear import SmearDesign, compose_smears, design_fitted_to_smears, evaluation_smears

DESIGN = SmearDesign(cells_per_smear=(20, 40), target_cells=(1, 3), lookalike_smears=0.3, lookalike_cells=(1, 4))


def cells(n_target=30, n_other=300):
    labels = ["erythroblast"] * n_target + ["neutrophil", "lymphocyte"] * (n_other // 2)
    return pd.DataFrame({"label": labels, "path": [f"c{i}.jpg" for i in range(len(labels))],
                         "patient_id": [f"P{i:04d}" for i in range(len(labels))]})


def compose(frame, seed=0, per_class=20):
    return compose_smears(frame, DESIGN, positive_class="erythroblast", lookalike_classes=["lymphocyte"],
                          smears_per_class=per_class, seed=seed)


def test_positive_smears_carry_targets_and_negatives_none():
    smears = compose(cells())
    per_smear = smears.groupby("smear_id")["label"].apply(lambda s: int((s == "erythroblast").sum()))
    positive = per_smear[per_smear.index.str.contains("-pos-")]
    negative = per_smear[per_smear.index.str.contains("-neg-")]
    assert len(positive) == len(negative) == 2 * 20  # both parts
    assert positive.between(1, 3).all() and (negative == 0).all()
    sizes = smears.groupby("smear_id").size()
    assert sizes.between(20, 40).all()  # one size range for both classes: size says nothing about the call
    assert not smears.duplicated(["smear_id", "cell_index"]).any()  # never twice in one smear


def test_the_two_parts_share_no_cell_and_no_patient():
    smears = compose(cells())
    part0, part1 = smears[smears["part"] == 0], smears[smears["part"] == 1]
    assert set(part0["cell_index"]).isdisjoint(part1["cell_index"])
    assert set(part0["patient_id"]).isdisjoint(part1["patient_id"])
    assert (part0["smear_id"].str.startswith("C0-")).all() and (part1["smear_id"].str.startswith("C1-")).all()


def test_deterministic_by_seed():
    assert compose(cells(), seed=3).equals(compose(cells(), seed=3))
    assert not compose(cells(), seed=3).equals(compose(cells(), seed=4))


def test_missing_positive_class_is_a_clear_error():
    with pytest.raises(SmearnetError, match="positive class `erythroblast`"):
        compose(cells(n_target=0))


def test_too_few_positive_patients_for_two_halves_is_a_clear_error():
    with pytest.raises(SmearnetError, match="two disjoint halves"):
        compose(cells(n_target=1))


def test_evaluation_smears_prefer_the_assessment_cohort_then_composition_then_the_test_split():
    frame = cells().assign(split="test", smear_id=lambda f: f["patient_id"])
    settings = {"enabled": True, "smears_per_class": 5, "cells_per_smear": [20, 40], "target_cells": [1, 3],
                "lookalike_smears": 0.3, "lookalike_cells": [1, 4], "lookalike_classes": ["lymphocyte"]}
    composed, source = evaluation_smears(frame, settings, positive_class="erythroblast", seed=0)
    assert source.startswith("composed") and composed["smear_id"].nunique() == 2 * 2 * 5
    own, source = evaluation_smears(frame, {**settings, "enabled": False}, positive_class="erythroblast", seed=0)
    assert source == "test split's own smears" and len(own) == len(frame)
    with_assessment = pd.concat([frame, frame.head(5).assign(split="assessment")])
    assessed, source = evaluation_smears(with_assessment, settings, positive_class="erythroblast", seed=0)
    assert source == "assessment cohort" and len(assessed) == 5


def _smears(counts):
    """Real smears: (size, positive cells) per smear, labels only."""
    rows = []
    for number, (size, positive) in enumerate(counts):
        rows += [{"smear_id": f"S{number}", "label": "variant"}] * positive
        rows += [{"smear_id": f"S{number}", "label": "normal"}] * (size - positive)
    return pd.DataFrame(rows)


def test_development_smears_are_composed_like_a_cohorts_own_mixed_smears():
    """Ten positive smears of 30-48 cells holding 2-11 positive cells among normal ones, ten negative ones: the
    design takes their 10th-90th percentile sizes and positive counts; look-alike settings stay configured."""
    counts = [(30 + 2 * i, 2 + i) for i in range(10)] + [(30 + 2 * i, 0) for i in range(10)]
    design, source = design_fitted_to_smears(_smears(counts), "variant", DESIGN, min_mixed_smears=5)
    assert design.cells_per_smear == (31, 47) and design.target_cells == (2, 11)
    assert (design.lookalike_smears, design.lookalike_cells) == (DESIGN.lookalike_smears, DESIGN.lookalike_cells)
    assert "20 smears (10 positive, 10 of them mixed)" in source


def test_the_configured_design_stays_where_smears_are_one_class_or_one_cell_or_too_few_are_mixed():
    one_class = _smears([(40, 40)] * 6 + [(40, 0)] * 6)  # the synthetic development cohort: a patient, a class
    one_cell = _smears([(1, 1)] * 30 + [(1, 0)] * 30)  # PBC: every cell its own smear
    few = _smears([(30, 3)] * 4 + [(30, 0)] * 10)
    for cohort in (one_class, one_cell, few):
        design, source = design_fitted_to_smears(cohort, "variant", DESIGN, min_mixed_smears=5)
        assert design == DESIGN and source.startswith("smear.compose (")
    assert "4 development smears hold positive and negative cells" in design_fitted_to_smears(
        few, "variant", DESIGN, min_mixed_smears=5)[1]
    assert design_fitted_to_smears(few, "variant", DESIGN, min_mixed_smears=4)[0].target_cells == (3, 3)
    with pytest.raises(SmearnetError, match="min_mixed_smears"):
        design_fitted_to_smears(few, "variant", DESIGN, min_mixed_smears=0)
