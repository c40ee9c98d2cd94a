"""The cell threshold (smear.cell_threshold): chosen on validation cells only, carried by the rule, applied
everywhere the rule calls cells."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from smearnet.errors import SmearnetError
from smearnet.evaluation.calibration import calibrate_probabilities
from smearnet.smear import (CellSet, SmearRule, cell_calls, check_cell_threshold_setting, f1_cell_threshold,
                            load_rule, measure_rule, resolve_cell_threshold, save_rule, score_smears, smear_table)

CLASSES = ["normal", "classic_rl", "covid_rl"]
POSITIVE = "covid_rl"


def probabilities(p_covid):
    p = np.asarray(p_covid, dtype=float)
    return np.stack([1 - p - 0.01, np.full_like(p, 0.01), p], axis=1)


# --- the choice -------------------------------------------------------------------------------------


def test_f1_threshold_known_answers_and_ties_go_to_the_higher_threshold():
    # thresholds 0.9, 0.6, 0.4, 0.3: F1 2/3, 1/2, 4/5, 2/3 -> 0.4
    assert f1_cell_threshold([0.9, 0.6, 0.4, 0.3, 0.2, 0.1], [True, False, True, False, False, False]) == 0.4
    # 0.9 (1 of 2 positives, no false call) and 0.6 (2 of 2, two false calls) both have F1 2/3: the higher wins
    assert f1_cell_threshold([0.9, 0.8, 0.7, 0.6], [True, False, False, True]) == 0.9
    with pytest.raises(SmearnetError, match="needs positive validation cells"):
        f1_cell_threshold([0.9, 0.1], [False, False])


def test_the_cell_threshold_is_chosen_on_validation_cells_only():
    """Validation positives sit near 0.3 among negatives below 0.2; test positives near 0.8 among negatives up to
    0.6. The threshold is the validation optimum, whatever the test cells hold (even NaN)."""
    rng = np.random.default_rng(0)
    val_p = np.concatenate([rng.uniform(0.28, 0.34, 8), rng.uniform(0.01, 0.2, 92)])
    test_p = np.concatenate([rng.uniform(0.78, 0.85, 8), rng.uniform(0.3, 0.6, 92)])
    truth = np.array(([True] * 8 + [False] * 92) * 2)
    probability, is_val = np.concatenate([val_p, test_p]), np.arange(200) < 100
    chosen = resolve_cell_threshold("validation", probability, truth, validation=is_val)
    val_optimum, test_optimum = f1_cell_threshold(val_p, truth[:100]), f1_cell_threshold(test_p, truth[100:])
    assert chosen.threshold == val_optimum == val_p[:8].min() and test_optimum == test_p[:8].min()
    assert f1_cell_threshold(probability, truth) != val_optimum  # all cells together would choose otherwise
    poisoned = np.where(is_val, probability, np.nan)
    assert resolve_cell_threshold("validation", poisoned, truth, validation=is_val) == chosen

    validation = chosen.metrics()["cell_threshold"]["validation_cells"]
    assert validation["n_cells"] == 100 and validation["n_positive_cells"] == 8 and validation["f1"] == 1.0
    assert validation["sensitivity"]["value"] == 1.0 and validation["precision"]["value"] == 1.0
    assert chosen.metrics()["cell_threshold"]["value"] == val_optimum


def test_settings_argmax_and_a_number_and_bad_values():
    argmax = resolve_cell_threshold("argmax", [0.5], [True], validation=[True])
    assert argmax.threshold is None and argmax.metrics() == {}  # arg-max: metrics/aggregate.json does not change
    fixed = resolve_cell_threshold(0.2, [0.3, 0.1, 0.9], [True, False, False], validation=[True, True, False])
    assert fixed.threshold == 0.2 and fixed.metrics()["cell_threshold"]["validation_cells"]["counts"] == {
        "tp": 1, "fp": 0, "tn": 1, "fn": 0}
    for bad in ("best", 0, 1, 1.5, True, float("nan")):
        with pytest.raises(SmearnetError, match="smear.cell_threshold must be"):
            check_cell_threshold_setting(bad)
    with pytest.raises(SmearnetError, match="needs validation cells"):
        resolve_cell_threshold("validation", [0.3], [True], validation=[False])


# --- the rule carries it ---------------------------------------------------------------------------


def test_the_rule_carries_its_cell_threshold_through_json(tmp_path):
    rule = SmearRule(score="share_predicted_positive", positive_class=POSITIVE, threshold=0.02, temperature=0.8,
                     cell_threshold=0.2375, chosen_by="test", threshold_from="test")
    assert SmearRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    save_rule(rule, tmp_path)
    assert load_rule(tmp_path)[0].cell_threshold == 0.2375
    assert SmearRule.from_dict({"score": "score_share", "positive_class": POSITIVE}).cell_threshold is None
    assert "p >= 0.2375" in rule.describe()
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(SmearnetError, match="cell threshold must lie in"):
            SmearRule(score="score_share", positive_class=POSITIVE, cell_threshold=bad)


def test_share_scores_count_the_cells_at_or_above_the_calibrated_cell_threshold():
    p = probabilities([0.45, 0.32, 0.25, 0.05, 0.6, 0.02])  # 0.45: arg-max normal (0.54)
    ids = ["a"] * 4 + ["b"] * 2
    argmax = SmearRule(score="share_predicted_positive", positive_class=POSITIVE, threshold=0.25)
    at_threshold = SmearRule(score="share_predicted_positive", positive_class=POSITIVE, threshold=0.25,
                             cell_threshold=0.3)
    by_argmax = argmax.classify(ids, p, CLASSES)[0].set_index("smear_id")
    by_threshold = at_threshold.classify(ids, p, CLASSES)[0].set_index("smear_id")
    assert by_argmax.loc["a", "n_predicted_positive"] == 0 and by_argmax.loc["b", "n_predicted_positive"] == 1
    assert by_threshold.loc["a", "n_predicted_positive"] == 2 and by_threshold.loc["a", "score"] == 0.5
    assert by_threshold.loc["a", "call"] == "positive" and by_argmax.loc["a", "call"] == "negative"
    assert by_threshold.loc["a", "score_share"] == 0.5  # the p >= 0.5 score moves to the cell threshold too

    warm = SmearRule(score="share_predicted_positive", positive_class=POSITIVE, threshold=0.25, temperature=3.0,
                     cell_threshold=0.3)  # the threshold applies to calibrated probabilities
    calibrated = calibrate_probabilities(p, 3.0)[:, 2]
    table = warm.classify(ids, p, CLASSES)[0].set_index("smear_id")
    assert table.loc["a", "n_predicted_positive"] == int((calibrated[:4] >= 0.3).sum())

    cells = pd.DataFrame({"smear_id": ids, "label": "normal", "predicted": "normal", "prob_covid_rl": p[:, 2]})
    assert smear_table(cells, POSITIVE, cell_threshold=0.3)["n_predicted_positive"].tolist() == [2, 1]


def test_cell_calls_and_the_served_per_cell_class_follow_the_cell_threshold():
    from smearnet.smear.calls import call_cells

    p = probabilities([0.6, 0.35, 0.05, np.nan])
    assert cell_calls(p, CLASSES, POSITIVE).tolist() == ["covid_rl", "normal", "normal", ""]
    assert cell_calls(p, CLASSES, POSITIVE, 0.7).tolist() == ["normal", "normal", "normal", ""]  # 0.6 < 0.7
    assert cell_calls(p, CLASSES, POSITIVE, 0.3).tolist() == ["covid_rl", "covid_rl", "normal", ""]

    rule = SmearRule(score="share_predicted_positive", positive_class=POSITIVE, threshold=0.5, cell_threshold=0.3)
    cells, smears = call_cells(rule, None, CLASSES, ["a"] * 4, p, errors=["", "", "", "undecodable"])
    assert cells["predicted"].tolist() == ["covid_rl", "covid_rl", "normal", ""]
    assert smears.loc[0, "n_predicted_positive"] == 2 and smears.loc[0, "call"] == "positive"  # 2 of 3 decoded cells
    argmax_cells, _ = call_cells(SmearRule(score="share_predicted_positive", positive_class=POSITIVE, threshold=0.5),
                                 None, CLASSES, ["a"] * 4, p)
    assert argmax_cells["predicted"].tolist() == ["covid_rl", "normal", "normal", ""]


def test_the_served_probabilities_are_the_calibrated_ones_each_call_is_made_by():
    from smearnet.smear.calls import call_cells

    p = probabilities([0.6, 0.35, 0.3, 0.05])
    rule = SmearRule(score="share_predicted_positive", positive_class=POSITIVE, threshold=0.5, cell_threshold=0.33,
                     temperature=2.0)
    cells, _ = call_cells(rule, None, CLASSES, ["a"] * 4, p)
    served = cells[[f"prob_{name}" for name in CLASSES]].to_numpy()
    np.testing.assert_allclose(served, rule.calibrated(p), rtol=1e-6)
    assert not np.allclose(served, p)  # T = 2 flattens them: the raw engine output is not what is served
    called = (cells["predicted"] == POSITIVE).to_numpy()
    assert called.tolist() == (cells[f"prob_{POSITIVE}"] >= 0.33).tolist() and 0 < called.sum() < 4


def test_development_smears_are_scored_at_the_cell_threshold():
    cells = pd.DataFrame({"smear_id": ["s1"] * 3 + ["s2"] * 3, "patient_id": ["p1"] * 3 + ["p2"] * 3,
                          "label": ["covid_rl", "normal", "normal"] + ["normal"] * 3,
                          "predicted": ["normal"] * 6, "prob_covid_rl": [0.4, 0.1, 0.05, 0.2, 0.1, 0.05]})
    cell_set = CellSet(cells, np.zeros((6, 2)))
    bags = [np.arange(3), np.arange(3, 6)]
    argmax = score_smears(cell_set, ["s1", "s2"], bags, POSITIVE, None)
    at_threshold = score_smears(cell_set, ["s1", "s2"], bags, POSITIVE, None, cell_threshold=0.15)
    assert argmax["n_predicted_positive"].tolist() == [0, 0]
    assert at_threshold["n_predicted_positive"].tolist() == [1, 1]


# --- the smear stage reports the cell calls --------------------------------------------------------------------


def evaluation_cells(composed: bool) -> pd.DataFrame:
    """8 smears of 4 cells; the positive cell of each positive smear at p 0.35 (never the arg-max)."""
    rows = []
    for index in range(8):
        for j in range(4):
            positive = index % 2 == 0 and j == 0
            value = 0.35 if positive else 0.02 + 0.01 * j
            rows.append({"smear_id": f"s{index}", "label": "covid_rl" if positive else "normal",
                         "prob_normal": 0.99 - value, "prob_classic_rl": 0.01, "prob_covid_rl": value,
                         **({"part": index // 4, "cell_index": (index % 2) * 4 + j} if composed else {})})
    return pd.DataFrame(rows)


def test_the_smear_stage_reports_positive_cell_calls_at_the_cell_threshold_only_when_the_rule_has_one():
    rule = SmearRule(score="share_predicted_positive", positive_class=POSITIVE, threshold=0.2, cell_threshold=0.3,
                     threshold_from="development")
    cells = measure_rule(rule, evaluation_cells(composed=False), CLASSES, selection="development",
                         n_resamples=20).result["positive_cells"]
    assert cells["cell_threshold"] == 0.3
    assert cells["at_cell_threshold"]["n_cells"] == 32 and cells["at_cell_threshold"]["n_positive_cells"] == 4
    assert cells["at_cell_threshold"]["sensitivity"]["value"] == 1.0
    assert cells["at_cell_threshold"]["precision"]["value"] == 1.0
    assert cells["at_argmax"]["sensitivity"]["value"] == 0.0 and math.isnan(cells["at_argmax"]["precision"]["value"])

    composed = measure_rule(rule, evaluation_cells(composed=True), CLASSES, selection="development",
                            n_resamples=20).result["positive_cells"]
    assert composed["at_cell_threshold"]["n_cells"] == 8  # composed smears reuse cells: each is judged once
    argmax = SmearRule(score="share_predicted_positive", positive_class=POSITIVE, threshold=0.2,
                       threshold_from="development")
    assert "positive_cells" not in measure_rule(argmax, evaluation_cells(composed=False), CLASSES,
                                                selection="development", n_resamples=20).result


def test_composed_smears_report_how_often_the_blind_smears_reuse_each_cell():
    rule = SmearRule(score="share_predicted_positive", positive_class=POSITIVE, threshold=0.2,
                     threshold_from="development")
    composed = measure_rule(rule, evaluation_cells(composed=True), CLASSES, selection="development",
                            n_resamples=20).result["composed_cell_reuse"]
    # 8 smears of 4 cells drawn from 8 distinct cells: every smear is blind under a development threshold.
    assert (composed["blind_smears"], composed["distinct_cells"], composed["cell_draws"]) == (8, 8, 32)
    assert composed["mean_draws_per_cell"] == 4.0 and composed["max_draws_per_cell"] == 4
    assert "not independent" in composed["note"]
    held_out = measure_rule(rule, evaluation_cells(composed=True), CLASSES, selection="held_out",
                            n_resamples=20).result["composed_cell_reuse"]
    assert held_out["blind_smears"] == 4 and held_out["cell_draws"] == 16  # the blind half only
    assert "composed_cell_reuse" not in measure_rule(rule, evaluation_cells(composed=False), CLASSES,
                                                     selection="development", n_resamples=20).result
