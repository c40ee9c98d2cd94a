import numpy as np
import pandas as pd
import pytest

from smearnet.errors import SmearnetError
from smearnet.data.split import assert_no_patient_leakage, split_by_patient, split_summary


def cohort(n_patients_per_class=10, cells=(3, 12), seed=0, classes=("normal", "classic_rl", "covid_rl")):
    rng = np.random.default_rng(seed)
    rows = []
    for label in classes:
        for p in range(n_patients_per_class):
            for c in range(int(rng.integers(*cells))):
                rows.append({"path": f"/x/{label}{p}_{c}.jpg", "label": label, "patient_id": f"{label}-{p}",
                             "smear_id": f"{label}-{p}", "site": "a", "cohort": "development"})
    return pd.DataFrame(rows)


FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def test_no_patient_in_two_splits_and_every_split_has_every_class():
    out = split_by_patient(cohort(), FRACTIONS, seed=1)
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    for split in ("train", "val", "test"):
        assert set(out[out["split"] == split]["label"]) == {"normal", "classic_rl", "covid_rl"}


def test_stratified_shares_close_to_targets():
    out = split_by_patient(cohort(n_patients_per_class=40), FRACTIONS, seed=3)
    for label, rows in out.groupby("label"):
        shares = rows["split"].value_counts(normalize=True)
        assert abs(shares["train"] - 0.7) < 0.08, (label, shares)
        assert abs(shares["test"] - 0.15) < 0.08, (label, shares)


def test_deterministic_by_seed_and_changes_with_seed():
    a = split_by_patient(cohort(), FRACTIONS, seed=5)
    b = split_by_patient(cohort(), FRACTIONS, seed=5)
    c = split_by_patient(cohort(), FRACTIONS, seed=6)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()


def test_assessment_cohort_kept_apart():
    development = cohort()
    assessment = development.head(5).assign(patient_id="A1", smear_id="A1", cohort="assessment")
    out = split_by_patient(pd.concat([development, assessment]), FRACTIONS, seed=0)
    assert (out[out["cohort"] == "assessment"]["split"] == "assessment").all()
    summary = split_summary(out)
    assert summary["assessment"]["cells"] == 5 and summary["assessment"]["patients"] == 1


def test_leakage_is_detected():
    frame = pd.DataFrame({"patient_id": ["p1", "p1"], "split": ["train", "test"]})
    with pytest.raises(SmearnetError, match="more than one split"):
        assert_no_patient_leakage(frame)


@pytest.mark.parametrize("fractions, message", [({"train": 0.0, "val": 1.0}, "nothing to train"),
                                                ({"train": 1.0, "holdout": 0.2}, "Unknown split"),
                                                ({"train": float("nan")}, "finite")])
def test_bad_fractions(fractions, message):
    with pytest.raises(SmearnetError, match=message):
        split_by_patient(cohort(), fractions, seed=0)
