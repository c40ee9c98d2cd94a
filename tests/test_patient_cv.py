"""benchmarks/patient_cv.py: recipes compared by cross-validation over whole development patients."""

import numpy as np
import pandas as pd
import pytest

from conftest import benchmark_script


@pytest.fixture(scope="module")
def patient_cv():
    return benchmark_script("patient_cv")


def _cells(n_patients: int = 15) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for patient in range(n_patients):
        label = ("normal", "covid_rl", "classic_rl")[patient % 3]
        rows += [{"patient_id": f"P{patient:02d}", "label": label}] * int(rng.integers(3, 30))
    return pd.DataFrame(rows)


def test_folds_hold_whole_patients_and_every_class(patient_cv):
    cells = _cells()
    fold_of = patient_cv.patient_folds(cells, 5, seed=42)
    assert cells.assign(fold=fold_of).groupby("patient_id")["fold"].nunique().max() == 1
    assert sorted(set(fold_of)) == [0, 1, 2, 3, 4]
    for fold in range(5):  # 5 patients a class: each fold holds one of each
        assert set(cells.loc[fold_of == fold, "label"]) == {"normal", "covid_rl", "classic_rl"}
    assert (patient_cv.patient_folds(cells, 5, seed=42) == fold_of).all()


def test_an_arm_needs_a_name_and_overrides(patient_cv):
    assert patient_cv.parse_arm("stain=train.stain_augment.enabled=true,train.cycles=3") == (
        "stain", ["train.stain_augment.enabled=true", "train.cycles=3"])
    with pytest.raises(SystemExit, match="NAME=OVERRIDE"):
        patient_cv.parse_arm("stain")


def test_an_arms_row_gives_accuracy_and_macro_f1_with_patient_intervals_and_the_worst_patients(patient_cv):
    cells = _cells()
    called = cells["label"].to_numpy().copy()
    wrong = (cells["patient_id"] == "P00").to_numpy()  # one normal patient, every cell called covid_rl
    called[wrong] = "covid_rl"
    classes = ["normal", "classic_rl", "covid_rl"]
    row = patient_cv.summary_row("recipe", cells, called, classes, seconds=12.3)
    accuracy, interval = row["accuracy"].split(" ", 1)
    assert float(accuracy) == pytest.approx(1 - wrong.mean(), abs=5e-4)
    low, high = (float(x) for x in interval.strip("()").split("-"))
    assert low < float(accuracy) <= high == 1.0  # resamples without that patient are all right
    assert float(row["macro-F1"].split()[0]) < 1.0 and row["macro-F1"].endswith("-1.000)")
    assert row["recall normal"] == f"{1 - wrong.sum() / (cells['label'] == 'normal').sum():.3f}"
    assert row["recall covid_rl"] == "1.000" and row["worst patient"] == "0.000" and row["patients < 0.8"] == 1
    assert row["training s"] == "12"
