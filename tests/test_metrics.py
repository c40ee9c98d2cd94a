"""Known-answer tests for smearnet.evaluation.metrics (cell level)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

from smearnet.errors import SmearnetError
from smearnet.io import json_safe
from smearnet.evaluation.metrics import (
    binary_counts,
    binary_summary,
    bootstrap_interval,
    cell_metrics,
    mix_accuracy,
    paired_difference,
    per_site,
    wilson_interval,
)

PAPER_FIGURE_7 = {"tp": 57, "fn": 1, "tn": 33, "fp": 1}


def test_binary_summary_reproduces_paper_figure_7():
    summary = binary_summary(PAPER_FIGURE_7)
    assert round(summary["sensitivity"]["value"], 3) == 0.983
    assert round(summary["specificity"]["value"], 3) == 0.971
    assert round(summary["precision"]["value"], 3) == 0.983
    assert round(summary["accuracy"]["value"], 3) == 0.978
    assert summary["npv"]["value"] == pytest.approx(33 / 34)
    for rate in summary.values():
        assert rate["low"] <= rate["value"] <= rate["high"]


def test_wilson_interval_matches_hand_computed_reference():
    # z = 1.959964, p = 57/58: centre (p + z^2/2n)/(1 + z^2/n), half z/(1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)
    low, high = wilson_interval(57, 58)
    assert low == pytest.approx(0.90859, abs=1e-4)
    assert high == pytest.approx(0.99695, abs=1e-4)
    assert binary_summary(PAPER_FIGURE_7)["sensitivity"]["low"] == pytest.approx(low)


def test_wilson_interval_known_values_and_symmetry():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    low, high = wilson_interval(3, 10)
    mirror_low, mirror_high = wilson_interval(7, 10)
    assert (low, high) == pytest.approx((1 - mirror_high, 1 - mirror_low))
    wide = wilson_interval(3, 10, confidence=0.99)
    assert wide[0] < low and wide[1] > high


def test_wilson_interval_empty_and_invalid():
    assert all(math.isnan(bound) for bound in wilson_interval(0, 0))
    with pytest.raises(SmearnetError):
        wilson_interval(5, 3)
    with pytest.raises(SmearnetError):
        wilson_interval(1, 3, confidence=1.5)


def test_binary_counts():
    truth = np.array([1, 1, 1, 0, 0, 0, 0], dtype=bool)
    predicted = np.array([1, 1, 0, 1, 0, 0, 0], dtype=bool)
    assert binary_counts(truth, predicted) == {"tp": 2, "fp": 1, "tn": 3, "fn": 1}
    assert binary_counts(np.array([], dtype=bool), np.array([], dtype=bool)) == {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    with pytest.raises(SmearnetError):
        binary_counts(truth, predicted[:-1])


def test_binary_summary_undefined_rates_are_nan():
    summary = binary_summary({"tp": 0, "fn": 0, "tn": 5, "fp": 0})
    assert math.isnan(summary["sensitivity"]["value"])
    assert math.isnan(summary["precision"]["low"])
    assert summary["specificity"]["value"] == 1.0
    with pytest.raises(SmearnetError):
        binary_summary({"tp": 1})


def test_bootstrap_interval_coverage_of_a_mean():
    rng = np.random.default_rng(12345)
    repetitions, covered = 200, 0
    for repetition in range(repetitions):
        sample = (rng.random(100) < 0.3).astype(float)
        low, high = bootstrap_interval(np.mean, (sample,), n_resamples=300, seed=repetition)
        covered += low <= 0.3 <= high
    assert 0.88 <= covered / repetitions <= 0.99


def test_bootstrap_interval_skips_undefined_resamples_and_keeps_strata():
    values = np.arange(10, dtype=float)
    rare = np.zeros(10, dtype=bool)
    rare[0] = True

    def mean_if_rare_present(x: np.ndarray, flag: np.ndarray) -> float:
        return float(x.mean()) if flag.any() else float("nan")

    low, high = bootstrap_interval(mean_if_rare_present, (values, rare), n_resamples=200)
    assert math.isfinite(low) and math.isfinite(high) and low <= high
    # stratified: every resample keeps exactly one rare row
    assert bootstrap_interval(lambda flag: flag.sum(), (rare,), n_resamples=50, stratify=rare) == (1.0, 1.0)
    assert all(math.isnan(b) for b in bootstrap_interval(lambda x: float("nan"), (values,), n_resamples=10))
    with pytest.raises(SmearnetError):
        bootstrap_interval(np.mean, (values, values[:3]))


def test_a_cluster_bootstrap_resamples_whole_patients_and_is_as_wide_as_their_number_makes_it():
    """5 patients of 100 cells, each patient's cells all right or all wrong: every resample holds whole patients,
    so its accuracy is a multiple of 1/5, and the interval is far wider than the Wilson interval over 500 cells."""
    from smearnet.evaluation.cells import patient_accuracy_interval

    patients = np.repeat(np.arange(5), 100)
    correct = np.isin(patients, [0, 1, 2]).astype(float)
    low, high = bootstrap_interval(np.mean, (correct,), clusters=patients, n_resamples=400)
    assert {round(low * 5, 9) % 1, round(high * 5, 9) % 1} == {0.0}
    wilson_low, wilson_high = wilson_interval(300, 500)
    assert high - low > 3 * (wilson_high - wilson_low)
    same = bootstrap_interval(np.mean, (correct,), clusters=np.arange(500), n_resamples=400)  # one cell each
    assert same[1] - same[0] < 1.5 * (wilson_high - wilson_low)
    with pytest.raises(SmearnetError, match="clusters"):
        bootstrap_interval(np.mean, (correct,), clusters=patients[:10])
    y_true = np.zeros(500, dtype=int)
    summary = patient_accuracy_interval(y_true, 1 - correct.astype(int), patients, confidence=0.95, n_resamples=400)
    assert summary["value"] == 0.6 and summary["patients"] == 5 and (summary["low"], summary["high"]) == (low, high)


def test_a_paired_difference_is_b_minus_a_on_the_same_draws():
    """Two arms that err on the same 300 of 1,000 cells, b right on 20 more: each arm's own interval is about
    +-3 points wide and they overlap, but the paired difference's interval excludes zero. With clusters, whole
    patients are resampled, so the interval widens; equal arms give exactly zero."""
    rng = np.random.default_rng(0)
    a = np.ones(1000)
    a[rng.choice(1000, 300, replace=False)] = 0
    b = a.copy()
    b[np.flatnonzero(a == 0)[:20]] = 1
    difference = paired_difference(a, b, n_resamples=1000)
    assert difference["value"] == pytest.approx(0.02)
    assert 0.0 < difference["low"] < 0.02 < difference["high"] < 0.04
    a_low, a_high = wilson_interval(700, 1000)
    b_low, b_high = wilson_interval(720, 1000)
    assert a_high > b_low  # the separate intervals overlap
    patients = np.repeat(np.arange(10), 100)
    by_patient = paired_difference(a, b, clusters=patients, n_resamples=1000)
    assert by_patient["value"] == difference["value"]
    assert by_patient["high"] - by_patient["low"] > difference["high"] - difference["low"]
    assert paired_difference(a, a, clusters=patients, n_resamples=200) == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert paired_difference(b, a, n_resamples=1000)["value"] == pytest.approx(-0.02)


def test_macro_f1_by_patient_resamples_whole_patients():
    """5 patients of 60 cells, two of them all wrong: the cell evaluation's macro-F1 interval over patients is the
    statistic of whole-patient resamples, far wider than the one over cells, around the same macro-F1."""
    import pandas as pd

    from smearnet.evaluation.cells import cell_evaluation, patient_interval

    classes = ["a", "b", "c"]
    patients = np.repeat(np.arange(5), 60)
    y_true = np.tile(np.arange(3), 100)
    y_pred = np.where(patients < 3, y_true, (y_true + 1) % 3)
    cells = pd.DataFrame({"label": [classes[i] for i in y_true], "patient_id": [f"P{p}" for p in patients]})
    metrics = cell_evaluation(cells, np.eye(3)[y_pred], classes, "c", confidence=0.95, n_resamples=300)
    by_patient = metrics["macro_f1_by_patient"]
    assert by_patient["value"] == metrics["macro_f1"]["value"] == pytest.approx(0.6)
    assert by_patient["patients"] == 5 and by_patient["method"] == "percentile bootstrap over patients"
    assert by_patient["low"] <= 0.2 + 1e-6 and by_patient["high"] >= 1.0 - 1e-6  # resamples of 0 to 5 right patients
    over_cells = metrics["macro_f1"]["high"] - metrics["macro_f1"]["low"]
    assert by_patient["high"] - by_patient["low"] > 3 * over_cells
    # accuracy_by_patient is the same interval machinery with accuracy as the statistic
    accuracy = patient_interval(lambda t, p: float(np.mean(t == p)), y_true, y_pred, cells["patient_id"].to_numpy(),
                                confidence=0.95, n_resamples=300)
    assert metrics["accuracy_by_patient"] == accuracy


def test_cell_evaluation_reports_accuracy_at_a_class_mix_only_when_given_one():
    """A balanced test split (100 a class; class a recalled 90%, b and c perfectly) at a mix that is mostly a."""
    import pandas as pd

    from smearnet.evaluation.cells import cell_evaluation

    classes = ["a", "b", "c"]
    y_true = np.repeat(np.arange(3), 100)
    y_pred = y_true.copy()
    y_pred[:10] = 1
    cells = pd.DataFrame({"label": [classes[i] for i in y_true]})
    probabilities = np.eye(3)[y_pred]
    plain = cell_evaluation(cells, probabilities, classes, "c", confidence=0.95, n_resamples=50)
    assert "accuracy_at_class_mix" not in plain
    mixed = cell_evaluation(cells, probabilities, classes, "c", confidence=0.95, n_resamples=50,
                            class_mix={"a": 800, "b": 200})["accuracy_at_class_mix"]
    assert mixed["value"] == pytest.approx(0.8 * 0.9 + 0.2 * 1.0)  # c weighs 0: not named
    assert plain["accuracy"]["value"] == pytest.approx(290 / 300) and plain["accuracy"]["value"] > mixed["value"]
    assert mixed["low"] < mixed["value"] < mixed["high"] and mixed["mix"] == {"a": 800.0, "b": 200.0}
    with pytest.raises(SmearnetError, match="not classes of the model: \\['d'\\]"):
        cell_evaluation(cells, probabilities, classes, "c", confidence=0.95, n_resamples=50, class_mix={"d": 1})
    with pytest.raises(SmearnetError, match="no test cells"):
        cell_evaluation(cells[cells["label"] != "b"], probabilities[y_true != 1], classes, "c", confidence=0.95,
                        n_resamples=50, class_mix={"a": 1, "b": 1})


CLASSES = ["lymphocyte", "covid_rl", "neutrophil", "monocyte"]  # monocyte absent


def _one_hot(predicted: list[int], n_classes: int = len(CLASSES)) -> np.ndarray:
    return np.eye(n_classes)[predicted] * 0.7 + 0.3 / n_classes


def test_cell_metrics_three_present_classes_one_absent():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    predicted = [0, 0, 1, 1, 1, 2, 2, 0]
    metrics = cell_metrics(y_true, _one_hot(predicted), CLASSES, "covid_rl")

    assert metrics["n_cells"] == 8
    assert metrics["confusion_matrix"] == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert metrics["confusion_matrix_normalised"][0] == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])
    assert metrics["confusion_matrix_normalised"][1] == [0.0, 1.0, 0.0, 0.0]
    assert all(math.isnan(v) for v in metrics["confusion_matrix_normalised"][3])
    assert metrics["accuracy"]["value"] == 0.75
    assert metrics["accuracy"]["low"] == pytest.approx(wilson_interval(6, 8)[0])

    per_class = metrics["per_class"]
    assert per_class["lymphocyte"]["f1"] == pytest.approx(2 / 3, abs=1e-6)
    expected_covid = {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    expected_neutrophil = {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert per_class["covid_rl"] == pytest.approx(expected_covid, abs=1e-6)
    assert per_class["neutrophil"] == pytest.approx(expected_neutrophil, abs=1e-6)
    assert per_class["monocyte"]["support"] == 0
    assert all(math.isnan(per_class["monocyte"][key]) for key in ("precision", "recall", "f1"))
    # macro F1 averages the classes that occur: (2/3 + 0.8 + 0.8) / 3
    assert metrics["macro_f1"]["value"] == pytest.approx((2 / 3 + 1.6) / 3, abs=1e-6)
    assert metrics["macro_f1"]["low"] <= metrics["macro_f1"]["value"] <= metrics["macro_f1"]["high"]

    positive = metrics["positive"]
    assert positive["class"] == "covid_rl"
    assert positive["counts"] == {"tp": 2, "fp": 1, "tn": 5, "fn": 0}
    assert positive["sensitivity"]["value"] == 1.0
    assert positive["specificity"]["value"] == pytest.approx(5 / 6)
    json.dumps(json_safe(metrics), allow_nan=False)


def test_cell_metrics_class_predicted_but_absent_from_truth():
    y_true = np.array([0, 0, 1, 1])
    metrics = cell_metrics(y_true, _one_hot([0, 3, 1, 1]), CLASSES, "covid_rl")
    monocyte = metrics["per_class"]["monocyte"]
    assert monocyte["precision"] == 0.0 and monocyte["f1"] == 0.0 and math.isnan(monocyte["recall"])
    # F1: lymphocyte 2/3, covid_rl 1, monocyte 0 (neutrophil neither true nor predicted: left out)
    assert metrics["macro_f1"]["value"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3, abs=1e-6)


def test_cell_metrics_agrees_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 300)
    probabilities = rng.dirichlet(np.ones(4), 300)
    probabilities[np.arange(150), y_true[:150]] += 1.0  # half the cells predicted right
    metrics = cell_metrics(y_true, probabilities, CLASSES, "covid_rl", n_resamples=50)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, probabilities.argmax(1), labels=range(4))
    for index, name in enumerate(CLASSES):
        assert metrics["per_class"][name]["precision"] == pytest.approx(precision[index], abs=1e-6)
        assert metrics["per_class"][name]["recall"] == pytest.approx(recall[index], abs=1e-6)
        assert metrics["per_class"][name]["f1"] == pytest.approx(f1[index], abs=1e-6)
        assert metrics["per_class"][name]["support"] == support[index]
    assert metrics["macro_f1"]["value"] == pytest.approx(f1.mean(), abs=1e-6)


def test_cell_metrics_input_errors():
    with pytest.raises(SmearnetError, match="No cells"):
        cell_metrics(np.array([], dtype=int), np.zeros((0, 4)), CLASSES, "covid_rl")
    with pytest.raises(SmearnetError, match="shape"):
        cell_metrics(np.array([0, 1]), np.zeros((2, 3)), CLASSES, "covid_rl")
    with pytest.raises(SmearnetError, match="not one of"):
        cell_metrics(np.array([0, 1]), _one_hot([0, 1]), CLASSES, "blast")
    with pytest.raises(SmearnetError, match="class indices"):
        cell_metrics(np.array([0, 7]), _one_hot([0, 1]), CLASSES, "covid_rl")


def test_json_safe_replaces_non_finite_values():
    assert json_safe({"a": float("nan"), "b": [np.float64(1.5), float("inf")], "c": np.int64(3)}) == {
        "a": None,
        "b": [1.5, None],
        "c": 3,
    }


def test_evaluate_cells_draws_the_configured_bootstrap_resamples(tmp_path, monkeypatch):
    """`evaluation.bootstrap_resamples` reaches the macro-F1 interval (it used to be a fixed 500)."""
    from types import SimpleNamespace

    import pandas as pd

    from smearnet.evaluation import cells as cells_module

    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, 120)
    probabilities = rng.dirichlet(np.ones(4), 120)
    probabilities[np.arange(80), y_true[:80]] += 1.0
    monkeypatch.setattr(cells_module, "predict_probabilities", lambda *args, **kwargs: probabilities)
    model = SimpleNamespace(name="toy", classes=CLASSES)
    cells = pd.DataFrame({"path": [f"c{i}.png" for i in range(120)], "label": [CLASSES[i] for i in y_true],
                          "smear_id": [f"s{i}" for i in range(120)]})
    intervals = []
    for n_resamples in (20, 500):
        metrics, table = cells_module.evaluate_cells(model, cells, "covid_rl", batch_size=4, confidence=0.9,
                                                     n_resamples=n_resamples, out_dir=tmp_path)
        assert metrics["macro_f1"] == cell_metrics(y_true, probabilities, CLASSES, "covid_rl", 0.9,
                                                   n_resamples=n_resamples)["macro_f1"]
        intervals.append((metrics["macro_f1"]["low"], metrics["macro_f1"]["high"]))
    assert intervals[0] != intervals[1] and len(table) == 120 and (tmp_path / "confusion.png").is_file()


# --- per site -------------------------------------------------------------------------------------


def test_per_site_measures_each_site_and_nothing_for_one_site():
    sites = np.array(["b", "a", "b", "b"])
    assert per_site(sites, lambda rows: {"n": int(rows.sum()), "first": int(np.flatnonzero(rows)[0])}) == {
        "a": {"n": 1, "first": 1}, "b": {"n": 3, "first": 0}}  # sorted by site name
    assert per_site(np.array(["a", "a"]), lambda rows: {"n": 1}) == {}
    assert per_site(None, lambda rows: {"n": 1}) == {}


def _two_site_cells(sites):
    """40 cells, 4 patients; site `sites[i // 20]`; probabilities that get site a's cells right, b's 13 of 20."""
    import pandas as pd

    y_true = np.array([0, 1, 2, 3] * 10)
    probabilities = np.full((40, 4), 0.1)
    probabilities[np.arange(40), y_true] = 0.7
    probabilities[20:30, :] = [0.7, 0.1, 0.1, 0.1]  # half of the second site's cells called normal
    cells = pd.DataFrame({"label": [CLASSES[i] for i in y_true], "smear_id": [f"s{i // 10}" for i in range(40)],
                          "patient_id": [f"P{i // 10}" for i in range(40)], "site": [sites[i // 20] for i in range(40)],
                          "path": [f"c{i}.png" for i in range(40)]})
    return cells, y_true, probabilities


def test_cell_evaluation_reports_each_site_only_when_cells_span_sites(tmp_path, monkeypatch):
    """Through `evaluate_cells`, the function pipeline/evaluate.py calls: per_site in the metrics and per_site.md."""
    from types import SimpleNamespace

    from smearnet.evaluation import cells as cells_module

    model = SimpleNamespace(name="toy", classes=CLASSES)
    cells, y_true, probabilities = _two_site_cells(["hospital_a", "hospital_b"])
    monkeypatch.setattr(cells_module, "predict_probabilities", lambda *args, **kwargs: probabilities)
    metrics, _ = cells_module.evaluate_cells(model, cells, "covid_rl", batch_size=4, confidence=0.95,
                                             n_resamples=20, out_dir=tmp_path / "two")
    assert set(metrics["per_site"]) == {"hospital_a", "hospital_b"}
    b = metrics["per_site"]["hospital_b"]
    alone = cell_metrics(y_true[20:], probabilities[20:], CLASSES, "covid_rl", n_resamples=20)
    assert b["n_cells"] == 20 and b["n_patients"] == 2
    assert b["accuracy"] == alone["accuracy"] and b["macro_f1"] == alone["macro_f1"]
    assert b["positive"]["sensitivity"] == alone["positive"]["sensitivity"]
    assert b["positive"]["precision"] == alone["positive"]["precision"]
    assert metrics["per_site"]["hospital_a"]["accuracy"]["value"] == 1.0 and b["accuracy"]["value"] == 0.65
    assert metrics["n_cells"] == 40  # the overall figures are still every cell's
    report = (tmp_path / "two" / cells_module.SITES_REPORT).read_text()
    assert "| hospital_b | 20 | 2 | 0.650" in report and "P0" not in report  # counts only, no patient ids
    json.dumps(json_safe(metrics), allow_nan=False)

    one_site, _, _ = _two_site_cells(["hospital_a", "hospital_a"])
    metrics, _ = cells_module.evaluate_cells(model, one_site, "covid_rl", batch_size=4, confidence=0.95,
                                             n_resamples=20, out_dir=tmp_path / "one")
    assert "per_site" not in metrics and not (tmp_path / "one" / cells_module.SITES_REPORT).exists()
    no_column, _, _ = _two_site_cells(["x", "y"])
    assert "per_site" not in cells_module.cell_evaluation(no_column.drop(columns="site"), probabilities, CLASSES,
                                                          "covid_rl", confidence=0.95, n_resamples=20)


def test_mix_accuracy_weights_each_recall_and_keeps_a_perfect_class_uncertain():
    totals = {"ig": 150, "neutrophil": 150, "platelet": 150}
    correct = {"ig": 146, "neutrophil": 149, "platelet": 150}
    balanced = mix_accuracy(correct, totals, {"ig": 1, "neutrophil": 1, "platelet": 1})
    assert balanced["value"] == pytest.approx(445 / 450)
    skewed = mix_accuracy(correct, totals, {"ig": 0.8, "neutrophil": 0.1, "platelet": 0.1})
    assert skewed["value"] == pytest.approx(0.8 * 146 / 150 + 0.1 * 149 / 150 + 0.1)
    assert skewed["value"] < balanced["value"]  # the weakest class weighs more
    for result in (balanced, skewed):
        assert result["low"] < result["value"] < result["high"] <= 1.0
    perfect = mix_accuracy({"platelet": 150}, {"platelet": 150}, {"platelet": 1})
    assert perfect["value"] == 1.0 and 0.97 < perfect["low"] < 0.999  # 150 of 150 does not prove 100%
    wide = mix_accuracy({"a": 9, "b": 10}, {"a": 10, "b": 10}, {"a": 1, "b": 1})
    narrow = mix_accuracy({"a": 900, "b": 1000}, {"a": 1000, "b": 1000}, {"a": 1, "b": 1})
    assert narrow["high"] - narrow["low"] < (wide["high"] - wide["low"]) / 5  # 100x the cells
    with pytest.raises(SmearnetError, match="same classes"):
        mix_accuracy(correct, totals, {"ig": 1})
    with pytest.raises(SmearnetError, match="0 <= correct <= total"):
        mix_accuracy({"a": 11}, {"a": 10}, {"a": 1})
