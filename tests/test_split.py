import numpy as np
import pandas as pd
import pytest

from smearnet.errors import SmearnetError
from smearnet.io import write_manifest
from smearnet.pseudonyms import KEY_ENV, pseudonym
from smearnet.data.split import (assert_no_patient_leakage, assessment_smear_warning, assignment_counts,
                                 majority_labels, read_assignments, split_by_patient, split_summary,
                                 sticky_split_by_patient)

CLASSES = ("normal", "classic_rl", "covid_rl")


def cohort(n_patients_per_class=10, cells=(3, 12), seed=0, classes=CLASSES, site="a"):
    rng = np.random.default_rng(seed)
    rows = []
    for label in classes:
        for p in range(n_patients_per_class):
            patient = f"{label}-{p}" if site == "a" else f"{site}-{label}-{p}"
            for c in range(int(rng.integers(*cells))):
                rows.append({"path": f"/x/{patient}_{c}.jpg", "label": label, "patient_id": patient,
                             "smear_id": patient, "site": site, "cohort": "development"})
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


def _with_assessment(positive: int, negative: int) -> pd.DataFrame:
    """The cohort plus assessment smears: `positive` holding one covid_rl cell among normal ones, `negative` not."""
    rows = []
    for index in range(positive + negative):
        labels = ["normal", "normal"] + (["covid_rl"] if index < positive else [])
        rows += [{"path": f"/a/{index}_{c}.jpg", "label": label, "patient_id": f"A{index}", "smear_id": f"A{index}",
                  "site": "a", "cohort": "assessment"} for c, label in enumerate(labels)]
    return split_by_patient(pd.concat([cohort(), pd.DataFrame(rows)]), FRACTIONS, seed=0)


def test_the_summary_counts_smears_holding_a_positive_cell():
    summary = split_summary(_with_assessment(positive=3, negative=4), positive_class="covid_rl")
    assert summary["assessment"]["smears"] == 7 and summary["assessment"]["positive_smears"] == 3
    assert "positive_smears" not in split_summary(_with_assessment(3, 4))["assessment"]  # no positive class named


@pytest.mark.parametrize("positive, negative", [(0, 5), (5, 0)])
def test_an_assessment_cohort_of_one_kind_of_smear_stops_the_split_before_training(positive, negative):
    summary = split_summary(_with_assessment(positive, negative), positive_class="covid_rl")
    with pytest.raises(SmearnetError, match=f"{positive} positive and {negative} negative smear.*needs both"):
        assessment_smear_warning(summary, "covid_rl")


def test_one_smear_of_a_kind_warns_that_the_held_out_choice_needs_two_and_two_of_each_pass():
    warning = assessment_smear_warning(split_summary(_with_assessment(1, 5), "covid_rl"), "covid_rl")
    assert warning and "1 positive and 5 negative" in warning and "threshold_selection=same" in warning
    assert assessment_smear_warning(split_summary(_with_assessment(2, 2), "covid_rl"), "covid_rl") is None
    assert assessment_smear_warning(split_summary(cohort().assign(split="train"), "covid_rl"), "covid_rl") is None


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


# --- the sticky split: earlier patients keep their split, only new ones are dealt --------------------------------


def splits_of(split_manifest: pd.DataFrame) -> dict[str, str]:
    return split_manifest.drop_duplicates("patient_id").set_index("patient_id")["split"].to_dict()


def test_a_new_site_keeps_every_earlier_patient_and_new_patients_are_dealt_stratified():
    site_a, site_b = cohort(seed=1), cohort(seed=2, site="b")
    first, memory = sticky_split_by_patient(site_a, FRACTIONS, seed=4)
    both = pd.concat([site_a, site_b], ignore_index=True)
    second, updated = sticky_split_by_patient(both, FRACTIONS, seed=4, earlier=memory)

    before, after = splits_of(first), splits_of(second)
    assert {patient: after[patient] for patient in before} == before
    # Dealt afresh under another seed, earlier patients move; kept by the memory, none does.
    moved_when_fresh = sum(splits_of(split_by_patient(both, FRACTIONS, seed=5))[p] != s for p, s in before.items())
    assert moved_when_fresh > 0, "a fresh deal must move someone, or this test proves nothing"
    reseeded, _ = sticky_split_by_patient(both, FRACTIONS, seed=5, earlier=memory)
    assert {patient: splits_of(reseeded)[patient] for patient in before} == before
    # The memory: old rows unchanged and first, then one row per new patient.
    pd.testing.assert_frame_equal(updated.head(len(memory)), memory)
    assert sorted(updated["patient_id"].iloc[len(memory):]) == sorted(site_b["patient_id"].unique())
    # New patients reach every split in every class, and each class's shares stay near the targets.
    new_rows = second[second["site"] == "b"]
    for split in ("train", "val", "test"):
        assert set(new_rows[new_rows["split"] == split]["label"]) == set(CLASSES), split
    for label, rows in second.groupby("label"):
        shares = rows["split"].value_counts(normalize=True)
        assert abs(shares["train"] - 0.7) < 0.1 and abs(shares["test"] - 0.15) < 0.1, (label, shares)
    assert assignment_counts(second, memory) == {"kept": 30, "new": 30, "remembered_absent": 0}


def test_a_small_class_still_reaches_val_and_test_when_new_patients_arrive():
    first, memory = sticky_split_by_patient(cohort(n_patients_per_class=1, classes=("covid_rl",)).pipe(
        lambda rare: pd.concat([cohort(classes=("normal",)), rare])), FRACTIONS, seed=0)
    assert splits_of(first)["covid_rl-0"] == "train"  # one patient of a class: it trains
    grown = pd.concat([first.drop(columns="split"), cohort(n_patients_per_class=2, classes=("covid_rl",), site="b")])
    second, _ = sticky_split_by_patient(grown, FRACTIONS, seed=0, earlier=memory)
    covid = second[second["label"] == "covid_rl"]
    assert set(covid["split"]) == {"train", "val", "test"}


def test_a_second_run_with_its_own_memory_changes_nothing():
    manifest = cohort()
    first, memory = sticky_split_by_patient(manifest, FRACTIONS, seed=3)
    again, memory_again = sticky_split_by_patient(manifest, FRACTIONS, seed=3, earlier=memory)
    assert again["split"].tolist() == first["split"].tolist()
    pd.testing.assert_frame_equal(memory_again, memory)
    assert assignment_counts(again, memory) == {"kept": 30, "new": 0, "remembered_absent": 0}


def test_new_patients_are_dealt_alike_under_any_pseudonym_key_and_row_order(monkeypatch):
    _, memory = sticky_split_by_patient(cohort(seed=1), FRACTIONS, seed=7)
    grown = pd.concat([cohort(seed=1), cohort(seed=2, site="b")], ignore_index=True)
    results = []
    for shuffle, key in enumerate(("first-secret-key", "another-secret-key")):
        monkeypatch.setenv(KEY_ENV, key)
        results.append((pseudonym("b-normal-0"), *sticky_split_by_patient(
            grown.sample(frac=1.0, random_state=shuffle), FRACTIONS, seed=7, earlier=memory)))
    (name_1, split_1, memory_1), (name_2, split_2, memory_2) = results
    assert name_1 != name_2, "the two keys must really differ for this test to mean anything"
    assert splits_of(split_1) == splits_of(split_2)
    pd.testing.assert_frame_equal(memory_1, memory_2)


def test_new_patients_of_one_class_go_where_they_go_whether_or_not_another_class_grows():
    _, memory = sticky_split_by_patient(cohort(seed=1), FRACTIONS, seed=2)
    new_normal = cohort(seed=2, site="b", classes=("normal",))
    new_covid = cohort(seed=3, site="b", classes=("covid_rl",))
    alone, _ = sticky_split_by_patient(pd.concat([cohort(seed=1), new_normal]), FRACTIONS, seed=2, earlier=memory)
    together, _ = sticky_split_by_patient(pd.concat([cohort(seed=1), new_normal, new_covid]), FRACTIONS, seed=2,
                                          earlier=memory)
    normal_patients = set(new_normal["patient_id"])
    assert {p: s for p, s in splits_of(together).items() if p in normal_patients} == \
        {p: s for p, s in splits_of(alone).items() if p in normal_patients}


def test_a_tied_majority_label_goes_to_the_first_label_by_name_whatever_the_row_order():
    tied = pd.DataFrame({"patient_id": ["p1"] * 4 + ["p2"] * 3, "label": ["normal", "covid_rl"] * 2 + ["normal"] * 3})
    for order in (tied, tied.iloc[::-1], tied.iloc[[1, 0, 2, 3, 4, 5, 6]]):
        assert majority_labels(order).to_dict() == {"p1": "covid_rl", "p2": "normal"}


def test_a_remembered_patient_missing_from_the_manifest_stays_remembered():
    both = pd.concat([cohort(seed=1), cohort(seed=2, site="b")], ignore_index=True)
    _, memory = sticky_split_by_patient(both, FRACTIONS, seed=0)
    site_a_only, kept = sticky_split_by_patient(cohort(seed=1), FRACTIONS, seed=0, earlier=memory)
    assert not site_a_only["patient_id"].str.startswith("b-").any()
    pd.testing.assert_frame_equal(kept, memory)
    assert assignment_counts(site_a_only, memory) == {"kept": 30, "new": 0, "remembered_absent": 30}


def test_assessment_patients_are_remembered_as_assessment():
    manifest = pd.concat([cohort(), cohort(n_patients_per_class=1, site="b").assign(cohort="assessment")])
    _, memory = sticky_split_by_patient(manifest, FRACTIONS, seed=0)
    assert set(memory.loc[memory["patient_id"].str.startswith("b-"), "split"]) == {"assessment"}


@pytest.mark.parametrize("was, now", [("development", "assessment"), ("assessment", "development")])
def test_a_patient_changing_cohort_is_refused_without_naming_it(was, now):
    assessment = cohort(n_patients_per_class=1, site="b").assign(cohort="assessment")
    _, memory = sticky_split_by_patient(pd.concat([cohort(), assessment]), FRACTIONS, seed=0)
    changed = "normal-3" if was == "development" else "b-normal-0"
    manifest = pd.concat([cohort(), assessment])
    manifest.loc[manifest["patient_id"] == changed, "cohort"] = now
    with pytest.raises(SmearnetError, match="keeps one cohort") as err:
        sticky_split_by_patient(manifest, FRACTIONS, seed=0, earlier=memory)
    assert "1 patient(s)" in str(err.value) and changed not in str(err.value)


def test_a_split_the_fractions_no_longer_configure_is_refused():
    _, memory = sticky_split_by_patient(cohort(), FRACTIONS, seed=0)
    assert (memory["split"] == "val").sum() > 0
    with pytest.raises(SmearnetError, match=r"\['val'\].*no longer configure"):
        sticky_split_by_patient(cohort(), {"train": 0.8, "test": 0.2}, seed=0, earlier=memory)


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.assign(split=m["split"].where(m.index != 0, "holdout")), "1 row\\(s\\) with a split other than"),
    (lambda m: pd.concat([m, m.head(2)]), "2 row\\(s\\) with a patient listed twice"),
    (lambda m: m.rename(columns={"split": "fold"}), "lack a column"),
])
def test_damaged_assignments_are_refused_without_naming_patients(damage, message):
    _, memory = sticky_split_by_patient(cohort(), FRACTIONS, seed=0)
    with pytest.raises(SmearnetError, match=message) as err:
        sticky_split_by_patient(cohort(), FRACTIONS, seed=0, earlier=damage(memory))
    assert not any(patient in str(err.value) for patient in memory["patient_id"])


def test_assignments_round_trip_through_a_file_with_ids_kept_as_text(tmp_path):
    path = tmp_path / "split_assignments" / "patients.csv"
    assert read_assignments(path) is None
    manifest = cohort().assign(patient_id=lambda m: "00" + m["patient_id"].str.len().astype(str) + m["patient_id"])
    _, memory = sticky_split_by_patient(manifest, FRACTIONS, seed=0)
    write_manifest(memory, path)
    pd.testing.assert_frame_equal(read_assignments(path), memory)
    path.write_text("")
    with pytest.raises(SmearnetError, match="empty file"):
        read_assignments(path)


def rare_positive_cohort(n_patients=30, n_positive=3, seed=0):
    """Every patient mostly normal cells; `n_positive` of them hold a single variant cell among 20."""
    rows = []
    for p in range(n_patients):
        labels = ["normal"] * 19 + (["variant"] if p < n_positive else ["normal"])
        rows += [{"path": f"/x/p{p}_{c}.jpg", "label": label, "patient_id": f"p{p:02d}", "smear_id": f"p{p:02d}",
                  "site": "a", "cohort": "development"} for c, label in enumerate(labels)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", range(6))
def test_patients_holding_a_rare_positive_class_reach_val_and_test(seed):
    # Every patient's majority label is "normal": without the positive class, strata cannot see the 3 positive
    # patients and they fall into val and test by chance (a val split without positive cells cannot choose a cell
    # threshold). Given it, each split gets one.
    out = split_by_patient(rare_positive_cohort(), FRACTIONS, seed=seed, positive_class="variant")
    positive_patients = out[out["label"] == "variant"].groupby("split")["patient_id"].nunique()
    assert positive_patients.reindex(list(FRACTIONS)).tolist() == [1, 1, 1]
    assert_no_patient_leakage(out)


def test_the_positive_stratum_changes_nothing_where_patients_hold_one_class():
    # Where each patient holds one class (the demo cohort), the positive class's patients are already a stratum.
    manifest = cohort()
    pd.testing.assert_frame_equal(split_by_patient(manifest, FRACTIONS, seed=2),
                                  split_by_patient(manifest, FRACTIONS, seed=2, positive_class="covid_rl"))
